"""Mask generators: callables ``(batch_size, grid_hw, generator) -> BoolTensor (B, h*w)``.

``True`` marks a masked patch. Every generator masks exactly ``round(mask_ratio * h * w)`` patches
per sample unless its docstring says otherwise, so any mask works with any ViT method.
"""

from mim.masking.base import MaskGenerator, mask_config, num_masked, validate_mask_ratio
from mim.masking.block import BlockMask
from mim.masking.color_noise import ColorNoiseMask
from mim.masking.random import RandomMask

__all__ = [
    "BlockMask",
    "ColorNoiseMask",
    "MaskGenerator",
    "RandomMask",
    "mask_config",
    "num_masked",
    "validate_mask_ratio",
]
