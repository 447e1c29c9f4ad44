"""MAE's per-sample uniform random masking (He et al. 2021, arXiv 2111.06377, Sec. 3 "Masking")."""

from __future__ import annotations

import torch

from mim.masking.base import MaskGenerator, num_masked


class RandomMask(MaskGenerator):
    """Mask a uniformly random subset of exactly ``round(mask_ratio * L)`` patches per sample.

    Sampling "random patches without replacement, following a uniform distribution" (MAE Sec. 3):
    each sample draws ``L`` i.i.d. uniform noise values and masks the positions of the
    ``num_masked(mask_ratio, L)`` largest, as the official ``random_masking`` does with argsort.

    Args:
        mask_ratio: fraction of patches to mask, in (0, 1); MAE's default 0.75.

    Raises:
        ValueError: ``mask_ratio`` outside (0, 1).
    """

    def __call__(
        self, batch_size: int, grid_hw: tuple[int, int], generator: torch.Generator | None = None
    ) -> torch.Tensor:
        length = grid_hw[0] * grid_hw[1]
        device = generator.device if generator is not None else None
        noise = torch.rand(batch_size, length, generator=generator, device=device)
        masked_ids = noise.topk(num_masked(self.mask_ratio, length), dim=1).indices
        mask = torch.zeros(batch_size, length, dtype=torch.bool, device=noise.device)
        return mask.scatter_(1, masked_ids, True)
