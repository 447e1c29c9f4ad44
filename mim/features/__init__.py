"""Frozen features on disk: extraction with ``mim predict`` into a feature store, and
memory-mapped, shuffled reading of it (for probes and sparse autoencoders)."""

from mim.features.extract import FeatureExtractor, FeatureStoreWriter
from mim.features.store import (
    FeatureBatch,
    FeatureStore,
    FeatureStoreError,
    FeatureStoreMismatchError,
)

__all__ = [
    "FeatureBatch",
    "FeatureExtractor",
    "FeatureStore",
    "FeatureStoreError",
    "FeatureStoreMismatchError",
    "FeatureStoreWriter",
]
