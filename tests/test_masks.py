"""BlockMask (BEiT/CAE) and ColorNoiseMask (ColorMAE): exact counts, structure, spectra, seeding."""

import pickle
from collections import deque

import pytest
import torch

from mim.errors import ConfigError
from mim.masking import BlockMask, ColorNoiseMask, RandomMask, num_masked
from mim.masking.block import min_block_area
from mim.masking.color_noise import COLORS

GRIDS = [(8, 8), (14, 14), (7, 5)]
RATIOS = [0.4, 0.6, 0.75, 0.9]


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mean_component_size(mask_hw: torch.Tensor) -> float:
    """Mean size of the 4-connected components of ``True`` cells in an ``(h, w)`` bool grid (BFS)."""
    h, w = mask_hw.shape
    cells = {(i, j) for i, j in mask_hw.nonzero().tolist()}
    sizes = []
    while cells:
        queue, size = deque([cells.pop()]), 0
        while queue:
            i, j = queue.popleft()
            size += 1
            for nb in ((i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)):
                if nb in cells:
                    cells.remove(nb)
                    queue.append(nb)
        sizes.append(size)
    return sum(sizes) / len(sizes)


def batch_component_size(mask: torch.Tensor, grid: tuple[int, int]) -> float:
    return sum(mean_component_size(m.view(grid)) for m in mask) / len(mask)


# -- exact counts ------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("kind", ["block", *COLORS])
def test_exact_count(kind, grid, ratio):
    gen = BlockMask(ratio) if kind == "block" else ColorNoiseMask(ratio, color=kind, bank_size=16)
    mask = gen(64, grid, seeded(0))
    length = grid[0] * grid[1]
    assert mask.shape == (64, length) and mask.dtype == torch.bool
    assert (mask.sum(1) == num_masked(ratio, length)).all()


@pytest.mark.parametrize("grid", [(2, 2), (1, 3), (3, 1), (20, 20)])
def test_block_mask_odd_grids(grid):
    length = grid[0] * grid[1]
    if min(grid) < 2:  # no block is smaller than a 1-wide grid: retrying (official) cannot finish
        with pytest.raises(ConfigError, match="at least 2x2"):
            BlockMask(0.5)(16, grid, seeded(0))
        mask = BlockMask(0.5, random_fill=True)(16, grid, seeded(0))
    else:
        mask = BlockMask(0.5)(16, grid, seeded(0))
    assert (mask.sum(1) == num_masked(0.5, length)).all()


def test_min_block_area_scales_down_on_small_grids():
    assert [min_block_area(16, n) for n in (196, 256, 64, 35, 4)] == [16, 16, 5, 3, 1]


def test_color_grid_larger_than_bank():
    gen = ColorNoiseMask(0.75, bank_size=4, bank_hw=8)
    mask = gen(3, (10, 12), seeded(0))
    assert (mask.sum(1) == num_masked(0.75, 120)).all()
    assert gen.bank(12).shape == (4, 12, 12)


# -- seeding -----------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [BlockMask, ColorNoiseMask], ids=["block", "green"])
def test_seeded_reproducible_and_varied(make):
    gen = make(0.6)
    a, b, c = gen(32, (14, 14), seeded(1)), gen(32, (14, 14), seeded(1)), gen(32, (14, 14), seeded(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({tuple(row.tolist()) for row in a}) == 32  # every sample of the batch differs
    torch.manual_seed(5)
    d = gen(8, (14, 14))
    torch.manual_seed(5)
    assert torch.equal(d, gen(8, (14, 14)))  # generator=None follows the global RNG


def test_color_seed_selects_the_bank():
    same = ColorNoiseMask(0.75, seed=3).bank()
    assert torch.equal(same, ColorNoiseMask(0.75, seed=3).bank())
    assert not torch.allclose(same, ColorNoiseMask(0.75, seed=4).bank())
    masks_a = ColorNoiseMask(0.75, seed=3)(16, (14, 14), seeded(0))
    assert not torch.equal(masks_a, ColorNoiseMask(0.75, seed=4)(16, (14, 14), seeded(0)))


def test_color_mask_masks_the_lowest_noise():
    gen = ColorNoiseMask(0.75, color="red")
    noise = gen.noise(8, (14, 14), seeded(0)).view(8, -1)
    mask = gen(8, (14, 14), seeded(0))
    assert (noise[mask].view(8, -1).max(1).values < noise[~mask].view(8, -1).min(1).values).all()


def test_color_bank_is_normalised_and_pickles_without_cache():
    gen = ColorNoiseMask(0.75, bank_size=8)
    bank = gen.bank()
    assert bank.dtype == torch.float32
    assert torch.allclose(bank.mean((1, 2)), torch.zeros(8), atol=1e-5)
    assert torch.allclose(bank.std((1, 2)), torch.ones(8), atol=1e-4)
    clone = pickle.loads(pickle.dumps(gen))
    assert clone._banks == {} and torch.equal(clone(4, (8, 8), seeded(0)), gen(4, (8, 8), seeded(0)))


# -- structure ---------------------------------------------------------------------------------
def test_block_mask_is_blocky():
    grid = (14, 14)
    block = batch_component_size(BlockMask(0.4)(64, grid, seeded(0)), grid)
    random = batch_component_size(RandomMask(0.4)(64, grid, seeded(0)), grid)
    assert block > 4 * random, (block, random)


def test_color_blob_size_follows_the_spectrum():
    """Masked regions: red (low-pass) forms the largest blobs, blue (high-pass) the smallest."""
    grid = (14, 14)
    size = {c: batch_component_size(ColorNoiseMask(0.5, color=c)(64, grid, seeded(0)), grid) for c in COLORS}
    size["random"] = batch_component_size(RandomMask(0.5)(64, grid, seeded(0)), grid)
    assert size["red"] > 2 * size["green"] > 2 * size["blue"], size
    assert size["blue"] < size["random"], size


def band_power(maps: torch.Tensor) -> dict[str, float]:
    """Mean power per frequency bin in three radial bands (cycles per patch) of ``(N, S, S)`` maps."""
    side = maps.shape[-1]
    freq = (torch.fft.fftfreq(side).view(-1, 1) ** 2 + torch.fft.fftfreq(side).view(1, -1) ** 2).sqrt()
    power = torch.fft.fft2(maps).abs().pow(2).mean(0) / side**2
    bands = {"low": (0.0, 0.06), "mid": (0.1, 0.2), "high": (0.3, 1.0)}
    return {name: float(power[(freq > lo) & (freq <= hi)].mean()) for name, (lo, hi) in bands.items()}


def test_color_spectra():
    """Radially banded power of each bank against unit-variance white noise (flat at 1 per bin)."""
    white = torch.randn(64, 64, 64, generator=seeded(123))
    white = band_power((white - white.mean((1, 2), keepdim=True)) / white.std((1, 2), keepdim=True))
    assert all(0.9 < v < 1.1 for v in white.values()), white
    p = {c: band_power(ColorNoiseMask(0.75, color=c, bank_size=64).bank()) for c in COLORS}
    red, blue, green, purple = (p[c] for c in ("red", "blue", "green", "purple"))
    assert red["low"] > 10 * white["low"] and red["high"] < 0.01 * white["high"], red
    assert blue["low"] < 0.05 * white["low"] and blue["high"] > white["high"], blue
    assert green["mid"] > 3 * white["mid"], green
    assert green["mid"] > 5 * green["low"] and green["mid"] > 20 * green["high"], green
    assert purple["low"] > 2 * purple["mid"] and purple["high"] > 2 * purple["mid"], purple
    assert purple["mid"] < 0.5 * white["mid"], purple


# -- errors ------------------------------------------------------------------------------------
def test_unknown_color():
    with pytest.raises(ConfigError, match="Unknown ColorNoiseMask color 'pink'.*red, blue, green, purple"):
        ColorNoiseMask(0.75, color="pink")


@pytest.mark.parametrize("make", [BlockMask, ColorNoiseMask])
@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.5])
def test_bad_ratio(make, ratio):
    with pytest.raises(ConfigError, match="mask_ratio must lie strictly between 0 and 1"):
        make(ratio)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(min_num_patches=0), "min_num_patches must be >= 1"),
        (dict(min_aspect=0.0), "0 < min_aspect <= max_aspect"),
        (dict(min_aspect=0.5, max_aspect=0.2), "0 < min_aspect <= max_aspect"),
    ],
)
def test_block_bad_args(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        BlockMask(0.4, **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sigma_small=2.0, sigma_large=1.0), "0 < sigma_small < sigma_large"),
        (dict(bank_size=0), "bank_size >= 1"),
    ],
)
def test_color_bad_args(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ColorNoiseMask(0.75, **kwargs)
