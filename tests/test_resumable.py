"""The resumable sampler: global batches split over ranks, resume position, per-image augmentation seeds."""

import torch

from mim.data import ImageDataModule
from mim.data.resumable import ResumableSampler


def _batches(sampler, batch_size):
    items = list(sampler)
    return [items[i : i + batch_size] for i in range(0, len(items), batch_size)]


def test_two_ranks_split_each_global_batch_of_one_rank():
    indices = list(range(3, 60))  # a subset: 57 images
    one = _batches(ResumableSampler(indices, 8, seed=5), 8)
    ranks = [_batches(ResumableSampler(indices, 4, seed=5, rank=r, world_size=2), 4) for r in (0, 1)]
    assert len(one) == len(ranks[0]) == len(ranks[1]) == 7  # 57 // 8; the rest dropped on every rank alike
    for step, batch in enumerate(one):
        assert ranks[0][step] + ranks[1][step] == batch  # same images, same augmentation seeds


def test_epochs_differ_and_resume_skips_the_batches_done():
    sampler = ResumableSampler(range(40), 4, seed=1)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    sampler.set_epoch(2)
    assert list(sampler) != epoch1
    resumed = ResumableSampler(range(40), 4, seed=1)
    resumed.load_state_dict({"epoch": 1, "batches": 3})
    assert list(resumed) == epoch1[12:]
    assert len(resumed) == 40  # Lightning counts the batches done itself
    resumed.set_epoch(2)
    assert len(list(resumed)) == 40  # the skip applies once


def test_evaluation_split_has_no_padding():
    parts = [list(ResumableSampler(range(11), 4, shuffle=False, drop_last=False, rank=r, world_size=3,
                                   with_seeds=False)) for r in range(3)]
    assert sorted(sum(parts, [])) == list(range(11))


def test_augmentation_depends_only_on_the_image_seed(shared_data):
    dm = ImageDataModule(root=str(shared_data), batch_size=4, num_workers=0, limit_per_class=1)
    dm.setup("fit")
    loader = dm.train_dataloader()
    dataset, (index, seed) = loader.dataset, next(iter(loader.sampler))
    a, b = dataset[(index, seed)][0], dataset[(index, seed + 1)][0]
    torch.testing.assert_close(dataset[(index, seed)][0], a)  # whatever was drawn in between
    assert not torch.equal(a, b)
