"""Benchmark of the latent explorer (``mim/explore``): build time of a site and page times in Chromium.

Two modes:

- ``--site DIR``: time an existing site's pages only (built by ``mim-explore``);
- default: write a synthetic latent cache (``tools/bench_latent_cache.py``'s TopK-like random codes: ``--images``
  x 64 tokens, ``--k`` active latents among ``--d-sae``), a random decoder and random 32 px images, build the site
  with :func:`mim.explore.build.write_site` (each stage timed), then time its pages.

Pages are timed in Debian's Chromium (``--chromium``, default ``chromium`` on PATH) through Playwright, from
``file://``: the cold open of ``index.html#/latent/<j>`` / ``#/image/<i>`` (navigation start to the view drawn:
``performance.now()`` when ``#view`` turns ``data-state=ready``) and the in-page navigation to another latent
(hash change to drawn), medians over ``--pages`` random latents / images. Prints markdown tables.

    python tools/bench_explore.py                                  # 10,000 images, d_sae 24,576
    python tools/bench_explore.py --site runs/explore              # a real site's page times
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_latent_cache import write_cache

from mim.explore.build import Stopwatch, write_site
from mim.sae.cache import LatentCache

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


class RandomImages(torch.utils.data.Dataset):
    """Items ``(image (3, size, size) in [0, 1], label i % 10, i)``, fixed per index (what ``store_dataset`` gives)."""

    def __init__(self, count: int, size: int = 32) -> None:
        self.count, self.size = count, size

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        generator = torch.Generator().manual_seed(i)
        return torch.rand(3, self.size, self.size, generator=generator), i % 10, i


def time_pages(site: Path, chromium: str, pages: int) -> list[tuple[str, float, float]]:
    """``(what, median ms, max ms)`` rows for the table, latent and image views of ``site``."""
    from playwright.sync_api import sync_playwright

    meta = json.loads((site / "data" / "meta.js").read_text().split(",", 1)[1].rsplit(")", 1)[0])
    generator = torch.Generator().manual_seed(0)
    latents = torch.randint(meta["d_sae"], (pages,), generator=generator).tolist()
    images = [meta["indices"][i] for i in torch.randint(len(meta["indices"]), (pages,), generator=generator).tolist()]
    base = (site / "index.html").as_uri()
    rows = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})

        def cold(hash_: str, view: str) -> float:
            page.goto("about:blank")
            page.goto(base + hash_)
            page.wait_for_selector(f"#view[data-view={view}][data-state=ready]", timeout=30_000)
            return float(page.get_attribute("#view", "data-at"))

        for what, view, hashes in (("open the table (#/)", "table", ["#/"] * pages),
                                   ("open a latent page", "latent", [f"#/latent/{j}" for j in latents]),
                                   ("open an image page", "image", [f"#/image/{i}" for i in images])):
            cold(hashes[0], view)  # warm the file cache once
            times = [cold(h, view) for h in hashes]
            rows.append((what, statistics.median(times), max(times)))
        times = []
        cold("#/latent/0", "latent")
        for j in latents:  # in-page: the latents table is loaded, each latent's shard is not (mostly)
            page.evaluate(f"location.hash = '#/latent/{j}'")
            page.wait_for_selector(f"#view[data-view=latent][data-state=ready] [data-latent='{j}']", timeout=30_000)
            times.append(float(page.get_attribute("#view", "data-ms")))
        rows.append(("go to another latent (in the page)", statistics.median(times), max(times)))
        times = []
        page.goto(base + "#/")
        page.wait_for_selector("#view[data-view=table][data-state=ready]")
        for key in ("freq", "sel", "mean"):
            start = time.perf_counter()
            page.click(f"th[data-key={key}]")
            page.wait_for_selector(f"th[data-key={key}][aria-sort]")
            times.append(1e3 * (time.perf_counter() - start))
        rows.append(("sort the table by a column (click to drawn)", statistics.median(times), max(times)))
        browser.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--site", type=Path, default=None, help="time this site's pages only")
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--d-sae", type=int, default=24_576)
    parser.add_argument("--k", type=int, default=32, help="active latents per token")
    parser.add_argument("--pages", type=int, default=20, help="random pages timed per kind")
    parser.add_argument("--chromium", default=shutil.which("chromium"), help="Chromium binary (none: no page times)")
    parser.add_argument("--keep", type=Path, default=None, help="write the synthetic site here (kept)")
    args = parser.parse_args()
    site = args.site
    if site is None:
        root = Path(tempfile.mkdtemp(prefix="bench_explore_"))
        cache_dir, site = root / "cache", args.keep or root / "site"
        start = time.perf_counter()
        write_cache(cache_dir, args.images, 64, args.k, args.d_sae, "float16", 4096)
        cache = LatentCache(cache_dir)
        written = time.perf_counter() - start
        start = time.perf_counter()
        cache.build_index()
        indexed = time.perf_counter() - start
        site.mkdir(parents=True, exist_ok=True)
        watch = Stopwatch()
        W_dec = torch.randn(args.d_sae, 192, generator=torch.Generator().manual_seed(0))
        write_site(site, cache, W_dec, RandomImages(args.images), [f"class {c}" for c in range(10)], 32,
                   {"title": f"synthetic: {args.images} images, {args.d_sae} latents"}, watch=watch)
        size = sum(p.stat().st_size for p in site.rglob("*") if p.is_file())
        print(f"\n{args.images:,} images x 64 tokens, k {args.k}, d_sae {args.d_sae:,}; torch "
              f"{torch.get_num_threads()} threads\n")
        print("| stage | seconds |\n|---|---:|")
        print(f"| (cache: write shards, not part of the site build) | {written:.1f} |")
        print(f"| (cache: build the per-latent index, once) | {indexed:.1f} |")
        for stage, seconds in watch.seconds.items():
            print(f"| {'**total site build**' if stage == 'total' else stage} | {seconds:.1f} |")
        print(f"\nsite: {size / 1e6:.0f} MB in {sum(1 for p in site.rglob('*') if p.is_file())} files")
    if args.chromium:
        print(f"\n| page ({args.pages} random, file://) | median ms | max ms |\n|---|---:|---:|")
        for what, median, worst in time_pages(site, args.chromium, args.pages):
            print(f"| {what} | {median:.0f} | {worst:.0f} |")
    if args.site is None:
        shutil.rmtree(root, ignore_errors=True)  # the cache (and the site unless --keep put it elsewhere)


if __name__ == "__main__":
    main()
