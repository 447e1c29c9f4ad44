"""Decoders that turn encoder tokens (plus mask tokens) back into pixels or targets."""

from mim.decoders.cae import CAEDecoder, CAERegressor
from mim.decoders.mae import MAEDecoder
from mim.decoders.spark import SparKDecoder

__all__ = ["CAEDecoder", "CAERegressor", "MAEDecoder", "SparKDecoder"]
