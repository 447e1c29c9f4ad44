"""BEiT-style blockwise masking (Bao et al. 2021, BEiT, arXiv 2106.08254, Sec. 2.5 and Algorithm 1),
as used by CAE (Chen et al. 2022, arXiv 2202.03026, Sec. 3.1)."""

from __future__ import annotations

import functools
import math
import random

import numpy as np
import torch

from mim.errors import ConfigError
from mim.masking.base import MaskGenerator, num_masked

# BEiT's reference grid: min_num_patches=16 was chosen for 224 px images with 16 px patches.
_BEIT_GRID_AREA = 14 * 14
# One round of the official ``_mask``: 10 block proposals; with ``random_fill`` a failed round ends the sample.
_MAX_FAILED_ATTEMPTS = 10
# Safety net of the retry loop (a grid at least 2x2 always admits an accepted block; the expected number of
# rejections in a row is small): this many rejections in a row raise instead of spinning forever.
_MAX_RETRIES = 1_000_000


def min_block_area(min_num_patches: int, num_patches: int) -> int:
    """Smallest block area used on a grid of ``num_patches`` patches.

    BEiT's 16 patches is 8% of its 14x14 grid; a smaller grid keeps that fraction instead:
    ``max(1, min(min_num_patches, round(min_num_patches * L / 196)))``, e.g. 16 on 14x14,
    5 on 8x8, 3 on 7x5; grids of 196 patches or more use ``min_num_patches`` unchanged.
    """
    return max(1, min(min_num_patches, round(min_num_patches * num_patches / _BEIT_GRID_AREA)))


class BlockMask(MaskGenerator):
    """Mask random rectangles until exactly ``num_masked(mask_ratio, L)`` patches are masked.

    Per sample, following BEiT Algorithm 1 and the official ``masking_generator.py``:
    repeatedly propose a block with area ``s ~ U(s_min, remaining)`` (``remaining`` = patches still
    to mask; ``s_min`` from :func:`min_block_area`), aspect ratio ``r`` log-uniform in
    ``[min_aspect, max_aspect]``, sides ``round(sqrt(s*r))`` x ``round(sqrt(s/r))`` (each at least 1
    and strictly smaller than the grid side) at a uniform position. A block is accepted when it
    adds between 1 and ``remaining`` new patches, so the count never overshoots. Rejected proposals
    are retried until exactly the target count is masked, as CAE's official generator does
    (``Atten4Vis/CAE``, ``furnace/masking_generator.py``: ``while mask_count != num_masking_patches``,
    rounds of 10 proposals). BEiT's own generator (``microsoft/unilm``, ``beit/masking_generator.py``)
    instead stops at the first round of 10 rejected proposals (``if delta == 0: break``) and may
    mask fewer patches; the package contract needs the exact count, so that is not offered.
    ``random_fill=True`` (not official) stops a sample after 10 rejected proposals in a row and masks
    the shortfall with uniformly random unmasked patches (single patches, not blocks).

    Each mask is a Python int with one bit per patch (a block is a precomputed bit pattern
    shifted into place, ``int.bit_count`` counts new patches): cheaper on CPU than batched tensor
    ops, whose per-op overhead dominates on grids this small (B=256 on 14x14: about 3 ms at ratio
    0.4, 10 ms at 0.75). Randomness comes from a ``random.Random`` seeded by one draw from
    ``generator`` (or from the global torch RNG when it is ``None``).

    Args:
        mask_ratio: fraction of patches to mask, in (0, 1); BEiT uses 0.4 (Sec. 2.5), CAE 0.5
            (98 of 196 patches in its official pretraining scripts).
        min_num_patches: minimum block area on a 14x14 grid (BEiT: 16), scaled down on smaller grids
            by :func:`min_block_area`.
        min_aspect: smallest aspect ratio ``r`` (BEiT: 0.3).
        max_aspect: largest aspect ratio; ``None`` means ``1 / min_aspect`` (BEiT: 1/0.3).
        random_fill: fill a stalled sample with random single patches instead of retrying blocks
            (default ``False``: retry, the official behaviour).

    Call: ``gen(batch_size, grid_hw, generator=None) -> (B, h*w) bool``, ``True`` = masked,
    row-major, on ``generator``'s device (CPU when ``None``).

    Raises:
        ConfigError: ``mask_ratio`` outside (0, 1), ``min_num_patches < 1``, ``min_aspect <= 0`` or
            ``max_aspect < min_aspect``; at call time, a grid with a side below 2 (no block fits; with
            ``random_fill`` such a grid gets uniformly random patches).
        RuntimeError: (retry mode) 1,000,000 rejected proposals in a row, which a valid grid does not reach
            in practice.
    """

    def __init__(
        self,
        mask_ratio: float,
        min_num_patches: int = 16,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        random_fill: bool = False,
    ) -> None:
        super().__init__(mask_ratio)
        if int(min_num_patches) < 1:
            raise ConfigError(
                f"BlockMask min_num_patches must be >= 1, got {min_num_patches}. "
                "Fix: pass e.g. min_num_patches: 16 (BEiT's default)."
            )
        if max_aspect is None and min_aspect > 0:
            max_aspect = 1.0 / min_aspect
        if not (min_aspect > 0 and max_aspect is not None and max_aspect >= min_aspect):
            raise ConfigError(
                f"BlockMask needs 0 < min_aspect <= max_aspect, got min_aspect={min_aspect}, "
                f"max_aspect={max_aspect}. Fix: pass e.g. min_aspect: 0.3 and leave max_aspect unset "
                "(it defaults to 1/min_aspect)."
            )
        self.min_num_patches = int(min_num_patches)
        self.min_aspect, self.max_aspect = float(min_aspect), float(max_aspect)
        self.random_fill = bool(random_fill)

    def __call__(
        self, batch_size: int, grid_hw: tuple[int, int], generator: torch.Generator | None = None
    ) -> torch.Tensor:
        h, w = int(grid_hw[0]), int(grid_hw[1])
        if (h < 2 or w < 2) and not self.random_fill:
            raise ConfigError(
                f"BlockMask needs a patch grid of at least 2x2 (a block is smaller than the grid), got {h}x{w}. "
                "Fix: a smaller patch size, random_fill: true, or mask: {class_path: mim.masking.RandomMask}."
            )
        device = generator.device if generator is not None else torch.device("cpu")
        seed = int(torch.randint(2**62, (1,), generator=generator, device=device))
        rng = random.Random(seed)
        shapes = _block_shapes(h, w)
        masks = [self._sample(h, w, shapes, rng) for _ in range(batch_size)]
        return _bits_to_tensor(masks, h * w).to(device)

    def _sample(self, h: int, w: int, shapes: dict[tuple[int, int], int], rng: random.Random) -> int:
        """One mask as an int whose bit ``i`` is set when patch ``i`` (row-major) is masked."""
        length = h * w
        remaining = num_masked(self.mask_ratio, length)
        min_area = min_block_area(self.min_num_patches, length)
        log_lo, log_hi = math.log(self.min_aspect), math.log(self.max_aspect)
        mask, failures = 0, 0
        limit = _MAX_FAILED_ATTEMPTS if self.random_fill else _MAX_RETRIES
        while remaining > 0 and failures < limit:
            # area ~ U(min_area, remaining), either order, as random.uniform does in BEiT's code.
            area = min_area + (remaining - min_area) * rng.random()
            aspect = math.exp(log_lo + (log_hi - log_lo) * rng.random())
            bh, bw = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            top, left = int(rng.random() * (h - bh + 1)), int(rng.random() * (w - bw + 1))
            shape = shapes.get((bh, bw))  # None when a side is 0 or not smaller than the grid
            if shape is not None:
                new = (shape << (top * w + left)) & ~mask
                count = new.bit_count()
                if 0 < count <= remaining:
                    mask, remaining, failures = mask | new, remaining - count, 0
                    continue
            failures += 1
        if remaining > 0 and not self.random_fill:
            raise RuntimeError(
                f"BlockMask found no block for the last {remaining} patches in {limit} proposals on a {h}x{w} grid. "
                "Fix: lower min_num_patches, or pass random_fill: true."
            )
        if remaining > 0:  # stalled (random_fill): uniformly random unmasked patches
            free = [i for i in range(length) if not mask >> i & 1]
            for i in rng.sample(free, remaining):
                mask |= 1 << i
        return mask

    def __repr__(self) -> str:
        return (
            f"BlockMask(mask_ratio={self.mask_ratio}, min_num_patches={self.min_num_patches}, "
            f"min_aspect={self.min_aspect}, max_aspect={self.max_aspect}, random_fill={self.random_fill})"
        )


@functools.lru_cache(maxsize=16)
def _block_shapes(h: int, w: int) -> dict[tuple[int, int], int]:
    """Bit pattern of every allowed ``(height, width)`` block at the top-left corner of an h x w grid."""
    return {
        (bh, bw): sum(((1 << bw) - 1) << (r * w) for r in range(bh)) for bh in range(1, h) for bw in range(1, w)
    }


def _bits_to_tensor(masks: list[int], length: int) -> torch.Tensor:
    """Ints with one bit per patch -> ``(len(masks), length)`` bool tensor (bit ``i`` -> column ``i``)."""
    num_bytes = (length + 7) // 8
    packed = np.frombuffer(b"".join(m.to_bytes(num_bytes, "little") for m in masks), dtype=np.uint8)
    bits = np.unpackbits(packed.reshape(len(masks), num_bytes), axis=1, bitorder="little")
    return torch.from_numpy(bits[:, :length].astype(bool))
