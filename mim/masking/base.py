"""The mask-generator contract shared by every method (see shared/DESIGN.md, "Contracts")."""

from __future__ import annotations

import inspect
from typing import Any

import torch

from mim.errors import ConfigError


def validate_mask_ratio(mask_ratio: float) -> float:
    """Return ``mask_ratio`` as a float, or raise :class:`ConfigError` (a ``ValueError``) unless in (0, 1)."""
    mask_ratio = float(mask_ratio)
    if not 0.0 < mask_ratio < 1.0:
        raise ConfigError(
            f"mask_ratio must lie strictly between 0 and 1, got {mask_ratio}. "
            "Fix: pass e.g. --model.mask_ratio 0.75 (MAE's default)."
        )
    return mask_ratio


def num_masked(mask_ratio: float, num_patches: int) -> int:
    """Number of masked patches, ``round(mask_ratio * num_patches)``, kept in ``[1, num_patches - 1]``.

    At least one patch stays visible (the encoder needs an input) and at least one is masked
    (the loss needs a target).
    """
    return min(max(round(mask_ratio * num_patches), 1), num_patches - 1)


class MaskGenerator:
    """Base class of mask generators.

    Call: ``mask = gen(batch_size, grid_hw, generator=None)``

    Args:
        batch_size: B, number of masks to draw.
        grid_hw: ``(h, w)``, the patch grid; ``L = h * w`` patches.
        generator: optional ``torch.Generator`` for reproducible masks; ``None`` uses the global RNG
            (which ``lightning.seed_everything`` seeds).

    Returns:
        ``(B, L)`` bool tensor on ``generator``'s device (CPU when ``None``), ``True`` = masked,
        row-major over the grid, with exactly ``num_masked(mask_ratio, L)`` ``True`` per row.
    """

    def __init__(self, mask_ratio: float) -> None:
        self.mask_ratio = validate_mask_ratio(mask_ratio)

    def __call__(
        self, batch_size: int, grid_hw: tuple[int, int], generator: torch.Generator | None = None
    ) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mask_ratio={self.mask_ratio})"


def mask_config(generator: Any) -> dict[str, Any]:
    """The config that re-creates ``generator`` as a method's ``mask`` argument (what a method stores
    in ``hparams["mask"]``): ``{"class_path": "<module>.<class>", "init_args": {...}}`` with every
    constructor argument but ``mask_ratio`` (the method passes that one), read from the attribute of
    the same name (arguments without one are left out: their defaults apply).

    The form is what a YAML config gives (``mask: {class_path: mim.masking.ColorNoiseMask, init_args:
    {color: green}}``), so ``mim fit --ckpt_path`` (which feeds a checkpoint's hyper-parameters back
    through the config parser) and ``load_from_checkpoint`` of a CLI run rebuild the same mask.
    """
    cls = type(generator)
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]  # without self
    init_args = {
        p.name: getattr(generator, p.name)
        for p in params
        if p.name != "mask_ratio" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and hasattr(generator, p.name)
    }
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}

