"""Learning-rate and weight-decay rules shared by pretraining and evaluation: MAE's batch scaling, the
per-step warmup + cosine schedule (He et al. 2021, arXiv 2111.06377, Appendix A.1; official
``util/lr_sched.py``), SparK's variant of it (official ``pretrain/utils/lr_control.py``,
``lr_wd_annealing``) and the weight-decay / no-weight-decay parameter groups."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
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


def lr_wd_annealing(
    step: int, warmup_steps: int, total_steps: int, start_ratio: float = 0.005, min_ratio: float = 0.001
) -> float:
    """SparK's learning-rate multiplier at ``step`` (official ``pretrain/utils/lr_control.py``,
    ``lr_wd_annealing``): linear warmup from ``start_ratio`` (0.005) at step 0 towards 1, then a
    half-cycle cosine from 1 at ``warmup_steps`` to ``min_ratio`` (0.001) at the last step
    ``total_steps - 1``.

    Args:
        step: optimiser step, from 0.
        warmup_steps: warmup length in steps (official: ``round(warmup_epochs * iters_per_epoch)``).
        total_steps: steps of the whole run.
        start_ratio: multiplier at step 0 (official 0.005).
        min_ratio: multiplier at the last step (official 0.001).

    Returns:
        The multiplier of the peak learning rate, in ``[min(start_ratio, min_ratio), 1]``.
    """
    if step < warmup_steps:
        return start_ratio + (1.0 - start_ratio) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def weight_decay_groups(
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float, no_decay_keys: Iterable[str] = ()
) -> list[dict[str, Any]]:
    """``[no-decay group, decay group]`` for an optimiser (``{"params": [...], "weight_decay": float}``).

    A trainable parameter gets no weight decay when it is 1-D (norms, layer scale), a bias (name ends in
    ``.bias``), or its name contains one of ``no_decay_keys`` as a substring (so ``"mask_token"`` also
    matches ``decoder.mask_tokens.0``); every other trainable parameter gets ``weight_decay``. Frozen
    parameters are left out. This is MAE's rule with ``no_decay_keys=()`` (official ``main_pretrain.py``:
    timm's ``add_weight_decay`` without a skip list, so cls and mask tokens are decayed) and SparK's
    ``get_param_groups`` (official ``pretrain/utils/lr_control.py``) with its ``nowd_keys``.
    """
    keys = tuple(no_decay_keys)
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or any(key in name for key in keys):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


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
    optimizer: torch.optim.Optimizer,
    trainer: L.Trainer,
    warmup_epochs: float,
    min_ratio: float = 0.0,
    rule: Callable[[int, int, int], float] | None = None,
) -> dict[str, Any]:
    """Lightning ``lr_scheduler`` entry: per-step :func:`warmup_cosine` over the trainer's
    ``estimated_stepping_batches``; ``warmup_epochs`` (fractions allowed) converted to steps. Each
    param group's own lr (e.g. a layer-decayed one) is multiplied by the same factor. ``rule(step,
    warmup_steps, total_steps)`` replaces :func:`warmup_cosine` (and ``min_ratio``) when given, e.g.
    SparK's :func:`lr_wd_annealing`."""
    total = max(1, int(trainer.estimated_stepping_batches))
    epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
    warmup = min(total, round(warmup_epochs * (total / epochs if epochs else total)))
    if rule is None:
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, total, min_ratio))
    else:
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: rule(step, warmup, total))
    return {"scheduler": schedule, "interval": "step"}


__all__ = [
    "effective_batch_size",
    "lr_wd_annealing",
    "scaled_lr",
    "warmup_cosine",
    "warmup_cosine_scheduler",
    "weight_decay_groups",
]
