"""Relaxed Archetypal SAE: a TopK SAE whose decoder atoms are convex combinations of fixed data points
(archetype candidates) plus a small, norm-bounded relaxation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mim.errors import UserError
from mim.sae.kernels import sparse_decode
from mim.sae.variants.base import (
    SAELoss,
    SparseAutoencoder,
    SparseCode,
    _check,
    _check_non_negative,
    _check_positive,
    batch_variance,
    squared_error,
)
from mim.sae.variants.msae import auxk_loss

#: How the archetype candidates ``C`` are taken from the initialisation sample.
CANDIDATES = ("kmeans", "sample")


def kmeans(points: torch.Tensor, n: int, iterations: int = 10, chunk_rows: int = 8192) -> torch.Tensor:
    """``n`` k-means centroids (n, d) of ``points`` (N, d) float32: Lloyd's iterations started at ``n`` distinct
    random points (torch's global RNG); a centroid whose cluster empties keeps its place. Distances are
    computed ``chunk_rows`` points at a time (memory ``chunk_rows * n`` floats)."""
    centroids = points[torch.randperm(len(points), device=points.device)[:n]].clone()
    for _ in range(iterations):
        sums, counts = torch.zeros_like(centroids), points.new_zeros(n)
        c_sq = centroids.pow(2).sum(1)
        for start in range(0, len(points), chunk_rows):
            block = points[start : start + chunk_rows]
            nearest = (c_sq[None, :] - 2 * block @ centroids.t()).argmin(1)  # ||p||^2 is the same for every c
            sums.index_add_(0, nearest, block)
            counts.index_add_(0, nearest, torch.ones_like(nearest, dtype=points.dtype))
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
    return centroids


class ArchetypalSAE(SparseAutoencoder):
    """Relaxed Archetypal SAE, RA-SAE (Fel et al. 2025, "Archetypal SAE: Adaptive and Stable Dictionary Learning
    for Concept Extraction in Large Vision Models", arXiv 2502.12892, Sec. 4, eq. 4), with a TopK encoder.

    Decoder (d_sae, d_model): ``W_dec = A C + Lambda``, computed from

    - ``archetypes`` ``C`` (n_candidates, d_model), a fixed buffer of data points taken in :meth:`initialize`
      from the normalised, ``b_dec``-centred sample (``x_n - b_dec``, the space the decoder writes in, since
      ``x_hat_n = W_dec^T f + b_dec``): k-means centroids (``candidates="kmeans"``, 10 Lloyd iterations; the
      paper reduces the data to k-means centroids) or a uniform random sample of the tokens (``"sample"``),
      all divided by one constant, their mean norm. The hull keeps the data's shape (a uniform scaling);
      atoms get norm about 1 like the other variants' unit-norm atoms, so the encoder's weights and Adam's
      steps have their usual scale (with the raw points, norm ~ sqrt(d_model), the same learning rate
      diverged on the quick CIFAR fit; the code's magnitudes absorb the constant);
    - ``mixing`` ``A`` (d_sae, n_candidates), row-stochastic (non-negative, rows sum to 1), so ``A C`` lies in
      the convex hull of ``C``;
    - ``relaxation`` ``Lambda`` (d_sae, d_model) with ``||Lambda_j|| <= delta``, in the units of ``C`` (mean
      candidate norm 1: ``delta = 0.1`` lets an atom leave the hull by 10 % of a typical candidate's norm).

    Both constraints are kept by projection after every optimizer step (:meth:`normalize_decoder_`, which the
    training loop calls there): ``A <- ReLU(A)`` with each row rescaled to sum 1 (a row that became all zero
    goes back to uniform), and ``Lambda_j`` scaled down to norm ``delta`` when longer (as the overcomplete
    library's ``RelaxedArchetypalDictionary``). So every atom is within ``delta`` of ``conv(C)``. The atoms are
    not unit-norm (``unit_norm_decoder = False``): their norm is that of the hull's points and the code's
    magnitudes absorb it; mim keeps no learned global scale (overcomplete multiplies by ``exp(m)``, which
    leaves the convex hull for the cone), so the hull property holds exactly.

    Initialisation: atom ``j`` starts at candidate ``perm[j mod n_candidates]`` (a random permutation), plus
    10 % of a random convex combination when ``d_sae > n_candidates`` (distinct atoms); ``Lambda = 0``; the
    encoder row ``j`` is ``W_dec_j / (k ||W_dec_j||^2)`` (so ``z_j`` starts as the coefficient of the projection on
    atom ``j`` over ``k``: the first reconstruction averages ``k`` projections instead of summing them, which
    overshoots on atoms as correlated as data points). Before :meth:`initialize` ``C`` is 0.

    Encoder and loss: ``f = ReLU(TopK_k(z))`` and ``fvu + aux_coeff * auxk`` with AuxK on dead latents, as
    :class:`~mim.sae.variants.topk.TopKSAE`. Cost: ``A C`` is a (d_sae x n_candidates x d_model) matmul, once per
    step (:meth:`loss` computes ``W_dec`` once).

    Args:
        d_model, d_sae, dead_tokens: see :class:`SparseAutoencoder`.
        k: active latents per token.
        n_candidates: number of archetype candidates (rows of ``C``); default ``min(d_sae, 4096)`` (``A`` is
            (d_sae, n_candidates) and ``A C`` costs ``d_sae * n_candidates * d_model`` per step).
        delta: bound on each relaxation row's norm, ``>= 0``, relative to the mean candidate norm (0: atoms
            exactly in ``conv(C)``); default 0.1 (mim's choice; overcomplete's default is 1.0 in raw data
            units).
        candidates: ``"kmeans"`` or ``"sample"``.
        k_aux, aux_coeff: AuxK's latents per token (default ``d_model // 2``) and coefficient (1/32).

    Raises:
        ConfigError: ``k`` outside ``[1, d_sae]``, ``n_candidates < 1``, ``delta < 0``, unknown ``candidates``,
            ``k_aux < 1``, ``aux_coeff < 0``.
        UserError (from :meth:`initialize`): a sample with fewer tokens than ``n_candidates``.
    """

    unit_norm_decoder = False

    def __init__(self, d_model: int, d_sae: int, k: int = 32, n_candidates: int | None = None, delta: float = 0.1,
                 candidates: str = "kmeans", k_aux: int | None = None, aux_coeff: float = 1 / 32,
                 dead_tokens: int = 10_000_000) -> None:
        super().__init__(d_model, d_sae, dead_tokens)
        _check(1 <= k <= d_sae, "k", k, f"be in [1, d_sae={d_sae}]", f"choose 1 <= k <= {d_sae} (or raise d_sae)")
        n_candidates = min(d_sae, 4096) if n_candidates is None else int(n_candidates)
        _check_positive("n_candidates", n_candidates, integer=True)
        _check_non_negative("delta", delta)
        _check(candidates in CANDIDATES, "candidates", candidates, f"be one of {list(CANDIDATES)}",
               "set candidates to kmeans (centroids of the sample) or sample (random sample tokens)")
        self.k_aux = k_aux if k_aux is not None else max(d_model // 2, 1)
        _check_positive("k_aux", self.k_aux, integer=True)
        _check_non_negative("aux_coeff", aux_coeff)
        self.k, self.n_candidates, self.delta, self.candidates, self.aux_coeff = (
            k, n_candidates, delta, candidates, aux_coeff)
        self.register_buffer("archetypes", torch.zeros(n_candidates, d_model))
        self.mixing = nn.Parameter(torch.zeros(d_sae, n_candidates))
        self.relaxation = nn.Parameter(torch.zeros(d_sae, d_model))
        self.reset_parameters()

    # ------------------------------------------------------------------------------------------------ set-up
    @property
    def W_dec(self) -> torch.Tensor:  # type: ignore[override]
        """(d_sae, d_model) atoms ``A C + Lambda`` (differentiable in ``A`` and ``Lambda``; not a parameter)."""
        return self.mixing @ self.archetypes + self.relaxation

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Drop the base class's free decoder, a random unit-norm encoder until :meth:`initialize`, zero biases;
        ``A`` one-hot rows (class docstring), ``Lambda = 0``."""
        self._parameters.pop("W_dec", None)  # the decoder is computed (W_dec property), not a parameter
        nn.init.kaiming_uniform_(self.W_enc, a=math.sqrt(5))
        self.W_enc.div_(self.W_enc.norm(dim=1, keepdim=True))
        self.b_enc.zero_()
        self.b_dec.zero_()
        if "mixing" not in self._parameters:  # called from the base constructor, before they exist
            return
        n = self.n_candidates
        perm = torch.randperm(n, device=self.mixing.device)
        rows = torch.arange(self.d_sae, device=self.mixing.device)
        self.mixing.zero_().index_put_((rows, perm[rows % n]), torch.tensor(1.0, device=self.mixing.device))
        if self.d_sae > n:
            noise = torch.rand_like(self.mixing)
            self.mixing.mul_(0.9).add_(0.1 * noise / noise.sum(1, keepdim=True))
        self.relaxation.zero_()

    @torch.no_grad()
    def initialize(self, sample: torch.Tensor) -> None:
        """The base initialisation (input scale, ``b_dec``), then the archetype candidates ``C`` from the
        normalised, centred ``sample`` (n, d_model) and the encoder as the decoder's pseudo-inverse rows.

        Raises:
            UserError: fewer sample tokens than ``n_candidates`` (and the base class's errors).
        """
        if sample.ndim == 2 and 0 < len(sample) < self.n_candidates:
            raise UserError(
                f"The archetypal SAE needs at least n_candidates={self.n_candidates} sample tokens to take its "
                f"archetype candidates from, got {len(sample)}. Fix: lower "
                f"--model.init_args.sae.init_args.n_candidates or raise --model.init_args.init_tokens."
            )
        super().initialize(sample)
        points = self.normalize(sample.detach().float().to(self.b_dec.device)) - self.b_dec
        if self.candidates == "kmeans":
            chosen = kmeans(points, self.n_candidates)
        else:
            chosen = points[torch.randperm(len(points), device=points.device)[: self.n_candidates]]
        self.archetypes.copy_(chosen / chosen.norm(dim=1).mean().clamp_min(1e-12))
        atoms = self.W_dec
        self.W_enc.copy_(atoms / (self.k * atoms.pow(2).sum(1, keepdim=True).clamp_min(1e-12)))

    # --------------------------------------------------------------------------------------------- inference
    def _topk(self, x_n: torch.Tensor) -> SparseCode:
        values, indices = self.select_pre_acts(x_n, lambda z: z.topk(self.k, dim=1, sorted=False))
        return SparseCode(F.relu(values), indices)

    def code(self, x_n: torch.Tensor) -> SparseCode:
        return self._topk(x_n)

    # ---------------------------------------------------------------------------------------------- training
    def loss(self, x_n: torch.Tensor) -> SAELoss:
        W_dec = self.W_dec
        code = self._topk(x_n)
        x_hat = sparse_decode(code.values, code.indices, W_dec) + self.b_dec
        mse = squared_error(x_n, x_hat)
        fvu = mse / batch_variance(x_n)
        dead = self.dead_latents()
        auxk = auxk_loss(self, x_n, x_hat, dead, W_dec) if bool(dead.any()) else torch.zeros_like(fvu)
        return self._result(fvu + self.aux_coeff * auxk, {"mse": mse, "fvu": fvu, "auxk": auxk}, x_hat, code)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Project ``A`` back to row-stochastic and clip each ``Lambda_j`` to norm ``delta`` (after the optimizer
        step; the training loop calls it there)."""
        mixing = self.mixing.clamp_min_(0)
        sums = mixing.sum(1, keepdim=True)
        empty = sums <= 0  # all-zero rows: 0 * 0 + 1/n, the others: A_j / sum + 0, in one pass over A
        torch.addcmul(empty / self.n_candidates, mixing, sums.reciprocal().masked_fill_(empty, 0), out=mixing)
        norms = self.relaxation.norm(dim=1, keepdim=True)
        self.relaxation.mul_((self.delta / norms.clamp_min(1e-30)).clamp(max=1.0))
