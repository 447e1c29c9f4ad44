"""One global feature vector per image from any timm encoder (ViT tokens or ConvNet maps)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Pool = Literal["cls", "mean"]


def pool_tokens(features: torch.Tensor, pool: Pool, num_prefix_tokens: int) -> torch.Tensor:
    """Pool encoder output to ``(B, D)``.

    Args:
        features: ViT tokens ``(B, P + L, D)`` or ConvNet map ``(B, D, h, w)``.
        pool: ``"cls"`` = first token (ViT with a cls token); ``"mean"`` = mean of the patch tokens
            (prefix tokens excluded). ConvNet maps are always global-average-pooled.
        num_prefix_tokens: ``P``, number of prefix tokens (cls, registers) of a ViT.

    Raises:
        ValueError: ``pool="cls"`` on a model without prefix tokens, or an unknown ``pool``.
    """
    if features.ndim == 4:
        return features.mean(dim=(2, 3))
    if pool == "cls":
        if num_prefix_tokens < 1:
            raise ValueError("pool='cls' needs a model with a class token; use pool='mean'.")
        return features[:, 0]
    if pool == "mean":
        return features[:, num_prefix_tokens:].mean(dim=1)
    raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")


@torch.no_grad()
def frozen_features(encoder: nn.Module, imgs: torch.Tensor) -> torch.Tensor:
    """``encoder.forward_features`` of the full, unmasked images, in eval mode, without gradients.

    Eval mode keeps BatchNorm statistics untouched and turns drop path off; the encoder's previous
    train/eval mode is restored. Returns ViT tokens ``(B, P + L, D)`` or a ConvNet map ``(B, D, h, w)``.
    """
    was_training = encoder.training
    encoder.eval()
    try:
        return encoder.forward_features(imgs)
    finally:
        encoder.train(was_training)


def pooled_features(encoder: nn.Module, imgs: torch.Tensor, pool: Pool = "cls") -> torch.Tensor:
    """Frozen, pooled features of the full images: ``(B, 3, H, W)`` -> ``(B, D)`` float32
    (:func:`frozen_features`, then :func:`pool_tokens`)."""
    features = frozen_features(encoder, imgs)
    return pool_tokens(features, pool, getattr(encoder, "num_prefix_tokens", 0)).float()
