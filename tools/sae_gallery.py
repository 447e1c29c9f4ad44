"""Pictures of what SAE latents respond to: per latent a grid of its top-activating images with the
patch heatmap over them, a latent-frequency histogram, a per-class activation table and an index.html.

    python tools/sae_gallery.py --sae runs/sae/topk/sae.safetensors --store runs/features/cifar10_train \\
        --data-root ../shared/data --out runs/gallery                      # the 16 most frequent latents
    python tools/sae_gallery.py ... --select selective --n-latents 32      # the most class-selective ones
    python tools/sae_gallery.py ... --latents 3 17 42 --top 25             # chosen latents, 25 images each
    python tools/sae_gallery.py --cache runs/latent_cache/topk_val --store runs/features/cifar10_val \
        --data-root ../shared/data --out runs/gallery                      # from a latent cache: no encoding

A latent cache (``mim predict -c configs/sae/latent_cache_vit_tiny_cifar10.yaml``, ``mim/sae/cache.py``) gives the
same pictures without encoding the store again; with ``--sae`` too, the cache is checked against that SAE.

Definitions (frequency, image score, selectivity, heatmap): ``mim/sae/viz.py``. Needs matplotlib
(``pip install 'mim-lightning[viz]'``). Prints the paths written.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from mim.errors import UserError
from mim.features.store import FeatureStore
from mim.sae.cache import LatentCache
from mim.sae.models import load_sae
from mim.sae.viz import (
    MIN_COUNT,
    SELECT_MODES,
    latent_activations,
    store_dataset,
    write_gallery,
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sae", default=None, help="saved SAE (.safetensors or .json of save_sae); "
                        "needed unless --cache is given")
    parser.add_argument("--cache", default=None, help="latent cache folder of the SAE on --store (mim predict with "
                        "LatentCacheWriter): read top images and heatmaps from it instead of encoding")
    parser.add_argument("--store", required=True, help="feature store folder (same encoder and layer as the SAE)")
    parser.add_argument("--data-root", default=None, help="data root of the store's dataset (default $MIM_DATA)")
    parser.add_argument("--out", default="runs/gallery", help="output folder (default runs/gallery)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--latents", type=int, nargs="+", help="latent ids to draw")
    which.add_argument("--select", choices=SELECT_MODES, default="frequent",
                       help="pick latents by firing frequency or class selectivity (default frequent)")
    parser.add_argument("--n-latents", type=int, default=16, help="latents picked by --select (default 16)")
    parser.add_argument("--top", type=int, default=16, help="top images per latent (default 16)")
    parser.add_argument("--tokens", choices=("patch", "cls", "mean"), default=None,
                        help="token kind (default patch when the store has it, else cls)")
    parser.add_argument("--min-count", type=int, default=MIN_COUNT,
                        help=f"fewest active tokens for --select selective (default {MIN_COUNT})")
    parser.add_argument("--batch-size", type=int, default=4096, help="tokens per encode (default 4096)")
    parser.add_argument("--device", default="cpu", help="device for the SAE (default cpu)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Run the tool on ``argv`` (default ``sys.argv[1:]``); returns the paths written (also printed)."""
    args = parse_args(argv)
    if args.sae is None and args.cache is None:
        raise UserError("sae_gallery needs --sae or --cache. Fix: pass the saved SAE, or its latent cache.")
    sae = load_sae(args.sae, map_location=args.device) if args.sae else None
    cache = LatentCache(args.cache) if args.cache else None
    store = FeatureStore(args.store)
    tokens = args.tokens or (cache.tokens if cache else "patch" if "patch" in store.tokens else "cls")
    dataset = store_dataset(store.metadata, args.data_root)  # before the pass: a wrong root fails fast
    acts = latent_activations(
        sae, store, tokens=tokens, batch_size=args.batch_size, n_top=args.top,
        latents=args.latents if args.latents else args.select, n_latents=args.n_latents,
        min_count=args.min_count, num_classes=len(dataset.dataset.classes), cache=cache,
    )
    name = Path(args.sae).name if args.sae else Path(cache.metadata.get("sae_file") or args.cache).name
    title = f"SAE {name} ({acts.d_sae} latents) on {store.path.name} ({tokens} tokens)"
    paths = write_gallery(acts, dataset, args.out, title=title)
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    try:
        main()
    except UserError as err:
        sys.exit(f"error: {err}")
