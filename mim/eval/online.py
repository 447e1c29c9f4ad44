"""Online evaluation while pretraining: a linear probe, a weighted kNN and a linear probe refitted each epoch, as
Lightning callbacks.

Both read frozen features of the *unmasked* images from ``pl_module.encoder`` (eval mode, no
gradients, see :func:`mim.eval.features.pooled_features`), so they never change the encoder. They
work with any method that exposes ``.encoder`` (a timm model) and batches ``(imgs, labels, ...)``;
labels ``< 0`` (unlabelled images) are ignored.
"""

from __future__ import annotations

import weakref
from typing import Any, get_args

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from mim.errors import ConfigError
from mim.eval.features import Pool, frozen_features, pool_tokens
from mim.eval.knn import weighted_knn_scores
from mim.eval.logistic import fit_linear_classifier
from mim.sync_batchnorm import SyncedBatchNorm


def _check_common(num_classes: int | None, pool: str, who: str) -> None:
    if pool not in get_args(Pool):
        raise ConfigError(f"{who} pool must be one of {list(get_args(Pool))}, got {pool!r}. Fix: set its init_args pool.")
    if num_classes is not None and num_classes < 2:
        raise ConfigError(f"{who} needs num_classes >= 2 (or null: the datamodule's), got {num_classes}.")


def _num_classes(num_classes: int | None, trainer: L.Trainer, who: str) -> int:
    if num_classes is None:
        num_classes = getattr(trainer.datamodule, "num_classes", None)
    if num_classes is None:
        raise ConfigError(f"{who} needs num_classes: the datamodule has none. Fix: set it in the callback's init_args.")
    return int(num_classes)


class _LastFeatures:
    """The encoder output of the last batch, so all online callbacks share one encoder pass.

    A hit needs the very same ``imgs`` tensor (unchanged) and the same encoder with unchanged
    parameters (``_version`` moves with every in-place optimiser update).
    """

    key: tuple | None = None
    imgs: weakref.ref | None = None
    features: torch.Tensor | None = None

    @classmethod
    def get(cls, trainer: L.Trainer, encoder: nn.Module, imgs: torch.Tensor) -> torch.Tensor:
        key = (id(encoder), next(encoder.parameters())._version, id(imgs), imgs._version)
        if key != cls.key or cls.imgs is None or cls.imgs() is not imgs:
            # The trainer's precision context, so bf16-mixed runs this forward in bf16 too.
            with trainer.precision_plugin.forward_context():
                cls.features = frozen_features(encoder, imgs)
            cls.key, cls.imgs = key, weakref.ref(imgs)
        return cls.features


def _features(trainer: L.Trainer, pl_module: L.LightningModule, imgs: torch.Tensor, pool: Pool) -> torch.Tensor:
    """``(B, D)`` float32 pooled frozen features of ``imgs`` from ``pl_module.encoder``."""
    encoder = pl_module.encoder
    tokens = _LastFeatures.get(trainer, encoder, imgs)
    return pool_tokens(tokens, pool, getattr(encoder, "num_prefix_tokens", 0)).float()


class OnlineLinearProbe(L.Callback):
    """Train a linear classifier on detached encoder features during pretraining.

    Head: ``BatchNorm1d(affine=False)`` + ``Linear``, as the MAE linear-probing protocol
    (He et al. 2021, arXiv 2111.06377, Appendix A.2: BatchNorm without affine before the linear
    classifier). It has its own AdamW optimiser and is trained on every training batch; it is
    evaluated on the validation set.

    Args:
        num_classes: classes; default ``trainer.datamodule.num_classes``.
        pool: ``"cls"`` token or ``"mean"`` of patch tokens (ConvNets: global average pooling).
        lr: AdamW learning rate of the head.
        weight_decay: AdamW weight decay of the head.
        name: prefix of the logged metrics (give each probe its own when using several).

    Logs ``<name>/train_loss``, ``<name>/train_top1`` (per step) and ``<name>/val_top1`` (per
    validation epoch), top-1 accuracy in [0, 1]. The head and its optimiser are saved in the
    checkpoint, so a resumed run continues the same probe.
    """

    def __init__(
        self,
        num_classes: int | None = None,
        pool: Pool = "cls",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        name: str = "probe",
    ) -> None:
        _check_common(num_classes, pool, type(self).__name__)
        if lr <= 0 or weight_decay < 0:
            raise ConfigError(
                f"OnlineLinearProbe needs lr > 0 and weight_decay >= 0, got {lr}, {weight_decay}. Fix: set the "
                "callback's init_args lr (e.g. 0.001) and weight_decay (e.g. 0)."
            )
        self.num_classes, self.pool, self.lr, self.weight_decay = num_classes, pool, lr, weight_decay
        self.name = name
        self.head: nn.Module | None = None
        self._pending_state: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.head is not None:
            return
        num_classes = _num_classes(self.num_classes, trainer, type(self).__name__)
        dim = pl_module.encoder.num_features
        # statistics over all ranks' batches: 2 ranks of batch B train as one process of batch 2B
        self.head = nn.Sequential(SyncedBatchNorm(dim, affine=False), nn.Linear(dim, num_classes))
        nn.init.trunc_normal_(self.head[1].weight, std=0.01)  # MAE's probe init
        nn.init.zeros_(self.head[1].bias)
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        self.val_top1 = MulticlassAccuracy(num_classes, average="micro", ignore_index=-1)

    def _to_device(self, pl_module: L.LightningModule) -> None:
        self.head.to(pl_module.device)
        self.val_top1.to(pl_module.device)
        if self._pending_state is not None:  # optimiser state follows the head onto its device
            self.head.load_state_dict(self._pending_state["head"])
            self.optimizer.load_state_dict(self._pending_state["optimizer"])
            self._pending_state = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._to_device(pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._to_device(pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        imgs, labels = batch[0], batch[1]
        valid = labels >= 0
        labelled = valid.sum()
        if trainer.world_size > 1:  # every rank takes part in the same collectives, labelled images or not
            labelled = trainer.strategy.reduce(labelled.float(), reduce_op="sum")
        if not bool(labelled > 0):
            return
        features = _features(trainer, pl_module, imgs, self.pool)
        self.head.train()
        with torch.enable_grad():
            logits = self.head(features)
            # mean over the labelled images of all ranks once the gradients are averaged over ranks
            loss = F.cross_entropy(logits, labels, ignore_index=-1, reduction="sum") * trainer.world_size / labelled
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if trainer.world_size > 1:  # keep the heads of all ranks identical
            for p in self.head.parameters():
                p.grad = trainer.strategy.reduce(p.grad, reduce_op="mean")
        self.optimizer.step()
        top1 = (logits.argmax(-1)[valid] == labels[valid]).float().mean()
        pl_module.log(f"{self.name}/train_loss", loss.detach(), batch_size=imgs.shape[0])
        pl_module.log(f"{self.name}/train_top1", top1, batch_size=imgs.shape[0])

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        imgs, labels = batch[0], batch[1]
        self.head.eval()
        with torch.no_grad():
            logits = self.head(_features(trainer, pl_module, imgs, self.pool))
        self.val_top1.update(logits, labels)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # compute() sums the counts of all ranks (torchmetrics), so every rank logs the global accuracy
        if self.val_top1.update_count or trainer.world_size > 1:
            pl_module.log(f"{self.name}/val_top1", self.val_top1.compute(), prog_bar=True, sync_dist=True)
        self.val_top1.reset()

    def state_dict(self) -> dict[str, Any]:
        if self.head is None:
            return {}
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self._pending_state = state_dict


class _EpochBank(L.Callback):
    """A bank of this epoch's pooled training features (as solo-learn's online kNN keeps one, so no extra pass over
    the training set is needed; the bank images are augmented), gathered over DDP ranks at the end of each
    validation epoch, where :meth:`scores` classifies the validation images. Logs ``<name>/val_top1`` in [0, 1]
    (nothing before the first training epoch), counted over the validation images of all ranks. The bank is saved
    in checkpoints, so a run resumed mid-epoch scores with the same bank as an uninterrupted one."""

    def __init__(self, pool: Pool, max_bank_size: int, num_classes: int | None, name: str) -> None:
        self.pool, self.max_bank_size, self.num_classes, self.name = pool, max_bank_size, num_classes, name
        self._reset()

    def scores(self, bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """(Q, C) class scores of the ``queries`` (Q, D) from the labelled ``bank`` (N, D), ``bank_labels`` (N,)."""
        raise NotImplementedError

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    def _reset(self) -> None:
        self.bank: list[torch.Tensor] = []
        self.bank_labels: list[torch.Tensor] = []
        self.queries: list[torch.Tensor] = []
        self.query_labels: list[torch.Tensor] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.num_classes = _num_classes(self.num_classes, trainer, type(self).__name__)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if sum(len(b) for b in self.bank) >= self.max_bank_size:
            return
        imgs, labels = batch[0], batch[1]
        self.bank.append(_features(trainer, pl_module, imgs, self.pool))
        self.bank_labels.append(labels)

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.bank:
            imgs, labels = batch[0], batch[1]
            self.queries.append(_features(trainer, pl_module, imgs, self.pool))
            self.query_labels.append(labels)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Every rank has trained on as many batches, so all have a bank or none does (no rank skips a collective).
        if not self.bank:
            return
        bank, bank_labels = torch.cat(self.bank), torch.cat(self.bank_labels)
        if trainer.world_size > 1:  # equal bank sizes on all ranks (same batches per rank)
            bank = trainer.strategy.all_gather(bank).flatten(0, 1)
            bank_labels = trainer.strategy.all_gather(bank_labels).flatten(0, 1)
        keep = bank_labels >= 0
        if self.queries:
            queries, query_labels = torch.cat(self.queries), torch.cat(self.query_labels)
        else:  # fewer validation images than ranks
            queries, query_labels = bank.new_zeros(0, bank.shape[1]), bank_labels.new_zeros(0)
        self.queries, self.query_labels = [], []
        if not bool(keep.any()):
            return
        scores = self.scores(bank[keep], bank_labels[keep], queries)
        labelled = query_labels >= 0
        counts = torch.stack([(scores.argmax(-1) == query_labels)[labelled].sum(), labelled.sum()]).float()
        if trainer.world_size > 1:
            counts = trainer.strategy.reduce(counts, reduce_op="sum")
        if bool(counts[1] > 0):
            pl_module.log(f"{self.name}/val_top1", counts[0] / counts[1], prog_bar=True, sync_dist=True)  # global already

    def state_dict(self) -> dict[str, Any]:
        if not self.bank:
            return {}
        return {"bank": torch.cat(self.bank).cpu(), "bank_labels": torch.cat(self.bank_labels).cpu()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:  # moved to the module's device by the next torch.cat with device features
            self.bank, self.bank_labels = [state_dict["bank"]], [state_dict["bank_labels"]]

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.bank = [b.to(pl_module.device) for b in self.bank]
        self.bank_labels = [b.to(pl_module.device) for b in self.bank_labels]


class OnlineKNN(_EpochBank):
    """Weighted kNN top-1 on the validation set, with a bank of this epoch's training features.

    At the end of each validation epoch every validation image is classified by
    :func:`mim.eval.knn.weighted_knn_scores` (cosine, ``k`` = 20, ``T`` = 0.07) against the pooled features of the
    training batches seen since the epoch started (gathered over DDP ranks; the bank logic is shared with
    :class:`EpochLinearProbe`).

    Args:
        k: neighbours.
        temperature: ``T`` of the vote weights.
        pool: feature pooling, as :class:`OnlineLinearProbe`.
        max_bank_size: most training features kept per rank (first ones of the epoch).
        num_classes: classes; default ``trainer.datamodule.num_classes``.
        name: prefix of the logged metric.

    Logs ``<name>/val_top1`` in [0, 1] (nothing before the first training epoch), counted over the
    validation images of all ranks. The bank is saved in checkpoints, so a run resumed mid-epoch votes
    with the same bank as an uninterrupted one.
    """

    def __init__(
        self,
        k: int = 20,
        temperature: float = 0.07,
        pool: Pool = "cls",
        max_bank_size: int = 50_000,
        num_classes: int | None = None,
        name: str = "knn",
    ) -> None:
        _check_common(num_classes, pool, type(self).__name__)
        if k < 1 or temperature <= 0 or max_bank_size < 1:
            raise ConfigError(
                f"OnlineKNN needs k >= 1, temperature > 0 and max_bank_size >= 1, got {k}, {temperature}, "
                f"{max_bank_size}. Fix: set the callback's init_args (DINO's: k 20, temperature 0.07)."
            )
        self.k, self.temperature = k, temperature
        super().__init__(pool, max_bank_size, num_classes, name)

    def scores(self, bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        return weighted_knn_scores(bank, bank_labels, queries, self.num_classes, self.k, self.temperature)


class EpochLinearProbe(_EpochBank):
    """A linear probe fitted to convergence at each validation, on this epoch's training features.

    :class:`OnlineLinearProbe` trains its head one step per training batch, on features that move as the encoder
    trains: in a short run it measures how far its head got as much as the features (on the 4-epoch CIFAR-10
    quick run its random-init row ends at 31.5 % on fixed features that a converged probe reads at 39.2 %). This
    probe refits from scratch at every validation: multinomial logistic
    regression on standardised features (the MAE probe's ``BatchNorm1d(affine=False)``), full-batch L-BFGS
    (:func:`mim.eval.logistic.fit_linear_classifier`), on the bank of the epoch's pooled training features that
    :class:`OnlineKNN` also keeps (augmented images, gathered over DDP ranks; every rank fits the same
    deterministic probe and classifies its own validation images). The cost is one such fit per validation
    (about a second for 10,000 features of 192 dims on 2 CPU cores), and no gradient reaches the encoder.

    Args:
        weight_decay: L2 coefficient of the fit (>= 0).
        max_iter: L-BFGS iterations (>= 1).
        pool: feature pooling, as :class:`OnlineLinearProbe`.
        max_bank_size: most training features kept per rank (first ones of the epoch).
        num_classes: classes; default ``trainer.datamodule.num_classes``.
        name: prefix of the logged metric.

    Logs ``<name>/val_top1`` in [0, 1], as :class:`OnlineKNN` (nothing before the first training epoch). The
    bank is saved in checkpoints.
    """

    def __init__(
        self,
        weight_decay: float = 1e-4,
        max_iter: int = 100,
        pool: Pool = "cls",
        max_bank_size: int = 50_000,
        num_classes: int | None = None,
        name: str = "epoch_probe",
    ) -> None:
        _check_common(num_classes, pool, type(self).__name__)
        if weight_decay < 0 or max_iter < 1 or max_bank_size < 1:
            raise ConfigError(
                f"EpochLinearProbe needs weight_decay >= 0, max_iter >= 1 and max_bank_size >= 1, got "
                f"{weight_decay}, {max_iter}, {max_bank_size}. Fix: set the callback's init_args (e.g. weight_decay "
                "1e-4, max_iter 100)."
            )
        self.weight_decay, self.max_iter = weight_decay, max_iter
        super().__init__(pool, max_bank_size, num_classes, name)

    def scores(self, bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        probe = fit_linear_classifier(bank, bank_labels, self.num_classes, self.weight_decay, self.max_iter)
        return probe.logits(queries)
