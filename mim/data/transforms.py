"""Image pipelines (albumentations 2.x) for pretraining and evaluation.

Every pipeline takes ``image``: an (H, W, 3) uint8 RGB numpy array and returns
``{"image": tensor}`` with a (3, img_size, img_size) float32 tensor normalized per channel
as ``(x / 255 - mean) / std``.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

# albumentations checks PyPI for a newer version at import; there is no network here.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
from albumentations.pytorch import ToTensorV2  # noqa: E402

#: Crop fraction used by ``eval_transform`` for images larger than the model input: resize the
#: shorter side to ``img_size / 0.875`` and center-crop (the usual ImageNet convention, 224/256).
IMAGENET_CROP_PCT = 0.875
#: ``eval_transform`` first center-crops the long side of images more elongated than this (w/h or h/w).
MAX_EVAL_ASPECT = 8.0
#: Resampling filters by the names timm's ``pretrained_cfg["interpolation"]`` uses, as OpenCV flags.
INTERPOLATIONS: dict[str, int] = {
    "bicubic": cv2.INTER_CUBIC,
    "bilinear": cv2.INTER_LINEAR,
    "nearest": cv2.INTER_NEAREST,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}
#: Eval crop modes (timm's ``crop_mode``): ``center`` resizes the shorter side then center-crops,
#: ``squash`` resizes both sides to the same length (aspect not kept) then center-crops.
CROP_MODES = ("center", "squash")


def interpolation_flag(name: str) -> int:
    """The OpenCV flag of an interpolation name (:data:`INTERPOLATIONS`).

    Raises:
        ValueError: an unknown name (the valid ones are listed).
    """
    if name not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {name!r}")
    return INTERPOLATIONS[name]


class CenterCropAspect(A.ImageOnlyTransform):
    """Center-crop the long side so that ``long <= ceil(max_ratio * short)``; other images pass unchanged.

    Used by ``eval_transform`` before resizing the shorter side: a 1 x 20000 panorama would
    otherwise be resized to ``S x 20000*S`` pixels (about 1 GB at S = 256) only to keep its center.
    The center crop of ``eval_transform`` keeps at most ``short`` pixels of the long side, so with
    ``max_ratio >= 3`` the same central region is kept; only the resampling grid moves by a
    fraction of a pixel (the rounded resized length changes).

    Args:
        max_ratio: largest long/short side ratio left untouched (> 0).
        p: probability of applying the transform.
    """

    def __init__(self, max_ratio: float = MAX_EVAL_ASPECT, p: float = 1.0) -> None:
        super().__init__(p=p)
        if max_ratio <= 0:
            raise ValueError(f"max_ratio must be > 0, got {max_ratio}")
        self.max_ratio = max_ratio

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        h, w = img.shape[:2]
        if w > self.max_ratio * h:
            keep = max(1, int(np.ceil(self.max_ratio * h)))
            x0 = (w - keep) // 2
            return img[:, x0 : x0 + keep]
        if h > self.max_ratio * w:
            keep = max(1, int(np.ceil(self.max_ratio * w)))
            y0 = (h - keep) // 2
            return img[y0 : y0 + keep]
        return img

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("max_ratio",)


class TimmAutoAugment(A.ImageOnlyTransform):
    """timm's AutoAugment family (RandAugment ``rand-*``, AugMix ``augmix-*``, AutoAugment policies) on a uint8
    RGB array, with the parameters ``timm.data.create_transform`` gives it (``translate_const = 0.45 *
    img_size``, the fill colour = ``mean`` in 0-255, ``interpolation``).

    timm's operations draw from Python's and NumPy's global generators; here they are seeded from this
    transform's own albumentations generators first (and the global states put back after), so each image's
    augmentation follows the pipeline seed like every other albumentations transform (per-image reseeding,
    exact resume; :mod:`mim.data.resumable`).

    Args:
        config: timm's config string, e.g. ``"rand-m9-mstd0.5-inc1"`` (MAE / BEiT fine-tuning: RandAugment,
            2 ops of magnitude 9 with std 0.5, increasing-severity ops; Cubuk et al. 2020, arXiv 1909.13719).
        img_size: the output side in pixels (the translation range follows it).
        mean: per-channel RGB mean in [0, 1] units (the fill of pixels moved in by geometric ops).
        interpolation: a key of :data:`INTERPOLATIONS` (bicubic, bilinear, nearest, lanczos; area falls back
            to bilinear, which PIL's affine ops take).
        p: probability of applying it.

    Raises:
        ValueError: a config string timm does not parse (its message).
    """

    def __init__(self, config: str, img_size: int, mean: Sequence[float], interpolation: str = "bicubic",
                 p: float = 1.0) -> None:
        super().__init__(p=p)
        from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform
        from timm.data.transforms import str_to_pil_interp

        self.config, self.img_size, self.mean, self.interpolation = config, img_size, tuple(mean), interpolation
        params: dict[str, Any] = dict(translate_const=int(img_size * 0.45),
                                      img_mean=tuple(min(255, round(255 * m)) for m in mean),
                                      interpolation=str_to_pil_interp("bilinear" if interpolation == "area"
                                                                      else interpolation))
        try:
            if config.startswith("rand"):
                self.augment = rand_augment_transform(config, params)
            elif config.startswith("augmix"):
                self.augment = augment_and_mix_transform(config, {**params, "translate_pct": 0.3})
            else:
                self.augment = auto_augment_transform(config, params)
        except (AssertionError, ValueError, KeyError, IndexError) as err:
            raise ValueError(f"auto_augment {config!r} is not a timm AutoAugment/RandAugment/AugMix config "
                             f"({err or type(err).__name__}); e.g. 'rand-m9-mstd0.5-inc1'") from err

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        seed = self.py_random.getrandbits(32)
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            random.seed(seed)
            np.random.seed(seed)
            return np.asarray(self.augment(Image.fromarray(img)))
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("config", "img_size", "mean", "interpolation")


def train_transform(
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    scale: tuple[float, float] = (0.2, 1.0),
    interpolation: str = "bicubic",
    auto_augment: str | None = None,
    reprob: float = 0.0,
) -> A.Compose:
    """Training augmentation: random resized crop, horizontal flip, optional RandAugment and random erasing, normalize.

    Pretraining (the default): He et al., "Masked Autoencoders Are Scalable Vision Learners", 2021
    (arXiv 2111.06377), Sec. A.1 and the official ``main_pretrain.py``:
    ``RandomResizedCrop(input_size, scale=(0.2, 1.0), interpolation=BICUBIC)`` and
    ``RandomHorizontalFlip()``; no color jitter. Fine-tuning (MAE App. A.3, ``main_finetune.py``, which calls
    timm's ``create_transform``): add ``auto_augment="rand-m9-mstd0.5-inc1"`` (:class:`TimmAutoAugment`, after
    the flip, as timm orders it) and ``reprob=0.25`` (random erasing of one box, Zhong et al. 2020, arXiv
    1708.04896: area 2 %-1/3 of the image, aspect log-uniform in 0.3-3.3, timm's defaults; albumentations'
    ``Erasing``). Erasing here fills the box with uniform random pixels in 0-255 before normalisation, where
    timm's ``mode="pixel"`` draws N(0, 1) after it: the same per-pixel noise up to its distribution (uniform
    0-255 has about the spread of the data, std ~1.2 in normalised units).

    Args:
        img_size: output side in pixels (square).
        mean, std: per-channel RGB statistics in [0, 1] units (pixel / 255).
        scale: range of the crop area as a fraction of the image area (aspect ratio 3/4..4/3).
        interpolation: resampling filter of the crop's resize, a key of :data:`INTERPOLATIONS`.
        auto_augment: a timm AutoAugment config string (:class:`TimmAutoAugment`), or ``None``.
        reprob: probability of random erasing, in [0, 1] (0: none).

    Any input size works, down to 1 x 1 and extreme aspect ratios such as 3 x 1000: when no crop
    with the sampled scale and ratio fits (10 tries), albumentations falls back to a center crop
    of the largest ratio-clamped box.

    Returns:
        a pipeline ``f(image=(H, W, 3) uint8) -> {"image": (3, img_size, img_size) float32}``.

    Raises:
        ValueError: an ``auto_augment`` string timm does not parse, ``reprob`` outside [0, 1].
    """
    if not 0.0 <= reprob <= 1.0:
        raise ValueError(f"reprob must be in [0, 1], got {reprob}")
    extra: list[A.BasicTransform] = []
    if auto_augment:
        extra.append(TimmAutoAugment(auto_augment, img_size, mean, interpolation))
    if reprob > 0:
        extra.append(A.Erasing(scale=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3), fill="random", p=reprob))
    return A.Compose(
        [
            A.RandomResizedCrop(
                size=(img_size, img_size), scale=tuple(scale), interpolation=interpolation_flag(interpolation)
            ),
            A.HorizontalFlip(p=0.5),
            *extra,
            A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0),
            ToTensorV2(),
        ]
    )


def eval_transform(
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    crop_pct: float = 1.0,
    interpolation: str = "bicubic",
    crop_mode: str = "center",
) -> A.Compose:
    """Deterministic evaluation pipeline: resize the shorter side, center-crop, normalize.

    The shorter side is resized (``interpolation``, bicubic by default) to ``round(img_size / crop_pct)``
    (``crop_mode="squash"``: both sides, as timm's ``transforms_factory``) then the center
    ``img_size x img_size`` is kept. ``crop_pct=1.0`` only resizes (right for CIFAR at 32 px, where
    the native size equals the input size); ``0.875`` is the ImageNet convention (256 -> 224) that
    ``ImageDataModule`` uses when the native size differs from ``img_size``. Images more
    elongated than ``MAX_EVAL_ASPECT`` (8:1) are first center-cropped to 8:1 (``CenterCropAspect``:
    the same central region, resampled on a grid shifted by a fraction of a pixel), so a
    1 x 20000 image stays cheap.

    Args:
        img_size: output side in pixels (square).
        mean, std: per-channel RGB statistics in [0, 1] units (pixel / 255).
        crop_pct: fraction of the resized shorter side kept by the center crop, in (0, 1].
        interpolation: resampling filter of the resize, a key of :data:`INTERPOLATIONS`.
        crop_mode: ``"center"`` or ``"squash"`` (:data:`CROP_MODES`).

    Returns:
        a pipeline ``f(image=(H, W, 3) uint8) -> {"image": (3, img_size, img_size) float32}``.

    Raises:
        ValueError: ``crop_pct`` not in (0, 1], an unknown ``interpolation`` or ``crop_mode``.
    """
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    if crop_mode not in CROP_MODES:
        raise ValueError(f"crop_mode must be one of {', '.join(CROP_MODES)}, got {crop_mode!r}")
    flag, scaled = interpolation_flag(interpolation), round(img_size / crop_pct)
    resize = (
        A.Resize(height=scaled, width=scaled, interpolation=flag)
        if crop_mode == "squash"
        else A.SmallestMaxSize(max_size=scaled, interpolation=flag)
    )
    return A.Compose(
        [
            CenterCropAspect(MAX_EVAL_ASPECT),
            resize,
            A.CenterCrop(height=img_size, width=img_size),
            A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0),
            ToTensorV2(),
        ]
    )
