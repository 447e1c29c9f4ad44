"""Pretraining methods, one LightningModule each (ColorMAE is ``MAE`` with a ``ColorNoiseMask``)."""

from mim.methods.base import PretrainModule
from mim.methods.cae import CAE
from mim.methods.mae import MAE
from mim.methods.mixedae import MixedAE

__all__ = ["CAE", "MAE", "MixedAE", "PretrainModule"]
