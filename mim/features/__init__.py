"""Frozen features on disk: extraction with ``mim predict`` into feature stores (one per extracted layer),
and memory-mapped, shuffled reading of them (for probes and sparse autoencoders)."""

from mim.features.extract import FeatureExtractor, FeatureStoreWriter
from mim.features.store import (
    FeatureBatch,
    FeatureStore,
    FeatureStoreError,
    FeatureStoreMismatchError,
    layer_folder,
)

__all__ = [
    "FeatureBatch",
    "FeatureExtractor",
    "FeatureStore",
    "FeatureStoreError",
    "FeatureStoreMismatchError",
    "FeatureStoreWriter",
    "layer_folder",
]
