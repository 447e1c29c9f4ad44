"""Pretraining step throughput and peak memory of the ``mim`` methods.

A "step" is what ``Trainer.fit`` does per batch without data loading: forward, loss, backward and
the AdamW update, on a fixed batch of real CIFAR-10 images. Each method runs in its own
subprocess so that the peak memory (CUDA: ``torch.cuda.max_memory_allocated``; CPU: peak RSS of
the process above its size before the model was built) belongs to that method alone. Prints a markdown table: median images/s over
``--repeats`` timed runs of ``--steps`` steps each, after ``--warmup`` steps.

    python tools/bench_pretrain.py                                # CPU, fp32
    python tools/bench_pretrain.py --threads 1 --methods MAE CAE  # one core, two methods
    python tools/bench_pretrain.py --device cuda --precision bf16 # GPU, bf16 autocast
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

from mim.masking import ColorNoiseMask

REPO = Path(__file__).resolve().parents[1]
VIT_TINY_4 = dict(backbone="vit_tiny_patch16_224", img_size=32, patch_size=4)
MAE_DECODER = dict(decoder_embed_dim=128, decoder_depth=4, decoder_num_heads=4)
# name -> (import path, kwargs): the model sizes of configs/<method>/vit_tiny_cifar10.yaml
METHODS = {
    "MAE": ("mim.methods:MAE", dict(**VIT_TINY_4, **MAE_DECODER)),
    "ColorMAE": ("mim.methods:MAE", dict(**VIT_TINY_4, **MAE_DECODER, mask=ColorNoiseMask)),
    "CAE": ("mim.methods:CAE", dict(**VIT_TINY_4, regressor_depth=2, decoder_depth=2)),
    "MixedAE": ("mim.methods:MixedAE", dict(**VIT_TINY_4, **MAE_DECODER)),
}


def real_batch(batch_size: int) -> torch.Tensor:
    """``batch_size`` real CIFAR-10 training images, normalised, ``(B, 3, 32, 32)``."""
    from mim.data import ImageDataModule

    root = os.environ.get("MIM_DATA") or str(REPO.parent / "shared" / "data")
    dm = ImageDataModule(root=root, batch_size=batch_size, num_workers=0, limit_per_class=batch_size // 10 + 1)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))[0]


def rss_mib() -> float:
    """Resident set size of this process now, in MiB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(name: str, batch_size: int, device: str, precision: str, steps: int, warmup: int, repeats: int) -> dict:
    """Time ``repeats`` runs of ``steps`` training steps of one method (runs in the child process)."""
    import importlib

    imgs = real_batch(batch_size).to(device)
    base_rss = rss_mib()
    module_name, cls_name = METHODS[name][0].split(":")
    model = getattr(importlib.import_module(module_name), cls_name)(**METHODS[name][1]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    dtype = {"bf16": torch.bfloat16, "fp32": None}[precision]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step() -> None:
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype is not None):
            loss = model(imgs)[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        rates.append(steps * batch_size / (time.perf_counter() - start))
    if device == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_rss
    return {"method": name, "images_per_s": statistics.median(rates), "runs": rates, "peak_mib": peak_mib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        result = measure(args.child, args.batch_size, args.device, args.precision, args.steps, args.warmup, args.repeats)
        print(json.dumps(result))
        return
    rows = []
    for name in args.methods:
        cmd = [sys.executable, __file__, "--child", name, *sys.argv[1:]]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"ViT-Tiny/4, 32 px, batch {args.batch_size}, {args.precision}, {device}; median of {args.repeats} x {args.steps} steps")
    print("| method | images/s | vs MAE | peak memory (MiB) |")
    print("|---|---:|---:|---:|")
    base = next((r["images_per_s"] for r in rows if r["method"] == "MAE"), None)
    for r in rows:
        rel = f"{r['images_per_s'] / base:.2f}x" if base else "-"
        print(f"| {r['method']} | {r['images_per_s']:.0f} | {rel} | {r['peak_mib']:.0f} |")


if __name__ == "__main__":
    main()
