import pytest
import torch

from mim.patches import gather_tokens, mask_to_pixels, patchify, unpatchify, visible_ids


def test_patchify_round_trip(cifar_batch):
    imgs = cifar_batch[0]
    patches = patchify(imgs, 4)
    assert patches.shape == (16, 64, 48)
    assert torch.equal(unpatchify(patches, 4, (8, 8)), imgs)


def test_patchify_layout_matches_mae():
    # patch (i, j) holds pixels [i*p:(i+1)*p, j*p:(j+1)*p], flattened as (p, p, C)
    imgs = torch.arange(2 * 3 * 8 * 12, dtype=torch.float32).reshape(2, 3, 8, 12)
    patches = patchify(imgs, 4)
    expected = imgs[1, :, 4:8, 8:12].permute(1, 2, 0).reshape(-1)
    assert torch.equal(patches[1, 1 * 3 + 2], expected)


def test_visible_ids_and_gather():
    mask = torch.tensor([[True, False, True, False], [False, False, True, True]])
    ids = visible_ids(mask)
    assert ids.tolist() == [[1, 3], [0, 1]]
    tokens = torch.arange(8.0).reshape(2, 4, 1)
    assert gather_tokens(tokens, ids).flatten().tolist() == [1, 3, 4, 5]


def test_visible_ids_refuses_unequal_counts():
    with pytest.raises(ValueError, match="same number of patches"):
        visible_ids(torch.tensor([[True, False], [False, False]]))


def test_mask_to_pixels():
    mask = torch.tensor([[True, False, False, True]])
    pixels = mask_to_pixels(mask, 2, (2, 2))
    assert pixels.shape == (1, 1, 4, 4)
    assert pixels[0, 0, :2, :2].eq(1).all() and pixels[0, 0, :2, 2:].eq(0).all()
    assert pixels[0, 0, 2:, 2:].eq(1).all()
