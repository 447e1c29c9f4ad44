"""Fine-tuning augmentation: timm's RandAugment inside the albumentations pipeline and random erasing, seeded per
image like every other transform (same seed, same pixels; the global generators untouched), on real CIFAR-10."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from mim.data import ImageDataModule
from mim.data.datasets import load_rgb
from mim.data.transforms import TimmAutoAugment, train_transform
from mim.errors import ConfigError

RA = "rand-m9-mstd0.5-inc1"  # MAE / BEiT fine-tuning


@pytest.fixture(scope="module")
def images(shared_data) -> list[np.ndarray]:
    files = sorted((shared_data / "cifar10" / "train").glob("*/*.jpg"))[::500][:12]
    return [np.asarray(load_rgb(f)) for f in files]


def test_randaugment_is_timms_seeded_per_image_and_leaves_global_rngs_alone(images):
    aug = TimmAutoAugment(RA, 32, (0.49, 0.48, 0.45))
    assert type(aug.augment).__name__ == "RandAugment" and len(aug.augment.ops) == 15  # timm's increasing set
    random.seed(1)
    np.random.seed(1)
    before = (random.random(), np.random.rand())
    random.seed(1)
    np.random.seed(1)

    def run(seed: int) -> list[np.ndarray]:
        aug.set_random_state(np.random.default_rng(seed), random.Random(seed))
        return [aug(image=img)["image"] for img in images]

    first, again, other = run(0), run(0), run(1)
    assert (random.random(), np.random.rand()) == before  # timm draws from the globals: restored after each image
    assert all(a.shape == img.shape and a.dtype == np.uint8 for a, img in zip(first, images))
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert sum(not np.array_equal(a, b) for a, b in zip(first, other)) >= 10
    assert sum(not np.array_equal(a, img) for a, img in zip(first, images)) >= 10  # 2 ops of magnitude ~9


def test_random_erasing_fills_one_box_with_noise(images):
    # with p = 1 every image has one erased box; the pixels outside it are the plain pipeline's
    plain = train_transform(32, (0.5,) * 3, (0.5,) * 3, scale=(1.0, 1.0))
    erased = train_transform(32, (0.5,) * 3, (0.5,) * 3, scale=(1.0, 1.0), reprob=1.0)
    for img in images:
        for tf in (plain, erased):
            tf.set_random_seed(7)
        a, b = plain(image=img)["image"], erased(image=img)["image"]
        changed = (a != b).any(0)
        rows, cols = changed.any(1).nonzero().squeeze(1), changed.any(0).nonzero().squeeze(1)
        assert len(rows) and len(cols)
        box = changed[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert box.float().mean() > 0.95  # one filled rectangle (a noise pixel may equal the image's by chance)
        assert 0.02 * 32 * 32 * 0.9 <= box.numel() <= 32 * 32 / 3 * 1.1


def test_datamodule_fine_tuning_pipeline_repeats_exactly(shared_data):
    def batch() -> torch.Tensor:
        torch.manual_seed(0)
        dm = ImageDataModule(root=str(shared_data), limit_per_class=2, val_limit_per_class=1, batch_size=20,
                             num_workers=0, crop_scale=(0.08, 1.0), auto_augment=RA, reprob=0.25)
        dm.setup("fit")
        return next(iter(dm.train_dataloader()))[0]

    a, b = batch(), batch()
    assert a.shape == (20, 3, 32, 32) and torch.equal(a, b)  # per-image seeds: exact resume holds


@pytest.mark.parametrize("kwargs, needle", [({"auto_augment": "rand-x9"}, "auto_augment"),
                                            ({"reprob": 1.5}, "reprob")])
def test_bad_augmentation_values_give_one_config_error(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        ImageDataModule(**kwargs)
