"""Finding, loading and sub-sampling the supported image datasets.

Supported names (``DATASETS``): ``cifar10``, ``cifar100``, ``stl10``, ``imagefolder`` and
``litdata`` (LitData shards, streamed by :mod:`mim.data.litdata`; ``build_dataset`` does not open them).
``build_dataset`` returns a "raw" dataset whose items are ``(PIL.Image in RGB mode, int label)``
and which has ``.classes`` and ``.targets`` (``.labels`` for torchvision's STL10).
``TransformedDataset`` turns the images into normalized tensors with an albumentations pipeline.
Every image file is decoded by ``load_rgb`` / ``decode_rgb`` (one set of rules for grayscale,
palette, alpha, CMYK, 16-bit, float and EXIF-rotated images; see ``to_rgb``).
Where each dataset is looked for is described in ``datasets/README.md``.
"""

from __future__ import annotations

import io
import logging
import os
import struct
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.datasets as tvd
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from mim.errors import UserError

log = logging.getLogger(__name__)

DATASETS = ("cifar10", "cifar100", "stl10", "imagefolder", "litdata")
#: STL10 splits accepted as ``train_split`` (torchvision names); unlabeled images have label -1.
STL10_SPLITS = ("train", "test", "unlabeled", "train+unlabeled")
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
#: Side in pixels of the images as stored; None: varies (imagefolder).
NATIVE_SIZE: dict[str, int | None] = {"cifar10": 32, "cifar100": 32, "stl10": 96, "imagefolder": None, "litdata": None}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Per-channel RGB (mean, std) in [0, 1] units (pixel / 255) of each dataset's train split.
STATS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": (IMAGENET_MEAN, IMAGENET_STD),
    "imagefolder": (IMAGENET_MEAN, IMAGENET_STD),
    "litdata": (IMAGENET_MEAN, IMAGENET_STD),  # the shards' meta.json may carry their own (mim.data.litdata)
}
#: File extensions read as images in ImageFolder trees: torchvision's list plus ``.gif`` (first frame).
IMG_EXTENSIONS: tuple[str, ...] = tuple(tvd.folder.IMG_EXTENSIONS) + (".gif",)
_TORCHVISION = {  # name -> (torchvision class, folder it extracts to under its root)
    "cifar10": (tvd.CIFAR10, "cifar-10-batches-py"),
    "cifar100": (tvd.CIFAR100, "cifar-100-python"),
    "stl10": (tvd.STL10, "stl10_binary"),
}
_FIX = (
    "Fix: put the data at one of these paths (layouts in datasets/README.md), or point --data.root "
    "(or the MIM_DATA environment variable) at the folder that holds it, or pass "
    "--data.download true on a machine that is online (cifar10, cifar100, stl10 only)."
)


class DatasetNotFoundError(UserError, FileNotFoundError):
    """The dataset is not where it was looked for, or its folder tree is unusable (e.g. an empty
    class folder). The message lists every path looked at and how to fix it."""


class BadImageError(UserError, RuntimeError):
    """An image cannot be decoded (corrupt, truncated, zero bytes, not an image despite its
    extension, an unsupported mode, or a float image with NaN / infinite values). The message names
    the file (or the shard item), the cause and the fix."""


def resolve_root(root: str | Path | None) -> tuple[Path, str]:
    """Data root and where it came from: ``root`` if given, else ``$MIM_DATA``, else ``./data``.

    Returns:
        (absolute path, source) where source is ``"--data.root"``, ``"MIM_DATA"`` or ``"default ./data"``.
    """
    if root is not None:
        return Path(root).expanduser().absolute(), "--data.root"
    if os.environ.get("MIM_DATA"):
        return Path(os.environ["MIM_DATA"]).expanduser().absolute(), "MIM_DATA"
    return Path("data").absolute(), "default ./data"


#: What PIL (and our conversion) raise on a file that is not a decodable image.
_DECODE_ERRORS = (
    OSError, SyntaxError, ValueError, TypeError, IndexError, EOFError, ZeroDivisionError, struct.error,
    Image.DecompressionBombError,
)
_SKIP_FIX = (
    "Fix: remove or replace this file, or set skip_bad_images: true (--data.skip_bad_images true) "
    "to drop unreadable files at setup."
)
_EXIF_ORIENTATION = 0x0112
#: PIL modes with more than 8 bits per sample: scaled to 8 bit by ``to_rgb`` (never clipped).
HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
#: Background that transparent pixels are composited over (RGB, 0..255).
ALPHA_BACKGROUND = (255, 255, 255)


def to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Scale the samples of a single-band high-depth image to uint8 0..255 (rounded), never clipping.

    Rules (by PIL mode):
      - ``I;16`` (``I;16L``, ``I;16B``, ``I;16N``), 16-bit PNG / TIFF: the dtype's range,
        ``round(v * 255 / 65535)``, so brightness stays comparable between images (a 16-bit image
        that only uses 0..4095, e.g. 12-bit sensor data, comes out dark, as in a viewer).
      - ``I`` (32-bit signed int; also what older Pillow versions open 16-bit PNGs as): values all in
        0..65535 are taken as 16-bit data (as above); otherwise the image's min..max.
      - ``F`` (32-bit float, e.g. float TIFF): values all in [0, 1] are scaled by 255 (the float
        image convention); otherwise the image's min..max.
    min..max maps the minimum to 0 and the maximum to 255; a constant image maps to 0.

    Args:
        values: (H, W) array of the image's samples (any integer or float dtype).
        mode: the PIL mode the values came from, one of ``HIGH_DEPTH_MODES``.

    Returns:
        (H, W) uint8 array.

    Raises:
        ValueError: a float image with NaN or infinite values, or an unknown ``mode``.
    """
    if mode not in HIGH_DEPTH_MODES:
        raise ValueError(f"mode {mode!r} is not a high-depth mode ({', '.join(HIGH_DEPTH_MODES)})")
    x = values.astype(np.float64)
    if x.size == 0:
        return np.zeros(x.shape, np.uint8)
    if not np.isfinite(x).all():
        raise ValueError("the image has NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if mode.startswith("I;16") or (mode == "I" and lo >= 0 and hi <= 65535):
        lo, hi = 0.0, 65535.0
    elif mode == "F" and lo >= 0 and hi <= 1:
        lo, hi = 0.0, 1.0
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return np.clip(np.rint((x - lo) * scale), 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert an opened PIL image (its current frame: the first for GIF / multi-page TIFF) to RGB.

    In order:
      1. EXIF orientation (tag 0x0112 != 1, e.g. phone photos) is applied with
         ``PIL.ImageOps.exif_transpose`` (orientations 5-8 swap width and height); unreadable EXIF
         is ignored.
      2. High-depth single-band images (``HIGH_DEPTH_MODES``: 16-bit ``I;16*``, 32-bit ``I``,
         float ``F``) are scaled to 8 bit with ``to_uint8`` and replicated to 3 channels (PIL's own
         ``convert("RGB")`` clips 16-bit values above 255 to white).
      3. Images with transparency (``RGBA``, ``LA``, ``PA``, ``RGBa``, ``La``, or a ``transparency``
         entry such as a palette or PNG ``tRNS`` colour key) are alpha-composited over
         ``ALPHA_BACKGROUND`` (white): a transparent pixel becomes white, whatever colour it stores.
      4. Everything else (``L``, ``1``, ``P``, ``CMYK``, ``YCbCr``, ``RGB``) goes through
         ``convert("RGB")`` (grayscale replicated, palette looked up, CMYK converted naively
         without ICC profile).

    Returns:
        a new RGB image (8 bits per channel).

    Raises:
        ValueError: a float image with NaN / infinite values, or a mode PIL cannot convert to RGB.
    """
    orientation = 1
    if img.format != "JPEG" or "exif" in img.info:  # a JPEG keeps EXIF in info: skip the parse without it
        try:
            orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
        except Exception:  # a broken EXIF block must not make a good image unreadable
            orientation = 1
    if orientation not in (1, None):
        img = ImageOps.exif_transpose(img)
    if img.mode in HIGH_DEPTH_MODES:
        return Image.fromarray(to_uint8(np.asarray(img), img.mode)).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, ALPHA_BACKGROUND)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img.convert("RGB")


def _open_rgb(fp: Any, name: str, fix: str) -> Image.Image:
    try:
        with Image.open(fp) as img:
            img.load()  # the full decode of the first frame: truncated files fail here
            return to_rgb(img)
    except _DECODE_ERRORS as e:
        raise BadImageError(f"Cannot read image {name}: {type(e).__name__}: {e}. {fix}") from e


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image file as 8-bit RGB with the rules of ``to_rgb`` (EXIF rotation, 16-bit and
    float scaling, alpha composited over white, grayscale / palette / CMYK converted; first frame of
    an animation).

    Raises:
        BadImageError: the file cannot be decoded; the message names the file, cause and fix.
    """
    return _open_rgb(path, str(path), _SKIP_FIX)


def decode_rgb(data: bytes | memoryview, name: str = "<bytes>", fix: str = "Fix: replace this image.") -> Image.Image:
    """``load_rgb`` for an encoded image held in memory (e.g. JPEG bytes from a LitData shard).

    Args:
        data: the encoded file's bytes.
        name: what the error message calls the image (e.g. its original path).
        fix: the error message's last sentence.

    Raises:
        BadImageError: the bytes cannot be decoded; the message names ``name``, cause and ``fix``.
    """
    return _open_rgb(io.BytesIO(data), name, fix)


def is_image_file(path: str) -> bool:
    """Whether an ImageFolder tree reads ``path`` as an image: its extension is in ``IMG_EXTENSIONS``."""
    return path.lower().endswith(IMG_EXTENSIONS)


def _readable(path: str) -> bool:
    try:
        load_rgb(path)
        return True
    except BadImageError:
        return False


def unreadable(paths: Sequence[str], threads: int = 8) -> list[str]:
    """The files of ``paths`` that :func:`load_rgb` cannot decode, in order (decoded on ``threads`` threads)."""
    with ThreadPoolExecutor(threads) as pool:
        ok = list(pool.map(_readable, paths))
    return [p for p, good in zip(paths, ok) if not good]


class RGBImageFolder(tvd.ImageFolder):
    """``torchvision.datasets.ImageFolder`` over ``root/<class>/<image>`` that loads with ``load_rgb``.

    Items: ``(PIL.Image RGB, int class index)``; classes are the sorted sub-folder names. Files
    whose extension is not in ``IMG_EXTENSIONS`` (torchvision's list plus ``.gif``) are ignored; a
    file with an image extension that does not decode raises ``BadImageError`` when read.

    Raises:
        DatasetNotFoundError: ``root`` has no class sub-folder, or some class folder holds no image.
    """

    def __init__(self, root: str | Path) -> None:
        root = Path(root)
        try:
            super().__init__(str(root), loader=load_rgb, is_valid_file=is_image_file, allow_empty=True)
        except FileNotFoundError as e:
            raise DatasetNotFoundError(
                f"{root} has no class sub-folders. An ImageFolder tree is <split>/<class>/<image>; "
                "see datasets/README.md."
            ) from e
        counts = Counter(self.targets)
        empty = [str(root / c) for c, i in self.class_to_idx.items() if counts[i] == 0]
        if empty:
            raise DatasetNotFoundError(
                f"Class folder(s) without any image file ({', '.join(IMG_EXTENSIONS)}): "
                f"{', '.join(empty)}. Every sub-folder of {root} is taken as a class. Fix: put images "
                "in it or delete it (hidden folders such as .ipynb_checkpoints count too)."
            )
        self.skipped: list[str] = []

    def drop_unreadable(self, threads: int = 8) -> list[str]:
        """Decode every file (thread pool) and remove those that fail from the sample list.

        Returns:
            paths of the removed files (also kept in ``self.skipped``).
        """
        self.skipped = unreadable([p for p, _ in self.samples], threads)
        if self.skipped:
            bad = set(self.skipped)
            self.samples = [s for s in self.samples if s[0] not in bad]
            self.imgs = self.samples
            self.targets = [t for _, t in self.samples]
        return self.skipped


class TransformedDataset(Dataset):
    """Applies an albumentations pipeline to a raw ``(PIL.Image, label)`` dataset.

    Items: ``(img, label)`` with ``img`` the pipeline's ``"image"`` output, here a
    (3, H, W) float32 tensor, and ``label`` an int (-1 for unlabeled STL10 images); with
    ``return_index``, ``(img, label, index)`` where ``index`` is the image's index in ``dataset``.
    """

    def __init__(self, dataset: Dataset, transform: Callable[..., dict[str, Any]], return_index: bool = False) -> None:
        self.dataset = dataset
        self.transform = transform
        self.return_index = return_index

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | tuple[torch.Tensor, int, int]:
        img, label = self.dataset[index]
        if img.mode != "RGB":
            img = img.convert("RGB")
        img = self.transform(image=np.asarray(img))["image"]
        return (img, int(label), index) if self.return_index else (img, int(label))


def targets_of(dataset: Dataset) -> list[int]:
    """Labels of a raw dataset, in dataset order (``.targets``, or ``.labels`` for STL10)."""
    if isinstance(dataset, TransformedDataset):
        dataset = dataset.dataset
    labels = getattr(dataset, "targets", None)
    if labels is None:
        labels = dataset.labels  # type: ignore[attr-defined]
    return [int(t) for t in labels]


def first_per_class(targets: Sequence[int], n: int) -> list[int]:
    """Indices of the first ``n`` samples of each class, in dataset order (deterministic)."""
    seen: Counter[int] = Counter()
    keep = []
    for i, t in enumerate(targets):
        if seen[t] < n:
            seen[t] += 1
            keep.append(i)
    return keep


def stratified_fraction(targets: Sequence[int], fraction: float, seed: int) -> list[int]:
    """Sorted indices of a random ``fraction`` of each class (at least one per class).

    Randomness: ``torch.Generator`` seeded with ``seed``, so the subset depends only on
    (targets, fraction, seed).
    """
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, t in enumerate(targets):
        by_class[t].append(i)
    g = torch.Generator().manual_seed(seed)
    keep = []
    for t in sorted(by_class):
        idx = by_class[t]
        k = max(1, round(fraction * len(idx)))
        keep += [idx[j] for j in torch.randperm(len(idx), generator=g)[:k].tolist()]
    return sorted(keep)


def _candidates(name: str, root: Path, split: str, train_split: str) -> list[tuple[str, Path]]:
    """``(kind, path)`` in lookup order; kind ``"torchvision"`` (extracted archive) or ``"folder"``."""
    if split == "train":
        dirs = [train_split] if train_split in ("train", "test") else []
    else:
        dirs = ["val", "test"] if name == "imagefolder" else ["test", "val"]
    if name == "imagefolder":
        return [("folder", root / d) for d in dirs]
    tv_dir = _TORCHVISION[name][1]
    return [("torchvision", root / tv_dir), ("torchvision", root / name / tv_dir)] + [
        ("folder", base / d) for base in (root / name, root) for d in dirs
    ]


def _load_torchvision(name: str, path: Path, split: str, train_split: str) -> Dataset:
    cls = _TORCHVISION[name][0]
    try:
        if name == "stl10":
            ds = cls(str(path.parent), split=train_split if split == "train" else "test")
            if not getattr(ds, "classes", None):
                ds.classes = STL10_CLASSES
            return ds
        return cls(str(path.parent), train=split == "train")
    except RuntimeError as e:
        raise DatasetNotFoundError(
            f"{path} exists but failed torchvision's {cls.__name__} integrity check ({e}). Fix: delete "
            "it and extract the official archive again (or pass --data.download true when online)."
        ) from e


def build_dataset(
    name: str,
    split: str = "train",
    root: str | Path | None = None,
    *,
    train_split: str | None = None,
    skip_bad_images: bool = False,
) -> Dataset:
    """Find and open one split of a dataset, without transforms.

    Args:
        name: one of ``DATASETS``.
        split: ``"train"`` or ``"val"`` (``"test"`` is accepted as an alias of ``"val"``; the val
            split is CIFAR's/STL10's test set and ImageFolder's ``val`` (or ``test``) folder).
        root: data root; None: ``$MIM_DATA``, else ``./data`` (see ``resolve_root``).
        train_split: STL10 only: torchvision split used as the train split, one of
            ``STL10_SPLITS`` (default ``"train"``); unlabeled images have label -1.
        skip_bad_images: ImageFolder trees only: decode every file now and drop the unreadable ones
            (logged as a warning naming up to 5 of them; the list is in ``dataset.skipped``).

    Returns:
        a dataset of ``(PIL.Image RGB, int label)`` with ``.classes`` (list of class names) and
        ``.targets`` (or ``.labels`` for torchvision STL10).

    Raises:
        ValueError: unknown ``name``, ``split`` or ``train_split``.
        DatasetNotFoundError: not found at any looked-at path (the message lists them all), or
            found but unusable (empty class folder, failed integrity check).
    """
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    if name == "litdata":
        raise ValueError(
            "litdata shards are streamed, not opened by build_dataset: use ImageDataModule(dataset='litdata') "
            "or mim.data.litdata.streaming_dataset"
        )
    split = {"test": "val"}.get(split, split)
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if train_split is not None and name != "stl10":
        raise ValueError(f"train_split is for stl10 only, got train_split={train_split!r} for {name!r}")
    train_split = train_split or "train"
    if train_split not in STL10_SPLITS:
        raise ValueError(f"train_split must be one of {', '.join(STL10_SPLITS)}, got {train_split!r}")

    root_path, source = resolve_root(root)
    candidates = _candidates(name, root_path, split, train_split)
    for kind, path in candidates:
        if not path.is_dir():
            continue
        if kind == "torchvision":
            return _load_torchvision(name, path, split, train_split)
        ds = RGBImageFolder(path)
        if skip_bad_images and ds.drop_unreadable():
            n = len(ds.skipped)
            more = ", ..." if n > 5 else ""
            log.warning("Skipped %d unreadable image(s) in %s: %s%s", n, path, ", ".join(ds.skipped[:5]), more)
        return ds

    what = {"torchvision": "  (torchvision format)", "folder": "<class>/<image>  (ImageFolder tree)"}
    looked = "\n".join(f"  - {p}{os.sep}{what[kind]}" for kind, p in candidates)
    raise DatasetNotFoundError(
        f"Dataset {name!r} ({split} split) not found under root {root_path} (from {source}). "
        f"Looked at:\n{looked}\n{_FIX}"
    )


def download_dataset(name: str, root: str | Path | None = None) -> None:
    """Download ``name`` with torchvision into ``<root>`` unless it is already there.

    Torchvision extracts to ``<root>/cifar-10-batches-py``, ``<root>/cifar-100-python`` or
    ``<root>/stl10_binary``.

    Raises:
        ValueError: ``name`` cannot be downloaded (``imagefolder``) or is unknown.
        DatasetNotFoundError: the download failed (e.g. no network); the message says how to
            place the data by hand.
    """
    if name not in _TORCHVISION:
        raise ValueError(f"download is supported for {', '.join(_TORCHVISION)} only, not {name!r}")
    root_path, _ = resolve_root(root)
    if any(p.is_dir() for _, p in _candidates(name, root_path, "train", "train")):
        return
    cls, tv_dir = _TORCHVISION[name]
    try:
        cls(str(root_path), download=True)
    except (OSError, RuntimeError) as e:
        raise DatasetNotFoundError(
            f"Could not download {name!r} to {root_path} ({type(e).__name__}: {e}). This machine "
            f"looks offline. Place the data by hand: extract the official archive so that "
            f"{root_path / tv_dir} exists, or lay it out as an ImageFolder tree "
            f"{root_path / name}/{{train,test}}/<class>/<image> (see datasets/README.md), "
            "and set --data.download false."
        ) from e
