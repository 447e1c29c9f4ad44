"""Linear probing of a frozen encoder (``mim fit -c configs/eval/linear_probe_cifar10.yaml``).

The MAE protocol: He et al. 2021 (arXiv 2111.06377), Appendix A.2, and the official
``main_linprobe.py``: the encoder is frozen, a ``BatchNorm1d`` without affine parameters
(``eps=1e-6``) normalises its features, one ``Linear`` layer (weights ``trunc_normal(std=0.01)``)
classifies them; LARS (momentum 0.9, no weight decay), ``lr = blr * batch / 256`` with ``blr = 0.1``,
linear warmup (10 epochs) then half-cycle cosine, 90 epochs, no augmentation besides a crop.

:class:`mim.eval.frozen.FrozenEncoderModule` holds the frozen encoder and its data checks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from timm.optim import Lars
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from mim.errors import ConfigError
from mim.eval.features import Pool
from mim.eval.frozen import FrozenEncoderModule
from mim.optim import scaled_lr, warmup_cosine_scheduler


class FeatureCache:
    """Pooled features kept in memory by image index, so that the encoder sees each image once.

    Rows live in one ``(N, D)`` tensor (grown on demand, ``N`` = largest index + 1) with a filled mask,
    on the device of the first features stored.
    """

    def __init__(self) -> None:
        self.features: torch.Tensor | None = None
        self.filled: torch.Tensor | None = None

    def __call__(
        self, indices: torch.Tensor, imgs: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """``(B, D)`` features of the images ``indices`` ``(B,)`` int64; ``compute`` runs on the
        not yet cached ones of ``imgs`` only."""
        if self.filled is not None:
            indices = indices.to(self.filled.device)
        miss = torch.ones_like(indices, dtype=torch.bool) if self.filled is None else ~self._filled(indices)
        if bool(miss.any()):
            fresh = compute(imgs[miss.to(imgs.device)])
            self._grow(int(indices.max()) + 1, fresh)
            indices = indices.to(self.filled.device)
            self.features[indices[miss]] = fresh.to(self.features)
            self.filled[indices[miss]] = True
        return self.features[indices].to(imgs.device)

    def _filled(self, indices: torch.Tensor) -> torch.Tensor:
        inside = indices < len(self.filled)
        return inside & self.filled[indices.clamp(max=len(self.filled) - 1)]

    def _grow(self, size: int, like: torch.Tensor) -> None:
        if self.features is not None and size <= len(self.features):
            return
        old = 0 if self.features is None else len(self.features)
        size = max(size, 2 * old)
        features = like.new_zeros(size, like.shape[1], dtype=torch.float32)
        filled = torch.zeros(size, dtype=torch.bool, device=like.device)
        if self.features is not None:
            features[:old], filled[:old] = self.features, self.filled
        self.features, self.filled = features, filled


class LinearProbe(FrozenEncoderModule):
    """Linear classifier on frozen encoder features, trained with ``mim fit`` (MAE Appendix A.2).

    Args:
        encoder, model_kwargs, pool: the frozen encoder and its pooling (:class:`FrozenEncoderModule`);
            ``pretrained:<name>.<tag>`` sources bring their preprocessing (adopted in :meth:`setup`).
        num_classes: classes of the head; None: ``trainer.datamodule.num_classes``.
        optimizer: ``"lars"`` (``timm.optim.Lars``, trust coefficient 0.001, adapting only the weight
            matrix as MAE's ``util/lars.py``) or ``"sgd"``; both with momentum 0.9.
        blr: base learning rate; ``lr = blr * effective_batch / 256`` (MAE's linear scaling rule),
            ``effective_batch = batch_size * accumulate_grad_batches * world_size``.
        lr: absolute learning rate, overrides ``blr``.
        weight_decay: on the weight matrix only (MAE: 0).
        warmup_epochs: linear warmup in epochs (fractions allowed), then per-step half-cycle cosine to 0.
        cache_features: compute the frozen features of each image once and keep them in memory (by
            image index: needs the datamodule's ``return_index: true``), so many epochs cost one encoder
            pass (images are still loaded each epoch). The features of the first epoch are reused, so
            train augmentation would be frozen too: use ``train_augment: false``.
        pretrained_file: the ``.safetensors`` weights of a ``pretrained:`` encoder (offline use).

    Batches: ``(imgs, labels)`` or ``(imgs, labels, indices)``, ``imgs`` ``(B, 3, H, W)`` float,
    ``labels`` ``(B,)`` int64. Logs ``train/loss``, ``train/top1``, ``val/loss``, ``val/top1`` and
    ``val/top5`` (accuracies in [0, 1], torchmetrics ``MulticlassAccuracy``).

    Raises:
        ConfigError: bad arguments (at init); a head / dataset class-count mismatch (at setup); batches
            without indices while caching.
    """

    def __init__(
        self,
        encoder: str,
        model_kwargs: dict[str, Any] | None = None,
        pool: Pool = "cls",
        num_classes: int | None = None,
        optimizer: Literal["sgd", "lars"] = "lars",
        blr: float = 0.1,
        lr: float | None = None,
        weight_decay: float = 0.0,
        warmup_epochs: float = 10.0,
        cache_features: bool = False,
        pretrained_file: str | None = None,
    ) -> None:
        super().__init__(encoder, model_kwargs, pool, pretrained_file)
        if optimizer not in ("sgd", "lars"):
            raise ConfigError(f"optimizer must be 'sgd' or 'lars', got {optimizer!r}.")
        if blr < 0 or (lr is not None and lr < 0) or weight_decay < 0 or warmup_epochs < 0:
            raise ConfigError(
                f"blr, lr, weight_decay and warmup_epochs must be >= 0, got blr={blr}, lr={lr}, "
                f"weight_decay={weight_decay}, warmup_epochs={warmup_epochs}."
            )
        if num_classes is not None and num_classes < 2:
            raise ConfigError(f"num_classes must be >= 2 or null (from the data), got {num_classes}.")
        self.save_hyperparameters()
        self.num_classes = num_classes
        self.optimizer_name, self.blr, self.lr, self.weight_decay = optimizer, blr, lr, weight_decay
        self.warmup_epochs, self.cache_features = warmup_epochs, cache_features
        self.head: nn.Sequential | None = None
        self._cache = {"train": FeatureCache(), "val": FeatureCache()}
        if num_classes is not None:
            self._build_head(num_classes)

    def _build_head(self, num_classes: int) -> None:
        dim = self.encoder.num_features
        self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
        nn.init.trunc_normal_(self.head[1].weight, std=0.01)  # main_linprobe.py
        nn.init.zeros_(self.head[1].bias)
        self.train_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_top5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro")

    def setup(self, stage: str) -> None:
        super().setup(stage)  # a pretrained encoder's preprocessing, before the image-size check
        num_classes = self.resolve_num_classes(self.num_classes)
        if self.head is None:
            self._build_head(num_classes)
            self.num_classes = self.hparams["num_classes"] = num_classes  # so checkpoints rebuild the head
        if self.cache_features and self.data_option("train_augment", False):
            rank_zero_warn(
                "LinearProbe(cache_features=True) with train_augment=True: the augmented views of the "
                "first epoch are reused in every epoch. Set --data.init_args.train_augment false."
            )

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` images -> ``(B, num_classes)`` logits."""
        return self.head(self.features(imgs))

    def _features(self, batch: Any, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        imgs, labels = batch[0], batch[1]
        self.check_labels(labels, self.num_classes)
        if not self.cache_features:
            return self.features(imgs), labels
        if len(batch) < 3:
            raise ConfigError(
                "LinearProbe(cache_features=True) keys its cache by image index, but the batches have none. "
                "Fix: --data.init_args.return_index true (or --model.init_args.cache_features false)."
            )
        return self._cache[split](batch[2], imgs, self.features), labels

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        features, labels = self._features(batch, "train")
        logits = self.head(features)
        loss = F.cross_entropy(logits, labels)
        self.train_top1(logits, labels)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(labels))
        self.log("train/top1", self.train_top1, on_step=False, on_epoch=True, batch_size=len(labels))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        features, labels = self._features(batch, "val")
        logits = self.head(features)
        self.val_top1(logits, labels)
        self.val_top5(logits, labels)
        self.log("val/loss", F.cross_entropy(logits, labels), batch_size=len(labels), sync_dist=True)
        self.log("val/top1", self.val_top1, prog_bar=True, batch_size=len(labels))
        self.log("val/top5", self.val_top5, batch_size=len(labels))

    def configure_optimizers(self) -> dict[str, Any]:
        """LARS or SGD (momentum 0.9) over the head; weight decay and LARS adaptation only for the
        weight matrix (``p.ndim > 1``, as MAE's ``util/lars.py``); per-step warmup + cosine."""
        lr = scaled_lr(self.blr, self.lr, self.trainer)
        params = list(self.head.parameters())
        matrices = {"params": [p for p in params if p.ndim > 1], "weight_decay": self.weight_decay}
        vectors = {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}
        if self.optimizer_name == "lars":
            optimizer = Lars([{**matrices, "always_adapt": True}, vectors], lr=lr, momentum=0.9)
        else:
            optimizer = torch.optim.SGD([matrices, vectors], lr=lr, momentum=0.9)
        schedule = warmup_cosine_scheduler(optimizer, self.trainer, self.warmup_epochs)
        return {"optimizer": optimizer, "lr_scheduler": schedule}


__all__ = ["FeatureCache", "FrozenEncoderModule", "LinearProbe"]
