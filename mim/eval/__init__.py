"""Evaluation of learned encoders: online probes during pretraining; offline linear probe, kNN and
fine-tuning of encoders loaded from exports, checkpoints, public pretrained timm weights or timm names."""

from mim.eval.encoders import (
    PRETRAINED_PREFIX,
    EncoderLoadError,
    PretrainedWeightsUnavailableError,
    adopt_preprocessing,
    encoder_data_config,
    load_encoder_from,
)
from mim.eval.features import pooled_features
from mim.eval.finetune import FineTune
from mim.eval.knn import knn_top1, weighted_knn_scores
from mim.eval.knn_eval import KNNEval
from mim.eval.linear_probe import LinearProbe
from mim.eval.logistic import LinearClassifier, fit_linear_classifier
from mim.eval.online import EpochLinearProbe, OnlineKNN, OnlineLinearProbe

__all__ = [
    "EncoderLoadError",
    "EpochLinearProbe",
    "FineTune",
    "KNNEval",
    "LinearClassifier",
    "LinearProbe",
    "OnlineKNN",
    "OnlineLinearProbe",
    "PRETRAINED_PREFIX",
    "PretrainedWeightsUnavailableError",
    "adopt_preprocessing",
    "encoder_data_config",
    "fit_linear_classifier",
    "knn_top1",
    "load_encoder_from",
    "pooled_features",
    "weighted_knn_scores",
]
