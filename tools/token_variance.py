"""Where a ViT encoder's token variance lives: in the position, in the image, or in the patch.

For the patch tokens ``t[i, p]`` (image ``i`` of ``N``, position ``p`` of ``L``) of a block's output, the total
sum of squares about the grand mean ``m`` splits into (a two-way ANOVA without replication)::

    position share = N * sum_p ||mean_i t[i, p] - m||^2 / total   # the same at every image: position only
    image share    = L * sum_i ||mean_p t[i, p] - m||^2 / total   # the same at every position: one vector per image
    patch share    = 1 - position share - image share             # what tells a patch from its neighbours

and the cls features (the final norm's output, what the probes read) have a participation ratio
``(sum lambda)^2 / sum lambda^2`` over the eigenvalues ``lambda`` of their covariance: how many directions they
span (1 to ``D``). Block outputs come from timm's ``forward_intermediates``; the last row is after the final norm.

A random-init ViT with CAE's embedding init is position-dominated (its patch embedding, trunc-normal 0.02 cut at
+-0.02 on 4x4x3 inputs, is small next to the sin-cos table); MIM training moves the variance into the image and
patch parts. docs/results.md compares the quick runs' encoders with it.

    python tools/token_variance.py runs/mae/lightning_logs/version_0/encoder.safetensors \\
        runs/cae/lightning_logs/version_0/encoder.safetensors
    python tools/token_variance.py timm:vit_tiny_patch16_224 --model-kwargs '{"img_size": 32, "patch_size": 4}'
"""

from __future__ import annotations

import argparse
import json

import torch

from mim.data import ImageDataModule
from mim.eval import load_encoder_from


def variance_shares(tokens: torch.Tensor) -> tuple[float, float]:
    """``(N, L, D)`` patch tokens -> (position share, image share) of their total sum of squares, float64."""
    t = tokens.double()
    grand = t.mean((0, 1))
    total = (t - grand).square().sum()
    position = t.shape[0] * (t.mean(0) - grand).square().sum()
    image = t.shape[1] * (t.mean(1) - grand).square().sum()
    return (position / total).item(), (image / total).item()


def participation_ratio(features: torch.Tensor) -> float:
    """``(N, D)`` features -> ``(sum lambda)^2 / sum lambda^2`` of their covariance's eigenvalues, in ``[1, D]``."""
    centred = features.double() - features.double().mean(0)
    eig = torch.linalg.svdvals(centred).square()
    return (eig.sum().square() / eig.square().sum()).item()


@torch.no_grad()
def token_stats(encoder: torch.nn.Module, imgs: torch.Tensor) -> dict[str, list[float] | float]:
    """Per-block position and image shares (last block after the final norm) and the cls participation ratio.

    Args:
        encoder: a timm ``VisionTransformer`` with a cls token.
        imgs: ``(N, 3, H, W)`` normalised images.

    Returns:
        ``{"position": [per block], "image": [per block], "cls_pr": float}``.
    """
    final, blocks = encoder.forward_intermediates(imgs, return_prefix_tokens=False, output_fmt="NLC")
    prefix = encoder.num_prefix_tokens
    outputs = [*blocks[:-1], final[:, prefix:]]
    shares = [variance_shares(t) for t in outputs]
    return {"position": [s[0] for s in shares], "image": [s[1] for s in shares],
            "cls_pr": participation_ratio(final[:, 0])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("encoders", nargs="+", help="encoder.safetensors / .json / mim .ckpt / timm:<name>")
    parser.add_argument("--model-kwargs", default="{}", help="JSON kwargs for timm:<name> sources")
    parser.add_argument("--root", default=None, help="dataset root (default: MIM_DATA / the usual places)")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--images-per-class", type=int, default=50, help="test images per class")
    args = parser.parse_args()
    dm = ImageDataModule(root=args.root, img_size=args.img_size, batch_size=args.images_per_class, num_workers=0,
                         limit_per_class=1, val_limit_per_class=args.images_per_class, train_augment=False)
    dm.setup("fit")
    imgs = torch.cat([batch[0] for batch in dm.val_dataloader()])
    print(f"{len(imgs)} test images; shares of the patch tokens' variance at blocks 1 / L/2 / L "
          "(L after the final norm)")
    print("| encoder | position share | image share | patch share | cls participation ratio |\n|---|---|---|---|---:|")
    for source in args.encoders:
        kwargs = json.loads(args.model_kwargs) if source.startswith("timm:") else None
        stats = token_stats(load_encoder_from(source, model_kwargs=kwargs)[0].eval(), imgs)
        at = [0, len(stats["position"]) // 2 - 1, -1]
        pos, img = ([stats[k][i] for i in at] for k in ("position", "image"))
        cols = [" / ".join(f"{v:.2f}" for v in vals) for vals in (pos, img, [1 - p - i for p, i in zip(pos, img)])]
        print(f"| {source} | {' | '.join(cols)} | {stats['cls_pr']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
