"""Exact-resume sampling of image datasets: data order, DDP split and per-image augmentation seeds.

A run killed mid-epoch and resumed from a step checkpoint must see the very batches, crops and flips the
uninterrupted run would have seen. Three pieces make every one of them a pure function of
``(seed, epoch, position)``, with no hidden RNG state to save:

- :class:`ResumableSampler` orders epoch ``e`` by a permutation seeded with ``(seed, e)`` and splits it
  into *global* batches of ``batch_size x world_size`` images; rank ``r`` takes the ``r``-th slice of each.
  So 2 ranks with batch ``B`` see exactly the images of 1 rank with batch ``2B``, in the same order.
  It resumes from ``(epoch, batches done)`` (:meth:`ResumableSampler.load_state_dict`).
- Each training item is drawn as ``(index, seed)``: the seed is a function of ``(seed, epoch, index)``
  (:func:`sample_seed`), and the albumentations pipeline draws that item's crop and flip from a
  :class:`SampleRNG` reseeded to it, whatever worker or rank decodes it (the LitData source does the same).
- :class:`mim.data.ImageDataModule` saves the sampler position in the checkpoint (its ``state_dict``) from the
  trainer's loop progress, so the batch prefetched by Lightning's data fetcher is not counted as done.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DistributedSampler, Sampler


_M64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """The splitmix64 output function (Steele, Lea, Flood 2014): a bijective 64-bit integer hash."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """64-bit seed of the augmentation of item ``index`` in ``epoch``: a function of the three only
    (chained splitmix64), so augmentations do not depend on the number of workers or ranks and are
    the same again after resuming from a checkpoint."""
    return _splitmix64(_splitmix64(_splitmix64(seed & _M64) ^ (epoch & _M64)) ^ (index & _M64))


class SampleRNG:
    """The numpy and python generators an albumentations pipeline draws from, reseeded in place
    for every item (measured 3x cheaper than a new ``numpy.random.default_rng(SeedSequence)`` and
    ``random.Random`` per item)."""

    def __init__(self) -> None:
        self.bits = np.random.PCG64()
        self.numpy = np.random.Generator(self.bits)
        self.python = random.Random()

    def reseed(self, seed64: int) -> SampleRNG:
        """Set both streams from a 64-bit seed (``sample_seed``); returns ``self``."""
        lo = _splitmix64(seed64)
        self.bits.state = {"bit_generator": "PCG64", "state": {"state": (seed64 << 64) | lo, "inc": (lo << 1) | 1},
                           "has_uint32": 0, "uinteger": 0}
        self.python.seed(seed64)
        return self


class ResumableSampler(DistributedSampler):
    """One rank's part of each epoch, in an order that depends only on ``(seed, epoch)``.

    A :class:`~torch.utils.data.DistributedSampler` subclass (so Lightning does not wrap it), but without
    padding: with ``drop_last`` (training) every rank gets ``floor(n / (batch_size x world_size)) x batch_size``
    items, the ``rank``-th ``batch_size`` slice of each global batch; without it (evaluation) rank ``r`` takes
    positions ``r, r + world_size, ...``, so ranks differ by at most one item and no item is counted twice.

    Args:
        indices: dataset indices to draw from (a subset, or ``range(len(dataset))``).
        batch_size: items per batch and rank.
        shuffle: permute each epoch (``torch.randperm`` seeded by ``(seed, epoch)``); else in ``indices`` order.
        drop_last: drop the last incomplete global batch (training).
        seed: base seed of the order and of the per-item augmentation seeds.
        rank, world_size: this process's global rank and the number of ranks.
        with_seeds: yield ``(index, augmentation seed)`` pairs (:func:`sample_seed`) instead of plain indices.

    Lightning calls :meth:`set_epoch` before each epoch; :meth:`load_state_dict` (``{"epoch", "batches"}``)
    makes the next pass start at that epoch after that many of this rank's batches. ``len()`` is always the
    whole epoch's count (Lightning counts the batches already done itself).
    """

    def __init__(
        self,
        indices: Sequence[int],
        batch_size: int,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        with_seeds: bool = True,
    ) -> None:
        Sampler.__init__(self)
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        self.indices = torch.as_tensor(list(indices), dtype=torch.long)
        self.batch_size, self.shuffle, self.drop_last, self.seed = batch_size, shuffle, drop_last, seed
        self.rank, self.num_replicas, self.with_seeds = rank, world_size, with_seeds
        self.epoch = 0
        self._resume: tuple[int, int] | None = None

    def __len__(self) -> int:
        n, world = len(self.indices), self.num_replicas
        if self.drop_last:
            return n // (self.batch_size * world) * self.batch_size
        return len(range(self.rank, n, world))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Start the next pass in epoch ``state["epoch"]`` after ``state["batches"]`` of this rank's batches."""
        self._resume = (int(state["epoch"]), int(state["batches"]))
        self.epoch = self._resume[0]

    def order(self, epoch: int) -> torch.Tensor:
        """Dataset indices of epoch ``epoch`` in the order of all ranks together (one process)."""
        if not self.shuffle:
            return self.indices
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0]))
        return self.indices[torch.randperm(len(self.indices), generator=g)]

    def positions(self, epoch: int) -> torch.Tensor:
        """This rank's dataset indices of epoch ``epoch``, in the order it draws them."""
        order, world, b = self.order(epoch), self.num_replicas, self.batch_size
        if not self.drop_last:
            return order[self.rank :: world]
        batches = len(order) // (b * world)
        return order[: batches * b * world].view(batches, world, b)[:, self.rank].reshape(-1)

    def __iter__(self) -> Iterator[Any]:
        epoch, skip = self._resume if self._resume is not None else (self.epoch, 0)
        self._resume = None
        mine = self.positions(epoch)[skip * self.batch_size :].tolist()
        if not self.with_seeds:
            return iter(mine)
        return iter([(i, sample_seed(self.seed, epoch, i)) for i in mine])


def batches_done(trainer: Any, batches_per_epoch: int) -> dict[str, int]:
    """Where training stands, as ``{"epoch", "batches"}`` for :meth:`ResumableSampler.load_state_dict`: the
    current epoch and the batches the training loop has taken from it (``batch_progress.current.ready``, so a
    batch Lightning's fetcher prefetched but did not train on is not counted); a finished epoch reads as
    ``(epoch + 1, 0)``."""
    # the epoch that was last started (``current_epoch`` already counts it as done at the end of training)
    epoch = max(int(trainer.fit_loop.epoch_progress.current.started) - 1, 0)
    done = int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)
    limit = trainer.num_training_batches
    limit = batches_per_epoch if not isinstance(limit, (int, float)) or math.isinf(limit) else int(limit)
    return {"epoch": epoch + 1, "batches": 0} if done >= min(limit, batches_per_epoch) else {"epoch": epoch, "batches": done}
