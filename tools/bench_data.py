"""Data-loading throughput: ImageFolder JPEG files against LitData shards, decode + MAE augmentation.

For each input size, the same real CIFAR-10 train images are read through ``ImageDataModule``'s
train loader (decode with ``load_rgb`` / ``decode_rgb``, ``train_transform``: random resized crop,
flip, normalize, to tensor; batches of ``--batch-size``) from

- ``imagefolder``: an ImageFolder tree of JPEG files on local disk, and
- ``litdata``: LitData shards of the same files (``mim.data.litdata.convert_image_folder``),

with ``num_workers`` 0 (all in the main process) and 1 (one worker process): images/s of one
process, so the per-worker rate. Two inputs:

- ``32 px``: the CIFAR-10 JPEGs as they are, output 32 px;
- ``224 px``: the same images upscaled (bicubic) to 256 x 256 and saved as JPEG quality 90, output
  224 px: a stand-in for ImageNet-sized files (ImageNet's average is about 400 x 350), as no
  ImageNet is available offline.

A pass reads ``--images`` images; the rate counts the images after the first batch over the time
after it (worker start-up excluded). Numbers: median (and min..max) of ``--repeats`` passes after
one warm-up pass; the four loaders of an input size take turns within each round, so a change in
machine load hits them alike. The main process runs torch on one thread, as DataLoader workers do
(so ``num_workers`` 0 and 1 do the same work in one process). Prints a markdown table.

    python tools/bench_data.py                      # 2000 images, 5 repeats
    python tools/bench_data.py --images 5000 --repeats 7 --batch-size 128
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def build_tree(src: Path, dst: Path, per_class: int, side: int | None) -> None:
    """``dst/train/<class>/`` with the first ``per_class`` JPEGs of each class of ``src``, copied
    (``side`` None) or resized to ``side`` x ``side`` (bicubic) and saved as JPEG quality 90."""
    for cls in sorted(p.name for p in src.iterdir()):
        out = dst / "train" / cls
        out.mkdir(parents=True)
        for path in sorted((src / cls).iterdir())[:per_class]:
            if side is None:
                shutil.copy(path, out / path.name)
            else:
                with Image.open(path) as img:
                    img.convert("RGB").resize((side, side), Image.BICUBIC).save(out / path.name, quality=90)


def one_pass(dm) -> float:
    """Images/s of one pass of ``dm.train_dataloader()``, after its first batch."""
    n, start = 0, None
    for imgs, _ in dm.train_dataloader():
        if start is None:
            start = time.perf_counter()
        else:
            n += len(imgs)
    return n / (time.perf_counter() - start)


def measure(cells: dict[tuple[str, int], object], repeats: int) -> dict[tuple[str, int], list[float]]:
    """Images/s of each datamodule in ``cells`` over ``repeats`` rounds (one warm-up pass each first);
    the cells take turns within a round, so a change in machine load hits them alike."""
    for dm in cells.values():
        one_pass(dm)  # warm-up: page cache, lazy imports
    rates: dict[tuple[str, int], list[float]] = {key: [] for key in cells}
    for _ in range(repeats):
        for key, dm in cells.items():
            rates[key].append(one_pass(dm))
    return rates


def datamodule(kind: str, root: Path, img_size: int, workers: int, batch_size: int):
    from mim.data import ImageDataModule

    dm = ImageDataModule(dataset=kind, root=str(root), img_size=img_size, batch_size=batch_size, num_workers=workers,
                         mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    dm.setup("fit")
    return dm


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=os.environ.get("MIM_DATA") or str(REPO.parent / "shared" / "data"),
                        help="folder holding cifar10/train (default: $MIM_DATA, else ../shared/data)")
    parser.add_argument("--images", type=int, default=2000, help="images per pass (a multiple of 10)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per cell (median reported)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    from mim.data.litdata import convert_image_folder

    args = parse_args(argv)
    torch.set_num_threads(1)  # as in a DataLoader worker; 2 threads made torch.stack 7x slower on a busy machine
    src = Path(args.data_root) / "cifar10" / "train"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, side, img_size in (("32 px JPEG (CIFAR-10 as is)", None, 32), ("256 px JPEG q90", 256, 224)):
            tree = Path(tmp) / f"tree{img_size}"
            build_tree(src, tree, args.images // 10, side)
            shards = Path(tmp) / f"lit{img_size}"
            convert_image_folder(tree / "train", str(shards / "train"), num_workers=1, chunk_bytes="64MB")
            for root in (tree, shards):  # setup("fit") opens a val split too; only train is timed
                (root / "val").symlink_to(root / "train", target_is_directory=True)
            cells = {(kind, workers): datamodule(kind, root, img_size, workers, args.batch_size)
                     for kind, root in (("imagefolder", tree), ("litdata", shards)) for workers in args.workers}
            for (kind, workers), rates in measure(cells, args.repeats).items():
                rows.append({"input": label, "img_size": img_size, "source": kind, "workers": workers,
                             "median": statistics.median(rates), "min": min(rates), "max": max(rates)})
                print(f"# {kind} {img_size}px workers={workers}: {statistics.median(rates):.0f} images/s", flush=True)
    print(f"\n{args.images} images per pass, batch {args.batch_size}, median of {args.repeats} passes "
          f"(min..max); {os.cpu_count()} CPUs\n")
    print("| input | output | source | num_workers | images/s | min..max |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['input']} | {r['img_size']} px | {r['source']} | {r['workers']} | {r['median']:.0f} | "
              f"{r['min']:.0f}..{r['max']:.0f} |")
    return rows


if __name__ == "__main__":
    main()
