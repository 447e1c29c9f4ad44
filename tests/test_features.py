"""Feature extraction into a feature store and reading it back, on real CIFAR-10 subsets."""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L
import pytest
import timm
import torch

from mim.cli import cli_main
from mim.data import ImageDataModule
from mim.errors import ConfigError, UserError
from mim.eval.encoders import load_encoder_from
from mim.eval.features import frozen_features, pool_tokens
from mim.export import save_encoder
from mim.features import (
    FeatureExtractor,
    FeatureStore,
    FeatureStoreError,
    FeatureStoreMismatchError,
    FeatureStoreWriter,
)
from mim.features.store import check_existing

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "extract" / "vit_tiny_cifar10.yaml"
VIT_KWARGS = {"img_size": 32, "patch_size": 4}
ALL = ["cls", "mean", "patch"]
N_IMAGES = 20  # 2 per class; shards of 7 rows -> 7, 7, 6


def _dm(root: Path, **overrides) -> ImageDataModule:
    kwargs = {"root": str(root), "batch_size": 8, "num_workers": 0, "limit_per_class": 2,
              "predict_split": "train", "train_augment": False, "return_index": True}
    return ImageDataModule(**{**kwargs, **overrides})


def _extract(path, root, model, shard_size=7, overwrite=False, trainer_kwargs=None, **dm_overrides):
    """One ``trainer.predict`` into the store at ``path``; returns the writer and the trainer."""
    writer = FeatureStoreWriter(str(path), shard_size=shard_size, overwrite=overwrite)
    kwargs = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
              "enable_model_summary": False, "enable_checkpointing": False, "default_root_dir": str(path.parent)}
    trainer = L.Trainer(callbacks=[writer], **{**kwargs, **(trainer_kwargs or {})})
    trainer.predict(model, datamodule=_dm(root, **dm_overrides), return_predictions=False)
    return writer, trainer


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory) -> Path:
    """An exported ViT-Tiny/4 (fixed weights, so every FeatureExtractor of a test has the same hash)."""
    torch.manual_seed(1)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, **VIT_KWARGS)
    return save_encoder(model, {"model_name": "vit_tiny_patch16_224", "model_kwargs": VIT_KWARGS},
                        tmp_path_factory.mktemp("enc") / "encoder.safetensors")


@pytest.fixture(scope="module")
def store_path(tmp_path_factory, encoder_file, shared_data) -> Path:
    """A 1-process store of 20 train images, all token kinds, last block."""
    path = tmp_path_factory.mktemp("store") / "one"
    _extract(path, shared_data, FeatureExtractor(str(encoder_file), tokens=ALL))
    return path


def test_store_round_trip_equals_frozen_features(store_path, encoder_file, shared_data):
    store = FeatureStore(store_path)
    meta = store.metadata
    assert len(store) == N_IMAGES and store.d_model == 192 and meta["patch_grid"] == [8, 8]
    assert [(s["file"], s["rows"], s["rank"]) for s in meta["shards"]] == [
        ("rank0-00000.safetensors", 7, 0), ("rank0-00001.safetensors", 7, 0), ("rank0-00002.safetensors", 6, 0)]
    encoder, info = load_encoder_from(encoder_file)
    assert meta["encoder"]["weights_sha256"] == info["weights_sha256"]
    assert (meta["layer"], meta["tokens"], meta["dataset"], meta["split"], meta["img_size"]) == (
        11, ALL, "cifar10", "train", 32)

    dm = _dm(shared_data, batch_size=N_IMAGES)
    dm.setup("predict")
    imgs, labels, indices = next(iter(dm.predict_dataloader()))
    tokens = frozen_features(encoder, imgs)  # (20, 1 + 64, 192), after the final norm
    expected = {"cls": tokens[:, 0], "mean": pool_tokens(tokens, "mean", 1), "patch": tokens[:, 1:]}
    for kind, value in expected.items():
        got = store.read(kind)
        assert got.features.dtype == torch.float32
        torch.testing.assert_close(got.features, value, atol=1e-5, rtol=1e-5)
        assert torch.equal(got.labels, labels) and torch.equal(got.indices, indices)
    assert indices.tolist() == sorted(indices.tolist()) and len(set(indices.tolist())) == N_IMAGES
    # streaming without shuffle gives the same rows in the same order
    streamed = list(store.batches(6, tokens="patch", shuffle=False))
    assert [len(b.labels) for b in streamed] == [6, 6, 6, 2]
    torch.testing.assert_close(torch.cat([b.features for b in streamed]), store.read("patch").features)


def test_intermediate_block_is_the_raw_residual_stream(encoder_file, cifar_batch):
    imgs = cifar_batch[0][:4]
    extractor = FeatureExtractor(str(encoder_file), layers=5, tokens=["patch", "cls"], dtype="bfloat16")
    out = extractor.predict_step((imgs, cifar_batch[1][:4], torch.arange(4)), 0)
    assert set(out) == {"layers", "labels", "indices"} and list(out["layers"]) == [5]
    rows = out["layers"][5]
    assert set(rows) == {"cls", "patch"} and rows["patch"].dtype == torch.bfloat16
    enc = extractor.encoder
    with torch.no_grad():  # blocks 0..5, no final norm
        x = enc.norm_pre(enc._pos_embed(enc.patch_embed(imgs)))
        for block in enc.blocks[:6]:
            x = block(x)
    torch.testing.assert_close(rows["patch"].float(), x[:, 1:], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(rows["cls"].float(), x[:, 0], atol=2e-2, rtol=2e-2)
    assert extractor.store_details(5)["patch_grid"] == [8, 8]
    with pytest.raises(ConfigError, match=r"layers \[12\] out of range.*\[-12, 11\]"):
        FeatureExtractor(str(encoder_file), layers=12)


def test_convnet_patch_tokens_are_stage_positions(cifar_batch):
    imgs = cifar_batch[0][:4]
    extractor = FeatureExtractor("timm:resnet18", layers=-2, tokens=["mean", "patch"])  # layer3: 256 ch, 2x2
    feats = extractor(imgs)[3]
    enc = extractor.encoder
    with torch.no_grad():
        x = enc.maxpool(enc.act1(enc.bn1(enc.conv1(imgs))))
        x = enc.layer3(enc.layer2(enc.layer1(x)))
    assert extractor.d_model == 256 and extractor.patch_grid == (2, 2)
    torch.testing.assert_close(feats["patch"], x.flatten(2).transpose(1, 2))
    torch.testing.assert_close(feats["mean"], x.mean(dim=(2, 3)))
    with pytest.raises(ConfigError, match="no class token.*tokens \\[mean\\]"):
        FeatureExtractor("timm:resnet18", tokens=["cls"])


def test_killed_mid_write_is_not_complete_and_restarts(tmp_path, encoder_file, shared_data, monkeypatch):
    path = tmp_path / "store"
    model = FeatureExtractor(str(encoder_file), tokens=["cls"])
    step = model.predict_step

    def dies_at_batch_2(batch, batch_idx):
        if batch_idx == 2:
            raise RuntimeError("killed")
        return step(batch, batch_idx)

    monkeypatch.setattr(model, "predict_step", dies_at_batch_2)
    with pytest.raises(RuntimeError, match="killed"):
        _extract(path, shared_data, model)
    assert sorted(p.name for p in path.iterdir()) == ["rank0-00000.safetensors", "rank0-00001.safetensors"]
    with pytest.raises(FeatureStoreError, match="incomplete: it has no metadata.json.*killed mid-write"):
        FeatureStore(path)
    monkeypatch.undo()
    (path / "rank0-00007.safetensors").write_bytes(b"stale")  # a leftover of an older run
    _extract(path, shared_data, FeatureExtractor(str(encoder_file), tokens=["cls"]))
    store = FeatureStore(path)
    assert len(store) == N_IMAGES and not (path / "rank0-00007.safetensors").exists()
    assert len(list(path.glob("*.safetensors"))) == 3 and not list(path.glob(".*"))


def test_identical_rerun_is_reused_without_encoder_work(store_path, encoder_file, shared_data, monkeypatch):
    before = {p.name: p.stat().st_mtime_ns for p in store_path.iterdir()}
    model = FeatureExtractor(str(encoder_file), tokens=["patch", "mean", "cls"])  # other order, same store
    calls = []
    forward = model.encoder.forward_intermediates
    monkeypatch.setattr(model.encoder, "forward_intermediates", lambda *a, **k: calls.append(1) or forward(*a, **k))
    writer, trainer = _extract(store_path, shared_data, model)
    assert writer.reused and calls == []
    assert {p.name: p.stat().st_mtime_ns for p in store_path.iterdir()} == before
    assert trainer.limit_predict_batches == 1.0  # restored after the skipped loop


def test_mismatching_store_is_refused_naming_the_fields(tmp_path, store_path, encoder_file, shared_data):
    path = tmp_path / "store"
    shutil.copytree(store_path, path)
    with pytest.raises(FeatureStoreMismatchError, match=r"layer: store 11, this run 5.*overwrite=True") as err:
        _extract(path, shared_data, FeatureExtractor(str(encoder_file), layers=5, tokens=ALL))
    assert isinstance(err.value, UserError) and "another folder" in str(err.value)
    tokens_differ = r"tokens: store \['cls', 'mean', 'patch'\], this run \['cls'\]"
    with pytest.raises(FeatureStoreMismatchError, match=tokens_differ):
        _extract(path, shared_data, FeatureExtractor(str(encoder_file), tokens=["cls"]))
    with pytest.raises(FeatureStoreMismatchError, match=r"data.limit_per_class: store 2, this run 1"):
        _extract(path, shared_data, FeatureExtractor(str(encoder_file), tokens=ALL), limit_per_class=1)
    _extract(path, shared_data, FeatureExtractor(str(encoder_file), layers=5, tokens=["cls"]), overwrite=True)
    store = FeatureStore(path)
    assert store.metadata["layer"] == 5 and store.tokens == ["cls"] and len(store) == N_IMAGES


def test_missing_shard_is_named(tmp_path, store_path, encoder_file, shared_data):
    path = tmp_path / "store"
    shutil.copytree(store_path, path)
    (path / "rank0-00001.safetensors").unlink()
    with pytest.raises(FeatureStoreError, match=r"missing shard rank0-00001.safetensors \(1 of 3.*Fix:"):
        FeatureStore(path)
    (path / "rank0-00002.safetensors").write_bytes(b"truncated")
    shutil.copy(store_path / "rank0-00001.safetensors", path)
    with pytest.raises(FeatureStoreError, match=r"rank0-00002.safetensors is not readable"):
        FeatureStore(path)
    assert not check_existing(path, FeatureStore(store_path).metadata, overwrite=True)  # broken: re-extract


def test_shuffled_batches_cover_every_row_once(store_path):
    store = FeatureStore(store_path)
    full = store.read("cls")
    order = []
    for batch in store.batches(6, tokens="cls", shuffle=True, seed=3, buffer_shards=2):
        rows = torch.searchsorted(full.indices, batch.indices)  # store indices are sorted
        torch.testing.assert_close(batch.features, full.features[rows], atol=0, rtol=0)
        assert torch.equal(batch.labels, full.labels[rows])
        order += batch.indices.tolist()
    assert sorted(order) == full.indices.tolist() and order != full.indices.tolist()
    again = [i for b in store.batches(6, tokens="cls", seed=3, buffer_shards=2) for i in b.indices.tolist()]
    other = [i for b in store.batches(6, tokens="cls", seed=4, buffer_shards=2) for i in b.indices.tolist()]
    assert again == order and other != order

    patch = store.read("patch")  # (20, 64, 192)
    batches = list(store.batches(100, tokens="patch", flatten=True, shuffle=True, buffer_shards=1))
    assert [len(b.labels) for b in batches[:-1]] == [100] * (len(batches) - 1)
    feats, indices = torch.cat([b.features for b in batches]), torch.cat([b.indices for b in batches])
    labels = torch.cat([b.labels for b in batches])
    assert feats.shape == (N_IMAGES * 64, 192)
    assert torch.bincount(indices).tolist() == [64 if i in set(patch.indices.tolist()) else 0
                                                for i in range(int(patch.indices.max()) + 1)]
    rows = torch.searchsorted(patch.indices, indices)
    assert torch.equal(labels, patch.labels[rows])
    sums = torch.zeros(N_IMAGES, 192).index_add_(0, rows, feats)  # every token of every image exactly once
    torch.testing.assert_close(sums, patch.features.sum(1), atol=1e-3, rtol=1e-4)
    with pytest.raises(FeatureStoreError, match="flatten=True is for patch tokens"):
        next(store.batches(4, tokens="cls", flatten=True))


def test_ddp_two_processes_give_the_one_process_store(tmp_path, store_path, encoder_file, shared_data):
    path = tmp_path / "ddp"
    _extract(path, shared_data, FeatureExtractor(str(encoder_file), tokens=ALL),
             trainer_kwargs={"strategy": "ddp_fork", "devices": 2})
    ddp, one = FeatureStore(path), FeatureStore(store_path)
    assert ddp.metadata["world_size"] == 2 and ddp.metadata["order"] == "index"
    assert sorted({s["rank"] for s in ddp.metadata["shards"]}) == [0, 1] and len(ddp) == N_IMAGES
    for kind in ALL:
        a, b = ddp.read(kind), one.read(kind)
        assert torch.equal(a.indices, b.indices) and torch.equal(a.labels, b.labels)
        torch.testing.assert_close(a.features, b.features, atol=1e-5, rtol=1e-5)
    streamed = torch.cat([b.indices for b in ddp.batches(3, tokens="mean", shuffle=False)])
    assert torch.equal(streamed, one.read("mean").indices)


def test_bad_data_settings_are_refused(tmp_path, encoder_file, shared_data):
    with pytest.raises(ConfigError, match="return_index true"):
        _extract(tmp_path / "a", shared_data, FeatureExtractor(str(encoder_file)), return_index=False)
    with pytest.raises(ConfigError, match="train_augment false"):
        _extract(tmp_path / "b", shared_data, FeatureExtractor(str(encoder_file)), train_augment=True)


def test_mim_predict_from_yaml(tmp_path, encoder_file, shared_data, monkeypatch):
    monkeypatch.setenv("MIM_DATA", str(shared_data))
    path = tmp_path / "features"
    cli_main(["predict", "-c", str(CONFIG), "--model.init_args.encoder", str(encoder_file),
              "--data.init_args.limit_per_class", "1", "--data.init_args.num_workers", "0",
              "--data.init_args.batch_size", "4", "--trainer.callbacks.init_args.path", str(path),
              "--trainer.callbacks.init_args.shard_size", "4", "--trainer.default_root_dir", str(tmp_path),
              "--trainer.enable_progress_bar", "false"])
    store = FeatureStore(path)
    meta = store.metadata
    assert len(store) == 10 and store.tokens == ALL and meta["split"] == "train" and meta["patch_grid"] == [8, 8]
    assert meta["encoder"]["weights_sha256"] == load_encoder_from(encoder_file)[1]["weights_sha256"]
    assert store.read("patch").features.shape == (10, 64, 192) and store.read("cls").labels.tolist() == list(range(10))


def test_shard_writer_raises_a_failed_background_write(tmp_path, monkeypatch):
    """Shards are written by a background thread: a failed write (disk full) must still stop the run, at the next
    shard or at close, and leave no file under a shard's name."""
    import mim.features.store as store_module
    from mim.features.store import ShardWriter

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_module, "save_file", full_disk)
    writer = ShardWriter(tmp_path, 0, shard_size=2)
    rows = {"patch": torch.zeros(3, 4, 8), "labels": torch.zeros(3, dtype=torch.long), "indices": torch.arange(3)}
    with pytest.raises(OSError, match="No space left"):
        writer.add(rows)  # the first full shard is queued; its error surfaces at close at the latest
        writer.close()
    assert not list(tmp_path.glob("rank0-*.safetensors"))
