"""Datasets, transforms and the Lightning DataModule (see datasets/README.md for data layouts)."""

from mim.data.datamodule import DEFAULT_IMG_SIZE, ImageDataModule
from mim.data.datasets import BadImageError, DatasetNotFoundError, build_dataset
from mim.data.transforms import eval_transform, train_transform

__all__ = [
    "BadImageError",
    "DEFAULT_IMG_SIZE",
    "DatasetNotFoundError",
    "ImageDataModule",
    "build_dataset",
    "eval_transform",
    "train_transform",
]
