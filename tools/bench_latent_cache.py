"""Benchmark of the sparse latent cache (``mim/sae/cache.py``) on random SAE codes of realistic size.

Writes a cache of ``--images`` images x ``--tokens`` tokens with ``--k`` active latents per token among ``--d-sae``
(ids drawn from a Zipf-like law, so some latents are frequent and many rare; values exponential), then times:
writing the shards, opening the cache, building the per-latent index (once), ``top_images(j, k=32)`` with
heat-maps for random latents (index) against a vectorised scan of every entry (no index), ``image_latents``,
``token_latents`` and ``stats``. Prints a markdown table.

    python tools/bench_latent_cache.py                         # 10,000 images, 64 tokens, k 32, d_sae 3072
    python tools/bench_latent_cache.py --d-sae 24576 --values float16
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mim.sae.cache import CacheShardWriter, LatentCache, coalesce, write_metadata
from mim.sae.variants import SparseCode


def random_codes(n_tokens: int, k: int, d_sae: int, generator: torch.Generator) -> SparseCode:
    """(n_tokens, k) TopK-like codes: ``k`` distinct ids per token, the first ``k`` distinct of ``4k`` draws with
    probability ~ 1 / (rank + 10) (sampling without replacement), values ~ Exp(1)."""
    weights = 1.0 / (torch.arange(d_sae, dtype=torch.float64) + 10)
    cdf = (weights.cumsum(0) / weights.sum()).float()
    perm = torch.randperm(d_sae, generator=generator)  # frequent latents spread over the id range
    draws = perm[torch.searchsorted(cdf, torch.rand(n_tokens, 4 * k, generator=generator)).clamp_max(d_sae - 1)]
    ids, order = draws.sort(dim=1, stable=True)
    first = torch.ones_like(ids, dtype=torch.bool)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    repeat = torch.zeros_like(first).scatter_(1, order, ~first)  # back in draw order
    rank = torch.arange(4 * k).expand_as(draws) + repeat * 4 * k
    keep = rank.topk(k, dim=1, largest=False, sorted=False).indices
    values = torch.empty(n_tokens, k).exponential_(generator=generator)
    return SparseCode(values, draws.gather(1, keep))


def write_cache(path: Path, images: int, tokens: int, k: int, d_sae: int, values: str, shard_size: int) -> float:
    """Write the cache; returns the seconds spent in the writer (drawing the codes excluded)."""
    generator = torch.Generator().manual_seed(0)
    writer = CacheShardWriter(path, 0, shard_size, tokens, d_sae, values)
    batch, spent = 256, 0.0
    for start in range(0, images, batch):
        n = min(batch, images - start)
        code = random_codes(n * tokens, k, d_sae, generator)
        begin = time.perf_counter()
        counts, latents, vals = coalesce(code, d_sae)
        writer.add({"counts": counts, "latents": latents, "values": vals,
                    "indices": torch.arange(start, start + n), "labels": torch.arange(start, start + n) % 10})
        spent += time.perf_counter() - begin
    begin = time.perf_counter()
    shards = writer.close()
    side = int(round(tokens ** 0.5))
    write_metadata(path, {"d_sae": d_sae, "tokens": "patch", "tokens_per_image": tokens,
                          "patch_grid": [side, tokens // side] if side * side == tokens else None,
                          "count": images, "entries": sum(s["entries"] for s in shards), "world_size": 1,
                          "values_dtype": values, "shards": shards})
    return spent + time.perf_counter() - begin


def scan_top_images(cache: LatentCache, latent: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The index-free way: scan every entry of every shard for ``latent``, max per image, top ``k``."""
    images, scores = [], []
    for shard in cache._shards:
        hit = np.flatnonzero(shard["latents"] == latent)
        image = np.searchsorted(shard["offsets"], hit, side="right") - 1
        image //= cache.tokens_per_image
        best = np.full(len(shard["indices"]), -np.inf, np.float32)
        np.maximum.at(best, image, shard["values"][hit].astype(np.float32))
        keep = np.flatnonzero(best > 0)
        images.append(np.asarray(shard["indices"])[keep])
        scores.append(best[keep])
    images, scores = np.concatenate(images), np.concatenate(scores)
    order = np.lexsort((images, -scores))[:k]
    return images[order], scores[order]


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--d-sae", type=int, default=3072)
    parser.add_argument("--values", choices=("float32", "float16"), default="float32")
    parser.add_argument("--shard-size", type=int, default=4096)
    parser.add_argument("--queries", type=int, default=200, help="random latents timed per query kind")
    parser.add_argument("--scan-queries", type=int, default=5, help="latents timed with the index-free scan")
    parser.add_argument("--dir", default=None, help="where to write the cache (default a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    folder = Path(args.dir or tempfile.mkdtemp(prefix="latent_cache_bench_"))
    path = folder / "cache"
    shutil.rmtree(path, ignore_errors=True)
    rows = []
    spent = write_cache(path, args.images, args.tokens, args.k, args.d_sae, args.values, args.shard_size)
    rows.append(("coalesce + write shards (SAE encode excluded)", spent, ""))
    size = sum(f.stat().st_size for f in path.glob("rank*.safetensors"))
    start = time.perf_counter()
    cache = LatentCache(path)
    rows.append(("open (headers + image lists)", time.perf_counter() - start, ""))
    start = time.perf_counter()
    cache.build_index()
    rows.append(("build per-latent index + stats (once)", time.perf_counter() - start, ""))
    index_size = (path / "latent_index.safetensors").stat().st_size
    start = time.perf_counter()
    cache = LatentCache(path)
    cache.index()
    rows.append(("re-open + map the index", time.perf_counter() - start, ""))

    rng = np.random.default_rng(0)
    latents = rng.integers(0, args.d_sae, args.queries).tolist()
    top = [timed(lambda j=j: cache.top_images(j, k=32), 1)[0] for j in latents]
    rows.append(("top_images(j, k=32) + heat-maps, index", statistics.median(top), f"max {max(top) * 1e3:.2f} ms"))
    no_maps = [timed(lambda j=j: cache.top_images(j, k=32, maps=False), 1)[0] for j in latents]
    rows.append(("top_images(j, k=32), no heat-maps", statistics.median(no_maps), f"max {max(no_maps) * 1e3:.2f} ms"))
    scan = [timed(lambda j=j: scan_top_images(cache, j, 32), 1)[0] for j in latents[: args.scan_queries]]
    rows.append(("top 32 images by a full scan (no index)", statistics.median(scan), f"max {max(scan) * 1e3:.1f} ms"))
    for j in latents[: args.scan_queries]:  # the index and the scan agree
        images, scores = scan_top_images(cache, j, 32)
        got = cache.top_images(j, k=32, maps=False)
        assert np.array_equal(got.images.numpy(), images) and np.allclose(got.scores.numpy(), scores)
    images = rng.integers(0, args.images, args.queries).tolist()
    per_image = [timed(lambda i=i: cache.image_latents(i), 1)[0] for i in images]
    rows.append(("image_latents(i)", statistics.median(per_image), ""))
    per_token = [timed(lambda i=i: cache.token_latents(i, 7), 1)[0] for i in images]
    rows.append(("token_latents(i, t)", statistics.median(per_token), ""))
    stats = timed(lambda: LatentCache(path).stats(), 3)
    rows.append(("open + stats() (from the sidecar)", statistics.median(stats), ""))

    entries = cache.metadata["entries"]
    print(f"{args.images} images x {args.tokens} tokens, k {args.k}, d_sae {args.d_sae}, values {args.values}: "
          f"{entries:,} entries, shards {size / 1e6:.1f} MB, index {index_size / 1e6:.1f} MB, "
          f"torch threads {torch.get_num_threads()}\n")
    print("| operation | time | note |\n|---|---:|---|")
    for name, seconds, note in rows:
        shown = f"{seconds * 1e3:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"
        print(f"| {name} | {shown} | {note} |")
    if args.dir is None:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
