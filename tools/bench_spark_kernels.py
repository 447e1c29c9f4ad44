"""SparK's CPU kernels against ATen's, per layer: the encoder's convolutions at the active sites only, and the UNet
decoder's weight gradient as shifted-row GEMMs.

``--table encoder``: every convolution shape of timm's ResNet-18 in SparK's encoder (stem, the 3x3 convolutions of
the four stages, the stride-2 3x3 and 1x1 of the downsampling blocks), at 224 px (batch 16) and 64 px (batch 128),
on ``channels_last`` maps zero outside the active sites of a random mask with ``--mask-ratio`` of the stride-32
cells masked per image (as SparK samples them):

- ``dense``: ATen's ``F.conv2d`` times the output mask, the official computation;
- ``per-tap``: the same with the per-tap weight gradient of :mod:`mim.backbones.tap_conv` on maps of up to 4x4,
  what mim's encoder ran before (the same as ``dense`` on larger maps);
- ``active``: ``mim.backbones.active_conv.active_conv2d`` (index built once per mask, outside the timing, as the
  encoder builds it once per forward and shape).

Forward without autograd, and forward + backward with the input and weight gradients (the stem's input needs none).

``--table decoder``: the weight gradient of the UNet decoder's stride-1 3x3 convolutions (width 384: densify
projections and the blocks' two convolutions) on dense ``channels_last`` maps, ATen's (oneDNN) against
``mim.backbones.tap_conv.shifted_weight_grad``, interleaved; the medians and the median of the per-round ratios.

Prints markdown tables of medians over ``--repeats`` after ``--warmup`` (milliseconds)::

    python tools/bench_spark_kernels.py                      # both tables, mask ratio 0.6
    python tools/bench_spark_kernels.py --table encoder --mask-ratio 0   # every site active: where the GEMMs lose
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mim.backbones import active_conv, tap_conv  # noqa: E402
from mim.backbones.sparse import upsample_active  # noqa: E402

# (name, in channels, out channels, kernel, stride, padding, input side at 224 px, how many ResNet-18 has)
LAYERS = [
    ("stem 7x7/2", 3, 64, 7, 2, 3, 224, 1),
    ("stage 1 3x3", 64, 64, 3, 1, 1, 56, 4),
    ("stage 2 3x3/2", 64, 128, 3, 2, 1, 56, 1),
    ("stage 2 1x1/2", 64, 128, 1, 2, 0, 56, 1),
    ("stage 2 3x3", 128, 128, 3, 1, 1, 28, 3),
    ("stage 3 3x3/2", 128, 256, 3, 2, 1, 28, 1),
    ("stage 3 1x1/2", 128, 256, 1, 2, 0, 28, 1),
    ("stage 3 3x3", 256, 256, 3, 1, 1, 14, 3),
    ("stage 4 3x3/2", 256, 512, 3, 2, 1, 14, 1),
    ("stage 4 1x1/2", 256, 512, 1, 2, 0, 14, 1),
    ("stage 4 3x3", 512, 512, 3, 1, 1, 7, 3),
]
BATCH = {224: 16, 64: 128}


def median_ms(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def sample_active(batch: int, grid: int, mask_ratio: float, gen: torch.Generator) -> torch.Tensor:
    """``(batch, 1, grid, grid)`` bool, ``round(mask_ratio * grid**2)`` cells masked per image."""
    masked = round(mask_ratio * grid * grid)
    order = torch.rand(batch, grid * grid, generator=gen).argsort(dim=1)
    return (order >= masked).view(batch, 1, grid, grid)


def bench_layer(layer: tuple, size: int, mask_ratio: float, warmup: int, repeats: int) -> dict:
    name, c_in, c_out, k, s, p, side224, _ = layer
    side, batch = side224 * size // 224, BATCH[size]
    gen = torch.Generator().manual_seed(0)
    active = sample_active(batch, size // 32, mask_ratio, gen)
    cl = torch.channels_last
    x = (torch.randn(batch, c_in, side, side, generator=gen) * upsample_active(active, (side, side)))
    x = x.contiguous(memory_format=cl).requires_grad_(c_in != 3)
    w = torch.randn(c_out, c_in, k, k, generator=gen).contiguous(memory_format=cl).requires_grad_()
    out_side = (side + 2 * p - k) // s + 1
    sites = upsample_active(active, (out_side, out_side))
    mask = sites.float()
    index = active_conv.site_index(sites, (side, side), (k, k), (s, s), (p, p), (1, 1), c_in)
    grad = torch.randn(batch, c_out, out_side, out_side, generator=gen).contiguous(memory_format=cl)

    def dense() -> torch.Tensor:
        return F.conv2d(x, w, None, s, p) * mask

    def per_tap() -> torch.Tensor:
        return tap_conv.conv2d(x, w, None, s, p) * mask

    def at_active_sites() -> torch.Tensor:
        return active_conv.active_conv2d(x, w, None, index)

    row = {"layer": name, "map": f"{batch}x{c_in}x{side}x{side}", "active": f"{index.fraction:.2f}"}
    for key, fn in [("dense", dense), ("per-tap", per_tap), ("active", at_active_sites)]:
        if key != "per-tap":  # the same forward as dense
            with torch.no_grad():
                row[f"{key} fwd"] = median_ms(fn, warmup, repeats)
        row[f"{key} fwd+bwd"] = median_ms(lambda fn=fn: fn().backward(grad), warmup, repeats)
    return row


# (in channels, out channels, map side, batch) of the UNet's stride-1 3x3 convolutions, width 384
DECODER = [
    (384, 384, 14, 16), (384, 192, 14, 16), (256, 192, 14, 16),
    (192, 192, 28, 16), (192, 96, 28, 16), (128, 96, 28, 16),
    (96, 96, 56, 16), (96, 48, 56, 16), (64, 48, 56, 16),
    (48, 48, 112, 16), (24, 24, 224, 16),
    (384, 384, 4, 128), (192, 192, 8, 128), (96, 96, 16, 128), (96, 48, 16, 128), (48, 48, 32, 128),
]  # fmt: skip


def decoder_table(warmup: int, repeats: int) -> None:
    print("| input | conv | map | shifted rows taken | ATen (oneDNN) | shifted rows | paired ratio |")
    print("|---|---|---|---|---:|---:|---:|")
    for c_in, c_out, side, batch in DECODER:
        gen = torch.Generator().manual_seed(0)
        cl = torch.channels_last
        x = torch.randn(batch, c_in, side, side, generator=gen).contiguous(memory_format=cl)
        w = torch.randn(c_out, c_in, 3, 3, generator=gen).contiguous(memory_format=cl)
        dy = torch.randn(batch, c_out, side, side, generator=gen).contiguous(memory_format=cl)

        def aten() -> torch.Tensor:
            mask = [False, True, False]
            return torch.ops.aten.convolution_backward(dy, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask)

        def shifted() -> torch.Tensor:
            return tap_conv.shifted_weight_grad(dy, x, (3, 3), (1, 1), (1, 1))

        for fn in (aten, shifted):
            for _ in range(warmup):
                fn()
        a, b = [], []
        for _ in range(repeats):
            a.append(median_ms(aten, 0, 1))
            b.append(median_ms(shifted, 0, 1))
        taken = tap_conv._shifts(x, (1, 1), side * side, False)
        print(f"| {'224' if batch == 16 else '64'} px | {c_in} -> {c_out} | {batch}x{c_in}x{side}x{side} | "
              f"{'yes' if taken else 'no'} | {statistics.median(a):.1f} | {statistics.median(b):.1f} | "
              f"{statistics.median(y / z for z, y in zip(a, b)):.2f}x |", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--table", choices=["encoder", "decoder", "both"], default="both")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 64], choices=sorted(BATCH))
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(f"fp32, CPU, {torch.get_num_threads()} threads, mask ratio {args.mask_ratio}; "
          f"median of {args.repeats} after {args.warmup} warm-up, ms")  # fmt: skip
    if args.table != "encoder":
        decoder_table(args.warmup, args.repeats)
    if args.table == "decoder":
        return
    print("| input | layer (count) | map | active | dense fwd | active fwd | dense fwd+bwd | per-tap fwd+bwd | "
          "active fwd+bwd | active / dense | active / per-tap |")  # fmt: skip
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    keys = ["dense fwd", "active fwd", "dense fwd+bwd", "per-tap fwd+bwd", "active fwd+bwd"]
    for size in args.sizes:
        total = dict.fromkeys(keys, 0.0)
        for layer in LAYERS:
            r = bench_layer(layer, size, args.mask_ratio, args.warmup, args.repeats)
            for key in total:
                total[key] += layer[-1] * r[key]
            cells = " | ".join(f"{r[key]:.1f}" for key in keys)
            print(f"| {size} px | {r['layer']} ({layer[-1]}) | {r['map']} | {r['active']} | {cells} | "
                  f"{r['active fwd+bwd'] / r['dense fwd+bwd']:.2f}x | "
                  f"{r['active fwd+bwd'] / r['per-tap fwd+bwd']:.2f}x |", flush=True)  # fmt: skip
        cells = " | ".join(f"{total[key]:.0f}" for key in keys)
        print(f"| {size} px | **all 20, weighted by count** | | | {cells} | "
              f"**{total['active fwd+bwd'] / total['dense fwd+bwd']:.2f}x** | "
              f"**{total['active fwd+bwd'] / total['per-tap fwd+bwd']:.2f}x** |", flush=True)  # fmt: skip

if __name__ == "__main__":
    main()
