"""Token rows of a feature store as training data for sparse autoencoders.

:class:`FeatureStoreDataModule` streams the rows of a feature store (``mim/features/store.py``): with
``tokens="patch"`` every patch token of every image is one row (``count x L`` rows, ``L = h x w`` of the store's
``patch_grid``), with ``"register"`` every register token (``count x R`` rows), with ``"cls"`` / ``"pooled"`` /
``"mean"`` every image is one row. Batches are :class:`FeatureBatch` ``(features (B, d_model), labels (B,) int64,
indices (B,) int64)``, labels and image indices repeated once per token. The features keep the store's dtype
(float16 / bfloat16 / float32) through the DataLoader, into pinned host memory when the trainer runs on a CUDA
device (``pin_memory``), and across the host-to-device copy (half the bytes of float32); the data module's
``on_after_batch_transfer`` casts them to float32 on the device, so every LightningModule gets float32 features
with the same values as a float32 read.

High-norm tokens. A store extracted with a high-norm filter (``FeatureExtractor(high_norm_factor=...)``) flags
artefact patch tokens; with ``skip_high_norm`` (the default) they are left out of the patch rows, so a pass gives
``count x L - high_norm_tokens`` rows (the count is in the store's metadata).

Order. Training batches come from :meth:`FeatureStore.batches` (shard order permuted, then ``buffer_shards``
shards at a time loaded and their rows permuted), seeded with ``seed + epoch``: every epoch has a new order,
and the same ``(seed, epoch)`` gives the same order. The data module saves how many batches of the epoch were
trained on (its ``state_dict``), so a run resumed from any checkpoint, mid-epoch too, goes on exactly as an
uninterrupted one. The epoch is the trainer's ``current_epoch``, handed to the dataset when a pass
yields its first batch (Lightning's ``set_epoch`` reaches samplers only; an ``IterableDataset`` has none).
Validation is in store order.

DDP and workers. Number the batches of the whole (one-process) stream ``0, 1, ...``: rank ``r`` of ``W``
takes batches ``r, r + W, ...``, so ranks are disjoint; only the rows of its own batches are gathered. In
training every rank stops after ``floor(n_batches / W)`` batches (equal counts, so no rank waits in a gradient
all-reduce for a batch another rank does not have); this and ``drop_last`` drop fewer than
``W x batch_size`` rows per epoch, a different set each epoch. Validation keeps every batch (ranks differ by at
most one batch; synchronise metrics at epoch end, e.g. torchmetrics). With ``num_workers`` > 0, worker ``w``
of a rank takes that rank's batches ``w, w + num_workers, ...``; the DataLoader returns them in turn, so a
rank's batches come in the same order as with ``num_workers=0``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mim.errors import ConfigError
from mim.features.store import (
    MULTI_TOKEN_KINDS,
    TOKEN_KINDS,
    FeatureBatch,
    FeatureStore,
    FeatureStoreError,
    read_metadata,
)

# Lightning warns about every IterableDataset with a __len__ (workers might each yield every row); this one splits
# its batches across workers (module docstring), so its length is exact.
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")

#: Metadata fields a validation store must share with the training store (same encoder, same layer).
SAME_FEATURES_KEYS = ("encoder", "layer")


def token_rows(store: FeatureStore, tokens: str, skip_high_norm: bool = False) -> int:
    """Rows a pass over ``store`` gives: ``count x h x w`` for patch tokens (less the flagged high-norm tokens
    with ``skip_high_norm``), ``count x R`` for register tokens, ``count`` for cls / pooled / mean."""
    rows = len(store) * store.tokens_per_image(tokens)
    if tokens == "patch" and skip_high_norm:
        rows -= store.high_norm_tokens or 0
    return rows


def check_d_model(
    store: FeatureStore | Mapping[str, Any], d_model: int, what: str = "the SAE", fix: str | None = None
) -> int:
    """Check that a feature store's features have width ``d_model``; returns the store's ``d_model``.

    Args:
        store: a :class:`FeatureStore` or its metadata dict (named by its ``path`` key when it has one).
        d_model: the width that ``what`` expects.
        what: what expects it, for the message (e.g. ``"the SAE"``, ``"the training store ..."``).
        fix: the remedy (default: set the SAE's ``d_model`` or use a store of that width).

    Raises:
        FeatureStoreError: the widths differ ("Feature store X has d_model 384 but the SAE has d_model 192. Fix: ...").
    """
    if isinstance(store, FeatureStore):
        name, stored = str(store.path), store.d_model
    else:
        name, stored = str(store.get("path", "(metadata)")), int(store["d_model"])
    if stored != d_model:
        fix = fix or (
            f"set --model.init_args.sae.init_args.d_model {stored}, or use a feature store with d_model {d_model} "
            "(extracted from the encoder and layer the SAE was made for)"
        )
        raise FeatureStoreError(f"Feature store {name} has d_model {stored} but {what} has d_model {d_model}. Fix: {fix}.")
    return stored


def batches_per_rank(rows: int, batch_size: int, drop_last: bool, world_size: int, even: bool) -> tuple[int, int]:
    """``(batches of the one-process stream that are used, batches of rank 0)`` for one pass.

    The stream has ``rows // batch_size`` batches (``ceil`` without ``drop_last``); ``even`` keeps the first
    ``world_size x floor(n / world_size)`` of them, so every rank gets the same number."""
    n = rows // batch_size if drop_last else math.ceil(rows / batch_size)
    used = world_size * (n // world_size) if even else n
    return used, math.ceil(used / world_size)


class FeatureStoreDataset(IterableDataset):
    """One rank's batches of token rows of a store (see the module docstring for order, DDP and workers).

    Args:
        store: an open :class:`FeatureStore`.
        tokens: ``"patch"`` (one row per patch token), ``"cls"`` or ``"mean"`` (one row per image).
        batch_size: rows per batch.
        shuffle: permute as :meth:`FeatureStore.batches` does, seeded with ``seed + epoch`` (:meth:`set_epoch`).
        seed: base seed of the order.
        buffer_shards: shards per shuffle buffer.
        drop_last: drop the stream's last incomplete batch.
        even: give every rank the same number of batches (training; see :func:`batches_per_rank`).
        check_finite: raise :class:`FeatureStoreError` naming the shard and row when a shard holds NaN / Inf.
        rank, world_size: this process's DDP rank and the number of ranks.
        skip_high_norm: leave out patch tokens flagged as high-norm by the extraction (if it flagged any).

    ``len()`` is the number of batches this rank yields per pass (all its workers together).
    Yields :class:`FeatureBatch` with ``features`` (B, d_model) in the store's dtype (not converted: the data
    module casts on the device), ``labels`` and ``indices`` (B,) int64, each a tensor of its own (not a view of a
    shuffle buffer).
    """

    def __init__(
        self,
        store: FeatureStore,
        tokens: str = "patch",
        batch_size: int = 4096,
        shuffle: bool = True,
        seed: int = 0,
        buffer_shards: int = 4,
        drop_last: bool = True,
        even: bool = True,
        check_finite: bool = True,
        rank: int = 0,
        world_size: int = 1,
        skip_high_norm: bool = True,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ConfigError(f"Need 0 <= rank < world_size, got rank {rank}, world_size {world_size}.")
        self.store, self.tokens, self.batch_size, self.shuffle = store, tokens, batch_size, shuffle
        self.seed, self.buffer_shards, self.drop_last, self.check_finite = seed, buffer_shards, drop_last, check_finite
        self.rank, self.world_size, self.skip_high_norm = rank, world_size, skip_high_norm
        self.rows = token_rows(store, tokens, skip_high_norm)
        self.used_batches, _ = batches_per_rank(self.rows, batch_size, drop_last, world_size, even)
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Order the next passes as epoch ``epoch`` (seed ``seed + epoch``), leaving out this rank's first
        ``skip`` batches (a run resumed mid-epoch; their rows are never read)."""
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return len(range(self.rank, self.used_batches, self.world_size))

    def __iter__(self) -> Iterator[FeatureBatch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        stream = self.store.batches(
            self.batch_size,
            self.tokens,
            shuffle=self.shuffle,
            seed=self.seed + self.epoch,
            buffer_shards=self.buffer_shards,
            flatten=self.tokens in MULTI_TOKEN_KINDS,
            drop_last=self.drop_last,
            check_finite=self.check_finite,
            offset=self.rank + self.world_size * (self.skip + worker),
            stride=self.world_size * workers,
            max_batches=self.used_batches,
            skip_high_norm=self.skip_high_norm,
        )
        for batch in stream:
            yield FeatureBatch(batch.features.clone(), batch.labels.clone(), batch.indices.clone())


class _EpochDataLoader(DataLoader):
    """A DataLoader that hands ``epoch()`` (an epoch, or ``(epoch, batches to skip)``) to its dataset's
    ``set_epoch`` when a pass yields its first batch (before workers get their copy of the dataset).

    Lazily, because Lightning may create the epoch's iterator before it knows the epoch: with
    ``estimated_stepping_batches`` in ``configure_optimizers`` it does so before restoring a resumed run's loop
    state (``Trainer._run``), and then keeps that iterator for the first resumed epoch."""

    def __init__(self, dataset: FeatureStoreDataset, epoch: Callable[[], int | tuple[int, int]], **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self._epoch = epoch

    def __iter__(self) -> Iterator[Any]:
        position = self._epoch()
        self.dataset.set_epoch(*(position if isinstance(position, tuple) else (position,)))
        yield from super().__iter__()


class FeatureStoreDataModule(L.LightningDataModule):
    """Feature-store token rows for SAE training and validation (see the module docstring).

    Args:
        train_store: folder of the training feature store.
        val_store: folder of the validation store (same encoder and layer); None: no validation.
        tokens: ``"patch"`` (one row per patch token), ``"cls"`` or ``"mean"`` (one row per image).
        batch_size: training rows (tokens) per batch and rank.
        val_batch_size: validation rows per batch (None: ``batch_size``).
        buffer_shards: shards per shuffle buffer (memory: that many shards plus one batch).
        seed: base seed of the training order (epoch ``e`` uses ``seed + e``).
        drop_last: drop the last incomplete training batch (validation keeps it).
        check_finite: raise :class:`FeatureStoreError` naming the shard file and row when a loaded shard holds
            NaN / Inf features (one ``isfinite`` pass per shard).
        num_workers: DataLoader worker processes per rank (0: load in the main process). Not persistent: each
            epoch's workers get the dataset with that epoch's order.
        skip_high_norm: leave the patch tokens that the extraction flagged as high-norm artefacts
            (``FeatureExtractor(high_norm_factor=...)``) out of training and validation; no effect on a store
            without flags.
        pin_memory: put the batches in page-locked host memory (faster, asynchronous copies to the GPU); None:
            when the trainer's device is a CUDA device.

    After :meth:`setup`: ``d_model``, ``train_metadata`` (the training store's ``metadata.json`` plus its
    ``path``), ``tokens_per_epoch`` (rows of the training store per pass, all ranks) and ``steps_per_epoch``
    (training batches per rank per epoch = optimizer steps without gradient accumulation; the dataset has a
    ``len``, so ``trainer.estimated_stepping_batches`` is finite). ``d_model`` and ``train_metadata`` can be
    read before :meth:`setup` too (from ``metadata.json``), e.g. to size the SAE.

    Raises (at construction):
        ConfigError: an unknown token kind, a non-positive batch size or ``buffer_shards``, negative workers.
    Raises (in :meth:`setup`):
        FeatureStoreError: an unreadable store; a store of 0 images or one too small for one batch per rank;
            a store without ``tokens``; a validation store with another ``d_model``, encoder or layer; ``mim
            validate`` without ``val_store``.
    """

    def __init__(
        self,
        train_store: str,
        val_store: str | None = None,
        tokens: str = "patch",
        batch_size: int = 4096,
        val_batch_size: int | None = None,
        buffer_shards: int = 4,
        seed: int = 0,
        drop_last: bool = True,
        check_finite: bool = True,
        num_workers: int = 0,
        skip_high_norm: bool = True,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__()
        if tokens not in TOKEN_KINDS:
            raise ConfigError(f"tokens must be one of {list(TOKEN_KINDS)}, got {tokens!r}. Fix: set --data.init_args.tokens.")
        sizes = {"batch_size": batch_size, "val_batch_size": val_batch_size or batch_size, "buffer_shards": buffer_shards}
        for name, value in sizes.items():
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}. Fix: set --data.init_args.{name} to a positive int.")
        if num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {num_workers}. Fix: set --data.init_args.num_workers 0.")
        self.save_hyperparameters()
        self.train_store, self.val_store, self.tokens = train_store, val_store, tokens
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.buffer_shards, self.seed, self.drop_last = buffer_shards, seed, drop_last
        self.check_finite, self.num_workers, self.skip_high_norm = check_finite, num_workers, skip_high_norm
        self.pin_memory = pin_memory
        self.train: FeatureStore | None = None
        self.val: FeatureStore | None = None
        self._resume: dict[str, int] | None = None  # training position from a checkpoint (load_state_dict)

    # -- stores -----------------------------------------------------------------------------------------------

    def _open(self, path: str, option: str) -> FeatureStore:
        store = FeatureStore(path)
        if len(store) == 0:
            meta = store.metadata
            raise FeatureStoreError(
                f"Feature store {store.path} holds 0 images (dataset {meta.get('dataset')!r}, split "
                f"{meta.get('split')!r}, data {meta.get('data')}): there is nothing to train or validate an SAE on. "
                "Fix: re-extract it from a non-empty split (check the data root and limit_per_class, overwrite=True), "
                f"or set --data.init_args.{option} to another store."
            )
        if self.tokens not in store.tokens:
            raise FeatureStoreError(
                f"Feature store {store.path} holds {store.tokens} tokens, not {self.tokens!r}. Fix: set "
                f"--data.init_args.tokens to one of those, or re-extract with --model.init_args.tokens including it."
            )
        return store

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def _train_position(self) -> int | tuple[int, int]:
        """The epoch of the next training pass, or ``(epoch, batches to skip)`` once after a resume."""
        if self._resume is not None:
            resume, self._resume = self._resume, None
            return resume["epoch"], resume["batches"]
        return self._epoch()

    def state_dict(self) -> dict[str, Any]:
        """The training position ``{"train_position": {"epoch", "batches"}}`` for the checkpoint (batches this
        rank has trained on in the epoch, from the trainer's loop progress), so a resumed run goes on with the
        very next batch."""
        from mim.data.resumable import batches_done

        if self.trainer is None or self.trainer.state.fn != "fit" or self.train is None:
            return {}
        return {"train_position": batches_done(self.trainer, self.steps_per_epoch)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume = state_dict.get("train_position")

    def setup(self, stage: str | None = None) -> None:
        """Open the stores and check them (see the class docstring for the errors). Idempotent."""
        if self.train is None:
            self.train = self._open(self.train_store, "train_store")
        if self.val is None and self.val_store is not None:
            self.val = self._open(self.val_store, "val_store")
            check_d_model(
                self.val, self.train.d_model, f"the training store {self.train.path}",
                fix="use a validation store extracted with the training store's encoder and layer "
                "(--data.init_args.val_store)",
            )
            diffs = [k for k in SAME_FEATURES_KEYS if self.val.metadata.get(k) != self.train.metadata.get(k)]
            if diffs:
                pairs = "; ".join(f"{k}: {self.val.metadata.get(k)} vs {self.train.metadata.get(k)}" for k in diffs)
                raise FeatureStoreError(
                    f"Feature store {self.val.path} holds features of another encoder / layer than the training store "
                    f"{self.train.path} ({pairs}). Fix: extract the validation store with the same encoder and layer."
                )
        if stage == "validate" and self.val is None:
            raise ConfigError("mim validate needs a validation store. Fix: set --data.init_args.val_store DIR.")
        _, world = self._world()
        if self.steps_per_epoch == 0:
            raise FeatureStoreError(
                f"Feature store {self.train.path} gives {self.tokens_per_epoch} {self.tokens} token rows, fewer than "
                f"one batch of {self.batch_size} per rank for {world} rank(s). Fix: lower --data.init_args.batch_size "
                "or extract more images."
            )
        if self.val is not None and len(self._dataset(self.val, train=False)) == 0:
            raise FeatureStoreError(
                f"Feature store {self.val.path} gives fewer validation batches than the {world} ranks. Fix: lower "
                "--data.init_args.val_batch_size or use a larger validation store."
            )

    @property
    def d_model(self) -> int:
        """Feature width of the training store (read from ``metadata.json`` before :meth:`setup`)."""
        return int(self.train_metadata["d_model"])

    @property
    def train_metadata(self) -> dict[str, Any]:
        """The training store's ``metadata.json`` plus ``"path"`` (the store folder).

        Raises:
            FeatureStoreError: the store has no (readable) ``metadata.json``.
        """
        if self.train is not None:
            return {**self.train.metadata, "path": str(self.train.path)}
        meta = read_metadata(self.train_store) or FeatureStore(self.train_store).metadata  # raises if incomplete
        return {**meta, "path": self.train_store}

    @property
    def tokens_per_epoch(self) -> int:
        """Token rows in the training store (one pass, all ranks); training uses
        ``steps_per_epoch x world_size x batch_size`` of them."""
        return token_rows(self._require_train(), self.tokens, self.skip_high_norm)

    @property
    def steps_per_epoch(self) -> int:
        """Training batches per rank per epoch (for the trainer's world size; 1 process without a trainer)."""
        _, world = self._world()
        return batches_per_rank(self.tokens_per_epoch, self.batch_size, self.drop_last, world, even=True)[1]

    def _require_train(self) -> FeatureStore:
        if self.train is None:
            self.setup()
        assert self.train is not None
        return self.train

    # -- loaders ----------------------------------------------------------------------------------------------

    def _dataset(self, store: FeatureStore, train: bool) -> FeatureStoreDataset:
        rank, world = self._world()
        return FeatureStoreDataset(
            store, self.tokens, self.batch_size if train else self.val_batch_size, shuffle=train, seed=self.seed,
            buffer_shards=self.buffer_shards, drop_last=self.drop_last and train, even=train,
            check_finite=self.check_finite, rank=rank, world_size=world, skip_high_norm=self.skip_high_norm,
        )

    def _pin(self) -> bool:
        """Whether to pin batches: ``pin_memory``, or (None) whether the trainer's device is a CUDA device."""
        if self.pin_memory is not None:
            return bool(self.pin_memory)
        trainer = self.trainer
        return trainer is not None and trainer.strategy.root_device.type == "cuda" and torch.cuda.is_available()

    def _loader(self, dataset: FeatureStoreDataset, train: bool = False) -> DataLoader:
        position = self._train_position if train else self._epoch
        return _EpochDataLoader(dataset, position, batch_size=None, num_workers=self.num_workers,
                                pin_memory=self._pin())

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Cast a batch's features to float32 on the device (after the copy in the store's dtype).

        Lightning calls this hook of the data module (in place of the LightningModule's) after moving a batch
        to the device, for training, validation and prediction alike."""
        if isinstance(batch, FeatureBatch) and batch.features.dtype != torch.float32:
            batch = batch._replace(features=batch.features.float())
        return batch

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches of this rank (a new order each epoch; resumes mid-epoch exactly)."""
        return self._loader(self._dataset(self._require_train(), train=True), train=True)

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches of this rank in store order; ``[]`` (no validation) without ``val_store``."""
        self._require_train()
        return self._loader(self._dataset(self.val, train=False)) if self.val is not None else []


__all__ = [
    "FeatureStoreDataModule",
    "FeatureStoreDataset",
    "batches_per_rank",
    "check_d_model",
    "token_rows",
]
