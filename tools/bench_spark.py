"""SparK encoder speed and memory: dense supervised pass vs SparK ``masked`` vs SparK ``spconv``.

For ResNet-18 on real CIFAR-10 images, per training step (forward + backward, no optimiser):

- ``dense``: the plain supervised pass of the same timm model (``forward`` + cross-entropy);
- ``masked`` / ``spconv``: SparK's sparse encoder on the visible cells (4 feature maps, a loss on
  them), the backend comparison; plus the whole SparK step (encoder + densify + UNet decoder +
  masked-patch loss) in its own column.

Sizes: CIFAR's 32 px images upsampled to 64 px as ``configs/spark/*`` do (SparK masks the
stride-32 grid: a 32 px input has a single cell, nothing to mask; the 32 px dense pass is printed
for reference), and 224 px. spconv runs its convolutions on one thread whatever the process uses
(its CPU kernels are wrong on more: ``mim.backbones.spconv_backend``), so it is timed with the
process at 1 thread and at ``--threads``. Each row runs in its own subprocess (peak memory: CUDA
``max_memory_allocated``; CPU peak RSS above the size before the model was built). Prints a
markdown table of medians over ``--repeats`` timed steps after ``--warmup``.

    python tools/bench_spark.py                                   # CPU, fp32, the full grid
    python tools/bench_spark.py --sizes 224 --ratios 0.6          # one size, one ratio
    python tools/bench_spark.py --device cuda --precision bf16    # GPU (spconv-cu126 wheel)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
BATCH = {32: 128, 64: 128, 224: 16}


def real_batch(batch_size: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` real CIFAR-10 training images resized to ``size`` px, and their labels."""
    from mim.data import ImageDataModule

    root = os.environ.get("MIM_DATA") or str(REPO.parent / "shared" / "data")
    dm = ImageDataModule(root=root, img_size=size, batch_size=batch_size, num_workers=0, limit_per_class=batch_size // 10 + 1)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))[:2]


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def median_ms(fn, device: str, warmup: int, repeats: int) -> float:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def measure(args: argparse.Namespace) -> dict:
    """One row (runs in the child process)."""
    import timm

    from mim.methods import SparK

    device, size, mode = args.device, args.size, args.mode
    batch = args.batch_size or BATCH.get(size, 16)
    imgs, labels = (t.to(device) for t in real_batch(batch, size))
    dtype = {"bf16": torch.bfloat16, "fp32": None}[args.precision]
    base_rss = rss_mib()
    row = {"size": size, "batch": batch, "mode": mode, "threads": torch.get_num_threads(), "ratio": args.ratio}

    def autocast():
        return torch.autocast(device_type=device, dtype=dtype, enabled=dtype is not None)

    if mode == "dense":
        model = timm.create_model(args.backbone, num_classes=10).to(device)

        def dense_step() -> None:
            with autocast():
                loss = F.cross_entropy(model(imgs), labels)
            loss.backward()

        row["encoder_ms"] = row["step_ms"] = median_ms(dense_step, device, args.warmup, args.repeats)
    else:
        model = SparK(args.backbone, img_size=size, backend=mode, mask_ratio=args.ratio, decoder_width=args.decoder_width)
        model = model.to(device)
        mask = model.sample_mask(batch, torch.Generator().manual_seed(0))
        row["masked_cells"] = f"{int(mask[0].sum())}/{mask.shape[1]}"
        active = ~mask.view(batch, 1, *model.grid_hw)

        def encoder_step() -> None:
            with autocast():
                feats = model.sparse_encoder(imgs, active)
                loss = sum(f.float().square().mean() for f in feats)
            loss.backward()

        def spark_step() -> None:
            with autocast():
                loss = model(imgs, mask)[0]
            loss.backward()

        row["encoder_ms"] = median_ms(encoder_step, device, args.warmup, args.repeats)
        row["step_ms"] = median_ms(spark_step, device, args.warmup, args.repeats)
    if device == "cuda":
        row["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        row["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_rss
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.4, 0.6, 0.75])
    parser.add_argument("--modes", nargs="+", default=["masked", "spconv"], choices=["masked", "spconv"])
    parser.add_argument("--batch-size", type=int, default=None, help="default: 128 at 32/64 px, 16 at 224 px")
    parser.add_argument("--decoder-width", type=int, default=384)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="best CPU thread count")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ratio", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        torch.set_num_threads(args.threads)
        print(json.dumps(measure(args)))
        return
    jobs = []
    for size in args.sizes:
        if size == 64:
            jobs.append(("dense", 32, 0.0, args.threads))
        jobs.append(("dense", size, 0.0, args.threads))
        for mode in args.modes:
            thread_counts = sorted({1, args.threads}) if mode == "spconv" and args.device == "cpu" else [args.threads]
            for threads in thread_counts:
                jobs += [(mode, size, ratio, threads) for ratio in args.ratios]
    rows = []
    for mode, size, ratio, threads in jobs:
        cmd = [sys.executable, __file__, "--child", "--mode", mode, "--size", str(size), "--ratio", str(ratio),
               "--threads", str(threads), "--backbone", args.backbone, "--decoder-width", str(args.decoder_width),
               "--device", args.device, "--precision", args.precision, "--warmup", str(args.warmup),
               "--repeats", str(args.repeats)] + (["--batch-size", str(args.batch_size)] if args.batch_size else [])  # fmt: skip
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"  measured {mode} {size} px ratio {ratio} threads {threads}", file=sys.stderr)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"{args.backbone}, {args.precision}, {device}; fwd+bwd per step, median of {args.repeats} after {args.warmup} warmup")
    print("| input | batch | pass | threads | mask ratio (cells masked) | encoder ms | vs dense | SparK step ms | peak MiB |")
    print("|---|---:|---|---:|---|---:|---:|---:|---:|")
    dense = {(r["size"], r["threads"]): r["encoder_ms"] for r in rows if r["mode"] == "dense"}
    for r in rows:
        base = dense.get((r["size"], args.threads))
        rel = f"{r['encoder_ms'] / base:.2f}x" if base else "-"
        ratio = "-" if r["mode"] == "dense" else f"{r['ratio']} ({r['masked_cells']})"
        print(f"| {r['size']} px | {r['batch']} | {r['mode']} | {r['threads']} | {ratio} | {r['encoder_ms']:.0f} | "
              f"{rel} | {r['step_ms']:.0f} | {r['peak_mib']:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
