"""Feature-extraction and feature-store throughput.

(a) Extraction, images/s over the same real CIFAR-10 batches (ViT-Tiny/4, 32 px by default):

1. timm's plain ``forward_features`` (the ceiling: one pass, nothing kept but the last block);
2. ``FeatureExtractor(layers=[3, 7, 11])``: the three blocks in ONE pass (``forward_intermediates``), cls + mean
   + patch tokens, cast to the store dtype (float16) and copied to the CPU, without writing (goal >= 0.9x of 1);
3. the same plus the store writes: one ``ShardWriter`` per layer (what ``FeatureStoreWriter`` runs: shard
   concatenation, safetensors files renamed into place, one store per layer under ``<tmp>/layer_<L>/``) and
   each store's ``metadata.json`` (goal >= 0.9x of 1);
4. three separate single-layer extractions (three passes, up to blocks 3, 7 and 11) with the same writes:
   what one-layer-at-a-time extraction costs.

(b) Store reading, tokens/s: one shuffled pass of ``FeatureStore.batches(4096, "patch", flatten=True)``
over the last layer's store written in (a), moved to the device, against what one SAE training step consumes:
a dense TopK SAE (d 192, d_sae 3072, k 32; Gao et al. 2024, arXiv 2406.04093, Sec. 2.3) forward, MSE,
backward and Adam update on 4096 tokens. Reading faster than the SAE step means the store never starves it.

Numbers are the median of ``--repeats`` timed runs after one warm-up run; the runs take turns within a round.
Prints a markdown table.

    python tools/bench_extract.py                                   # CPU, 512 images, batch 256
    python tools/bench_extract.py --threads 1 --clock cpu           # a CPU shared with other jobs
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
from mim.features.store import ShardWriter, layer_folder, write_metadata

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


#: The clock of :func:`median_seconds`: ``time.perf_counter`` (wall) or ``time.process_time`` (CPU time of this
#: process, all its threads; on a machine shared with other jobs it counts only this process's work).
CLOCK: Callable[[], float] = time.perf_counter


def median_seconds(runs: dict[str, Callable[[], None]], repeats: int, sync: Callable[[], None]) -> dict[str, float]:
    """Median time (:data:`CLOCK`) of each of ``runs`` over ``repeats`` rounds (one warm-up round first); the
    runs take turns within a round, so a change in machine load hits them alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(repeats + 1):
        for name, run in runs.items():
            sync()
            start = CLOCK()
            run()
            sync()
            if round_:
                times[name].append(CLOCK() - start)
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
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 7, 11], help="blocks extracted together")
    parser.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--shard-size", type=int, default=256, help="images per shard of each store")
    parser.add_argument("--buffer-shards", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="wall time, or this process's CPU time (a CPU shared with other jobs; use --threads 1)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        if args.device == "cuda":
            parser.error("--clock cpu measures CPU work; time the GPU with --clock wall")
        global CLOCK
        CLOCK = time.process_time
    device = args.device
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    batches = [tuple(t.to(device) for t in b) for b in real_batches(args.images, args.batch_size)]
    n_images = sum(len(b[0]) for b in batches)
    source, kwargs, tokens = "timm:vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4}, ["cls", "mean", "patch"]
    together = FeatureExtractor(source, kwargs, layers=args.layers, tokens=tokens, dtype=args.dtype).to(device)
    singles = [FeatureExtractor(source, kwargs, layers=layer, tokens=tokens, dtype=args.dtype).to(device)
               for layer in together.layers]
    for single in singles:  # the same (random) weights everywhere
        single.encoder.load_state_dict(together.encoder.state_dict())
    encoder = together.encoder
    tmp = Path(tempfile.mkdtemp(prefix="bench_extract_"))

    def plain() -> None:
        with torch.no_grad():
            for imgs, _, _ in batches:
                encoder.forward_features(imgs)

    def extract() -> None:
        for i, batch in enumerate(batches):
            together.predict_step(batch, i)

    def write(extractors: list[FeatureExtractor], folder: Path) -> None:
        """Every extractor's pass over the batches into one store per layer (FeatureStoreWriter's steps)."""
        for extractor in extractors:
            writers = {layer: ShardWriter(layer_folder(folder, layer, True), 0, args.shard_size)
                       for layer in extractor.layers}
            for i, batch in enumerate(batches):
                out = extractor.predict_step(batch, i)
                for layer, writer in writers.items():
                    writer.add({**out["layers"][layer], "labels": out["labels"], "indices": out["indices"]})
            for layer, writer in writers.items():
                shards = writer.close()
                write_metadata(writer.folder, {**extractor.store_identity(layer), **extractor.store_details(layer),
                                               "count": n_images, "order": "written", "shards": shards})

    runs = {
        "plain": plain,
        "extract": extract,
        "together": lambda: write([together], tmp / "together"),
        "separate": lambda: write(singles, tmp / "separate"),
    }
    timed = median_seconds(runs, args.repeats, sync)

    store = FeatureStore(layer_folder(tmp / "together", together.layers[-1], True))
    seeds = iter(range(10**6))

    def read() -> None:
        for batch in store.batches(SAE_BATCH, "patch", shuffle=True, seed=next(seeds), flatten=True,
                                   buffer_shards=args.buffer_shards):
            batch.features.to(device, non_blocking=True).float()

    grid = together.patch_grids[together.layers[-1]]
    n_tokens = n_images * grid[0] * grid[1]
    t_read = median_seconds({"read": read}, args.repeats, sync)["read"]
    t_sae = sae_seconds_per_step(together.d_models[together.layers[-1]], device, args.repeats, sync)
    sae_tps = SAE_BATCH / t_sae
    shutil.rmtree(tmp)

    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    name += ", CPU time of this process" if args.clock == "cpu" else ""
    layers = ", ".join(map(str, together.layers))
    print(f"ViT-Tiny/4 (12 blocks) on {n_images} real CIFAR-10 images, batch {args.batch_size}, {name}; tokens cls + "
          f"mean + patch (64), {args.dtype} stores, shards of {args.shard_size} images; median of {args.repeats}\n")
    print("| measurement | throughput | vs forward_features |")
    print("|---|---:|---:|")
    t_plain = timed["plain"]
    rows = [
        ("timm `forward_features` (one pass, last block only)", "plain"),
        (f"blocks {layers} in one pass: `predict_step` (to CPU, {args.dtype})", "extract"),
        (f"blocks {layers} in one pass + {args.dtype} store writes (one store per block)", "together"),
        (f"blocks {layers} as {len(singles)} single-block passes + the same writes", "separate"),
    ]
    for label, key in rows:
        print(f"| {label} | {n_images / timed[key]:,.0f} img/s | {t_plain / timed[key]:.2f}x |")
    print(f"| TopK SAE step (d 192, d_sae 3072, k 32, {SAE_BATCH} tokens, fwd + bwd + Adam) "
          f"| {sae_tps:,.0f} tok/s | |")
    print(f"| store read, shuffled flattened {args.dtype} patch tokens, batch {SAE_BATCH}, to float32 "
          f"| {n_tokens / t_read:,.0f} tok/s | {n_tokens / t_read / sae_tps:.1f}x the SAE step |")


if __name__ == "__main__":
    main()
