"""Pretraining methods, one LightningModule each."""

from mim.methods.base import PretrainModule
from mim.methods.mae import MAE

__all__ = ["MAE", "PretrainModule"]
