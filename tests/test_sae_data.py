"""SAE training data from a real feature store: every token row once per epoch, seeded epoch orders, DDP split,
NaN / empty / d_model checks, bf16 stores, and the datamodule inside a Lightning Trainer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mim.errors import ConfigError
from mim.features.store import (
    METADATA,
    FeatureBatch,
    FeatureStore,
    FeatureStoreError,
    write_metadata,
)
from mim.sae.data import FeatureStoreDataModule, FeatureStoreDataset, check_d_model

TOKENS = 64  # 8 x 8 patch grid of the fixture stores


def _batches(ds: FeatureStoreDataset, epoch: int = 0) -> list:
    ds.set_epoch(epoch)
    return list(ds)


def _token_keys(ref: FeatureBatch, batches: list) -> torch.Tensor:
    """``image index * L + token position`` of every streamed row, found by matching the row's features
    exactly against that image's patch tokens in ``ref`` (the store's ``read("patch")``; each row must match
    exactly one token)."""
    where = torch.empty(int(ref.indices.max()) + 1, dtype=torch.long)
    where[ref.indices] = torch.arange(len(ref.indices))
    keys = []
    for b in batches:
        assert b.features.dtype == torch.float32 and b.features.shape[1] == ref.features.shape[-1]
        images = where[b.indices]
        match = (ref.features[images, :, :4] == b.features[:, None, :4]).all(-1)  # (B, L) on 4 coordinates
        assert bool((match.sum(1) == 1).all()), "a streamed row is not exactly one token of its image"
        token = match.int().argmax(1)
        assert torch.equal(ref.features[images, token], b.features)  # and the whole row
        keys.append(b.indices * TOKENS + token)
    return torch.cat(keys)


def _all_keys(ref: FeatureBatch) -> torch.Tensor:
    idx = ref.indices
    return (idx[:, None] * TOKENS + torch.arange(TOKENS)).flatten().sort().values


def _copy_store(src: Path, dst: Path, link_shards: bool = True, **changes) -> Path:
    """A copy of a store (shards symlinked unless ``link_shards`` is False) with metadata fields changed."""
    dst.mkdir()
    meta = json.loads((src / METADATA).read_text())
    for shard in meta["shards"]:
        if link_shards:
            (dst / shard["file"]).symlink_to(src / shard["file"])
        else:
            shutil.copy(src / shard["file"], dst / shard["file"])
    write_metadata(dst, {**meta, **changes})
    return dst


def test_every_token_row_once_per_epoch_and_seeded_epoch_orders(sae_stores):
    store = FeatureStore(sae_stores[0])
    ds = FeatureStoreDataset(store, "patch", batch_size=1000, drop_last=False, seed=3)
    assert ds.rows == len(store) * TOKENS == 12_800 and len(ds) == 13
    epoch0, epoch1 = _batches(ds, 0), _batches(ds, 1)
    ref = store.read("patch")
    assert [len(b.labels) for b in epoch0] == [1000] * 12 + [800]
    for batches in (epoch0, epoch1):
        assert torch.equal(_token_keys(ref, batches).sort().values, _all_keys(ref))
    cls = store.read("cls")
    first = epoch0[0]
    assert torch.equal(first.labels, cls.labels[torch.searchsorted(cls.indices, first.indices)])  # labels follow
    assert not torch.equal(epoch0[0].indices, epoch1[0].indices)  # a new order each epoch
    again = FeatureStoreDataset(store, "patch", batch_size=1000, drop_last=False, seed=3)
    for a, b in zip(_batches(again, 1), epoch1, strict=True):  # same seed and epoch: the same batches
        assert torch.equal(a.features, b.features) and torch.equal(a.indices, b.indices)
    # per-image tokens: one row per image, drop_last drops the 200 % 64 = 8 rows of the last batch
    mean = FeatureStoreDataset(store, "mean", batch_size=64, drop_last=True)
    rows = _batches(mean)
    assert len(rows) == len(mean) == 3 and all(b.features.shape == (64, 192) for b in rows)
    mean_ref = store.read("mean")
    idx = torch.cat([b.indices for b in rows])
    assert len(idx.unique()) == 192
    assert torch.equal(torch.cat([b.features for b in rows]), mean_ref.features[torch.searchsorted(mean_ref.indices, idx)])


def test_ddp_ranks_take_disjoint_interleaved_batches_of_equal_count(sae_stores):
    store = FeatureStore(sae_stores[0])
    ref = store.read("patch")
    one = _batches(FeatureStoreDataset(store, batch_size=1000, seed=5, buffer_shards=1), 2)  # 12 full batches
    assert len(one) == 12
    for world in (3, 5):  # 12 = 3 x 4; 5 ranks: 2 each, batches 10 and 11 dropped so no rank waits
        per_rank = []
        for rank in range(world):
            ds = FeatureStoreDataset(store, batch_size=1000, seed=5, buffer_shards=1, rank=rank, world_size=world)
            got = _batches(ds, 2)
            assert len(got) == len(ds) == 12 // world
            for a, b in zip(got, one[rank::world], strict=False):  # rank r: batches r, r + W, ...
                assert torch.equal(a.features, b.features) and torch.equal(a.indices, b.indices)
            per_rank.append(_token_keys(ref, got))
        keys = torch.cat(per_rank)
        assert len(keys.unique()) == len(keys) == world * (12 // world) * 1000  # disjoint
    # validation (unshuffled, every batch kept): ranks differ by at most one batch and cover every row once
    val = FeatureStore(sae_stores[1])
    parts = [
        list(FeatureStoreDataset(val, batch_size=1500, shuffle=False, drop_last=False, even=False, rank=r, world_size=2))
        for r in range(2)
    ]
    assert [len(p) for p in parts] == [3, 2]  # 6400 rows: 1500 x 4 + 400
    val_ref = val.read("patch")
    assert torch.equal(_token_keys(val_ref, parts[0] + parts[1]).sort().values, _all_keys(val_ref))


def test_workers_split_a_ranks_batches_in_order(sae_stores):
    dm = FeatureStoreDataModule(str(sae_stores[0]), batch_size=1000, num_workers=2)
    dm.setup()
    with_workers = list(dm.train_dataloader())
    dm.num_workers = 0
    without = list(dm.train_dataloader())
    assert len(with_workers) == len(without) == dm.steps_per_epoch == 12
    for a, b in zip(with_workers, without, strict=True):
        assert torch.equal(a.features, b.features) and torch.equal(a.indices, b.indices)


def test_nan_and_inf_are_named_by_shard_row_image_and_token(sae_stores, tmp_path):
    path = _copy_store(sae_stores[0], tmp_path / "nan", link_shards=False)
    shard = path / "rank0-00001.safetensors"
    with safe_open(shard, framework="pt") as f:
        file_meta = f.metadata()
    tensors = load_file(shard)
    tensors["patch"][17, 5, 3] = float("nan")
    tensors["cls"][9, 0] = float("inf")
    save_file(tensors, shard, metadata=file_meta)
    image = int(tensors["indices"][17])

    dm = FeatureStoreDataModule(str(path), batch_size=512)
    dm.setup()
    with pytest.raises(FeatureStoreError, match=rf"shard rank0-00001\.safetensors row 17 \(image index {image}, patch "
                                                r"token 5\) holds NaN features\. Fix: re-extract"):
        list(dm.train_dataloader())
    store = FeatureStore(path)
    with pytest.raises(FeatureStoreError, match=r"rank0-00001\.safetensors row 9 \(image index \d+\) holds infinite"):
        store.read("cls", check_finite=True)
    assert store.read("mean", check_finite=True).features.isfinite().all()  # only the bad tensors fail
    unchecked = FeatureStoreDataModule(str(path), batch_size=512, check_finite=False)  # off: NaN goes through
    unchecked.setup()
    assert any(b.features.isnan().any() for b in unchecked.train_dataloader())


def test_empty_store_wrong_tokens_and_val_mismatch_are_refused(sae_stores, tmp_path):
    train, val = sae_stores
    empty = _copy_store(train, tmp_path / "empty", count=0, shards=[])
    assert len(FeatureStore(empty)) == 0  # legal for extraction, but not for training
    with pytest.raises(FeatureStoreError, match=r"holds 0 images .* Fix: re-extract"):
        FeatureStoreDataModule(str(empty)).setup("fit")
    with pytest.raises(FeatureStoreError, match=r"holds 0 images .* --data\.init_args\.val_store"):
        FeatureStoreDataModule(str(train), val_store=str(_copy_store(val, tmp_path / "empty_val", count=0,
                                                                      shards=[]))).setup("fit")
    no_patch = _copy_store(train, tmp_path / "no_patch", tokens=["cls", "mean"])
    with pytest.raises(FeatureStoreError, match=r"\['cls', 'mean'\] tokens, not 'patch'\. Fix"):
        FeatureStoreDataModule(str(no_patch)).setup("fit")
    wide = _copy_store(val, tmp_path / "wide", d_model=384)
    with pytest.raises(FeatureStoreError, match=rf"{wide} has d_model 384 but the training store .* d_model 192\. Fix"):
        FeatureStoreDataModule(str(train), val_store=str(wide)).setup("fit")
    other_layer = _copy_store(val, tmp_path / "layer", layer=3)
    with pytest.raises(FeatureStoreError, match=r"another encoder / layer .*\(layer: 3 vs 6\)"):
        FeatureStoreDataModule(str(train), val_store=str(other_layer)).setup("fit")
    with pytest.raises(FeatureStoreError, match=r"fewer than one batch of 20000"):
        FeatureStoreDataModule(str(train), batch_size=20_000).setup("fit")
    with pytest.raises(ConfigError, match="mim validate needs a validation store"):
        FeatureStoreDataModule(str(train)).setup("validate")
    with pytest.raises(ConfigError, match="tokens must be one of"):
        FeatureStoreDataModule(str(train), tokens="patches")


def test_check_d_model_names_store_sizes_and_fix(sae_stores):
    store = FeatureStore(sae_stores[0])
    assert check_d_model(store, 192) == 192
    with pytest.raises(FeatureStoreError, match=rf"Feature store {store.path} has d_model 192 but the SAE has d_model "
                                                r"384\. Fix: set --model\.init_args\.sae\.init_args\.d_model 192"):
        check_d_model(store, 384)
    dm = FeatureStoreDataModule(str(sae_stores[0]))
    assert dm.d_model == 192  # readable before setup (to size the SAE)
    with pytest.raises(FeatureStoreError, match=rf"{store.path} has d_model 192 but the SAE has d_model 96"):
        check_d_model(dm.train_metadata, 96)


def test_bfloat16_store_streams_in_its_own_dtype(sae_stores, tmp_path):
    path = _copy_store(sae_stores[1], tmp_path / "bf16", link_shards=False, dtype="bfloat16")
    for shard in path.glob("rank*.safetensors"):
        tensors = load_file(shard)
        save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tensors.items()}, shard)
    dm = FeatureStoreDataModule(str(sae_stores[0]), val_store=str(path), tokens="cls", batch_size=64,
                                val_batch_size=30)
    dm.setup()
    got = list(dm.val_dataloader())
    assert [len(b.labels) for b in got] == [30, 30, 30, 10]
    ref = FeatureStore(sae_stores[1]).read("cls")
    features = torch.cat([b.features for b in got])
    assert features.dtype == torch.bfloat16  # cast to float32 on the device (on_after_batch_transfer)
    assert torch.equal(features.float(), ref.features.to(torch.bfloat16).float())
    assert torch.equal(torch.cat([b.indices for b in got]), ref.indices)  # validation: store order


class _Recorder(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(192, 192)
        self.seen: dict[int, list[torch.Tensor]] = {}
        self.val_rows = 0

    def training_step(self, batch, batch_idx):
        self.seen.setdefault(self.current_epoch, []).append(batch.indices.clone())
        return (self.layer(batch.features) - batch.features).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.val_rows += len(batch.labels)

    def configure_optimizers(self):
        self.stepping_batches = self.trainer.estimated_stepping_batches
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def _trainer(root: Path, epochs: int) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(root))


def test_trainer_epochs_orders_resume_and_stepping_batches(sae_stores, tmp_path):
    train, val = sae_stores
    dm = FeatureStoreDataModule(str(train), val_store=str(val), batch_size=4096, seed=7)
    module = _Recorder()
    _trainer(tmp_path, 2).fit(module, datamodule=dm)
    assert dm.tokens_per_epoch == 12_800 and dm.steps_per_epoch == 3
    assert module.stepping_batches == 6  # finite: the dataloader has a length
    assert module.val_rows == 2 * 6_400  # every validation token, each epoch
    reference = FeatureStoreDataset(FeatureStore(train), batch_size=4096, seed=7)
    for epoch in (0, 1):  # the trainer's epoch drives the order
        expected = [b.indices for b in _batches(reference, epoch)]
        assert all(torch.equal(a, b) for a, b in zip(module.seen[epoch], expected, strict=True))
    # stop after epoch 0, resume from its checkpoint: epoch 1 comes in the uninterrupted run's order
    first = _Recorder()
    _trainer(tmp_path / "a", 1).fit(first, datamodule=FeatureStoreDataModule(str(train), batch_size=4096, seed=7))
    ckpt = next((tmp_path / "a").rglob("*.ckpt"))
    resumed = _Recorder()
    _trainer(tmp_path / "a", 2).fit(resumed, datamodule=FeatureStoreDataModule(str(train), batch_size=4096, seed=7),
                                    ckpt_path=str(ckpt))
    assert list(resumed.seen) == [1]
    assert all(torch.equal(a, b) for a, b in zip(resumed.seen[1], module.seen[1], strict=True))
