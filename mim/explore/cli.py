"""``mim-explore``: build the latent explorer site (:func:`mim.explore.build.build_site`) from the command line.

::

    mim-explore --sae runs/sae/.../sae.safetensors --store runs/features/vit_tiny_cifar10_val --out runs/explore
    mim-explore --sae ... --store ... --cache runs/latent_cache/topk_vit_tiny_cifar10_val --out runs/explore

Open ``runs/explore/index.html`` in a browser (or ``python -m http.server -d runs/explore``). Errors a user can
fix print one line ``mim: error: ...`` and exit with status 2 (``MIM_TRACEBACK=1`` shows the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys

from mim.errors import UserError


def parser() -> argparse.ArgumentParser:
    """The argument parser of ``mim-explore``."""
    p = argparse.ArgumentParser(prog="mim-explore", description="Write a static web site to browse an SAE's "
                                "latents and images (open index.html from the folder; no server needed).")
    p.add_argument("--sae", required=True, help="saved SAE (sae.safetensors of mim fit -c configs/sae/...)")
    p.add_argument("--store", required=True, help="feature store with patch tokens (usually the val split)")
    p.add_argument("--out", required=True, help="site folder (created; an earlier site there is replaced)")
    p.add_argument("--cache", default=None, help="latent cache of this SAE and store (mim predict -c "
                   "configs/sae/latent_cache_*.yaml); default: encode the store here")
    p.add_argument("--cache-out", default=None, help="keep the cache encoded here in this folder (reused next time)")
    p.add_argument("--data-root", default=None, help="data root of the store's dataset (default $MIM_DATA)")
    p.add_argument("--k", type=int, default=32, help="top images per latent (default 32)")
    p.add_argument("--neighbours", type=int, default=8, help="nearest latents by decoder cosine (default 8)")
    p.add_argument("--dense", type=float, default=0.1, help="frequency above which a latent is flagged dense")
    p.add_argument("--thumb", type=int, default=96, help="largest thumbnail side in pixels (default 96)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch when encoding the store")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    return p


def main(argv: list[str] | None = None) -> None:
    """Console script ``mim-explore``."""
    args = parser().parse_args(argv)
    from mim.explore.build import build_site  # after parsing: --help stays fast

    log = None if args.quiet else (lambda line: print(f"mim-explore: {line}", file=sys.stderr, flush=True))
    try:
        build_site(args.sae, args.store, args.out, cache=args.cache, cache_out=args.cache_out,
                   data_root=args.data_root, k=args.k, neighbours=args.neighbours, dense=args.dense,
                   thumb=args.thumb, batch_size=args.batch_size, log=log)
    except UserError as err:
        if os.environ.get("MIM_TRACEBACK"):
            raise
        message = " ".join(str(err).split())
        print(f"mim: error: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
