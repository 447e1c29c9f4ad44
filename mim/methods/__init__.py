"""Pretraining methods, one LightningModule each (ColorMAE is ``MAE`` with a ``ColorNoiseMask``;
SparK pretrains ConvNets, the others ViTs)."""

from mim.methods.base import PretrainModule
from mim.methods.cae import CAE
from mim.methods.mae import MAE
from mim.methods.mixedae import MixedAE
from mim.methods.spark import SparK

__all__ = ["CAE", "MAE", "MixedAE", "PretrainModule", "SparK"]
