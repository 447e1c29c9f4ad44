"""Sparse autoencoders on frozen features: variants (:mod:`mim.sae.variants`, saved and loaded by
:mod:`mim.sae.models`), their sparse kernels (:mod:`mim.sae.kernels`), the training loop (:mod:`mim.sae.module`), feature-store streaming
(:mod:`mim.sae.data`), metrics (:mod:`mim.sae.metrics`), downstream probes (:mod:`mim.sae.downstream`),
pictures of what latents respond to (:mod:`mim.sae.viz`), splicing and interventions in a frozen encoder
(:mod:`mim.sae.splice`), the splice-in evaluation (:mod:`mim.sae.splice_eval`) and the sparse latent cache
(:mod:`mim.sae.cache`, written by ``mim predict`` with :mod:`mim.sae.encode`)."""

from mim.sae.cache import LatentCache, LatentCacheWriter
from mim.sae.encode import SAEEncoder, StoreImagesDataModule
from mim.sae.models import VARIANTS, load_sae, save_sae
from mim.sae.splice import SPLICE_MODES, capture, intervene
from mim.sae.splice_eval import SpliceEvaluation, SpliceMetric
from mim.sae.variants import (
    MPSAE,
    MSAE,
    AbsTopKSAE,
    ArchetypalSAE,
    BatchTopKSAE,
    FeatureChoiceSAE,
    JumpReLUSAE,
    MatryoshkaSAE,
    MutualChoiceSAE,
    ReLUSAE,
    SAELoss,
    SAEOutput,
    SparseAutoencoder,
    SparseCode,
    TopAFASAE,
    TopKSAE,
)

__all__ = [
    "MPSAE",
    "MSAE",
    "VARIANTS",
    "AbsTopKSAE",
    "ArchetypalSAE",
    "BatchTopKSAE",
    "FeatureChoiceSAE",
    "JumpReLUSAE",
    "LatentCache",
    "LatentCacheWriter",
    "MatryoshkaSAE",
    "MutualChoiceSAE",
    "ReLUSAE",
    "SAEEncoder",
    "SAELoss",
    "SPLICE_MODES",
    "SAEOutput",
    "SparseAutoencoder",
    "SparseCode",
    "SpliceEvaluation",
    "SpliceMetric",
    "StoreImagesDataModule",
    "TopAFASAE",
    "TopKSAE",
    "capture",
    "intervene",
    "load_sae",
    "save_sae",
]
