"""Image pipelines (albumentations 2.x) for pretraining and evaluation.

Every pipeline takes ``image``: an (H, W, 3) uint8 RGB numpy array and returns
``{"image": tensor}`` with a (3, img_size, img_size) float32 tensor normalized per channel
as ``(x / 255 - mean) / std``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

# albumentations checks PyPI for a newer version at import; there is no network here.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
from albumentations.pytorch import ToTensorV2  # noqa: E402

#: Crop fraction used by ``eval_transform`` for images larger than the model input: resize the
#: shorter side to ``img_size / 0.875`` and center-crop (the usual ImageNet convention, 224/256).
IMAGENET_CROP_PCT = 0.875


def train_transform(
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    scale: tuple[float, float] = (0.2, 1.0),
) -> A.Compose:
    """MAE pretraining augmentation: random resized crop + horizontal flip + normalize.

    Source: He et al., "Masked Autoencoders Are Scalable Vision Learners", 2021
    (arXiv 2111.06377), Sec. A.1 and the official ``main_pretrain.py``:
    ``RandomResizedCrop(input_size, scale=(0.2, 1.0), interpolation=BICUBIC)`` and
    ``RandomHorizontalFlip()``; no color jitter.

    Args:
        img_size: output side in pixels (square).
        mean, std: per-channel RGB statistics in [0, 1] units (pixel / 255).
        scale: range of the crop area as a fraction of the image area (aspect ratio 3/4..4/3).

    Returns:
        a pipeline ``f(image=(H, W, 3) uint8) -> {"image": (3, img_size, img_size) float32}``.
    """
    return A.Compose(
        [
            A.RandomResizedCrop(size=(img_size, img_size), scale=tuple(scale), interpolation=cv2.INTER_CUBIC),
            A.HorizontalFlip(p=0.5),
            A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0),
            ToTensorV2(),
        ]
    )


def eval_transform(
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    crop_pct: float = 1.0,
) -> A.Compose:
    """Deterministic evaluation pipeline: resize the shorter side, center-crop, normalize.

    The shorter side is resized (bicubic) to ``round(img_size / crop_pct)`` then the center
    ``img_size x img_size`` is kept. ``crop_pct=1.0`` only resizes (right for CIFAR at 32 px, where
    the native size equals the input size); ``0.875`` is the ImageNet convention (256 -> 224) that
    ``ImageDataModule`` uses when the native size differs from ``img_size``.

    Args:
        img_size: output side in pixels (square).
        mean, std: per-channel RGB statistics in [0, 1] units (pixel / 255).
        crop_pct: fraction of the resized shorter side kept by the center crop, in (0, 1].

    Returns:
        a pipeline ``f(image=(H, W, 3) uint8) -> {"image": (3, img_size, img_size) float32}``.

    Raises:
        ValueError: ``crop_pct`` not in (0, 1].
    """
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    return A.Compose(
        [
            A.SmallestMaxSize(max_size=round(img_size / crop_pct), interpolation=cv2.INTER_CUBIC),
            A.CenterCrop(height=img_size, width=img_size),
            A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0),
            ToTensorV2(),
        ]
    )
