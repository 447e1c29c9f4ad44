"""PNG gallery of the mask generators: random, block and the four ColorMAE colours, per grid size.

One row per generator and grid (white = visible, black = masked), then one row of raw noise
maps (the first bank entry of each colour, and the white noise they all filter).

    python tools/visualize_masks.py                              # runs/masks.png, ratio 0.75
    python tools/visualize_masks.py --mask-ratio 0.4 --grids 14x14 --out runs/masks_040.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torchvision.utils import make_grid

from mim.masking import BlockMask, ColorNoiseMask, RandomMask
from mim.masking.color_noise import COLORS

TILE = 112  # pixels per tile side
LABEL_WIDTH = 150


def to_tile(image_hw: torch.Tensor) -> torch.Tensor:
    """``(h, w)`` values in [0, 1] -> ``(3, TILE, TILE)`` nearest-neighbour upscale."""
    return F.interpolate(image_hw[None, None].float(), size=(TILE, TILE), mode="nearest")[0].expand(3, -1, -1)


def normalise(image: torch.Tensor) -> torch.Tensor:
    return (image - image.min()) / (image.max() - image.min()).clamp_min(1e-12)


def gallery(mask_ratio: float, grids: list[tuple[int, int]], samples: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """All tiles as one ``(N, 3, TILE, TILE)`` tensor, ``samples`` per row, and the row labels."""
    generators = {"random": RandomMask(mask_ratio), "block": BlockMask(mask_ratio)}
    generators.update({color: ColorNoiseMask(mask_ratio, color=color, seed=seed) for color in COLORS})
    tiles, labels = [], []
    for h, w in grids:
        for name, gen in generators.items():
            masks = gen(samples, (h, w), torch.Generator().manual_seed(seed)).view(samples, h, w)
            tiles += [to_tile(1.0 - m.float()) for m in masks]
            labels.append(f"{name} {h}x{w}")
    noise = [generators[color].bank()[0] for color in COLORS]
    bank_shape = generators[COLORS[0]].bank().shape  # the white noise that every bank filters
    noise.append(torch.randn(*bank_shape, generator=torch.Generator().manual_seed(seed))[0])
    row = [to_tile(normalise(n)) for n in noise][:samples]
    tiles += row + [torch.ones(3, TILE, TILE)] * (samples - len(row))
    labels.append("noise: " + " ".join(c[0].upper() for c in [*COLORS, "white"][: len(row)]))
    return torch.stack(tiles), labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/masks.png", help="PNG path (default runs/masks.png)")
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--grids", nargs="+", default=["14x14", "8x8"], help="grids as HxW")
    parser.add_argument("--samples", type=int, default=8, help="masks per row")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    grids = [tuple(int(v) for v in g.lower().split("x")) for g in args.grids]
    tiles, labels = gallery(args.mask_ratio, grids, args.samples, args.seed)
    pad = 4
    grid = make_grid(tiles, nrow=args.samples, padding=pad, pad_value=0.5)
    canvas = Image.new("RGB", (grid.shape[2] + LABEL_WIDTH, grid.shape[1]), "white")
    canvas.paste(Image.fromarray(grid.mul(255).round().byte().permute(1, 2, 0).numpy()), (LABEL_WIDTH, 0))
    draw = ImageDraw.Draw(canvas)
    for i, label in enumerate(labels):
        draw.text((6, pad + i * (TILE + pad) + TILE // 2 - 6), label, fill="black")
    draw.text((6, 6), f"mask_ratio={args.mask_ratio}", fill="black")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    print(f"wrote {out} ({len(labels)} rows: {', '.join(labels)})")


if __name__ == "__main__":
    main()
