"""Evaluation metrics of sparse autoencoders, as streaming torchmetrics ``Metric`` subclasses.

Every metric keeps only sums (``dist_reduce_fx="sum"``, ``full_state_update=False``), never the rows
themselves, so an evaluation set of ~10^6 tokens costs O(d_model + d_sae) memory and DDP gives exactly
the 1-process result (torchmetrics sums the states of all ranks before ``compute``). Reconstruction
sums are accumulated in float64 whatever the input dtype.

Inputs: ``x`` the store features and ``x_hat`` the SAE reconstruction (``SAEOutput.x_hat``), both
``(..., d_model)`` in raw feature units (leading dims are flattened to tokens); ``code`` a
:class:`mim.sae.variants.SparseCode`. A latent *fires* on a token when its code value is non-zero
(negative values of AbsTopK count); a latent repeated in a row (ids add up) fires once on that token.

Lightning: :func:`sae_metrics` builds a ``MetricCollection``; call ``update(x=x, x_hat=x_hat, code=code)``
with keywords (the collection gives each metric the arguments its ``update`` names) and
``self.log_dict(collection)``; every metric computes a scalar.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric, MetricCollection

from mim.errors import ConfigError

if TYPE_CHECKING:
    from mim.sae.variants import SparseCode

#: Default firing-frequency threshold above which a latent counts as dense: 10 % of tokens, SAEBench's
#: ``freq_over_10_percent`` (Karvonen et al. 2025, arXiv 2503.09532, core evaluation) and the "fires on
#: more than 10 % of tokens" high-frequency latents of Rajamanoharan et al. 2024 (JumpReLU SAEs,
#: arXiv 2407.14435, Sec. 5).
DENSE_THRESHOLD = 0.1

#: SAEBench's second density cut: ``freq_over_1_percent`` is the fraction of latents firing on more than 1 % of
#: tokens (Karvonen et al. 2025, core evaluation, ``calculate_misc_metrics``).
FREQ_1_PERCENT = 0.01

#: SAEBench's guard of the L2 ratio: an input norm below this is replaced by 1 before dividing.
L2_RATIO_MIN_NORM = 1e-4


def _tokens(x: Tensor, x_hat: Tensor, who: str, d_model: int | None = None) -> tuple[Tensor, Tensor]:
    """``x`` and ``x_hat`` as ``(N, d)`` float64 token rows, after checking their shapes."""
    if x.shape != x_hat.shape or x.ndim < 1:
        raise ConfigError(
            f"{who}.update needs x and x_hat of one shape (..., d_model), got {tuple(x.shape)} and "
            f"{tuple(x_hat.shape)}. Fix: pass the store features and the SAE's reconstruction of them."
        )
    if d_model is not None and x.shape[-1] != d_model:
        raise ConfigError(
            f"{who} was built for d_model={d_model} but got features of width {x.shape[-1]}. "
            f"Fix: build it with d_model={x.shape[-1]} (the store's / SAE's d_model)."
        )
    d = x.shape[-1]
    return x.detach().reshape(-1, d).to(torch.float64), x_hat.detach().reshape(-1, d).to(torch.float64)


class FractionOfVarianceUnexplained(Metric):
    """Fraction of variance unexplained (FVU, "normalised MSE") of reconstructions, streaming, float64.

    ``FVU = sum_i ||x_i - x_hat_i||^2 / sum_i ||x_i - mu||^2`` with ``mu`` the *per-dimension* mean of
    ``x`` over all tokens: the MSE divided by the MSE of always predicting the mean activation
    (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", arXiv 2406.04093, Sec. 2.1,
    "normalized MSE"; saev / EleutherAI sparsify compute the same per-dimension total variance). It is
    not the variance around one scalar mean of all entries, which overstates the total variance when the
    dimensions have different means and so understates FVU.

    The denominator is computed from streaming sums as ``sum_j (S2_j - S1_j^2 / n)`` (``S1``, ``S2``:
    per-dimension sums of x and x^2, float64), so chunked and DDP updates give the one-pass result.

    Other libraries' "explained variance" (``1 - FVU`` here, :class:`ExplainedVariance`): SAELens' training
    log ``metrics/explained_variance`` (``sae_lens/training/sae_trainer.py``) is the same ratio over one
    training batch (``mu`` that batch's mean), its ``explained_variance_legacy`` the mean over tokens of the
    per-token ratio ``1 - ||x_i - x_hat_i||^2 / ||x_i - mu||^2``; SAEBench's core ``explained_variance`` was
    that per-token mean per batch too. dictionary_learning's ``frac_variance_explained``
    (``dictionary_learning/evaluation.py``) is ``1 - sum_j Var(x - x_hat)_j / sum_j Var(x)_j`` on one batch:
    the residual is centred on its *own* mean, so a constant offset of the reconstructions costs nothing
    there and counts here.

    Args:
        d_model: feature width ``d`` (states are sized at construction).
        **kwargs: torchmetrics ``Metric`` options.

    ``update(x, x_hat)``: ``(..., d_model)`` tensors of any float dtype (raw feature units).
    ``compute()``: 0-dim float64 tensor, >= 0 (0: perfect; 1: as good as predicting the mean; NaN before
    any update or when ``x`` has no variance).

    Raises:
        ConfigError: ``d_model < 1``; ``x`` / ``x_hat`` of different shapes or of width ``!= d_model``.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, d_model: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if d_model < 1:
            raise ConfigError(f"d_model must be >= 1, got {d_model}. Fix: pass the feature width.")
        self.d_model = int(d_model)
        f64 = torch.float64
        self.add_state("x_sum", torch.zeros(d_model, dtype=f64), dist_reduce_fx="sum")
        self.add_state("x_sq_sum", torch.zeros(d_model, dtype=f64), dist_reduce_fx="sum")
        self.add_state("residual_sq_sum", torch.zeros((), dtype=f64), dist_reduce_fx="sum")
        self.add_state("tokens", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, x: Tensor, x_hat: Tensor) -> None:
        x, x_hat = _tokens(x, x_hat, type(self).__name__, self.d_model)
        self.x_sum += x.sum(0)
        self.x_sq_sum += x.square().sum(0)
        self.residual_sq_sum += (x - x_hat).square().sum()
        self.tokens += x.shape[0]

    def compute(self) -> Tensor:
        n = self.tokens.to(torch.float64)
        total = (self.x_sq_sum - self.x_sum.square() / n).sum()
        return self.residual_sq_sum / total


FVU = FractionOfVarianceUnexplained


class ExplainedVariance(FractionOfVarianceUnexplained):
    """Explained variance ``1 - FVU`` of reconstructions (pooled over dimensions; see
    :class:`FractionOfVarianceUnexplained` for the formula, sources and arguments).

    Unlike ``torchmetrics.ExplainedVariance`` (regression: one score per output dimension, then averaged),
    this pools the residual and total variance over all dimensions before dividing, as SAE papers report
    it. ``compute()``: 0-dim float64, <= 1 (1: perfect).
    """

    higher_is_better = True

    def compute(self) -> Tensor:
        return 1.0 - super().compute()


class MeanL0(Metric):
    """Mean L0: the average number of active (non-zero) latents per token, ``code.l0()`` averaged.

    ``update(code)``: a ``SparseCode`` of ``N`` tokens. ``compute()``: 0-dim float64 (NaN before any update).
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("l0_sum", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("l0_tokens", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, code: SparseCode) -> None:
        l0 = code.l0()
        self.l0_sum += l0.sum()
        self.l0_tokens += l0.numel()

    def compute(self) -> Tensor:
        return self.l0_sum.to(torch.float64) / self.l0_tokens.to(torch.float64)


class LatentFiring(Metric):
    """Per-latent firing counts: dead and dense latent fractions and the firing-frequency vector.

    A latent is *dead* when it fires on no token of the evaluated set and *dense* when its firing
    frequency exceeds ``dense_threshold`` (default :data:`DENSE_THRESHOLD`, 10 % of tokens).

    Args:
        d_sae: number of latents.
        dense_threshold: frequency in [0, 1] above which a latent is dense.
        **kwargs: torchmetrics ``Metric`` options.

    ``update(code)``: a ``SparseCode`` of ``N`` tokens with indices in ``[0, d_sae)``.
    ``compute()``: ``{"dead_latents": fraction, "dense_latents": fraction}`` (0-dim float64 tensors).
    :meth:`frequencies`: ``(d_sae,)`` float64, the fraction of tokens each latent fired on (synced over DDP).
    For a scalar-per-metric collection use :class:`DeadLatents` / :class:`DenseLatents`.

    Raises:
        ConfigError: ``d_sae < 1`` or a threshold outside [0, 1].
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, d_sae: int, dense_threshold: float = DENSE_THRESHOLD, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if d_sae < 1:
            raise ConfigError(f"d_sae must be >= 1, got {d_sae}. Fix: pass the SAE's number of latents.")
        if not 0.0 <= dense_threshold <= 1.0:
            raise ConfigError(
                f"dense_threshold is a fraction of tokens, got {dense_threshold}. Fix: pass a value in [0, 1]."
            )
        self.d_sae, self.dense_threshold = int(d_sae), float(dense_threshold)
        self.add_state("fire_counts", torch.zeros(d_sae, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("fire_tokens", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, code: SparseCode) -> None:
        ids = torch.where(code.values != 0, code.indices, -1).sort(dim=1).values  # -1: an unused slot
        first = torch.ones_like(ids, dtype=torch.bool)
        first[:, 1:] = ids[:, 1:] != ids[:, :-1]  # a latent repeated in a row (MP-SAE) fires once
        active = ids[first & (ids >= 0)]
        self.fire_counts += torch.bincount(active, minlength=self.d_sae)[: self.d_sae]
        self.fire_tokens += code.values.shape[0]

    def _frequencies(self) -> Tensor:
        return self.fire_counts.to(torch.float64) / self.fire_tokens.to(torch.float64)

    def _fractions(self) -> dict[str, Tensor]:
        freq = self._frequencies()
        return {
            "dead_latents": (self.fire_counts == 0).to(torch.float64).mean(),
            "dense_latents": (freq > self.dense_threshold).to(torch.float64).mean(),
        }

    def compute(self) -> dict[str, Tensor]:
        return self._fractions()

    def frequencies(self) -> Tensor:
        """``(d_sae,)`` float64 firing frequency of each latent (fraction of tokens; NaN before any update),
        with the states of all DDP ranks summed first (as ``compute`` does)."""
        with self.sync_context(self.dist_sync_fn, should_sync=self._to_sync, should_unsync=self._should_unsync):
            return self._frequencies().clone()


class DeadLatents(LatentFiring):
    """:class:`LatentFiring` computing only the fraction of latents that never fired (0-dim float64)."""

    higher_is_better = False

    def compute(self) -> Tensor:
        return self._fractions()["dead_latents"]


class DenseLatents(LatentFiring):
    """:class:`LatentFiring` computing only the fraction of latents firing on more than ``dense_threshold``
    of tokens (0-dim float64)."""

    higher_is_better = False

    def compute(self) -> Tensor:
        return self._fractions()["dense_latents"]


class MeanCosineSimilarity(Metric):
    """Mean cosine similarity ``cos(x_i, x_hat_i)`` over tokens, streaming (a float64 sum and a count).

    ``torchmetrics.CosineSimilarity`` keeps every row until ``compute``; this keeps two numbers, which is
    what a ~10^6-token evaluation needs. A zero vector has cosine 0 with anything
    (``torch.nn.functional.cosine_similarity`` with ``eps=1e-8``).

    ``update(x, x_hat)``: ``(..., d)`` tensors of one shape. ``compute()``: 0-dim float64 in [-1, 1].
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("cos_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("cos_tokens", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, x: Tensor, x_hat: Tensor) -> None:
        x, x_hat = _tokens(x, x_hat, type(self).__name__)
        self.cos_sum += F.cosine_similarity(x, x_hat, dim=-1, eps=1e-8).sum()
        self.cos_tokens += x.shape[0]

    def compute(self) -> Tensor:
        return self.cos_sum / self.cos_tokens.to(torch.float64)


class RelativeReconstructionBias(Metric):
    """Relative reconstruction bias ``gamma = E[||x_hat||^2] / E[<x_hat, x>]``, streaming, float64.

    ``gamma`` is the ``argmin`` of ``E||x_hat / gamma - x||^2``: the scale by which the reconstructions
    are off on average (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse
    Autoencoders", arXiv 2404.16014, Eq. 10). ``gamma = 1``: unbiased; ``gamma < 1``: shrinkage (e.g. from
    an L1 penalty); ``gamma > 1``: reconstructions too long. Both expectations are over tokens, so the
    ratio of the two token sums is exact under chunking and DDP.

    ``update(x, x_hat)``: ``(..., d)`` tensors of one shape. ``compute()``: 0-dim float64.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("x_hat_sq_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("x_hat_dot_x_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, x: Tensor, x_hat: Tensor) -> None:
        x, x_hat = _tokens(x, x_hat, type(self).__name__)
        self.x_hat_sq_sum += x_hat.square().sum()
        self.x_hat_dot_x_sum += (x_hat * x).sum()

    def compute(self) -> Tensor:
        return self.x_hat_sq_sum / self.x_hat_dot_x_sum


class L2Ratio(Metric):
    """Mean over tokens of the norm ratio ``||x_hat_i|| / ||x_i||``, streaming (a float64 sum and a count).

    SAEBench's ``l2_ratio`` (Karvonen et al. 2025, arXiv 2503.09532; ``sae_bench/evals/core/main.py``,
    ``get_sparsity_and_variance_metrics``): the ratio is taken per token and then averaged over tokens (not
    ``E||x_hat|| / E||x||``), and a token with ``||x|| < 1e-4`` is divided by 1 instead
    (:data:`L2_RATIO_MIN_NORM`). dictionary_learning's ``l2_ratio`` is the same per-token mean without the guard.
    Below 1: the reconstructions are shorter than the inputs (shrinkage); compare
    :class:`RelativeReconstructionBias`, a ratio of token sums.

    ``update(x, x_hat)``: ``(..., d)`` tensors of one shape. ``compute()``: 0-dim float64, >= 0 (NaN before
    any update).
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("ratio_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("ratio_tokens", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, x: Tensor, x_hat: Tensor) -> None:
        x, x_hat = _tokens(x, x_hat, type(self).__name__)
        norm_in = x.norm(dim=-1)
        norm_in = torch.where(norm_in.abs() < L2_RATIO_MIN_NORM, torch.ones_like(norm_in), norm_in)
        self.ratio_sum += (x_hat.norm(dim=-1) / norm_in).sum()
        self.ratio_tokens += x.shape[0]

    def compute(self) -> Tensor:
        return self.ratio_sum / self.ratio_tokens.to(torch.float64)


#: Cap on the elements of one ``(block x d_sae)`` cosine block (64 MiB in float32).
_COSINE_BLOCK_ELEMENTS = 1 << 24


def _check_decoder(W_dec: Tensor, chunk_size: int | None, who: str) -> int:
    """Validate a decoder and return the rows per cosine block."""
    if W_dec.ndim != 2 or W_dec.shape[0] < 2:
        raise ConfigError(
            f"{who} needs a (d_sae, d_model) decoder with d_sae >= 2, got shape {tuple(W_dec.shape)}. "
            "Fix: pass sae.W_dec (one atom per row)."
        )
    if chunk_size is None:
        return max(1, _COSINE_BLOCK_ELEMENTS // W_dec.shape[0])
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}. Fix: pass a positive chunk_size.")
    return int(chunk_size)


def _cosine_blocks(W_dec: Tensor, chunk_size: int, self_value: float):
    """Yield ``(start, cos)``: the cosines of atoms ``start:start+chunk`` with every atom, ``(chunk, d_sae)`` in
    float32 (or the input's wider dtype) with autocast off, each atom's cosine with itself set to ``self_value``.
    A zero atom has cosine 0 with every other."""
    atoms = F.normalize(W_dec.detach().to(torch.promote_types(W_dec.dtype, torch.float32)), dim=1)
    for start in range(0, atoms.shape[0], chunk_size):
        with torch.autocast(atoms.device.type, enabled=False):  # float32 also when called inside autocast
            cos = atoms[start : start + chunk_size] @ atoms.T
        cos.diagonal(offset=start).fill_(self_value)  # an atom with itself
        yield start, cos


@torch.no_grad()
def decoder_coherence(W_dec: Tensor, chunk_size: int | None = 1024) -> float:
    """Coherence of a dictionary: the largest ``|cos|`` between two different decoder atoms.

    ``max_{i != j} |<w_i, w_j>| / (||w_i|| ||w_j||)`` (mutual coherence, Donoho & Elad 2003; the
    "max cosine similarity" of SAE evaluations). The single worst pair: one duplicated atom sets it to 1
    however good the rest is; :func:`mean_max_decoder_cosine` is the per-latent average SAEBench reports.
    Computed ``chunk_size`` rows at a time in float32 (or the input's wider dtype), so memory is
    ``chunk_size x d_sae``, never ``d_sae^2``. A zero atom has cosine 0 with every other.

    Args:
        W_dec: ``(d_sae, d_model)`` decoder, one atom per row (``SparseAutoencoder.W_dec``).
        chunk_size: rows per block (>= 1); None: as many as fit in 2^24 cosines.

    Returns:
        The coherence in [0, 1] (1: two atoms are parallel or anti-parallel).

    Raises:
        ConfigError: ``W_dec`` not 2-D, fewer than 2 atoms, or ``chunk_size < 1``.
    """
    chunk_size = _check_decoder(W_dec, chunk_size, "decoder_coherence")
    best = W_dec.new_zeros((), dtype=torch.promote_types(W_dec.dtype, torch.float32))
    for _, cos in _cosine_blocks(W_dec, chunk_size, 0.0):
        best = torch.maximum(best, cos.abs_().max())
    return float(best)


@torch.no_grad()
def max_decoder_cosine(W_dec: Tensor, chunk_size: int | None = None) -> Tensor:
    """Each latent's largest cosine similarity with any *other* decoder atom (signed, not absolute).

    ``m_i = max_{j != i} <w_i, w_j> / (||w_i|| ||w_j||)``: SAEBench's ``max_decoder_cosine_sim`` per latent
    (Karvonen et al. 2025, arXiv 2503.09532; ``sae_bench/evals/core/main.py``, ``calculate_max_cosine_sim``:
    the self-similarity is excluded, the sign kept, so an anti-parallel pair does not count as redundant).
    Computed in blocks of ``chunk_size`` atoms against all ``d_sae`` (float32, or the input's wider dtype):
    memory ``chunk_size x d_sae``, never ``d_sae^2`` (the default block holds 2^24 cosines, 64 MiB: 682 rows at
    d_sae 24,576).

    Args:
        W_dec: ``(d_sae, d_model)`` decoder, one atom per row.
        chunk_size: atoms per block (>= 1); None: as many as fit in 2^24 cosines.

    Returns:
        ``(d_sae,)`` float32 (or wider) in [-1, 1], on ``W_dec``'s device. A zero atom has cosine 0 with all.

    Raises:
        ConfigError: ``W_dec`` not 2-D, fewer than 2 atoms, or ``chunk_size < 1``.
    """
    chunk_size = _check_decoder(W_dec, chunk_size, "max_decoder_cosine")
    out = W_dec.new_empty(W_dec.shape[0], dtype=torch.promote_types(W_dec.dtype, torch.float32))
    for start, cos in _cosine_blocks(W_dec, chunk_size, -math.inf):
        out[start : start + cos.shape[0]] = cos.amax(dim=1)
    return out


@torch.no_grad()
def mean_max_decoder_cosine(W_dec: Tensor, chunk_size: int | None = None) -> float:
    """The mean over latents of :func:`max_decoder_cosine`: SAEBench's ``average_max_decoder_cosine_sim``
    (core evaluation, ``calculate_misc_metrics``). Lower: a less redundant dictionary; unlike
    :func:`decoder_coherence` it does not saturate at 1 when a few atoms are duplicated.

    Returns:
        A float in [-1, 1] (averaged in float64).

    Raises:
        ConfigError: as :func:`max_decoder_cosine`.
    """
    return float(max_decoder_cosine(W_dec, chunk_size).double().mean())


@torch.no_grad()
def decoder_cosine_stats(W_dec: Tensor, chunk_size: int | None = None) -> dict[str, Tensor]:
    """:func:`decoder_coherence` and :func:`mean_max_decoder_cosine` from one blocked pass over the atom pairs
    (the ``d_sae^2 x d_model`` matmul is the cost: ~30 s on 2 CPU cores at d_sae 24,576, d_model 768).

    Returns:
        ``{"decoder_coherence": c, "mean_max_decoder_cosine": m}``, 0-dim float64 tensors on the CPU.

    Raises:
        ConfigError: as :func:`max_decoder_cosine`.
    """
    chunk_size = _check_decoder(W_dec, chunk_size, "decoder_cosine_stats")
    row_max = W_dec.new_empty(W_dec.shape[0], dtype=torch.promote_types(W_dec.dtype, torch.float32))
    coherence = row_max.new_zeros(())
    for start, cos in _cosine_blocks(W_dec, chunk_size, -math.inf):
        row_max[start : start + cos.shape[0]] = cos.amax(dim=1)
        cos.diagonal(offset=start).fill_(0.0)
        coherence = torch.maximum(coherence, cos.abs_().max())
    return {
        "decoder_coherence": coherence.double().cpu(),
        "mean_max_decoder_cosine": row_max.double().mean().cpu(),
    }


def sae_metrics(d_model: int, d_sae: int, dense_threshold: float = DENSE_THRESHOLD, **kwargs: Any) -> MetricCollection:
    """The standard SAE evaluation metrics as one ``MetricCollection``.

    Keys: ``fvu``, ``explained_variance``, ``l0``, ``dead_latents``, ``dense_latents`` (firing on more than
    ``dense_threshold`` of tokens), ``freq_over_1_percent`` (more than 1 %, SAEBench's), ``cosine_similarity``,
    ``relative_reconstruction_bias``, ``l2_ratio`` (each a 0-dim float64 tensor). Call
    ``update(x=x, x_hat=x_hat, code=code)`` **with keywords** (positional arguments would go to every
    metric); the metrics that share states (FVU / explained variance, dead / dense latents) are updated
    once through torchmetrics compute groups. ``kwargs`` go to ``MetricCollection`` (e.g. ``prefix="val/"``).
    """
    return MetricCollection(
        {
            "fvu": FractionOfVarianceUnexplained(d_model),
            "explained_variance": ExplainedVariance(d_model),
            "l0": MeanL0(),
            "dead_latents": DeadLatents(d_sae, dense_threshold),
            "dense_latents": DenseLatents(d_sae, dense_threshold),
            "freq_over_1_percent": DenseLatents(d_sae, FREQ_1_PERCENT),
            "cosine_similarity": MeanCosineSimilarity(),
            "relative_reconstruction_bias": RelativeReconstructionBias(),
            "l2_ratio": L2Ratio(),
        },
        **kwargs,
    )


__all__ = [
    "DENSE_THRESHOLD",
    "FREQ_1_PERCENT",
    "FVU",
    "L2_RATIO_MIN_NORM",
    "DeadLatents",
    "DenseLatents",
    "ExplainedVariance",
    "FractionOfVarianceUnexplained",
    "L2Ratio",
    "LatentFiring",
    "MeanCosineSimilarity",
    "MeanL0",
    "RelativeReconstructionBias",
    "decoder_coherence",
    "decoder_cosine_stats",
    "max_decoder_cosine",
    "mean_max_decoder_cosine",
    "sae_metrics",
]
