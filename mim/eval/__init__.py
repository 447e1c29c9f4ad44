"""Evaluation of learned encoders: online probes during pretraining, kNN, feature pooling."""

from mim.eval.features import pooled_features
from mim.eval.knn import weighted_knn_scores
from mim.eval.online import OnlineKNN, OnlineLinearProbe

__all__ = ["OnlineKNN", "OnlineLinearProbe", "pooled_features", "weighted_knn_scores"]
