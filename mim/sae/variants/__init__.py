"""Sparse autoencoder variants: one small module per family on the shared base (:mod:`mim.sae.variants.base`),
all trained by :class:`mim.sae.module.SAETraining`.

Notation (every variant): inputs are normalised, ``x_n = input_scale * x`` with ``E||x_n|| = sqrt(d_model)``
(the scale is fitted on a sample and stored with the SAE), ``z = W_enc (x_n - b_dec) + b_enc``, a variant's
activation turns ``z`` into a sparse code ``f``, ``x_hat_n = W_dec^T f + b_dec`` and ``x_hat = x_hat_n / input_scale``.
``W_enc`` and ``W_dec`` are both stored (d_sae, d_model): row ``j`` of ``W_dec`` is atom ``j``; the encoder starts
as the decoder's transpose (Gao et al. 2024, arXiv 2406.04093, Sec. 2.2 / App. A.1; Conerly et al. 2024,
"April update").

Choices where the anchors disagree (each class repeats its own):

- ``b_dec`` is subtracted before the encoder (Gao et al. Sec. 2.1, openai/sparse_autoencoder, SAELens) and
  initialised to the geometric median of a sample (Weiszfeld iterations), as in Gao et al. App. A.1.
- TopK takes the top ``k`` of ``z`` and then ReLU (Gao et al. Sec. 2.3; openai ``model.TopK``), so a token
  keeps fewer than ``k`` nonzeros only when fewer than ``k`` pre-activations are positive.
- Reconstruction losses: the TopK family minimises the batch-normalised MSE ``sum ||x_n - x_hat_n||^2 /
  sum ||x_n - mean(x_n)||^2`` (openai ``normalized_mse``, sparsify's ``fvu``), so AuxK's coefficient 1/32 has
  its published meaning; the penalised variants (ReLU + L1, JumpReLU) minimise ``E ||x_n - x_hat_n||^2``
  (summed over dimensions), the loss their published coefficients refer to.

Codes are returned as a :class:`SparseCode` (padded rows) and decoded with
:func:`mim.sae.kernels.sparse_decode` (``embedding_bag``), never with a dense matmul.
"""

from mim.sae.variants.archetypal import ArchetypalSAE
from mim.sae.variants.base import SAELoss, SAEOutput, SparseAutoencoder, SparseCode
from mim.sae.variants.batchtopk import BatchTopKSAE
from mim.sae.variants.choice import FeatureChoiceSAE, MutualChoiceSAE
from mim.sae.variants.jumprelu import JumpReLUSAE
from mim.sae.variants.matryoshka import MatryoshkaSAE
from mim.sae.variants.mp import MPSAE
from mim.sae.variants.msae import MSAE
from mim.sae.variants.relu import ReLUSAE
from mim.sae.variants.topafa import TopAFASAE
from mim.sae.variants.topk import AbsTopKSAE, TopKSAE

__all__ = [
    "MPSAE",
    "MSAE",
    "AbsTopKSAE",
    "ArchetypalSAE",
    "BatchTopKSAE",
    "FeatureChoiceSAE",
    "JumpReLUSAE",
    "MatryoshkaSAE",
    "MutualChoiceSAE",
    "ReLUSAE",
    "SAELoss",
    "SAEOutput",
    "SparseAutoencoder",
    "SparseCode",
    "TopAFASAE",
    "TopKSAE",
]
