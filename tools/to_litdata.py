"""Convert an image dataset into LitData streaming shards for ``ImageDataModule(dataset="litdata")``.

Writes ``<out>/train/`` and ``<out>/val/`` (LitData's ``index.json`` + ``chunk-*.bin``, and mim's
``meta.json`` with the class names), locally or to object storage. JPEG files are stored as their
original bytes; every other file (and torchvision's in-memory CIFAR / STL10) as lossless 8-bit RGB
PNG. Every image is decoded once first: unreadable files stop the conversion with their paths,
or are left out with ``--skip-bad-images``. The train split is written in shuffled order.
The work is done by ``mim.data.litdata`` (``convert_dataset`` / ``convert_image_folder``).

    # a dataset found as --data.root finds it (datasets/README.md), both splits:
    python tools/to_litdata.py --dataset cifar10 --root ../shared/data --out data/cifar10_litdata
    python tools/to_litdata.py --dataset imagefolder --root /data/imagenet --out s3://bucket/imagenet \\
        --num-workers 32
    # one ImageFolder split folder <folder>/<class>/<image>:
    python tools/to_litdata.py --folder ../shared/data/cifar10/train --out data/c10/train --split train

Then train with ``--data.dataset litdata --data.root data/cifar10_litdata``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

from mim.errors import UserError


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", choices=["cifar10", "cifar100", "stl10", "imagefolder"],
                     help="a dataset looked for under --root as ImageDataModule does")
    src.add_argument("--folder", help="one ImageFolder split folder <folder>/<class>/<image>")
    parser.add_argument("--root", help="data root for --dataset (default: $MIM_DATA, else ./data)")
    parser.add_argument("--out", required=True, help="output folder or URL (s3://bucket/prefix)")
    parser.add_argument("--splits", nargs="+", default=["train", "val"], choices=["train", "val"],
                        help="--dataset: the splits to write, each into <out>/<split> (default: train val)")
    parser.add_argument("--split", default="train", choices=["train", "val"],
                        help="--folder: which split it is (train is written shuffled); default train")
    parser.add_argument("--limit-per-class", type=int, help="only the first N images of each class")
    parser.add_argument("--skip-bad-images", action="store_true", help="leave unreadable files out (listed in meta.json)")
    parser.add_argument("--chunk-bytes", default="64MB", help="size of one chunk file (default 64MB)")
    parser.add_argument("--num-workers", type=int, help="writer processes (default: all CPUs)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train split's write order")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--quiet", action="store_true", help="no LitData progress output")
    args = parser.parse_args(argv)
    if args.limit_per_class is not None and args.limit_per_class < 1:
        parser.error("--limit-per-class must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Run the conversion on ``argv`` (default ``sys.argv[1:]``); returns ``{split: meta.json content}``."""
    from mim.data.litdata import convert_dataset, convert_image_folder

    args = parse_args(argv)
    common = dict(limit_per_class=args.limit_per_class, skip_bad_images=args.skip_bad_images,
                  chunk_bytes=args.chunk_bytes, num_workers=args.num_workers, seed=args.seed,
                  overwrite=args.overwrite, verbose=not args.quiet)
    start = time.perf_counter()
    if args.folder:
        metas = {args.split: convert_image_folder(args.folder, args.out, split=args.split, **common)}
    else:
        metas = convert_dataset(args.dataset, args.root, args.out, splits=args.splits, **common)
    for split, meta in metas.items():
        print(f"{split}: {meta['num_items']} images ({meta['jpeg_items']} JPEG as-is), {len(meta['classes'])} "
              f"classes, {len(meta['skipped'])} skipped")
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s")
    return metas


if __name__ == "__main__":
    try:
        main()
    except UserError as err:
        sys.exit(f"error: {err}")
