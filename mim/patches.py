"""Patch bookkeeping shared by the ViT methods: patchify, unpatchify, visible-token indices.

Layout follows the official MAE code (He et al. 2021, arXiv 2111.06377, ``models_mae.py``): a patch
is flattened as ``(p, p, C)``, patches are row-major over the ``(h, w)`` grid.
"""

from __future__ import annotations

import torch


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Split images into flattened patches.

    Args:
        imgs: ``(B, C, H, W)``, any float dtype; ``H`` and ``W`` divisible by ``patch_size``.
        patch_size: ``p``, side of a square patch in pixels.

    Returns:
        ``(B, L, p*p*C)`` with ``L = (H/p) * (W/p)``, row-major over the grid.
    """
    b, c, height, width = imgs.shape
    h, w = height // patch_size, width // patch_size
    x = imgs.reshape(b, c, h, patch_size, w, patch_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, h * w, patch_size * patch_size * c)


def unpatchify(patches: torch.Tensor, patch_size: int, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``(B, L, p*p*C)`` -> ``(B, C, h*p, w*p)``."""
    b, length, dim = patches.shape
    h, w = grid_hw
    c = dim // (patch_size * patch_size)
    x = patches.reshape(b, h, w, patch_size, patch_size, c)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, c, h * patch_size, w * patch_size)


def visible_ids(mask: torch.Tensor) -> torch.Tensor:
    """Indices of the visible (``False``) positions of each row, in increasing order.

    Args:
        mask: ``(B, L)`` bool, ``True`` = masked, the same number of masked positions in every row.

    Returns:
        ``(B, L - num_masked)`` int64.

    Raises:
        ValueError: rows mask different numbers of patches (the mask-generator contract is broken).
    """
    counts = mask.sum(dim=1)
    lo, hi = counts.aminmax()
    lo, hi = int(lo), int(hi)
    if lo != hi:
        raise ValueError(
            f"every mask row must hide the same number of patches, got between {lo} and {hi}; "
            "use a mask generator from mim.masking or keep its exact-count contract"
        )
    # A stable sort of 0/1 keys lists the visible positions first, in their original order.
    order = torch.sort(mask.to(torch.uint8), dim=1, stable=True).indices
    return order[:, : mask.shape[1] - lo]


def gather_tokens(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``tokens[b, ids[b]]`` for every row: ``(B, L, D)``, ``(B, N)`` -> ``(B, N, D)``."""
    return torch.gather(tokens, 1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def mask_to_pixels(mask: torch.Tensor, patch_size: int, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Patch mask ``(B, L)`` bool -> pixel mask ``(B, 1, h*p, w*p)`` float, 1 = masked."""
    h, w = grid_hw
    m = mask.reshape(-1, 1, h, w).float()
    return m.repeat_interleave(patch_size, 2).repeat_interleave(patch_size, 3)
