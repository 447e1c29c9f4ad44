"""LitData shards (``mim/data/litdata.py``, ``tools/to_litdata.py``) built from real CIFAR-10 JPEGs:
the same pixels and labels as the ImageFolder source, rank sharding, exact resume (loader and
Lightning checkpoint), and a MAE ``Trainer.fit`` reading them."""

from __future__ import annotations

import io
import json
import shutil
from itertools import islice
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

pytest.importorskip("litdata", reason="the [stream] extra: pip install -e '.[stream]'")

from cli_run import load_tool
from litdata import StreamingDataset  # noqa: E402

from mim.data import BadImageError, DatasetNotFoundError, ImageDataModule  # noqa: E402
from mim.data.datasets import load_rgb  # noqa: E402
from mim.data.litdata import (  # noqa: E402
    SampleRNG,
    convert_dataset,
    convert_image_folder,
    optimize_image_dataset,
    sample_seed,
)
from mim.errors import ConfigError  # noqa: E402
from mim.methods import MAE  # noqa: E402

PER_CLASS = 20  # 200 train + 200 val images
MAE_TINY = dict(backbone="vit_tiny_patch16_224", img_size=32, patch_size=4, backbone_kwargs={"depth": 2},
                decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, warmup_epochs=0.0)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, shared_data: Path) -> Path:
    """``<root>/{train,val}`` shards of the first 20 images per class of the shared CIFAR-10 JPEG tree,
    in chunks of ~40 KB (several chunks per split, from 2 writer processes)."""
    out = tmp_path_factory.mktemp("litdata") / "cifar10"
    convert_dataset("cifar10", shared_data, str(out), limit_per_class=PER_CLASS, chunk_bytes="40KB", num_workers=2)
    return out


def lit_dm(root: Path, **kw) -> ImageDataModule:
    return ImageDataModule(**{"dataset": "litdata", "root": str(root), "num_workers": 0, "batch_size": 8,
                              "return_index": True, **kw})


def by_index(loader) -> dict[int, tuple[torch.Tensor, int]]:
    return {int(i): (x, int(y)) for xs, ys, idx in loader for x, y, i in zip(xs, ys, idx)}


def test_meta_and_items_are_the_original_jpegs(shards, shared_data):
    meta = json.loads((shards / "train" / "meta.json").read_text())
    assert meta["classes"] == sorted(p.name for p in (shared_data / "cifar10" / "train").iterdir())
    assert (meta["num_items"], meta["jpeg_items"], meta["native_size"]) == (200, 200, 32)
    assert meta["mean"] == [0.4914, 0.4822, 0.4465] and meta["write_order"] == "shuffled (seed 0)"
    assert len(list((shards / "train").glob("chunk-*.bin"))) >= 4

    ds = StreamingDataset(str(shards / "val"))  # LitData's own reader: the raw items
    items = [ds[i] for i in range(len(ds))]
    assert [it["index"] for it in items] == [c * 1000 + j for c in range(10) for j in range(PER_CLASS)]  # in order
    for it in items[::37]:
        path = shared_data / "cifar10" / "test" / it["path"]
        assert bytes(it["image"]) == path.read_bytes()  # stored as-is, no re-encoding
        assert meta["classes"][it["label"]] == path.parent.name
    train = StreamingDataset(str(shards / "train"))
    order = [train[i]["index"] for i in range(len(train))]
    assert sorted(order) == [c * 5000 + j for c in range(10) for j in range(PER_CLASS)] and order != sorted(order)


def test_same_pixels_and_labels_as_imagefolder(shards, shared_data):
    lit = lit_dm(shards, train_augment=False)
    ref = ImageDataModule(root=str(shared_data), num_workers=0, batch_size=8, return_index=True, train_augment=False,
                          limit_per_class=PER_CLASS, val_limit_per_class=PER_CLASS)
    lit.setup("fit"), ref.setup("fit")
    # meta.json gives converted CIFAR-10 its statistics and the 32 px eval crop, as for the JPEG tree
    assert (lit.num_classes, lit.mean, lit.std, lit.eval_crop_pct) == (10, ref.mean, ref.std, ref.eval_crop_pct)
    for split in ("train", "val"):
        if split == "train":  # shuffled; 200 = 25 full batches of 8
            got, want = by_index(lit.train_dataloader()), by_index(DataLoader(ref.train_set, batch_size=50))
        else:
            got, want = by_index(lit.val_dataloader()), by_index(ref.val_dataloader())
        assert sorted(got) == sorted(want) and len(got) == 200
        for i, (x, y) in got.items():
            assert y == want[i][1]
            assert torch.equal(x, want[i][0]), (split, i)  # decoded pixels equal -> identical tensors
    vals = [idx.tolist() for _, _, idx in lit.val_dataloader()]
    assert sum(vals, []) == sorted(want)  # val in dataset order


def test_train_batches_mix_classes_and_augment(shards):
    dm = lit_dm(shards, batch_size=16)
    dm.setup("fit")
    imgs, labels, _ = next(iter(dm.train_dataloader()))
    assert imgs.shape == (16, 3, 32, 32) and imgs.dtype == torch.float32 and labels.dtype == torch.int64
    assert len(set(labels.tolist())) >= 5  # shuffled write order: not a one-class batch
    # augmentation is a function of (seed, epoch, index): the same item in the same epoch repeats exactly
    a = dm.train_set[0]
    b = dm.train_set[0]
    assert torch.equal(a[0], b[0])
    draws = {(e, i): SampleRNG().reseed(sample_seed(1, e, i)).numpy.random() for e in (1, 2) for i in (5, 6)}
    assert len(set(draws.values())) == 4  # epoch and index both change the stream
    assert SampleRNG().reseed(sample_seed(1, 2, 6)).numpy.random() == draws[2, 6]


def test_two_ranks_see_disjoint_data(shards, monkeypatch):
    seen = []
    for rank in (0, 1):  # LitData reads the rank from these variables when torch.distributed is not initialised
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("GLOBAL_RANK", str(rank))
        dm = lit_dm(shards)
        dm.setup("fit")
        train = [int(i) for _, _, idx in dm.train_dataloader() for i in idx]
        val = [int(i) for _, _, idx in dm.val_dataloader() for i in idx]
        seen.append((train, val))
    (t0, v0), (t1, v1) = seen
    assert len(t0) == len(t1) >= 96 and not set(t0) & set(t1)  # same number of batches, no overlap
    assert len(v0) == len(v1) and not set(v0) & set(v1) and len(set(v0) | set(v1)) >= 192


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_state_dict_resumes_the_same_batches(shards, num_workers):
    def loader():
        dm = lit_dm(shards, num_workers=num_workers)
        dm.setup("fit")
        return dm.train_dataloader()

    full = list(loader())
    assert len(full) == 200 // 8
    first = loader()
    it = iter(first)
    for _ in range(7):
        next(it)
    state = first.state_dict()
    assert state["num_samples_yielded"] == 7 * 8
    del it
    resumed = loader()
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(full) - 7
    for (x, y, i), (x2, y2, i2) in zip(full[7:], rest):
        assert torch.equal(i, i2) and torch.equal(y, y2) and torch.equal(x, x2)  # order and augmentations


class Record(L.Callback):
    """Keeps each training batch's indices and image checksum."""

    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append((batch[2].tolist(), float(batch[0].double().sum())))


def fit(shards: Path, root: Path, max_steps: int, ckpt_path: str | None = None) -> tuple[Record, L.Trainer]:
    L.seed_everything(0, verbose=False)
    record = Record()
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=root, every_n_train_steps=2, save_top_k=-1)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        callbacks=[record, ckpt], default_root_dir=root)
    trainer.fit(MAE(**MAE_TINY), datamodule=lit_dm(shards, num_workers=2), ckpt_path=ckpt_path)
    return record, trainer


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_fit_mae_and_resume_from_checkpoint(shards, tmp_path):
    first, trainer = fit(shards, tmp_path, max_steps=2)
    assert trainer.global_step == 2 and len(first.batches) == 2
    assert np.isfinite(float(trainer.callback_metrics["train/loss"]))
    ckpt = tmp_path / "epoch=0-step=2.ckpt"
    state = torch.load(ckpt, weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert state["num_samples_yielded"] == 2 * 8  # no batch fetched ahead: the loader has a length

    second, trainer = fit(shards, tmp_path, max_steps=4, ckpt_path=str(ckpt))
    assert trainer.global_step == 4 and len(second.batches) == 2
    dm = trainer.datamodule  # an uninterrupted epoch from the same datamodule (same seeds)
    fresh = [(idx.tolist(), float(x.double().sum())) for x, _, idx in islice(dm.train_dataloader(), 4)]
    assert first.batches + second.batches == fresh


def test_non_jpeg_and_in_memory_sources_are_png(tmp_path, shared_data):
    folder = tmp_path / "tree" / "cat"
    folder.mkdir(parents=True)
    src = sorted((shared_data / "cifar10" / "train" / "cat").iterdir())[:2]
    shutil.copy(src[0], folder / "a.jpg")
    load_rgb(src[1]).convert("RGBA").save(folder / "b.png")
    gradient = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 64)
    Image.fromarray(gradient).save(folder / "c16.png")  # 16-bit: stored as 8-bit PNG, scaled as load_rgb does
    meta = convert_image_folder(tmp_path / "tree", str(tmp_path / "out" / "val"), split="val", num_workers=1)
    assert (meta["num_items"], meta["jpeg_items"], meta["write_order"]) == (3, 1, "dataset order")
    ds = StreamingDataset(str(tmp_path / "out" / "val"))
    for i, name in enumerate(["a.jpg", "b.png", "c16.png"]):
        item = ds[i]
        assert item["path"] == f"cat/{name}" and item["index"] == i
        assert bytes(item["image"][:3]) == (b"\xff\xd8\xff" if name.endswith("jpg") else b"\x89PN")
        with Image.open(io.BytesIO(bytes(item["image"]))) as img:
            np.testing.assert_array_equal(np.asarray(img.convert("RGB")), np.asarray(load_rgb(folder / name)))

    class InMemory(torch.utils.data.Dataset):  # what torchvision's CIFAR arrays look like
        classes = ["x", "y"]

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return load_rgb(src[i]), i

    optimize_image_dataset(InMemory(), str(tmp_path / "mem"), num_workers=1)
    ds = StreamingDataset(str(tmp_path / "mem"))
    with Image.open(io.BytesIO(bytes(ds[1]["image"]))) as img:
        assert img.format == "PNG"
        np.testing.assert_array_equal(np.asarray(img), np.asarray(load_rgb(src[1])))


def test_bad_images_stop_or_are_skipped_at_conversion(tmp_path, shared_data):
    folder = tmp_path / "tree" / "cat"
    folder.mkdir(parents=True)
    good = sorted((shared_data / "cifar10" / "train" / "cat").iterdir())[:3]
    for p in good:
        shutil.copy(p, folder / p.name)
    (folder / "broken.jpg").write_bytes(good[0].read_bytes()[:300])
    with pytest.raises(BadImageError, match="broken.jpg.*--skip-bad-images"):
        convert_image_folder(tmp_path / "tree", str(tmp_path / "a"), num_workers=1)
    meta = convert_image_folder(tmp_path / "tree", str(tmp_path / "b"), skip_bad_images=True, num_workers=1)
    assert meta["num_items"] == 3 and meta["skipped"] == [str(folder / "broken.jpg")]


def test_cli_and_user_errors(tmp_path, shared_data, capsys):
    tool = load_tool("to_litdata")
    out = tmp_path / "c10"
    metas = tool.main(["--folder", str(shared_data / "cifar10" / "test"), "--out", str(out / "val"), "--split", "val",
                       "--limit-per-class", "2", "--num-workers", "1", "--quiet"])
    assert metas["val"]["num_items"] == 20 and "val: 20 images (20 JPEG as-is)" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="not empty.*--overwrite"):
        tool.main(["--folder", str(shared_data / "cifar10" / "test"), "--out", str(out / "val"), "--quiet"])

    with pytest.raises(DatasetNotFoundError, match=f"{out / 'train'}.*tools/to_litdata.py"):
        lit_dm(out).setup("fit")  # only val was written
    dm = lit_dm(out)
    dm.setup("validate")
    assert len(dm.val_set) == 20 and dm.eval_crop_pct == 0.875  # imagefolder: native size unknown
    with pytest.raises(ConfigError, match="limit_per_class does not apply"):
        lit_dm(out, limit_per_class=2)
    with pytest.raises(ConfigError, match="--data.root"):
        ImageDataModule(dataset="litdata")
