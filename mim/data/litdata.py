"""LitData streaming shards of an image dataset: writing them, and reading them in ``ImageDataModule``.

LitData (https://github.com/Lightning-AI/litData, the ``[stream]`` extra) stores a dataset as
chunk files plus an ``index.json``, read locally or straight from object storage (``s3://``,
``gs://``, ...) on many nodes; it shards the items over DDP ranks and DataLoader workers itself
and its ``StreamingDataLoader`` has a ``state_dict`` that Lightning saves in checkpoints, so an
interrupted epoch resumes where it stopped.

Layout written by ``convert_dataset`` (``tools/to_litdata.py``) and read by
``ImageDataModule(dataset="litdata", root=<root>)``::

    <root>/train/{index.json, chunk-*.bin, meta.json}
    <root>/val/{index.json, chunk-*.bin, meta.json}

Items (one per image): ``{"image": bytes, "label": int, "index": int, "path": str}``.
``image`` is the original file's bytes when the file is a JPEG (no re-encoding, no quality loss);
any other file (PNG, WebP, GIF, 16-bit or float TIFF, ...) and in-memory datasets (torchvision's
CIFAR arrays) are decoded with ``mim.data.datasets.load_rgb`` rules and stored as lossless 8-bit RGB
PNG. ``index`` is the image's position in its split as ``build_dataset`` lists it (what
``return_index`` returns for the other sources), ``path`` its file path relative to the split folder
(for error messages). ``meta.json`` holds the class names and where the images came from.
Reading decodes with ``mim.data.datasets.decode_rgb`` (the same rules as ``load_rgb``), so the
decoded pixels equal those of the ImageFolder source.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")  # no PyPI request at import (no network here)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

from mim.data.resumable import SampleRNG, sample_seed  # noqa: E402
from mim.errors import ConfigError  # noqa: E402
from mim.data.datasets import (  # noqa: E402
    NATIVE_SIZE,
    STATS,
    BadImageError,
    DatasetNotFoundError,
    RGBImageFolder,
    build_dataset,
    decode_rgb,
    first_per_class,
    load_rgb,
    targets_of,
    unreadable,
)

try:
    from litdata import StreamingDataLoader, StreamingDataset, optimize
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ConfigError(
        "dataset 'litdata' needs the litdata package, which is not installed. "
        "Fix: pip install 'mim-lightning[stream]' (or pip install litdata)."
    ) from err

log = logging.getLogger(__name__)

#: The JSON beside each split's shards: class names, counts, statistics, provenance.
META_FILE = "meta.json"
#: Version of the item layout written here (``meta.json`` field ``format``).
FORMAT = "mim-litdata-1"
SPLITS = ("train", "val")
_JPEG_MAGIC = b"\xff\xd8\xff"
_READ_FIX = (
    "Fix: convert the data again with tools/to_litdata.py, which decodes every image first "
    "(--skip-bad-images leaves unreadable ones out)."
)


# --- writing --------------------------------------------------------------------------------------


def _png_bytes(img: Image.Image) -> bytes:
    buf = BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class _ShardItem:
    """``optimize``'s ``fn``: position in the split -> shard item (picklable for spawned workers)."""

    def __init__(self, raw: Dataset, name: str) -> None:
        self.raw = raw
        self.name = name

    def __call__(self, index: int) -> dict[str, Any]:
        if isinstance(self.raw, RGBImageFolder):
            path, label = self.raw.samples[index]
            data = Path(path).read_bytes()
            if not data.startswith(_JPEG_MAGIC):
                data = _png_bytes(load_rgb(path))
            rel = os.path.relpath(path, self.raw.root)
        else:
            img, label = self.raw[index]
            data = _png_bytes(img if img.mode == "RGB" else img.convert("RGB"))
            rel = f"{self.name}[{index}]"
        return {"image": data, "label": int(label), "index": int(index), "path": rel}


def _is_remote(path: str) -> bool:
    return "://" in str(path)


def _join(root: str, *names: str) -> str:
    if _is_remote(root):
        return "/".join([str(root).rstrip("/"), *names])
    return os.path.join(os.path.expanduser(str(root)), *names)


def _write_meta(output_dir: str, meta: dict[str, Any]) -> None:
    text = json.dumps(meta, indent=1)
    if not _is_remote(output_dir):
        tmp = Path(output_dir) / f".{META_FILE}.tmp"
        tmp.write_text(text)
        tmp.replace(Path(output_dir) / META_FILE)  # atomic: a reader never sees half a file
        return
    from litdata.streaming.fs_provider import _get_fs_provider

    with tempfile.TemporaryDirectory() as tmpdir:
        local = os.path.join(tmpdir, META_FILE)
        Path(local).write_text(text)
        _get_fs_provider(output_dir).upload_file(local, _join(output_dir, META_FILE))


def optimize_image_dataset(
    raw: Dataset,
    output_dir: str,
    *,
    indices: Sequence[int] | None = None,
    dataset: str = "imagefolder",
    source: str = "",
    split: str = "train",
    chunk_bytes: int | str = "64MB",
    num_workers: int | None = None,
    start_method: str | None = None,
    verify: bool = True,
    threads: int = 8,
    overwrite: bool = False,
    verbose: bool = False,
    shuffle: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Write one split of a raw image dataset as LitData shards plus ``meta.json``.

    Args:
        raw: a dataset from ``build_dataset`` (an ``RGBImageFolder``: file bytes are stored, JPEG
            as-is, other formats as PNG; any other dataset of ``(PIL.Image, label)``: PNG).
        output_dir: local folder or object-store URL (``s3://bucket/prefix/train``) for this split.
        indices: positions in ``raw`` to write (default all); stored as each item's ``index``.
        dataset: the dataset name, for ``meta.json`` (its mean / std / native size are recorded
            when it is cifar10, cifar100 or stl10, so ``ImageDataModule`` picks them up).
        source: where the images came from, for ``meta.json``.
        split: ``train`` or ``val``, for ``meta.json``.
        chunk_bytes: target size of one chunk file (LitData's ``chunk_bytes``; 64MB suits object
            storage; a few hundred KB gives several chunks for tiny test sets).
        num_workers: processes writing chunks (LitData's ``num_workers``); None: all CPUs.
        start_method: multiprocessing start method for them; None: ``fork`` where available
            (LitData's default, ``spawn``, re-imports torch in every worker: seconds each). The
            process-wide start method is restored afterwards.
        verify: decode every file of an ImageFolder first (``threads`` threads) and raise
            ``BadImageError`` naming the unreadable ones, instead of writing them.
        threads: threads of the verification pass.
        overwrite: replace an existing non-empty ``output_dir`` (else ``ConfigError``).
        verbose: let LitData print its progress.
        shuffle: write the items in a random order (seeded by ``seed``). LitData shuffles chunk
            order and items within a chunk, not across chunks, so a train split written in class
            order would give batches of one or two classes; ``convert_dataset`` shuffles train.
        seed: seed of that order (``torch.Generator``).

    Returns:
        the ``meta.json`` content: ``format``, ``split``, ``dataset``, ``source``, ``classes``,
        ``num_items``, ``jpeg_items`` (stored as original bytes), ``mean``/``std``/``native_size``
        (None for imagefolder), ``skipped`` (files ``build_dataset(..., skip_bad_images=True)`` dropped).

    Raises:
        BadImageError: ``verify`` found unreadable files (all of them are listed).
        ConfigError: ``output_dir`` exists and is not empty, and ``overwrite`` is False.
    """
    positions = list(range(len(raw))) if indices is None else [int(i) for i in indices]  # type: ignore[arg-type]
    if not positions:
        raise ConfigError(f"Nothing to write to {output_dir}: the {split} split selection is empty.")
    if shuffle:
        order = torch.randperm(len(positions), generator=torch.Generator().manual_seed(seed)).tolist()
        positions = [positions[i] for i in order]
    if not _is_remote(output_dir):
        out = Path(output_dir)
        if out.is_dir() and any(out.iterdir()) and not overwrite:
            raise ConfigError(f"{out} exists and is not empty. Fix: choose another output folder, or pass --overwrite.")
        out.mkdir(parents=True, exist_ok=True)
    if verify and isinstance(raw, RGBImageFolder):
        bad = unreadable([raw.samples[i][0] for i in positions], threads)
        if bad:
            more = f" (and {len(bad) - 20} more)" if len(bad) > 20 else ""
            raise BadImageError(
                f"{len(bad)} unreadable image(s) in {raw.root}: {', '.join(bad[:20])}{more}. Fix: remove or "
                "replace them, or pass --skip-bad-images (skip_bad_images=True) to leave them out."
            )
    jpeg = 0
    if isinstance(raw, RGBImageFolder):
        with ThreadPoolExecutor(threads) as pool:
            jpeg = sum(pool.map(_starts_with_jpeg, [raw.samples[i][0] for i in positions]))

    if start_method is None and "fork" in multiprocessing.get_all_start_methods():
        start_method = "fork"
    previous = multiprocessing.get_start_method(allow_none=True)
    env = {k: v for k, v in os.environ.items() if k.startswith("DATA_OPTIMIZER_")}
    try:
        optimize(
            fn=_ShardItem(raw, f"{dataset}/{split}"),
            inputs=positions,
            output_dir=output_dir,
            chunk_bytes=chunk_bytes,
            num_workers=num_workers or os.cpu_count() or 1,
            mode="overwrite" if overwrite else None,
            start_method=start_method,
            keep_data_ordered=True,  # static slices: the shards hold the items in the given order
            verbose=verbose,
        )
    finally:  # LitData sets the process-wide start method (force=True) and DATA_OPTIMIZER_* variables
        multiprocessing.set_start_method(previous, force=True)
        for key in [k for k in os.environ if k.startswith("DATA_OPTIMIZER_")]:
            del os.environ[key]
        os.environ.update(env)

    known = dataset in ("cifar10", "cifar100", "stl10")
    meta = {
        "format": FORMAT,
        "split": split,
        "dataset": dataset,
        "source": str(source),
        "classes": [str(c) for c in raw.classes],  # type: ignore[attr-defined]
        "num_items": len(positions),
        "write_order": f"shuffled (seed {seed})" if shuffle else "dataset order",
        "jpeg_items": int(jpeg),
        "mean": list(STATS[dataset][0]) if known else None,
        "std": list(STATS[dataset][1]) if known else None,
        "native_size": NATIVE_SIZE[dataset] if known else None,
        "skipped": list(getattr(raw, "skipped", [])),
        "item": {"image": "encoded image: original JPEG bytes, else lossless RGB PNG", "label": "int",
                 "index": "int, position in the split", "path": "str, relative to the split folder"},
    }
    _write_meta(output_dir, meta)
    return meta


def _starts_with_jpeg(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(3) == _JPEG_MAGIC


def convert_dataset(
    name: str,
    root: str | Path | None,
    output_dir: str,
    *,
    splits: Sequence[str] = SPLITS,
    limit_per_class: int | None = None,
    skip_bad_images: bool = False,
    **kwargs: Any,
) -> dict[str, dict[str, Any]]:
    """Convert the train and/or val split of a dataset that ``build_dataset`` finds into
    ``<output_dir>/<split>/`` shards (the layout ``ImageDataModule(dataset="litdata")`` reads).

    Args:
        name: ``cifar10``, ``cifar100``, ``stl10`` or ``imagefolder`` (looked for as ``--data.root``
            is; datasets/README.md).
        root: data root (None: ``$MIM_DATA``, else ``./data``).
        output_dir: local folder or object-store URL.
        splits: which of ``train``, ``val`` to write.
        limit_per_class: write only the first N images of each class (dataset order).
        skip_bad_images: leave unreadable files out (listed in ``meta.json`` ``skipped``) instead of
            raising ``BadImageError``.
        **kwargs: passed to ``optimize_image_dataset`` (``chunk_bytes``, ``num_workers``, ``seed``,
            ...); the train split is written in shuffled order, val in dataset order.

    Returns:
        ``{split: meta}`` for each written split.

    Raises:
        DatasetNotFoundError: the dataset is not found; BadImageError: unreadable files (without
        ``skip_bad_images``); ConfigError: see ``optimize_image_dataset``; ValueError: unknown split.
    """
    kwargs.setdefault("verify", not skip_bad_images)  # skip_bad_images has decoded every file already
    metas = {}
    for split in splits:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        raw = build_dataset(name, split, root, skip_bad_images=skip_bad_images)
        indices = None if limit_per_class is None else first_per_class(targets_of(raw), limit_per_class)
        source = getattr(raw, "root", root)
        metas[split] = optimize_image_dataset(
            raw, _join(str(output_dir), split), indices=indices, dataset=name, source=str(source), split=split,
            shuffle=split == "train", **kwargs,
        )
    return metas


def convert_image_folder(
    folder: str | Path,
    output_dir: str,
    *,
    split: str = "train",
    limit_per_class: int | None = None,
    skip_bad_images: bool = False,
    **kwargs: Any,
) -> dict[str, Any]:
    """Convert one ImageFolder split ``folder/<class>/<image>`` into shards in ``output_dir``
    (which should end in ``/train`` or ``/val`` for ``ImageDataModule``).

    Arguments and errors as ``convert_dataset``; ``split`` is recorded in ``meta.json``, and a
    ``train`` split is written in shuffled order (``shuffle`` in ``kwargs`` overrides).
    """
    kwargs.setdefault("shuffle", split == "train")
    kwargs.setdefault("verify", not skip_bad_images)  # skip_bad_images has decoded every file already
    raw = RGBImageFolder(folder)
    if skip_bad_images and raw.drop_unreadable():
        log.warning("Skipped %d unreadable image(s) in %s", len(raw.skipped), folder)
    indices = None if limit_per_class is None else first_per_class(raw.targets, limit_per_class)
    return optimize_image_dataset(
        raw, str(output_dir), indices=indices, dataset="imagefolder", source=str(folder), split=split, **kwargs
    )


# --- reading --------------------------------------------------------------------------------------


def read_meta(split_dir: str) -> dict[str, Any]:
    """``meta.json`` of one split (local folder or object-store URL).

    Raises:
        DatasetNotFoundError: no shards / no ``meta.json`` there (the message says how to make them).
    """
    fix = (
        "Fix: convert a dataset with `python tools/to_litdata.py` (datasets/README.md, section litdata), "
        "or point --data.root at the folder holding its train/ and val/ folders."
    )
    if not _is_remote(split_dir):
        for name in ("index.json", META_FILE):
            if not os.path.isfile(os.path.join(split_dir, name)):
                raise DatasetNotFoundError(f"No LitData shards at {split_dir} (no {name}). {fix}")
        return json.loads(Path(split_dir, META_FILE).read_text())
    from litdata.streaming.fs_provider import _get_fs_provider

    with tempfile.TemporaryDirectory() as tmpdir:
        local = os.path.join(tmpdir, META_FILE)
        try:
            _get_fs_provider(split_dir).download_file(_join(split_dir, META_FILE), local)
            return json.loads(Path(local).read_text())
        except Exception as e:  # every provider raises its own types (botocore, obstore, gcsfs)
            raise DatasetNotFoundError(
                f"Could not read {_join(split_dir, META_FILE)} ({type(e).__name__}: {e}). {fix}"
            ) from e


class ImageStreamingDataset(StreamingDataset):
    """``litdata.StreamingDataset`` over shards written by ``optimize_image_dataset``, yielding
    model-ready images.

    Items: ``(img, label)``, or ``(img, label, index)`` with ``return_index``: ``img`` the
    ``transform``'s ``"image"`` output ((3, H, W) float32 for mim's pipelines) of the decoded RGB
    image (``decode_rgb``), ``label`` int, ``index`` the image's position in its split.

    Args:
        input_dir: one split's folder or URL (``<root>/train``).
        transform: albumentations pipeline ``f(image=(H, W, 3) uint8) -> {"image": ...}``.
        augment: the pipeline is random: reseed it per item with ``sample_seed(aug_seed, epoch,
            index)`` (exact augmentations on resume, whatever the worker count).
        aug_seed: seed of the augmentations.
        return_index: also return ``index``.
        classes: class names (``.classes``).
        **kwargs: ``StreamingDataset`` arguments (``shuffle``, ``drop_last``, ``seed`` of the
            shuffle, ``cache_dir``, ``max_cache_size``, ``storage_options``, ...).

    Raises:
        BadImageError: while iterating, for an item whose bytes do not decode.
    """

    def __init__(
        self,
        input_dir: str,
        transform: Callable[..., dict[str, Any]],
        *,
        augment: bool = False,
        aug_seed: int = 0,
        return_index: bool = False,
        classes: Sequence[str] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(input_dir, **kwargs)
        self.image_transform = transform
        self.augment = augment
        self.aug_seed = int(aug_seed)
        self.return_index = return_index
        self.classes = list(classes)
        self._rng = SampleRNG()

    def __getitem__(self, index: Any) -> Any:
        item = super().__getitem__(index)
        if not isinstance(item, dict):  # slices: a list of raw items, as LitData returns them
            return item
        label, position = int(item["label"]), int(item["index"])
        img = decode_rgb(item["image"], name=f"{item['path']} (item {position} of {self.input_dir.url or self.input_dir.path})",
                         fix=_READ_FIX)
        if self.augment:
            rng = self._rng.reseed(sample_seed(self.aug_seed, self.current_epoch, position))
            self.image_transform.set_random_state(rng.numpy, rng.python)  # type: ignore[attr-defined]
        x = self.image_transform(image=np.asarray(img))["image"]
        return (x, label, position) if self.return_index else (x, label)


def streaming_loader(ds: StreamingDataset, batch_size: int, num_workers: int, train: bool) -> StreamingDataLoader:
    """``StreamingDataLoader`` over ``ds``: shuffled, full batches only (``train``), or in order
    with the last batch kept (dropped under DDP, where LitData gives every rank the same count).

    Its ``state_dict`` (batches yielded, epoch, worker turn) is what Lightning's fit loop saves in
    the checkpoint and loads into the new loader on resume.
    """
    return StreamingDataLoader(
        ds,
        batch_size=batch_size,
        num_workers=num_workers,
        shuffle=train,
        drop_last=train or ds.distributed_env.world_size > 1,
        pin_memory=torch.cuda.is_available(),
    )


def check_args(hparams: dict[str, Any]) -> None:
    """Reject ``ImageDataModule`` options that do not apply to LitData shards.

    Raises:
        ConfigError: naming the option and the fix.
    """
    if hparams.get("root") is None:
        raise ConfigError(
            "dataset 'litdata' needs the shards' location. Fix: set --data.root to the folder or URL "
            "holding train/ and val/ (written by tools/to_litdata.py)."
        )
    for arg, fix in (
        ("limit_per_class", "write a subset with tools/to_litdata.py --limit-per-class N"),
        ("val_limit_per_class", "write a subset with tools/to_litdata.py --limit-per-class N"),
        ("fraction", "write a subset with tools/to_litdata.py --limit-per-class N"),
        ("skip_bad_images", "tools/to_litdata.py decodes every image when converting (--skip-bad-images)"),
        ("download", "convert a downloaded dataset with tools/to_litdata.py"),
    ):
        if hparams.get(arg):
            raise ConfigError(f"{arg} does not apply to dataset 'litdata' (streamed shards). Fix: unset it; {fix}.")


def setup_litdata(dm: Any, wants_train: bool) -> None:
    """``ImageDataModule.setup`` for ``dataset="litdata"``: opens ``<root>/train`` (when
    ``wants_train``) and ``<root>/val`` as ``ImageStreamingDataset`` s with the module's transforms.

    Sets ``dm.train_set``, ``dm.val_set``, ``dm.num_classes``; when the user left them unset, also
    ``dm.mean`` / ``dm.std`` (from ``meta.json``, e.g. CIFAR-10's for converted CIFAR-10) and
    ``dm.eval_crop_pct`` (1.0 when ``meta.json``'s native size equals ``img_size``). Shuffle and
    augmentation seed: ``seed`` plus the run's ``seed_everything`` value (``PL_GLOBAL_SEED``), as for
    the other sources; a resumed run must use the same two (LitData checks the shuffle seed).

    Raises:
        DatasetNotFoundError: no shards at ``<root>/<split>``.
    """
    from mim.data.transforms import IMAGENET_CROP_PCT, eval_transform, train_transform

    hp = dm.hparams
    want = [s for s in SPLITS if (s == "train" and wants_train and dm.train_set is None) or (s == "val" and dm.val_set is None)]
    if not want:
        return
    dirs = {s: _join(str(dm.root), s) for s in want}
    metas = {s: read_meta(d) for s, d in dirs.items()}
    meta = metas.get("train", metas.get("val", {}))
    dm.num_classes = len(meta["classes"])
    if hp.mean is None and meta.get("mean"):
        dm.mean = tuple(meta["mean"])
    if hp.std is None and meta.get("std"):
        dm.std = tuple(meta["std"])
    if hp.eval_crop_pct is None:
        dm.eval_crop_pct = 1.0 if meta.get("native_size") == dm.img_size else IMAGENET_CROP_PCT
    evaluation = eval_transform(dm.img_size, dm.mean, dm.std, dm.eval_crop_pct)
    seed = int(hp.seed) + int(os.environ.get("PL_GLOBAL_SEED", 0))
    common = {"return_index": hp.return_index, "seed": seed}
    if "train" in want:
        augment = bool(hp.train_augment)
        tf = train_transform(dm.img_size, dm.mean, dm.std, scale=tuple(hp.crop_scale), interpolation=dm.interpolation,
                             auto_augment=hp.auto_augment, reprob=hp.reprob) if augment else evaluation
        dm.train_set = ImageStreamingDataset(
            dirs["train"], tf, augment=augment, aug_seed=seed, shuffle=True, drop_last=True,
            classes=metas["train"]["classes"], **common,
        )
    if "val" in want:
        dm.val_set = ImageStreamingDataset(dirs["val"], evaluation, classes=metas["val"]["classes"], **common)
