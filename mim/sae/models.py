"""Sparse autoencoder variants: one small class each, all trained by :class:`mim.sae.module.SAETraining`.

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

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from mim.errors import ConfigError, UserError
from mim.export import atomic_write
from mim.sae.kernels import Selector, select_linear, sparse_decode

FORMAT = "mim-sae"


class SparseCode(NamedTuple):
    """A batch of sparse codes in padded-row form.

    Attributes:
        values: (N, s) float; exactly 0 in unused slots; negative only for :class:`AbsTopKSAE`.
        indices: (N, s) int64 latent ids in ``[0, d_sae)``; an unused slot holds any valid id.
    """

    values: torch.Tensor
    indices: torch.Tensor

    def to_dense(self, d_sae: int) -> torch.Tensor:
        """The code as a dense (N, d_sae) tensor (repeated ids, as matching pursuit makes, add up)."""
        dense = self.values.new_zeros(self.values.shape[0], d_sae)
        return dense.scatter_add_(1, self.indices, self.values)

    def _distinct(self, d_sae: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row-sorted ids with inactive slots as ``d_sae``, and the mask of each row's distinct active ids."""
        ids = self.indices.masked_fill(self.values == 0, d_sae).sort(dim=1).values
        first = torch.ones_like(ids, dtype=torch.bool)
        first[:, 1:] = ids[:, 1:] != ids[:, :-1]
        return ids, first & (ids < d_sae)

    def l0(self) -> torch.Tensor:
        """(N,) int64: active latents per row (a latent in several slots, as matching pursuit makes, counts once)."""
        return self._distinct(torch.iinfo(torch.long).max)[1].sum(dim=1)

    def fired(self, d_sae: int) -> torch.Tensor:
        """(d_sae,) int64: in how many rows each latent is active."""
        ids, keep = self._distinct(d_sae)
        return torch.bincount(ids[keep], minlength=d_sae)


class SAEOutput(NamedTuple):
    """``x_hat`` (N, d_model) in the input's units and the ``code`` that made it."""

    x_hat: torch.Tensor
    code: SparseCode


class SAELoss(NamedTuple):
    """One training step's result (normalised units).

    Attributes:
        loss: scalar to minimise.
        terms: scalar parts for logging (``mse``, ``fvu``, ``auxk``, ``l1``, ``l0_penalty``, ...).
        x_hat: (N, d_model) reconstruction of ``x_n``.
        fired: (d_sae,) int64 tokens of the batch on which each latent was active.
        l0: scalar float, mean active latents per token.
    """

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    x_hat: torch.Tensor
    fired: torch.Tensor
    l0: torch.Tensor


def geometric_median(points: torch.Tensor, iterations: int = 50, eps: float = 1e-8) -> torch.Tensor:
    """Geometric median of ``points`` (n, d) by Weiszfeld's iterations (in float64), started at the mean.

    The point minimising the sum of Euclidean distances; what Gao et al. 2024 (App. A.1) initialise ``b_dec`` to.
    """
    pts = points.double()
    median = pts.mean(0)
    for _ in range(iterations):
        weights = 1.0 / (pts - median).norm(dim=1).clamp_min(eps)
        new = (weights[:, None] * pts).sum(0) / weights.sum()
        if (new - median).norm() <= 1e-7 * median.norm().clamp_min(1.0):
            median = new
            break
        median = new
    return median.to(points.dtype)


def squared_error(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """``E ||x - x_hat||^2`` over a batch (N, d): squared error summed over dimensions, mean over rows."""
    return (x_hat - x).pow(2).sum(-1).mean()


def batch_variance(x: torch.Tensor) -> torch.Tensor:
    """``sum ||x - mean(x)||^2 / N`` over a batch (N, d): the total variance around the per-dimension mean.

    Under DDP (an initialised process group of more than one rank) the batch is that of all ranks together
    (counts, sums and sums of squares all-reduced in float64, no gradient: ``x`` is data or a detached
    residual), so every rank normalises its loss alike and 2 ranks of ``B`` rows take the step of one process
    of ``2B``. Every rank must then call it equally often (a collective).
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return (x - x.mean(0)).pow(2).sum(-1).mean()
    with torch.no_grad():
        x64 = x.detach().double()
        stats = torch.cat([x64.sum(0), x64.pow(2).sum().view(1), x64.new_tensor([x.shape[0]])])
        dist.all_reduce(stats)
        count = stats[-1].clamp_min(1)
        mean = stats[:-2] / count
        return (stats[-2] / count - mean.pow(2).sum()).clamp_min(0).to(x.dtype)


def support_code(f: torch.Tensor, support: torch.Tensor) -> SparseCode:
    """Padded code of the entries of ``f`` (N, d_sae) where ``support`` (N, d_sae) bool is set (``s`` = the
    largest row count); values are ``f`` there (zeros allowed), gradients flow to ``f`` at every support entry."""
    width = int(support.sum(1).max()) if support.numel() else 0
    indices = support.to(f.dtype).topk(width, dim=1, sorted=False).indices
    return SparseCode(f.gather(1, indices) * support.gather(1, indices), indices)


def threshold_code(z: torch.Tensor, threshold: torch.Tensor | float) -> SparseCode:
    """The code ``z * (z > threshold)`` in padded form, gradients to ``z`` at the active entries."""
    return support_code(z, z.detach() > threshold)


def _check(ok: bool, name: str, value: Any, rule: str, fix: str) -> None:
    """Raise :class:`ConfigError` "``name`` must ``rule``, got ``value``. Fix: ``fix``", naming the SAE config key
    (``--model.init_args.sae.init_args.<name>``) unless ``ok``. Comparisons with NaN are false, so NaN fails."""
    if not ok:
        raise ConfigError(
            f"SAE {name} must {rule}, got {value!r}. Fix: {fix} (--model.init_args.sae.init_args.{name})."
        )


def _check_positive(name: str, value: float, integer: bool = False) -> None:
    """``value > 0`` (``>= 1`` for counts) or :class:`ConfigError`."""
    if integer:
        _check(value >= 1, name, value, "be positive (an integer >= 1)", f"set {name} to a positive integer")
    else:
        _check(value > 0, name, value, "be positive (> 0)", f"set {name} to a positive number")


def _check_non_negative(name: str, value: float) -> None:
    """``value >= 0`` or :class:`ConfigError`."""
    _check(value >= 0, name, value, "be >= 0", f"set {name} >= 0 (0 turns the term off)")


def _without_autocast(device: torch.device) -> Any:
    """A context in which autocast is off on ``device`` (ops run in their inputs' dtype)."""
    return torch.autocast(device.type, enabled=False)


class SparseAutoencoder(nn.Module):
    """Base of every variant: parameters, normalisation, decoding, initialisation and the decoder constraint.

    A variant implements :meth:`code` (the inference code of normalised inputs) and :meth:`loss` (a training
    step). Public methods take raw features (the store's units) unless their name says ``_n``.

    Args:
        d_model: input width ``d`` (must equal the feature store's).
        d_sae: number of latents (dictionary size).
        dead_tokens: a latent is dead after this many training tokens without firing (Gao et al. 2024,
            Sec. 2.4: 10M tokens).

    Mixed precision (``--trainer.precision bf16-mixed`` / ``16-mixed``): parameters and buffers stay float32;
    under autocast the encoder matmul runs in the autocast dtype for the ranking variants (TopK, AbsTopK,
    TopAFA, MP, ReLU: a rounded ``z`` changes which latents win only at near-ties), but in float32 wherever ``z``
    is compared with a learned or estimated threshold (BatchTopK / Matryoshka, JumpReLU: see
    :meth:`pre_acts`). Decoding (:func:`~mim.sae.kernels.sparse_decode`) and the losses run in float32.

    Raises:
        ConfigError: a ``d_model``, ``d_sae`` or ``dead_tokens`` below 1.
    """

    #: decoder rows kept at unit norm, the gradient's parallel component removed (Gao et al. App. A.1)
    unit_norm_decoder: ClassVar[bool] = True
    #: whether the variant has its own encoder (matching pursuit uses the decoder)
    has_encoder: ClassVar[bool] = True
    #: whether a code row never holds a latent twice (matching pursuit may pick an atom again)
    distinct_ids: ClassVar[bool] = True

    def __init__(self, d_model: int, d_sae: int, dead_tokens: int = 10_000_000) -> None:
        super().__init__()
        for name, value in (("d_model", d_model), ("d_sae", d_sae), ("dead_tokens", dead_tokens)):
            _check_positive(name, value, integer=True)
        self.d_model, self.d_sae, self.dead_tokens = d_model, d_sae, dead_tokens
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_model))
        self.b_dec = nn.Parameter(torch.zeros(d_model))
        if self.has_encoder:
            self.W_enc = nn.Parameter(torch.empty(d_sae, d_model))
            self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.register_buffer("input_scale", torch.tensor(1.0))
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("tokens_since_fired", torch.zeros(d_sae, dtype=torch.long))
        self.reset_parameters()

    # ----------------------------------------------------------------------------------------------- set-up
    def init_args(self) -> dict[str, Any]:
        """The constructor arguments (what :func:`save_sae` writes to the JSON config)."""
        import inspect

        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {name: getattr(self, name) for name in names}

    def decoder_init_norm(self) -> float:
        """Norm of the decoder rows at initialisation (1 for unit-norm variants)."""
        return 1.0

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random unit directions for the decoder rows (scaled to :meth:`decoder_init_norm`), the encoder as
        their transpose, zero biases, scale 1. Data-dependent parts come from :meth:`initialize`."""
        nn.init.kaiming_uniform_(self.W_dec, a=math.sqrt(5))
        self.W_dec.mul_(self.decoder_init_norm() / self.W_dec.norm(dim=1, keepdim=True))
        self.b_dec.zero_()
        if self.has_encoder:
            self.W_enc.copy_(self.W_dec)
            self.b_enc.zero_()

    @torch.no_grad()
    def initialize(self, sample: torch.Tensor) -> None:
        """Fit the input scale (``E||x_n|| = sqrt(d_model)``) and ``b_dec`` (geometric median of the normalised
        sample) on ``sample`` (n, d_model) raw features; marks the SAE initialised.

        Raises:
            UserError: a sample with another width, or non-finite values.
        """
        sample = sample.detach().float().to(self.W_dec.device)
        if sample.ndim != 2 or sample.shape[1] != self.d_model or not len(sample):
            raise UserError(f"SAE initialisation needs a (n, {self.d_model}) sample, got {tuple(sample.shape)}.")
        if not torch.isfinite(sample).all():
            raise UserError("The SAE initialisation sample holds NaN/Inf features. Fix: re-extract the store.")
        mean_norm = sample.norm(dim=1).mean()
        self.input_scale.fill_(math.sqrt(self.d_model) / float(mean_norm.clamp_min(1e-12)))
        self.b_dec.copy_(geometric_median(sample * self.input_scale))
        self.initialized.fill_(True)

    # ------------------------------------------------------------------------------------------- inference
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Raw features (N, d_model) -> the normalised ``x_n`` the SAE works on."""
        return x.to(self.W_dec.dtype) * self.input_scale

    def pre_acts(self, x_n: torch.Tensor, fp32: bool = False) -> torch.Tensor:
        """Dense pre-activations ``z = W_enc (x_n - b_dec) + b_enc``: (N, d_sae).

        Under autocast the matmul runs in the autocast dtype (bf16 / fp16), unless ``fp32``: then autocast is
        off and ``z`` is float32. The threshold variants need that: bf16 keeps 8 significant bits, so near
        ``z = 0.7`` its values are 0.0039 apart, wider than JumpReLU's whole pseudo-derivative window
        (bandwidth 0.001), which then holds no ``z`` and gives the threshold no gradient; and a threshold
        estimated from, or compared with, rounded ``z`` is off by up to 0.4 %.
        """
        if not fp32:
            return F.linear(x_n - self.b_dec, self.W_enc, self.b_enc)
        with _without_autocast(x_n.device):
            return F.linear(x_n.float() - self.b_dec.float(), self.W_enc.float(), self.b_enc.float())

    def code(self, x_n: torch.Tensor) -> SparseCode:
        """The inference code of normalised inputs ``x_n`` (N, d_model)."""
        raise NotImplementedError

    def decode_n(self, code: SparseCode) -> torch.Tensor:
        """``x_hat_n = W_dec^T f + b_dec`` (normalised units), decoding only the active latents."""
        return sparse_decode(code.values, code.indices, self.W_dec) + self.b_dec

    def encode(self, x: torch.Tensor) -> SparseCode:
        """Sparse codes of raw features ``x`` (N, d_model)."""
        return self.code(self.normalize(x))

    def decode(self, code: SparseCode) -> torch.Tensor:
        """Reconstruction (N, d_model) in the raw features' units."""
        return self.decode_n(code) / self.input_scale

    def forward(self, x: torch.Tensor) -> SAEOutput:
        """Encode and decode raw features ``x`` (N, d_model)."""
        code = self.encode(x)
        return SAEOutput(self.decode(code), code)

    # -------------------------------------------------------------------------------------------- training
    def loss(self, x_n: torch.Tensor) -> SAELoss:
        """One training step's loss on normalised inputs ``x_n`` (N, d_model)."""
        raise NotImplementedError

    def _result(self, loss: torch.Tensor, terms: dict[str, torch.Tensor], x_hat: torch.Tensor,
                code: SparseCode) -> SAELoss:
        """The :class:`SAELoss` of a step (``terms`` must hold ``mse``), with the firing counts of ``code``."""
        if self.distinct_ids:  # no id twice in a row: count active slots directly (no sort)
            active = code.values != 0
            fired, l0 = torch.bincount(code.indices[active], minlength=self.d_sae), active.sum(1)
        else:
            fired, l0 = code.fired(self.d_sae), code.l0()
        return SAELoss(loss, terms, x_hat, fired, l0.float().mean())

    def dead_latents(self) -> torch.Tensor:
        """(d_sae,) bool: latents that have not fired for ``dead_tokens`` training tokens."""
        return self.tokens_since_fired >= self.dead_tokens

    @torch.no_grad()
    def update_firing(self, fired: torch.Tensor, tokens: int) -> None:
        """Dead-latent bookkeeping after a step: ``fired`` (d_sae,) counts over ``tokens`` tokens (all ranks)."""
        self.tokens_since_fired.add_(tokens).masked_fill_(fired > 0, 0)

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Drop the component of each decoder row's gradient parallel to the row (call before the optimizer
        step; with :meth:`normalize_decoder_` after it, the unit-norm constraint of Gao et al. App. A.1)."""
        if self.unit_norm_decoder and self.W_dec.grad is not None:
            unit = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
            self.W_dec.grad.sub_((self.W_dec.grad * unit).sum(1, keepdim=True) * unit)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Project the decoder rows back to unit norm (after the optimizer step)."""
        if self.unit_norm_decoder:
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))


class TopKSAE(SparseAutoencoder):
    """TopK SAE (Gao et al. 2024, arXiv 2406.04093, Sec. 2.3) with the AuxK loss on dead latents (Sec. 2.4).

    ``f = ReLU(TopK_k(z))``; loss = ``fvu + aux_coeff * auxk``. ``fvu`` is the batch-normalised MSE (module
    docstring). AuxK: the ``k_aux`` largest pre-activations among dead latents (ReLU'd) reconstruct the detached
    residual ``e = x_n - x_hat_n`` (no ``b_dec``), normalised by the residual's batch variance as in
    openai/sparse_autoencoder (``normalized_mse``); 0 when no latent is dead.

    Args:
        d_model, d_sae, dead_tokens: see :class:`SparseAutoencoder`.
        k: active latents per token (``1 <= k <= d_sae``).
        k_aux: dead latents in the AuxK reconstruction; default ``d_model // 2`` (Gao et al. App. B.1's
            heuristic, sparsify's default; the paper's own runs used 512 at d_model 768+).
        aux_coeff: AuxK coefficient (Gao et al.: 1/32).

    Raises:
        ConfigError: ``k`` outside ``[1, d_sae]``, ``k_aux < 1`` or ``aux_coeff < 0`` (and the base class's).
    """

    def __init__(self, d_model: int, d_sae: int, k: int = 32, k_aux: int | None = None,
                 aux_coeff: float = 1 / 32, dead_tokens: int = 10_000_000) -> None:
        super().__init__(d_model, d_sae, dead_tokens)
        _check(1 <= k <= d_sae, "k", k, f"be in [1, d_sae={d_sae}]", f"choose 1 <= k <= {d_sae} (or raise d_sae)")
        self.k_aux = k_aux if k_aux is not None else max(d_model // 2, 1)
        _check_positive("k_aux", self.k_aux, integer=True)
        _check_non_negative("aux_coeff", aux_coeff)
        self.k, self.aux_coeff = k, aux_coeff

    def rank(self, z: torch.Tensor) -> torch.Tensor:
        """The score the top ``k`` is taken of (``z``; AbsTopK overrides it with ``|z|``)."""
        return z

    def activate(self, values: torch.Tensor) -> torch.Tensor:
        """Activation of the kept pre-activations (ReLU; AbsTopK keeps them signed)."""
        return F.relu(values)

    def _select(self, dead: torch.Tensor | None) -> Selector:
        k, k_aux = self.k, self.k_aux

        def select(z: torch.Tensor) -> torch.Tensor:
            score = self.rank(z)
            top = score.topk(k, dim=1, sorted=False).indices
            if dead is None:
                return top
            ids = dead.nonzero().squeeze(1)
            aux = score.index_select(1, ids).topk(min(k_aux, len(ids)), dim=1, sorted=False).indices
            return torch.cat([top, ids[aux]], dim=1)

        return select

    def code(self, x_n: torch.Tensor) -> SparseCode:
        values, indices = select_linear(x_n - self.b_dec, self.W_enc, self.b_enc, self._select(None))
        return SparseCode(self.activate(values), indices)

    def loss(self, x_n: torch.Tensor) -> SAELoss:
        dead = self.dead_latents()
        dead = dead if bool(dead.any()) else None
        values, indices = select_linear(x_n - self.b_dec, self.W_enc, self.b_enc, self._select(dead))
        values = self.activate(values)
        code = SparseCode(values[:, : self.k], indices[:, : self.k])
        x_hat = self.decode_n(code)
        mse = squared_error(x_n, x_hat)
        fvu = mse / batch_variance(x_n)
        auxk = torch.zeros_like(fvu)
        if dead is not None:
            auxk = self._auxk(x_n, x_hat, values[:, self.k :], indices[:, self.k :])
        return self._result(fvu + self.aux_coeff * auxk, {"mse": mse, "fvu": fvu, "auxk": auxk}, x_hat, code)

    def _auxk(self, x_n: torch.Tensor, x_hat: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """AuxK: the dead latents' code (``values``, ``indices``, no ``b_dec``) against the detached residual,
        normalised by the residual's batch variance (openai ``normalized_mse``)."""
        residual = (x_n - x_hat).detach()
        e_hat = sparse_decode(values, indices, self.W_dec)
        return squared_error(residual, e_hat) / batch_variance(residual).clamp_min(1e-12)


class AbsTopKSAE(TopKSAE):
    """AbsTopK SAE ("AbsTopK: Rethinking Sparse Autoencoders For Bidirectional Features", 2025): keep the ``k``
    pre-activations of largest ``|z|`` with their signs (no ReLU), so one latent can encode both directions
    of a feature. Training as :class:`TopKSAE` (AuxK ranks dead latents by ``|z|`` too)."""

    def rank(self, z: torch.Tensor) -> torch.Tensor:
        return z.abs()

    def activate(self, values: torch.Tensor) -> torch.Tensor:
        return values


class BatchTopKSAE(TopKSAE):
    """BatchTopK SAE (Bussmann, Leask & Nanda 2024, arXiv 2412.06410, Sec. 3): in training, the ``k * N`` largest
    entries of ``ReLU(z)`` over the whole batch of ``N`` tokens stay active (``k`` per token on average); at
    inference a global threshold ``f = z * (z > threshold)`` replaces the batch dependence.

    The threshold is the paper's ``E_batches[min{f_ij > 0}]``, estimated from each training batch's smallest kept
    activation: their plain mean over the first ``1 / (1 - threshold_beta)`` batches, then an exponential moving
    average with decay ``threshold_beta`` = 0.9. The anchors average slower (dictionary_learning 0.999 after
    skipping 1000 steps, SAELens 0.99), but the batch minima drift down while the SAE trains and a slow average
    lags behind them: on the quick CIFAR run (k 32, 468 steps) inference kept 11.6 latents per token with 0.999
    (73 % of the latents never reached the threshold), 16 with 0.99 (after 312 steps) and 31.4 with 0.9,
    while the minima of 4096-token batches vary by only 1 % between batches (0.322-0.326), so a short average
    costs no precision. Until a training step has set it, inference uses per-token TopK. AuxK and the
    loss are :class:`TopKSAE`'s.

    Precision: the pre-activations of the training code and of the inference threshold comparison are computed
    in float32 also under autocast (:meth:`SparseAutoencoder.pre_acts` with ``fp32``), and the ``threshold``
    buffer is float32, so the estimate and its use do not depend on ``--trainer.precision``.

    Args:
        threshold_beta: EMA decay of the threshold estimate, in ``[0, 1)``.
        (others as :class:`TopKSAE`)

    Raises:
        ConfigError: ``threshold_beta`` outside ``[0, 1)`` (and :class:`TopKSAE`'s).
    """

    def __init__(self, d_model: int, d_sae: int, k: int = 32, k_aux: int | None = None, aux_coeff: float = 1 / 32,
                 threshold_beta: float = 0.9, dead_tokens: int = 10_000_000) -> None:
        super().__init__(d_model, d_sae, k, k_aux, aux_coeff, dead_tokens)
        _check(0 <= threshold_beta < 1, "threshold_beta", threshold_beta, "lie in [0, 1)",
               "set threshold_beta to e.g. 0.9 (0: the last batch's minimum only)")
        self.threshold_beta = threshold_beta
        self.register_buffer("threshold", torch.tensor(-1.0))
        self.register_buffer("threshold_updates", torch.tensor(0, dtype=torch.long))

    def code(self, x_n: torch.Tensor) -> SparseCode:
        if float(self.threshold) < 0:
            return super().code(x_n)
        return threshold_code(self.pre_acts(x_n, fp32=True), self.threshold)

    def batch_code(self, x_n: torch.Tensor) -> SparseCode:
        """The training code: top ``k * N`` of ``ReLU(z)`` over the batch (rows padded to the largest count);
        ``z`` in float32 (class docstring)."""
        f = F.relu(self.pre_acts(x_n, fp32=True))
        flat = f.detach().flatten().topk(min(self.k * len(f), f.numel()), sorted=False).indices
        keep = torch.zeros_like(f, dtype=torch.bool).flatten().index_fill_(0, flat, True).view_as(f) & (f > 0)
        code = threshold_code(f.masked_fill(~keep, 0), 0.0)
        if self.training:
            self._update_threshold(code)
        return code

    @torch.no_grad()
    def _update_threshold(self, code: SparseCode) -> None:
        kept = code.values[code.values > 0]
        if not len(kept):
            return
        self.threshold_updates.add_(1)
        rate = max(1 - self.threshold_beta, 1 / int(self.threshold_updates))
        kept_min = kept.min().to(self.threshold.dtype)
        self.threshold.copy_(torch.lerp(self.threshold.clamp_min(0), kept_min, rate))

    def reconstruction_losses(self, x_n: torch.Tensor, code: SparseCode) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """``(loss, x_hat_n, terms)`` of the reconstruction (Matryoshka overrides it)."""
        x_hat = self.decode_n(code)
        mse = squared_error(x_n, x_hat)
        fvu = mse / batch_variance(x_n)
        return fvu, x_hat, {"mse": mse, "fvu": fvu}

    def loss(self, x_n: torch.Tensor) -> SAELoss:
        code = self.batch_code(x_n)
        loss, x_hat, terms = self.reconstruction_losses(x_n, code)
        dead = self.dead_latents()
        auxk = torch.zeros_like(loss)
        if bool(dead.any()):
            z = self.pre_acts(x_n).masked_fill(~dead, -math.inf)
            aux_values, aux_indices = z.topk(min(self.k_aux, int(dead.sum())), dim=1, sorted=False)
            auxk = self._auxk(x_n, x_hat, F.relu(aux_values), aux_indices)
        return self._result(loss + self.aux_coeff * auxk, {**terms, "auxk": auxk}, x_hat, code)


class MatryoshkaSAE(BatchTopKSAE):
    """Matryoshka SAE (Bussmann et al. 2025, arXiv 2503.17547; Zaigrajew et al. 2025, MSAE, arXiv 2502.20578):
    the loss sums the reconstruction losses of nested prefixes of the dictionary, so the first latents must
    reconstruct on their own (coarse features first). Built on :class:`BatchTopKSAE` as Bussmann et al.: one
    BatchTopK code; the prefix ``m`` reconstruction keeps only its latents ``< m`` (plus ``b_dec``).

    Args:
        prefixes: increasing prefix sizes ending at ``d_sae``; default ``d_sae/16, /8, /4, /2, d_sae``.
        (others as :class:`BatchTopKSAE`)

    Raises:
        ConfigError: empty ``prefixes``, prefixes below 1, not strictly increasing or not ending at ``d_sae``.
    """

    def __init__(self, d_model: int, d_sae: int, k: int = 32, prefixes: list[int] | None = None,
                 k_aux: int | None = None, aux_coeff: float = 1 / 32, threshold_beta: float = 0.9,
                 dead_tokens: int = 10_000_000) -> None:
        super().__init__(d_model, d_sae, k, k_aux, aux_coeff, threshold_beta, dead_tokens)
        if prefixes is None:
            prefixes = sorted({max(d_sae // 2**i, 1) for i in range(4, -1, -1)})
        prefixes = [int(p) for p in prefixes]
        example = sorted({max(d_sae // 2**i, 1) for i in range(3, -1, -1)})
        _check(bool(prefixes) and prefixes[0] >= 1 and prefixes[-1] == d_sae
               and all(b > a for a, b in itertools.pairwise(prefixes)),
               "prefixes", prefixes, f"increase strictly and end at d_sae={d_sae} (sizes >= 1)",
               f"e.g. prefixes {example}, or leave prefixes unset for d_sae/16, /8, /4, /2, d_sae")
        self.prefixes = prefixes

    def prefix_reconstructions(self, code: SparseCode) -> list[torch.Tensor]:
        """``x_hat_n`` of each prefix (N, d_model), in the order of :attr:`prefixes`."""
        return [
            sparse_decode(code.values * (code.indices < m), code.indices, self.W_dec) + self.b_dec
            for m in self.prefixes
        ]

    def reconstruction_losses(self, x_n: torch.Tensor, code: SparseCode) -> tuple[torch.Tensor, torch.Tensor, dict]:
        variance = batch_variance(x_n)
        x_hats = self.prefix_reconstructions(code)
        errors = [squared_error(x_n, x_hat) for x_hat in x_hats]
        fvus = [error / variance for error in errors]
        terms = {f"fvu_prefix_{m}": fvu for m, fvu in zip(self.prefixes, fvus)}
        return torch.stack(fvus).sum(), x_hats[-1], {"mse": errors[-1], "fvu": fvus[-1], **terms}


class ReLUSAE(SparseAutoencoder):
    """ReLU SAE with the L1 penalty weighted by decoder norms (Conerly et al. 2024, "Circuits Updates – April
    2024", transformer-circuits.pub/2024/april-update, "Training SAEs"): ``f = ReLU(z)``, loss =
    ``E||x_n - x_hat_n||^2 + l1_coeff * E sum_i f_i ||W_dec,i||``. The decoder is not norm-constrained (the
    penalty makes shrinking it useless); its rows start at norm ``decoder_init_norm`` (0.1; the update draws
    them with norms 0.05-1). ``l1_coeff`` is warmed up linearly over the first ``l1_warmup_steps`` steps
    of training (the update: the first 5 %), counted by the SAE's ``step`` buffer. The update encodes ``x``
    itself and starts ``b_dec`` at 0; here, as in every variant, ``b_dec`` (the geometric median) is
    subtracted first (module docstring).

    Args:
        l1_coeff: the sparsity coefficient lambda (the update used 5 with ``E||x|| = sqrt(d)``).
        l1_warmup_steps: steps of the linear lambda warm-up (0: none).
        (others as :class:`SparseAutoencoder`)

    Raises:
        ConfigError: ``l1_coeff <= 0`` or ``l1_warmup_steps < 0`` (and the base class's).
    """

    unit_norm_decoder = False

    def __init__(self, d_model: int, d_sae: int, l1_coeff: float = 5.0, l1_warmup_steps: int = 0,
                 dead_tokens: int = 10_000_000) -> None:
        _check_positive("l1_coeff", l1_coeff)
        _check(l1_warmup_steps >= 0, "l1_warmup_steps", l1_warmup_steps, "be >= 0",
               "set l1_warmup_steps >= 0 (0: no warm-up)")
        self.l1_coeff, self.l1_warmup_steps = l1_coeff, l1_warmup_steps
        super().__init__(d_model, d_sae, dead_tokens)
        self.register_buffer("step", torch.tensor(0, dtype=torch.long))

    def decoder_init_norm(self) -> float:
        return 0.1

    def code(self, x_n: torch.Tensor) -> SparseCode:
        return threshold_code(self.pre_acts(x_n), 0.0)

    def loss(self, x_n: torch.Tensor) -> SAELoss:
        f = F.relu(self.pre_acts(x_n))
        code = threshold_code(f, 0.0)
        x_hat = self.decode_n(code)
        l1 = (f * self.W_dec.norm(dim=1)).sum(-1).mean()
        warm = min(1.0, (int(self.step) + 1) / self.l1_warmup_steps) if self.l1_warmup_steps else 1.0
        if self.training:
            self.step.add_(1)
        mse = squared_error(x_n, x_hat)
        return self._result(mse + warm * self.l1_coeff * l1, {"mse": mse, "l1": l1}, x_hat, code)


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    """Rectangle kernel ``K(u) = H(u + 1/2) - H(u - 1/2)``."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """``z * H(z - theta)``; d/dz = ``H(z - theta)``, d/dtheta = ``-(theta / eps) K((z - theta) / eps)``
    (Rajamanoharan et al. 2024, arXiv 2407.14435, eq. 11)."""

    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta)

    @staticmethod
    def backward(ctx, grad):
        z, theta = ctx.saved_tensors
        grad_z = grad * (z > theta)
        grad_theta = (grad * -(theta / ctx.eps) * _rectangle((z - theta) / ctx.eps)).sum(0)
        return grad_z, grad_theta, None


class _Step(torch.autograd.Function):
    """``H(z - theta)``; no gradient to ``z``, d/dtheta = ``-(1 / eps) K((z - theta) / eps)`` (eq. 12 of
    Rajamanoharan et al. 2024)."""

    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        z, theta = ctx.saved_tensors
        grad_theta = (grad * -(1.0 / ctx.eps) * _rectangle((z - theta) / ctx.eps)).sum(0)
        return None, grad_theta, None


class JumpReLUSAE(SparseAutoencoder):
    """JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead", arXiv 2407.14435, Sec. 3-4):
    ``f = z * H(z - theta)`` with a learned threshold per latent (``theta = exp(log_threshold)``), loss =
    ``E||x_n - x_hat_n||^2 + l0_coeff * E||f||_0``. The step function has no gradient; ``theta`` learns through the
    straight-through pseudo-derivatives with a rectangle kernel of width ``bandwidth`` (eqs. 11-12); ``z`` gets
    gradient only from the reconstruction. The decoder rows are kept at unit norm (dictionary_learning's
    JumpReLU trainer does the same). The paper encodes ``x`` itself; here, as in every variant, ``b_dec`` is
    subtracted first (SAELens' default). The paper scales inputs to ``E||x||^2 = d``, this SAE to
    ``E||x|| = sqrt(d)``: about the same scale.

    Precision: ``z`` is computed in float32 also under autocast (:meth:`SparseAutoencoder.pre_acts` with ``fp32``),
    as are the comparison with ``theta`` and the pseudo-derivatives; with a bf16 ``z`` the window
    ``|z - theta| < bandwidth / 2`` would hold no value once ``theta`` exceeds ~0.13 (bf16 spacing > 0.001), and
    ``theta`` would get no gradient. So this variant gains no speed from mixed precision.

    Args:
        l0_coeff: sparsity coefficient lambda.
        bandwidth: kernel width epsilon (paper: 0.001).
        init_threshold: initial theta (paper: 0.001).
        (others as :class:`SparseAutoencoder`)

    Raises:
        ConfigError: ``l0_coeff``, ``bandwidth`` or ``init_threshold`` not > 0 (and the base class's).
    """

    def __init__(self, d_model: int, d_sae: int, l0_coeff: float = 1.0, bandwidth: float = 0.001,
                 init_threshold: float = 0.001, dead_tokens: int = 10_000_000) -> None:
        for name, value in (("l0_coeff", l0_coeff), ("bandwidth", bandwidth), ("init_threshold", init_threshold)):
            _check_positive(name, value)
        self.l0_coeff, self.bandwidth, self.init_threshold = l0_coeff, bandwidth, init_threshold
        super().__init__(d_model, d_sae, dead_tokens)
        self.log_threshold = nn.Parameter(torch.full((d_sae,), math.log(init_threshold)))

    def code(self, x_n: torch.Tensor) -> SparseCode:
        return threshold_code(self.pre_acts(x_n, fp32=True), self.log_threshold.float().exp())

    def loss(self, x_n: torch.Tensor) -> SAELoss:
        z = self.pre_acts(x_n, fp32=True)
        theta = self.log_threshold.float().exp()
        f = _JumpReLU.apply(z, theta, self.bandwidth)
        l0 = _Step.apply(z, theta, self.bandwidth).sum(-1).mean()
        # the code also holds the zeros within bandwidth / 2 below the threshold: eq. 11 needs d loss / d f there
        code = support_code(f, z.detach() > theta.detach() - self.bandwidth / 2)
        x_hat = self.decode_n(code)
        mse = squared_error(x_n, x_hat)
        return self._result(mse + self.l0_coeff * l0, {"mse": mse, "l0_penalty": l0}, x_hat, code)


class TopAFASAE(TopKSAE):
    """top-AFA SAE (Lee et al. 2025, "Evaluating and Designing Sparse Autoencoders by Approximating
    Quasi-Orthogonality", arXiv 2503.24277, Sec. 5): no fixed ``k``. With quasi-orthogonal unit atoms the norm
    of the sparse code approximates the norm of the input it encodes (the approximate feature activation, AFA),
    so each token keeps its largest ``ReLU(z)`` values, sorted descending, up to the count whose cumulative
    norm ``sqrt(sum_{i<=n} f_i^2)`` is closest to ``||x_n - b_dec||`` (the authors' ``training/sae.py``: the
    closest prefix, at least one latent). The loss adds the AFA term ``afa_coeff * E (||f|| - ||x_n - b_dec||)^2``
    to :class:`TopKSAE`'s ``fvu + aux_coeff * auxk``.

    Deviation (for speed): the search runs over the ``k_max`` largest values, not all ``d_sae``; a token that
    would need more keeps ``k_max``.

    Args:
        k_max: cap on active latents per token (a cap above ``d_sae`` acts as ``d_sae``).
        afa_coeff: weight of the AFA norm-matching term (the authors sweep 1/128 to 1/16).
        (others as :class:`TopKSAE`)

    Raises:
        ConfigError: ``k_max < 1`` or ``afa_coeff < 0`` (and :class:`TopKSAE`'s).
    """

    def __init__(self, d_model: int, d_sae: int, k_max: int = 128, afa_coeff: float = 1 / 32,
                 k_aux: int | None = None, aux_coeff: float = 1 / 32, dead_tokens: int = 10_000_000) -> None:
        _check_positive("k_max", k_max, integer=True)
        _check_non_negative("afa_coeff", afa_coeff)
        super().__init__(d_model, d_sae, min(k_max, max(d_sae, 1)), k_aux, aux_coeff, dead_tokens)
        self.k_max, self.afa_coeff = k_max, afa_coeff

    def _select(self, dead: torch.Tensor | None) -> Selector:
        select = super()._select(dead)

        def sorted_select(z: torch.Tensor) -> torch.Tensor:
            indices = select(z)
            top = indices[:, : self.k]
            order = z.gather(1, top).argsort(dim=1, descending=True)
            return torch.cat([top.gather(1, order), indices[:, self.k :]], dim=1)

        return sorted_select

    def _afa(self, x_n: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> SparseCode:
        """Keep, per row, the prefix of the descending ``values`` whose norm is closest to ``||x_n - b_dec||``
        (norms in float32, also when ``values`` come from an autocast matmul)."""
        target = (x_n - self.b_dec).detach().float().norm(dim=1, keepdim=True)
        norms = values.detach().float().pow(2).cumsum(1).sqrt()
        count = (norms - target).abs().argmin(dim=1, keepdim=True)  # index of the last kept slot
        keep = torch.arange(values.shape[1], device=values.device) <= count
        return SparseCode(values * keep, indices)

    def code(self, x_n: torch.Tensor) -> SparseCode:
        values, indices = select_linear(x_n - self.b_dec, self.W_enc, self.b_enc, self._select(None))
        return self._afa(x_n, self.activate(values), indices)

    def loss(self, x_n: torch.Tensor) -> SAELoss:
        dead = self.dead_latents()
        dead = dead if bool(dead.any()) else None
        values, indices = select_linear(x_n - self.b_dec, self.W_enc, self.b_enc, self._select(dead))
        values = self.activate(values)
        code = self._afa(x_n, values[:, : self.k], indices[:, : self.k])
        x_hat = self.decode_n(code)
        mse = squared_error(x_n, x_hat)
        fvu = mse / batch_variance(x_n)
        afa = (code.values.float().norm(dim=1) - (x_n - self.b_dec).float().norm(dim=1)).pow(2).mean()
        auxk = self._auxk(x_n, x_hat, values[:, self.k :], indices[:, self.k :]) if dead is not None else None
        terms = {"mse": mse, "fvu": fvu, "afa": afa, "auxk": auxk if auxk is not None else torch.zeros_like(fvu)}
        return self._result(fvu + self.afa_coeff * afa + self.aux_coeff * terms["auxk"], terms, x_hat, code)


class MPSAE(SparseAutoencoder):
    """Matching-pursuit SAE (Costa et al. 2025, "From Flat to Hierarchical: Extracting Sparse Representations
    with Matching Pursuit", arXiv 2506.03093, Sec. 3): the encoder is ``steps`` unrolled steps of matching
    pursuit on the unit-norm decoder atoms (tied weights, no ``W_enc``). From ``r = x_n - b_dec``, each step
    picks ``j = argmax_j <r, W_dec,j>``, adds ``c = ReLU(<r, W_dec,j>)`` to ``f_j`` and subtracts ``c W_dec,j``
    from ``r`` (non-negative codes, as the authors' code and SAELens; an atom may be picked again). Since the
    atoms are unit vectors, ``||r||^2`` falls by ``c^2`` every step: the error never grows with ``steps``,
    which can be changed at inference (set the attribute). Loss ``fvu`` (batch-normalised MSE), trained
    through the unrolled steps.

    Args:
        steps: matching-pursuit steps T (at most T active latents per token).
        (others as :class:`SparseAutoencoder`)

    Raises:
        ConfigError: ``steps < 1`` (and the base class's).
    """

    has_encoder = False
    distinct_ids = False

    def __init__(self, d_model: int, d_sae: int, steps: int = 32, dead_tokens: int = 10_000_000) -> None:
        _check_positive("steps", steps, integer=True)
        self.steps = steps
        super().__init__(d_model, d_sae, dead_tokens)

    def code(self, x_n: torch.Tensor, steps: int | None = None) -> SparseCode:
        """Matching pursuit for ``steps`` (default :attr:`steps`) steps on normalised inputs ``x_n``."""
        residual = x_n - self.b_dec
        values, indices = [], []
        for _ in range(self.steps if steps is None else steps):
            correlation = residual @ self.W_dec.t()
            index = correlation.detach().argmax(dim=1, keepdim=True)
            value = F.relu(correlation.gather(1, index))
            residual = residual - value * self.W_dec[index.squeeze(1)]
            values.append(value)
            indices.append(index)
        if not values:
            return SparseCode(x_n.new_zeros(len(x_n), 0), torch.zeros(len(x_n), 0, dtype=torch.long))
        return SparseCode(torch.cat(values, 1), torch.cat(indices, 1))

    def loss(self, x_n: torch.Tensor) -> SAELoss:
        code = self.code(x_n)
        x_hat = self.decode_n(code)
        mse = squared_error(x_n, x_hat)
        fvu = mse / batch_variance(x_n)
        return self._result(fvu, {"mse": mse, "fvu": fvu}, x_hat, code)


#: Variants by class name (what :func:`load_sae` resolves the JSON's ``class`` with).
VARIANTS: dict[str, type[SparseAutoencoder]] = {
    cls.__name__: cls
    for cls in (TopKSAE, BatchTopKSAE, MatryoshkaSAE, AbsTopKSAE, TopAFASAE, ReLUSAE, JumpReLUSAE, MPSAE)
}


def save_sae(sae: SparseAutoencoder, path: str | os.PathLike) -> Path:
    """Write ``sae``'s weights and buffers (``input_scale``, thresholds, firing counters) to ``path``
    (``.safetensors``) and its class and constructor arguments beside it (``.json``), both atomically.

    Returns:
        the ``.safetensors`` path.
    """
    path = Path(path).with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
    config = {"format": FORMAT, "class": type(sae).__name__, "init_args": sae.init_args(), "weights": path.name}
    atomic_write(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))
    return path


def load_sae(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> SparseAutoencoder:
    """Re-create an SAE written by :func:`save_sae` (``path``: its ``.safetensors`` or ``.json``).

    Raises:
        UserError: a missing file, another format, an unknown class or weights that do not fit the config.
    """
    path = Path(path)
    weights, meta = path.with_suffix(".safetensors"), path.with_suffix(".json")
    for p in (weights, meta):
        if not p.is_file():
            raise UserError(f"{p} does not exist; an SAE is saved as <name>.safetensors + <name>.json together.")
    config = json.loads(meta.read_text())
    if config.get("format") != FORMAT or config.get("class") not in VARIANTS:
        raise UserError(f"{meta} is not a mim SAE config (class {config.get('class')!r}). Fix: pass a saved SAE.")
    sae = VARIANTS[config["class"]](**config["init_args"])
    try:
        sae.load_state_dict(load_file(weights, device=str(map_location)))
    except (RuntimeError, OSError) as err:
        raise UserError(f"{weights} does not fit {meta}: {err}. Fix: keep the two files of one save together.") from err
    return sae.to(map_location)
