import pytest
import torch

from mim.errors import ConfigError
from mim.masking import RandomMask, num_masked


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.6, 0.75, 0.9])
@pytest.mark.parametrize("grid", [(8, 8), (14, 14), (7, 5), (2, 2)])
def test_random_mask_exact_count(ratio, grid):
    mask = RandomMask(ratio)(32, grid)
    length = grid[0] * grid[1]
    assert mask.shape == (32, length) and mask.dtype == torch.bool
    assert (mask.sum(1) == num_masked(ratio, length)).all()
    assert num_masked(ratio, length) == min(max(round(ratio * length), 1), length - 1)


def test_random_mask_is_seeded_and_varies_per_sample():
    gen = RandomMask(0.75)
    a = gen(16, (8, 8), torch.Generator().manual_seed(3))
    b = gen(16, (8, 8), torch.Generator().manual_seed(3))
    c = gen(16, (8, 8), torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({tuple(row.tolist()) for row in a}) == 16


def test_random_mask_is_uniform_over_positions():
    mask = RandomMask(0.75)(20000, (4, 4), torch.Generator().manual_seed(0))
    freq = mask.float().mean(0)
    assert torch.allclose(freq, torch.full_like(freq, 0.75), atol=0.02)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_mask_ratio_out_of_range(ratio):
    with pytest.raises(ConfigError, match="mask_ratio must lie strictly between 0 and 1"):
        RandomMask(ratio)
