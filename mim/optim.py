"""Learning-rate rules shared by pretraining and evaluation: MAE's batch scaling and the per-step
warmup + cosine schedule (He et al. 2021, arXiv 2111.06377, Appendix A.1; official ``util/lr_sched.py``)."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch

from mim.errors import ConfigError


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier at ``step``: linear warmup, then half-cycle cosine to ``min_ratio``
    (MAE Appendix A.1: "cosine decay", "warmup epochs 40"; applied per step as ``util/lr_sched.py``)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(progress, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def effective_batch_size(trainer: L.Trainer) -> int:
    """``batch_size * accumulate_grad_batches * world_size`` of a running trainer.

    Raises:
        ConfigError: the datamodule has no ``batch_size`` (then give ``lr`` directly).
    """
    batch_size = getattr(trainer.datamodule, "batch_size", None)
    if batch_size is None:
        raise ConfigError(
            "cannot scale blr by the batch size: the datamodule has no `batch_size`. "
            "Fix: give the learning rate directly with --model.init_args.lr."
        )
    return batch_size * trainer.accumulate_grad_batches * trainer.world_size


def scaled_lr(blr: float, lr: float | None, trainer: L.Trainer) -> float:
    """``lr`` when given, else MAE's linear scaling rule ``blr * effective_batch / 256``."""
    return lr if lr is not None else blr * effective_batch_size(trainer) / 256


def warmup_cosine_scheduler(
    optimizer: torch.optim.Optimizer, trainer: L.Trainer, warmup_epochs: float, min_ratio: float = 0.0
) -> dict[str, Any]:
    """Lightning ``lr_scheduler`` entry: per-step :func:`warmup_cosine` over the trainer's
    ``estimated_stepping_batches``; ``warmup_epochs`` (fractions allowed) converted to steps. Each
    param group's own lr (e.g. a layer-decayed one) is multiplied by the same factor."""
    total = max(1, int(trainer.estimated_stepping_batches))
    epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
    warmup = min(total, round(warmup_epochs * (total / epochs if epochs else total)))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, total, min_ratio))
    return {"scheduler": schedule, "interval": "step"}


__all__ = ["effective_batch_size", "scaled_lr", "warmup_cosine", "warmup_cosine_scheduler"]
