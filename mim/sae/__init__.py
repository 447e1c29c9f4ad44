"""Sparse autoencoders on frozen features: variants (:mod:`mim.sae.models`), their sparse kernels
(:mod:`mim.sae.kernels`), the training loop (:mod:`mim.sae.module`), feature-store streaming
(:mod:`mim.sae.data`), metrics (:mod:`mim.sae.metrics`), downstream probes (:mod:`mim.sae.downstream`) and
pictures of what latents respond to (:mod:`mim.sae.viz`)."""

from mim.sae.models import (
    MPSAE,
    VARIANTS,
    AbsTopKSAE,
    BatchTopKSAE,
    JumpReLUSAE,
    MatryoshkaSAE,
    ReLUSAE,
    SAELoss,
    SAEOutput,
    SparseAutoencoder,
    SparseCode,
    TopAFASAE,
    TopKSAE,
    load_sae,
    save_sae,
)

__all__ = [
    "MPSAE",
    "VARIANTS",
    "AbsTopKSAE",
    "BatchTopKSAE",
    "JumpReLUSAE",
    "MatryoshkaSAE",
    "ReLUSAE",
    "SAELoss",
    "SAEOutput",
    "SparseAutoencoder",
    "SparseCode",
    "TopAFASAE",
    "TopKSAE",
    "load_sae",
    "save_sae",
]
