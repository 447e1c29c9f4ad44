"""Shared fixtures: real CIFAR-10 from ../shared/data (or $MIM_DATA), small and fast."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def shared_data_root() -> Path:
    """``$MIM_DATA`` when set, else ``../shared/data`` beside the repository."""
    return Path(os.environ.get("MIM_DATA") or REPO.parent / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = shared_data_root()
    if not (root / "cifar10" / "train").is_dir():
        pytest.fail(f"real test data not found at {root}/cifar10; set MIM_DATA to the folder holding cifar10/")
    return root


@pytest.fixture(scope="session")
def cifar_batch(shared_data: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """16 real CIFAR-10 validation images (2 per class for 8 classes), normalised, with labels."""
    from mim.data import ImageDataModule

    dm = ImageDataModule(root=str(shared_data), batch_size=16, num_workers=0, val_limit_per_class=2)
    dm.setup("fit")
    imgs, labels = next(iter(dm.val_dataloader()))
    return imgs, labels


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
