"""Feature-extraction and feature-store throughput.

(a) Extraction, images/s over the same real CIFAR-10 batches (ViT-Tiny/4, 32 px, cls + mean + patch
tokens, last block): timm's plain ``forward_features`` (the ceiling), ``FeatureExtractor.predict_step``
(forward_intermediates up to the block, pooling, dtype cast, copy to CPU; goal >= 0.9x), and
``predict_step`` plus the store's shard writes (``ShardWriter``: concatenation and safetensors files).

(b) Store reading, tokens/s: one shuffled pass of ``FeatureStore.batches(4096, "patch", flatten=True)``
over the store written in (a), moved to the device, against what one SAE training step consumes: a
dense TopK SAE (d 192, d_sae 3072, k 32; Gao et al. 2024, arXiv 2406.04093, Sec. 2.3) forward, MSE,
backward and Adam update on 4096 tokens. Reading faster than the SAE step means the store never starves it.

Numbers are the median of ``--repeats`` timed runs after one warm-up run. Prints a markdown table.

    python tools/bench_extract.py                       # CPU, 1000 images
    python tools/bench_extract.py --device cuda --images 10000 --batch-size 512
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from mim.features import FeatureExtractor, FeatureStore
from mim.features.store import ShardWriter, write_metadata

REPO = Path(__file__).resolve().parents[1]
SAE_BATCH = 4096


def real_batches(images: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``images`` real CIFAR-10 train images (eval transform) as ``(imgs, labels, indices)`` batches."""
    from mim.data import ImageDataModule

    root = os.environ.get("MIM_DATA") or str(REPO.parent / "shared" / "data")
    dm = ImageDataModule(root=root, batch_size=batch_size, num_workers=0, limit_per_class=-(-images // 10),
                         predict_split="train", train_augment=False, return_index=True)
    dm.setup("predict")
    return list(dm.predict_dataloader())


def median_seconds(runs: dict[str, Callable[[], None]], repeats: int, sync: Callable[[], None]) -> dict[str, float]:
    """Median wall time of each of ``runs`` over ``repeats`` rounds (one warm-up round first); the runs take
    turns within a round, so a change in machine load hits them alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(repeats + 1):
        for name, run in runs.items():
            sync()
            start = time.perf_counter()
            run()
            sync()
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


class TopKSAE(nn.Module):
    """Dense TopK sparse autoencoder: ``z = TopK_k(ReLU(W_enc (x - b_dec) + b_enc))``, ``x_hat = W_dec z + b_dec``."""

    def __init__(self, d: int, d_sae: int, k: int) -> None:
        super().__init__()
        self.k = k
        self.enc = nn.Linear(d, d_sae)
        self.dec = nn.Linear(d_sae, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.enc(x - self.dec.bias)
        top = pre.topk(self.k, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        return self.dec(z)


def sae_seconds_per_step(d: int, device: str, repeats: int, sync: Callable[[], None]) -> float:
    """Median seconds of one TopK SAE step (d_sae 3072, k 32) on ``SAE_BATCH`` tokens."""
    sae = TopKSAE(d, 3072, 32).to(device)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4)
    x = torch.randn(SAE_BATCH, d, device=device)

    def steps() -> None:
        for _ in range(5):
            loss = (sae(x) - x).pow(2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return median_seconds({"sae": steps}, repeats, sync)["sae"] / 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--shard-size", type=int, default=250, help="images per shard of the store in (b)")
    parser.add_argument("--buffer-shards", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    batches = [tuple(t.to(device) for t in b) for b in real_batches(args.images, args.batch_size)]
    n_images = sum(len(b[0]) for b in batches)
    extractor = FeatureExtractor("timm:vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4},
                                 tokens=["cls", "mean", "patch"]).to(device).eval()
    encoder = extractor.encoder

    def plain() -> None:
        with torch.no_grad():
            for imgs, _, _ in batches:
                encoder.forward_features(imgs)

    def extract() -> None:
        for i, batch in enumerate(batches):
            extractor.predict_step(batch, i)

    tmp = Path(tempfile.mkdtemp(prefix="bench_extract_"))

    def extract_and_write() -> None:
        writer = ShardWriter(tmp, 0, args.shard_size)
        for i, batch in enumerate(batches):
            writer.add(extractor.predict_step(batch, i))
        shards = writer.close()
        write_metadata(tmp, {"tokens": extractor.tokens, "d_model": extractor.d_model, "dtype": "float32",
                             "count": n_images, "order": "written", "shards": shards})

    timed = median_seconds({"plain": plain, "extract": extract, "write": extract_and_write}, args.repeats, sync)
    t_plain, t_extract, t_write = timed["plain"], timed["extract"], timed["write"]

    store = FeatureStore(tmp)
    seeds = iter(range(10**6))

    def read() -> None:
        for batch in store.batches(SAE_BATCH, "patch", shuffle=True, seed=next(seeds), flatten=True,
                                   buffer_shards=args.buffer_shards):
            batch.features.to(device, non_blocking=True)

    n_tokens = n_images * extractor.patch_grid[0] * extractor.patch_grid[1]
    t_read = median_seconds({"read": read}, args.repeats, sync)["read"]
    t_sae = sae_seconds_per_step(extractor.d_model, device, args.repeats, sync)
    sae_tps = SAE_BATCH / t_sae
    shutil.rmtree(tmp)

    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"ViT-Tiny/4 on {n_images} real CIFAR-10 images, batch {args.batch_size}, {name}; "
          f"store: {len(store.metadata['shards'])} shards of {args.shard_size} images, buffer {args.buffer_shards}; "
          f"median of {args.repeats}\n")
    print("| measurement | throughput | ratio |")
    print("|---|---:|---:|")
    print(f"| timm `forward_features` | {n_images / t_plain:,.0f} img/s | 1.00x |")
    print(f"| `FeatureExtractor.predict_step` (cls + mean + patch, to CPU) | {n_images / t_extract:,.0f} img/s "
          f"| {t_plain / t_extract:.2f}x |")
    print(f"| `predict_step` + shard writes | {n_images / t_write:,.0f} img/s | {t_plain / t_write:.2f}x |")
    print(f"| TopK SAE step (d 192, d_sae 3072, k 32, {SAE_BATCH} tokens, fwd + bwd + Adam) "
          f"| {sae_tps:,.0f} tok/s | 1.00x |")
    print(f"| store read, shuffled flattened patch tokens, batch {SAE_BATCH} | {n_tokens / t_read:,.0f} tok/s "
          f"| {n_tokens / t_read / sae_tps:.1f}x |")


if __name__ == "__main__":
    main()
