"""Offline weighted kNN evaluation of a frozen encoder (``mim validate -c configs/eval/knn_cifar10.yaml``).

Wu et al. 2018 (arXiv 1805.01978, Sec. 3.4) with DINO's ``eval_knn.py`` defaults: the bank is the
features of the whole train split (eval transform, no augmentation), each val image is classified by
its ``k = 20`` most cosine-similar bank features voting with weight ``exp(cos / 0.07)``. The scoring
is :func:`mim.eval.knn.weighted_knn_scores`, the same as the online :class:`mim.eval.OnlineKNN`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Subset
from torchmetrics.classification import MulticlassAccuracy

from mim.errors import ConfigError
from mim.eval.features import Pool
from mim.eval.knn import weighted_knn_scores
from mim.eval.frozen import FrozenEncoderModule


class KNNEval(FrozenEncoderModule):
    """Weighted kNN top-1 / top-5 of a frozen encoder, run with ``mim validate``.

    Before validation the bank is built from ``trainer.datamodule.train_set`` in dataset order (the
    datamodule's ``setup("fit")`` is called when the train split is not open yet, as under
    ``validate``); under DDP each rank encodes every ``world_size``-th image and the banks are
    gathered. Every validation batch is then scored against the bank.

    Args:
        encoder, model_kwargs, pool: the frozen encoder and its pooling (:class:`FrozenEncoderModule`).
        k: neighbours per query (DINO: 20).
        temperature: ``T`` of the vote weights ``exp(cos / T)`` (DINO: 0.07).
        num_classes: classes; None: ``trainer.datamodule.num_classes``.
        pretrained_file: the ``.safetensors`` weights of a ``pretrained:`` encoder (offline use).

    A ``pretrained:<name>.<tag>`` encoder's preprocessing is adopted by the datamodule in :meth:`setup`,
    so the bank (built later) and the queries both use it.

    Logs ``knn/top1`` and ``knn/top5``, accuracies in [0, 1] over the val split (labels ``< 0`` ignored).

    Raises:
        ConfigError: bad ``k`` / ``temperature``; a datamodule without ``train_set``; train augmentation
            switched on (the bank must use the eval transform); a class-count mismatch.
    """

    def __init__(
        self,
        encoder: str,
        model_kwargs: dict[str, Any] | None = None,
        pool: Pool = "cls",
        k: int = 20,
        temperature: float = 0.07,
        num_classes: int | None = None,
        pretrained_file: str | None = None,
    ) -> None:
        super().__init__(encoder, model_kwargs, pool, pretrained_file)
        if k < 1 or temperature <= 0:
            raise ConfigError(f"k must be >= 1 and temperature > 0, got k={k}, temperature={temperature}.")
        self.save_hyperparameters()
        self.k, self.temperature, self.num_classes = k, temperature, num_classes
        self.bank: torch.Tensor | None = None
        self.bank_labels: torch.Tensor | None = None

    def setup(self, stage: str) -> None:
        super().setup(stage)  # a pretrained encoder's preprocessing, before the image-size check
        self.num_classes = self.resolve_num_classes(self.num_classes)
        self.top1 = MulticlassAccuracy(self.num_classes, top_k=1, average="micro", ignore_index=-1)
        top_k = min(5, self.num_classes)
        self.top5 = MulticlassAccuracy(self.num_classes, top_k=top_k, average="micro", ignore_index=-1)

    def _train_set(self) -> Any:
        datamodule = self.trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "train_set"):
            raise ConfigError(
                "KNNEval builds its bank from the datamodule's train_set. Fix: use mim.data.ImageDataModule."
            )
        if datamodule.train_set is None:
            datamodule.setup("fit")
        if self.data_option("train_augment", False):
            raise ConfigError(
                "KNNEval's bank must be built with the eval transform, but the datamodule augments the train "
                "split. Fix: --data.init_args.train_augment false."
            )
        return datamodule.train_set

    @torch.no_grad()
    def build_bank(self) -> None:
        """Encode the train split into ``bank`` ``(N, D)`` float32 and ``bank_labels`` ``(N,)`` int64
        (unlabelled images, label ``< 0``, dropped)."""
        dataset, datamodule = self._train_set(), self.trainer.datamodule
        world, rank = self.trainer.world_size, self.trainer.global_rank
        shard = Subset(dataset, range(rank, len(dataset), world)) if world > 1 else dataset
        loader = DataLoader(
            shard,
            batch_size=getattr(datamodule, "batch_size", 256),
            shuffle=False,
            num_workers=getattr(datamodule, "num_workers", 0),
        )
        features, labels = [], []
        with self.trainer.precision_plugin.forward_context():
            for batch in loader:
                features.append(self.features(batch[0].to(self.device)))
                labels.append(batch[1].to(self.device))
        bank, bank_labels = torch.cat(features), torch.cat(labels)
        self.check_labels(bank_labels, self.num_classes)
        if world > 1:  # equal shapes for all_gather: pad the shorter shards with unlabelled rows
            rows = -(-len(dataset) // world)
            pad = rows - len(bank)
            bank = torch.cat([bank, bank.new_zeros(pad, bank.shape[1])])
            bank_labels = torch.cat([bank_labels, bank_labels.new_full((pad,), -1)])
            bank, bank_labels = self.all_gather(bank).flatten(0, 1), self.all_gather(bank_labels).flatten(0, 1)
        keep = bank_labels >= 0
        if not bool(keep.any()):
            raise ConfigError("KNNEval's train split has no labelled image to vote. Fix: use a labelled train split.")
        self.bank, self.bank_labels = bank[keep], bank_labels[keep]

    def on_validation_start(self) -> None:
        if self.bank is None:
            self.build_bank()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        imgs, labels = batch[0], batch[1]
        self.check_labels(labels, self.num_classes)
        scores = weighted_knn_scores(
            self.bank, self.bank_labels, self.features(imgs), self.num_classes, self.k, self.temperature
        )
        self.top1(scores, labels)
        self.top5(scores, labels)
        self.log("knn/top1", self.top1, prog_bar=True, batch_size=len(labels))
        self.log("knn/top5", self.top5, batch_size=len(labels))


__all__ = ["KNNEval"]
