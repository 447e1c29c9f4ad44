"""Tests of mim.data on the shared CIFAR-10 JPEG tree and on small trees built from it in tmp_path."""

from __future__ import annotations

import logging
import pickle
import shutil
import urllib.error
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd
from PIL import Image
from torch.utils.data import DataLoader, Subset

from mim.data import (
    BadImageError,
    DatasetNotFoundError,
    ImageDataModule,
    build_dataset,
    eval_transform,
    train_transform,
)
from mim.data.datamodule import _seed_worker
from mim.data.datasets import STATS, TransformedDataset, load_rgb, stratified_fraction, targets_of

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
CIFAR = SHARED / "cifar10"
CLASSES = sorted(p.name for p in (CIFAR / "train").iterdir()) if CIFAR.is_dir() else []
CIFAR10_MEAN, CIFAR10_STD = STATS["cifar10"]



@pytest.fixture(autouse=True, scope="module")
def _need_shared_cifar10() -> None:
    if not CIFAR.is_dir():
        pytest.fail(f"real test data not found: {CIFAR} (see ../shared/data/README.md)")


def real_jpegs(n: int, cls: str = "cat", split: str = "train") -> list[Path]:
    """The first ``n`` shared CIFAR-10 JPEGs of one class."""
    return sorted((CIFAR / split / cls).iterdir())[:n]


def make_tree(root: Path, classes: tuple[str, ...] = ("cat", "dog"), n: int = 3, splits=("train", "test")) -> Path:
    """``root/<split>/<class>/<NNNN>.jpg`` with ``n`` real CIFAR-10 images per class."""
    for split in splits:
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            for src in real_jpegs(n, cls):
                shutil.copy(src, root / split / cls / src.name)
    return root


def dm_kwargs(**kw):
    return {"num_workers": 0, "batch_size": 4, **kw}


# --- the shared CIFAR-10 tree ---------------------------------------------------------------


def test_shared_cifar10_found_via_env_batches_normalized(monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("MIM_DATA", "../shared/data")  # as documented: relative to the repo root
    dm = ImageDataModule(**dm_kwargs(limit_per_class=2, val_limit_per_class=5, batch_size=50))
    dm.setup("fit")
    assert dm.num_classes == 10
    assert (dm.mean, dm.std) == (CIFAR10_MEAN, CIFAR10_STD)
    assert dm.eval_crop_pct == 1.0  # native 32 px == img_size

    imgs, labels = next(iter(dm.val_dataloader()))
    assert imgs.shape == (50, 3, 32, 32) and imgs.dtype == torch.float32
    assert labels.shape == (50,) and labels.dtype == torch.int64
    assert sorted(Counter(labels.tolist()).values()) == [5] * 10
    mean, std = imgs.mean(dim=(0, 2, 3)), imgs.std(dim=(0, 2, 3))
    assert mean.abs().max() < 0.4, mean  # normalized with the dataset statistics
    assert ((std > 0.6) & (std < 1.4)).all(), std

    dm.batch_size = 6
    train = list(dm.train_dataloader())  # 20 images, batch 6, drop_last
    assert len(train) == 3
    assert all(x.shape == (6, 3, 32, 32) and x.dtype == torch.float32 for x, _ in train)


@pytest.mark.parametrize("root", [SHARED, CIFAR], ids=["data-root", "dataset-folder"])
def test_shared_cifar10_found_via_root(root, monkeypatch):
    monkeypatch.delenv("MIM_DATA", raising=False)
    dm = ImageDataModule(**dm_kwargs(root=str(root), limit_per_class=3, val_limit_per_class=1))
    dm.setup("fit")
    assert dm.num_classes == 10
    assert Counter(label for _, label in dm.train_set) == {i: 3 for i in range(10)}
    assert len(dm.val_set) == 10
    # limit_per_class keeps the first N of each class, in dataset order
    names = [Path(dm.train_set.dataset.dataset.samples[i][0]).name for i in dm.train_set.indices]
    assert names == ["0000.jpg", "0001.jpg", "0002.jpg"] * 10


def test_fraction_is_stratified_and_seeded():
    def indices(seed: int) -> list[int]:
        dm = ImageDataModule(**dm_kwargs(root=str(SHARED), fraction=0.01, seed=seed))
        dm.setup("fit")
        return dm.train_set.indices

    a, b, c = indices(0), indices(0), indices(1)
    assert a == b and a != c
    targets = targets_of(build_dataset("cifar10", "train", SHARED))
    assert Counter(targets[i] for i in a) == {i: 50 for i in range(10)}  # 1% of 5000 per class
    assert stratified_fraction([0, 0, 0, 1], 0.1, seed=0) in ([0, 3], [1, 3], [2, 3])  # >= 1 per class


def test_validate_and_predict_build_only_val():
    dm = ImageDataModule(**dm_kwargs(root=str(SHARED), val_limit_per_class=1))
    dm.setup("predict")
    assert dm.train_set is None and len(dm.val_set) == 10
    imgs, labels = next(iter(dm.predict_dataloader()))
    again, _ = next(iter(dm.predict_dataloader()))
    assert torch.equal(imgs, again)  # eval transform: deterministic, no shuffle
    assert labels.tolist() == [0, 1, 2, 3]


# --- torchvision formats ----------------------------------------------------------------------


def write_fake_cifar10(folder: Path, per_batch: int = 2) -> list[np.ndarray]:
    """A tiny ``cifar-10-batches-py`` (torchvision / official pickle format) from real JPEG pixels.

    Returns the (32, 32, 3) uint8 train images in dataset order.
    """
    folder.mkdir(parents=True)
    images = []
    for name, split in [(f"data_batch_{i}", "train") for i in range(1, 6)] + [("test_batch", "test")]:
        labels = [(len(images) + j) % 10 for j in range(per_batch)]
        pixels = [np.asarray(load_rgb(real_jpegs(1, CLASSES[t], split)[0])) for t in labels]
        if split == "train":
            images += pixels
        data = np.stack([p.transpose(2, 0, 1).reshape(-1) for p in pixels])  # (N, 3072) uint8, CHW rows
        entry = {"batch_label": name, "labels": labels, "data": data, "filenames": [f"{j}.png" for j in labels]}
        (folder / name).write_bytes(pickle.dumps(entry))
    meta = {"num_cases_per_batch": per_batch, "label_names": CLASSES, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return images


@pytest.fixture
def no_md5(monkeypatch):
    """torchvision checks the md5 of the official files: accept the fake ones."""
    monkeypatch.setattr(tvd.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tvd.STL10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tvd.cifar, "check_integrity", lambda *a, **k: True)


@pytest.mark.parametrize("sub", ["", "cifar10"])
def test_torchvision_format_cifar10(tmp_path, no_md5, sub):
    images = write_fake_cifar10(tmp_path / sub / "cifar-10-batches-py")
    make_tree(tmp_path / "cifar10", splits=("train",))  # torchvision format is looked at first
    raw = build_dataset("cifar10", "train", tmp_path)
    assert isinstance(raw, tvd.CIFAR10) and len(raw) == 10
    img, label = raw[3]
    assert img.mode == "RGB" and label == 3
    np.testing.assert_array_equal(np.asarray(img), images[3])

    dm = ImageDataModule(**dm_kwargs(root=str(tmp_path), limit_per_class=1))
    dm.setup("fit")
    assert dm.num_classes == 10 and len(dm.train_set) == 10 and len(dm.val_set) == 2
    imgs, labels = next(iter(dm.val_dataloader()))
    assert imgs.shape == (2, 3, 32, 32) and labels.tolist() == [0, 1]


def test_torchvision_format_failing_integrity_is_reported(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(DatasetNotFoundError, match="integrity check"):
        build_dataset("cifar10", "train", tmp_path)


def test_torchvision_format_stl10_unlabeled_is_minus_one(tmp_path, no_md5):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, n in [("train", 4), ("test", 2), ("unlabeled", 3)]:
        (folder / f"{split}_X.bin").write_bytes(rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8).tobytes())
        if split != "unlabeled":
            (folder / f"{split}_y.bin").write_bytes(np.arange(1, n + 1, dtype=np.uint8).tobytes())  # 1-based

    dm = ImageDataModule(**dm_kwargs(dataset="stl10", root=str(tmp_path), img_size=64, train_split="train+unlabeled"))
    dm.setup("fit")
    assert dm.num_classes == 10 and dm.eval_crop_pct == 0.875
    labels = [label for _, label in dm.train_set]
    assert labels == [0, 1, 2, 3, -1, -1, -1]
    imgs, val_labels = next(iter(dm.val_dataloader()))
    assert imgs.shape == (2, 3, 64, 64) and val_labels.tolist() == [0, 1]


# --- errors -------------------------------------------------------------------------------------


def test_missing_dataset_lists_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("MIM_DATA", str(tmp_path))
    dm = ImageDataModule(**dm_kwargs())
    with pytest.raises(DatasetNotFoundError) as info:
        dm.setup("fit")
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    for path in ["cifar-10-batches-py", "cifar10/cifar-10-batches-py", "cifar10/train", "train"]:
        assert f"{tmp_path / path}{'/'}" in msg
    assert "MIM_DATA" in msg and "--data.root" in msg and "datasets/README.md" in msg

    monkeypatch.delenv("MIM_DATA")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetNotFoundError, match="default ./data"):
        build_dataset("cifar100", "val")


def test_download_offline_gives_clear_error(tmp_path, monkeypatch):
    def offline(self):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tvd.CIFAR10, "download", offline)
    dm = ImageDataModule(**dm_kwargs(root=str(tmp_path), download=True))
    with pytest.raises(DatasetNotFoundError, match="offline") as info:
        dm.prepare_data()
    assert str(tmp_path / "cifar-10-batches-py") in str(info.value)
    ImageDataModule(**dm_kwargs(root=str(SHARED), download=True)).prepare_data()  # present: no download


def test_empty_class_folder_is_named(tmp_path):
    root = make_tree(tmp_path)
    (root / "train" / "bird").mkdir()
    (root / "train" / "bird" / "notes.txt").write_text("not an image")
    dm = ImageDataModule(**dm_kwargs(root=str(root)))
    with pytest.raises(DatasetNotFoundError, match="without any image") as info:
        dm.setup("fit")
    assert str(root / "train" / "bird") in str(info.value)
    assert str(root / "train" / "cat") not in str(info.value)


@pytest.mark.parametrize("value", [{"dataset": "imagenet"}, {"fraction": 0.0}, {"fraction": 1.5},
                                   {"limit_per_class": 0}, {"img_size": 0}, {"train_split": "unlabeled"}])
def test_invalid_arguments(value):
    with pytest.raises(ValueError) as info:
        ImageDataModule(**value)
    if "dataset" in value:
        assert "cifar10, cifar100, stl10, imagefolder" in str(info.value)


# --- image files --------------------------------------------------------------------------------


def bad_tree(root: Path) -> tuple[Path, list[Path]]:
    root = make_tree(root)
    cat = root / "train" / "cat"
    good = (cat / "0000.jpg").read_bytes()
    bad = [cat / "truncated.jpg", cat / "zero.jpg", cat / "text.jpg"]
    bad[0].write_bytes(good[: len(good) // 2])
    bad[1].write_bytes(b"")
    bad[2].write_text("hello, I am not a JPEG\n")
    (cat / "readme.txt").write_text("ignored: not an image extension")
    return root, bad


def test_bad_images_raise_with_path(tmp_path):
    root, bad = bad_tree(tmp_path)
    raw = build_dataset("cifar10", "train", root)
    assert len(raw) == 3 + 3 + 3  # readme.txt is not listed
    paths = [p for p, _ in raw.samples]
    for path in bad:
        with pytest.raises(BadImageError, match="skip_bad_images") as info:
            raw[paths.index(str(path))]
        assert str(path) in str(info.value)
    assert isinstance(info.value, RuntimeError)

    # the same error (type and message) comes out of a DataLoader worker process
    dm = ImageDataModule(**dm_kwargs(root=str(root)))
    dm.setup("fit")
    assert "Cannot read image" in first_error(DataLoader(dm.train_set, batch_size=9, num_workers=1))


def first_error(loader: DataLoader) -> str:
    """Message of the BadImageError raised by the first batch."""
    it = iter(loader)
    try:
        next(it)
    except BadImageError as e:
        return str(e)
    finally:  # a failed worker iterator left to the garbage collector takes 5 s to shut down
        it._shutdown_workers()
    raise AssertionError("no BadImageError")


def test_skip_bad_images(tmp_path, caplog):
    root, bad = bad_tree(tmp_path)
    dm = ImageDataModule(**dm_kwargs(root=str(root), skip_bad_images=True, batch_size=3))
    with caplog.at_level(logging.WARNING, logger="mim.data.datasets"):
        dm.setup("fit")
    assert sorted(dm.skipped_images) == sorted(map(str, bad))
    assert "Skipped 3 unreadable image(s)" in caplog.text and str(bad[0]) in caplog.text
    assert len(dm.train_set) == 6
    assert sum(len(x) for x, _ in dm.train_dataloader()) == 6


def test_grayscale_cmyk_palette_rgba_become_rgb(tmp_path):
    root = make_tree(tmp_path)
    cat = root / "train" / "cat"
    src = load_rgb(cat / "0000.jpg")
    src.convert("L").save(cat / "gray.jpg")
    src.convert("CMYK").save(cat / "cmyk.jpg")
    src.convert("P").save(cat / "palette.png")
    src.convert("RGBA").save(cat / "rgba.png")
    with Image.open(cat / "cmyk.jpg") as cmyk:
        assert cmyk.mode == "CMYK"
    for name in ["gray.jpg", "cmyk.jpg", "palette.png", "rgba.png"]:
        assert load_rgb(cat / name).mode == "RGB"

    dm = ImageDataModule(**dm_kwargs(root=str(root), batch_size=10))
    dm.setup("fit")
    imgs, labels = next(iter(dm.train_dataloader()))  # 7 cats + 3 dogs: every file in one batch
    assert imgs.shape == (10, 3, 32, 32) and imgs.dtype == torch.float32
    gray = dm.train_set[[p for p, _ in dm.train_set.dataset.samples].index(str(cat / "gray.jpg"))][0]
    assert gray.shape == (3, 32, 32)


def test_imagefolder_train_val_layout(tmp_path):
    root = make_tree(tmp_path, classes=("bird", "cat", "dog"), n=2, splits=("train", "val"))
    dm = ImageDataModule(**dm_kwargs(dataset="imagefolder", root=str(root), img_size=24, batch_size=2))
    dm.setup("fit")
    assert dm.num_classes == 3
    assert (dm.mean, dm.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert dm.eval_crop_pct == 0.875  # native size unknown: ImageNet convention
    assert len(dm.train_set) == 6 and len(dm.val_set) == 6
    imgs, labels = next(iter(dm.val_dataloader()))
    assert imgs.shape == (2, 3, 24, 24) and labels.tolist() == [0, 0]
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "elsewhere" / "train")):
        ImageDataModule(**dm_kwargs(dataset="imagefolder", root=str(tmp_path / "elsewhere"))).setup()


# --- transforms -----------------------------------------------------------------------------------


def test_train_transform_shapes_and_randomness():
    tf = train_transform(24, CIFAR10_MEAN, CIFAR10_STD)
    img = np.asarray(load_rgb(real_jpegs(1)[0]))
    wide = np.concatenate([img, img], axis=1)  # (32, 64, 3): non-square input
    outs = [tf(image=x)["image"] for x in (img, img, wide)]
    assert all(o.shape == (3, 24, 24) and o.dtype == torch.float32 for o in outs)
    assert not torch.equal(outs[0], outs[1])


def test_eval_transform_deterministic_and_center_crop():
    img = np.asarray(load_rgb(real_jpegs(1)[0]))
    tf = eval_transform(32, CIFAR10_MEAN, CIFAR10_STD, crop_pct=1.0)
    a, b = tf(image=img)["image"], tf(image=img)["image"]
    assert torch.equal(a, b) and a.shape == (3, 32, 32) and a.dtype == torch.float32
    mean, std = torch.tensor(CIFAR10_MEAN)[:, None, None], torch.tensor(CIFAR10_STD)[:, None, None]
    expected = (torch.from_numpy(img.copy()).permute(2, 0, 1) / 255 - mean) / std
    torch.testing.assert_close(a, expected.float(), atol=1e-5, rtol=0)  # 32 -> 32: pixels untouched
    big = np.zeros((96, 128, 3), np.uint8)
    assert eval_transform(64, CIFAR10_MEAN, CIFAR10_STD, crop_pct=0.875)(image=big)["image"].shape == (3, 64, 64)
    with pytest.raises(ValueError):
        eval_transform(32, CIFAR10_MEAN, CIFAR10_STD, crop_pct=0.0)


def test_workers_get_different_augmentations():
    """albumentations keeps its RNG in the pipeline; each worker must be reseeded (_seed_worker)."""
    raw = build_dataset("cifar10", "train", SHARED)
    ds = Subset(TransformedDataset(raw, train_transform(16, CIFAR10_MEAN, CIFAR10_STD)), [0, 0])
    loader = DataLoader(ds, batch_size=1, num_workers=2, worker_init_fn=_seed_worker)
    first, second = [x for x, _ in loader]  # item 0 from worker 0, item 1 from worker 1
    assert not torch.equal(first, second)
