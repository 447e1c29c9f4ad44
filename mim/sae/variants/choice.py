"""Feature Choice and Mutual Choice SAEs: the token x latent matching of a batch is chosen per latent (each
latent takes its top tokens) or globally (the batch's top ``k * N`` entries), so tokens get a variable number of
latents; an auxiliary loss revives dead and under-used latents."""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from mim.sae.kernels import attach_linear_grad_ragged, ragged_decode, ragged_offsets, threshold_linear
from mim.sae.variants.base import (
    RaggedCode,
    SAELoss,
    SparseAutoencoder,
    SparseCode,
    _check,
    _check_non_negative,
    _check_positive,
    batch_variance,
    squared_error,
    threshold_code,
)
from mim.sae.variants.batch_search import BatchSearch
from mim.sae.variants.msae import auxk_loss


class _ChoiceSAE(SparseAutoencoder):
    """Shared part of :class:`FeatureChoiceSAE` and :class:`MutualChoiceSAE` (see their docstrings).

    Training code: the whole batch's pre-activations ``z`` (N, d_sae) are computed once, in float32 (also under
    autocast, since a threshold is estimated from them) and without autograd; the batch-level rule
    (:meth:`keep`) picks the entries, which stay flat (token, latent) pairs: the decoder is an ``embedding_bag``
    over each token's pairs and the encoder's backward touches only the pairs
    (:func:`~mim.sae.kernels.attach_linear_grad_ragged`), so a token with many latents costs no padding.
    ``f = ReLU(z)`` at the kept entries: an entry with ``z <= 0`` is never kept.
    """

    #: EMA decay (per training step) of each latent's firing rate, which decides "under-used"
    RATE_BETA: ClassVar[float] = 0.99

    def __init__(self, d_model: int, d_sae: int, k: int = 32, k_aux: int | None = None, aux_coeff: float = 1 / 32,
                 underused_fraction: float = 0.1, threshold_beta: float = 0.9, dead_tokens: int = 10_000_000) -> None:
        super().__init__(d_model, d_sae, dead_tokens)
        _check(1 <= k <= d_sae, "k", k, f"be in [1, d_sae={d_sae}]", f"choose 1 <= k <= {d_sae} (or raise d_sae)")
        self.k_aux = k_aux if k_aux is not None else max(d_model // 2, 1)
        _check_positive("k_aux", self.k_aux, integer=True)
        _check_non_negative("aux_coeff", aux_coeff)
        _check(0 <= underused_fraction < 1, "underused_fraction", underused_fraction, "lie in [0, 1)",
               "set underused_fraction to e.g. 0.1 (0: the auxiliary loss sees dead latents only, plain AuxK)")
        _check(0 <= threshold_beta < 1, "threshold_beta", threshold_beta, "lie in [0, 1)",
               "set threshold_beta to e.g. 0.9 (0: the last batch's estimate only)")
        self.k, self.aux_coeff = k, aux_coeff
        self.underused_fraction, self.threshold_beta = underused_fraction, threshold_beta
        self.register_buffer("firing_rate", torch.full((d_sae,), k / d_sae))

    # ------------------------------------------------------------------------------------ rules (subclasses)
    def expected_rate(self) -> torch.Tensor:
        """(d_sae,) float: each latent's expected firing rate (fraction of tokens); they sum to ``k``."""
        return torch.full_like(self.firing_rate, self.k / self.d_sae)

    def keep(self, z: torch.Tensor) -> torch.Tensor:
        """(N, d_sae) bool: the batch-level matching on pre-activations ``z`` (N, d_sae), no gradient."""
        raise NotImplementedError

    def _update_threshold(self, cols: torch.Tensor, values: torch.Tensor) -> None:
        """Update the inference threshold from a training batch's kept pairs (latent ``cols``, ``values``)."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------------- training
    def batch_pairs(self, x_n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The training code of a batch ``x_n`` (N, d_model) as flat (token, latent) pairs: ``rows``, ``cols``
        (P,) int64 in token-major order, ``offsets`` (N,) int64 (each token's first pair) and ``values`` (P,)
        float32 ``= ReLU(z)`` there, differentiable in ``W_enc``, ``b_enc`` and ``b_dec``. ``z`` is computed
        once, in float32 (also under autocast) and without autograd; the backward touches only the P pairs
        (:func:`~mim.sae.kernels.attach_linear_grad_ragged`). Updates the inference threshold in training."""
        with self.encoder_args(x_n, True) as (x, W, b, c):
            with torch.no_grad():
                z = F.linear(x - c, W, b)
                rows, cols = (self.keep(z) & (z > 0)).nonzero(as_tuple=True)
                offsets = torch.searchsorted(rows, torch.arange(len(z), device=z.device))
            values = attach_linear_grad_ragged(x, W, b, z[rows, cols], cols, rows, offsets, center=c)
        if self.training:
            self._update_threshold(cols, values.detach())
        return rows, cols, offsets, values

    def _pairs(self, x_n: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, z: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`batch_pairs`'s result from kept pairs found without autograd (``rows`` ascending, ``z > 0``)."""
        code = RaggedCode(z, cols, rows, ragged_offsets(rows, len(x_n)))
        values = self.attach_ragged(x_n, code, fp32=True)  # every kept z is > 0: ReLU(z) = z
        if self.training:
            self._update_threshold(cols, values.detach())
        return rows, cols, code.offsets, values

    def batch_code(self, x_n: torch.Tensor) -> SparseCode:
        """:meth:`batch_pairs` as a padded :class:`SparseCode` (width = the largest count of a token)."""
        rows, cols, offsets, values = self.batch_pairs(x_n)
        counts = torch.bincount(rows, minlength=len(x_n))
        width = int(counts.max()) if len(rows) else 0
        slots = torch.arange(len(rows), device=rows.device) - offsets[rows]
        padded = values.new_zeros(len(x_n), width).index_put((rows, slots), values)
        return SparseCode(padded, cols.new_zeros(len(x_n), width).index_put_((rows, slots), cols))

    def aux_candidates(self) -> torch.Tensor:
        """(d_sae,) bool: dead latents and under-used ones (firing-rate EMA below ``underused_fraction`` times
        :meth:`expected_rate`), the latents the auxiliary loss trains."""
        return self.dead_latents() | (self.firing_rate < self.underused_fraction * self.expected_rate())

    def loss(self, x_n: torch.Tensor) -> SAELoss:
        _, cols, offsets, values = self.batch_pairs(x_n)
        x_hat = ragged_decode(values, cols, offsets, self.W_dec) + self.b_dec
        mse = squared_error(x_n, x_hat)
        fvu = mse / batch_variance(x_n)
        candidates = self.aux_candidates()
        aux = auxk_loss(self, x_n, x_hat, candidates) if bool(candidates.any()) else torch.zeros_like(fvu)
        terms = {"mse": mse, "fvu": fvu, "auxk": aux, "aux_latents": candidates.sum().float()}
        fired = torch.bincount(cols, minlength=self.d_sae)
        l0 = torch.tensor(len(cols) / max(len(x_n), 1), device=x_n.device)
        return SAELoss(fvu + self.aux_coeff * aux, terms, x_hat, fired, l0)

    @torch.no_grad()
    def update_firing(self, fired: torch.Tensor, tokens: int) -> None:
        super().update_firing(fired, tokens)
        self.firing_rate.lerp_(fired.to(self.firing_rate.dtype) / max(tokens, 1), 1 - self.RATE_BETA)

    # ---------------------------------------------------------------------------------------------- inference
    def _topk_code(self, x_n: torch.Tensor) -> SparseCode:
        """Per-token TopK (``ReLU(TopK_k(z))``): the inference code until a training step set a threshold."""
        values, indices = self.select_pre_acts(x_n, lambda z: z.topk(self.k, dim=1, sorted=False))
        return SparseCode(F.relu(values), indices)

    def _ema(self, old: torch.Tensor, new: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
        """Plain mean over the first ``1 / (1 - threshold_beta)`` updates, then an EMA (as BatchTopKSAE)."""
        rate = torch.clamp(1.0 / updates.clamp_min(1).to(old.dtype), min=1 - self.threshold_beta)
        return torch.lerp(old.clamp_min(0), new, rate)


class FeatureChoiceSAE(_ChoiceSAE):
    """Feature Choice SAE (Ayonrinde 2024, "Adaptive Sparse Allocation with Mutual Choice & Feature Choice Sparse
    Autoencoders", arXiv 2411.02124, Sec. 3): each latent picks the tokens of the batch it matches best, at most
    its capacity ``m_j``, as expert-choice routing picks tokens per expert; a token keeps every latent that
    picked it, so tokens get a variable number of latents, ``k`` on average.

    Capacity (per batch of ``N`` tokens): ``m_j = k * N * s_j`` rounded to integers that sum to exactly ``k * N``
    (floors, then one more token for the largest remainders, ties broken at random), with shares ``s_j``
    uniform (``1 / d_sae``: ``m = k * N / d_sae`` tokens per latent) by default, or Zipf-distributed
    ``s_j ~ (j + 1) ** -zipf_exponent`` (the paper fits a Zipf law to feature densities; latent 0 gets the
    largest share). The capacity *covers the batch* when no latent is owed more tokens than the batch holds,
    ``k * max_j s_j <= 1``; otherwise the budget ``k * N`` cannot be spent and construction fails. A latent keeps
    fewer than ``m_j`` tokens only where fewer than ``m_j`` of its pre-activations are positive.

    Auxiliary loss: AuxK (Gao et al. 2024, Sec. 2.4) over dead latents *and* under-used ones, those whose firing
    rate (EMA over steps, decay :attr:`RATE_BETA`) is below ``underused_fraction`` of the expected rate
    ``k * s_j`` -- mim's reading of the paper's ``aux_zipf_loss``, which extends ``aux_k_loss`` from dead to
    under-used features measured against the Zipf fit of feature densities (the paper's exact form and
    coefficient were not reproduced here; coefficient 1/32 as AuxK). A feature-choice latent fires on its full
    capacity whenever its pre-activations are positive, so the term mostly stays 0.

    Inference (a token must not depend on its batch): each latent's own threshold ``theta_j`` (buffer
    ``latent_thresholds``), an estimate of
    its smallest kept activation in training (plain mean over the first ``1 / (1 - threshold_beta)``
    updates of that latent, then an EMA), ``f_j = z_j * (z_j > theta_j)`` (a JumpReLU with per-latent
    thresholds, so each latent keeps its expected capacity; the paper does not specify an inference rule, this
    is mim's analogue of BatchTopK's threshold). A latent never kept in training stays off; before the first
    training step inference is per-token TopK.

    Training code: after the first step, each latent's top tokens come from a pool of the entries near its
    previous cut (:meth:`_search_pairs`: exact, with a whole-column fallback per latent, and without the
    (N, d_sae) pre-activations); :meth:`keep` is the dense form of the same rule (and the first step's).

    Args:
        d_model, d_sae, dead_tokens: see :class:`SparseAutoencoder`.
        k: average active latents per token (the batch budget is ``k * N``).
        zipf_exponent: 0 for uniform capacities, > 0 for Zipf shares.
        k_aux, aux_coeff: the auxiliary loss's latents per token and coefficient.
        underused_fraction: a latent firing below this fraction of its expected rate is under-used.
        threshold_beta: EMA decay of the inference thresholds, in ``[0, 1)``.

    Raises:
        ConfigError: ``k`` outside ``[1, d_sae]``, ``zipf_exponent < 0``, capacities that do not cover the batch
            (``k * max_j s_j > 1``), ``k_aux < 1``, ``aux_coeff < 0``, ``underused_fraction`` outside
            ``[0, 1)``, ``threshold_beta`` outside ``[0, 1)``.
    """

    def __init__(self, d_model: int, d_sae: int, k: int = 32, zipf_exponent: float = 0.0, k_aux: int | None = None,
                 aux_coeff: float = 1 / 32, underused_fraction: float = 0.1, threshold_beta: float = 0.9,
                 dead_tokens: int = 10_000_000) -> None:
        super().__init__(d_model, d_sae, k, k_aux, aux_coeff, underused_fraction, threshold_beta, dead_tokens)
        _check_non_negative("zipf_exponent", zipf_exponent)
        self.zipf_exponent = zipf_exponent
        share = self.capacity_shares()
        top = k * float(share.max())
        _check(top <= 1 + 1e-9, "zipf_exponent", zipf_exponent,
               f"give capacities that cover the batch (k * largest share <= 1), but latent 0 would need "
               f"{top:.3g} x the batch's tokens", "lower zipf_exponent or k (0: uniform capacities k * N / d_sae)")
        self.register_buffer("latent_thresholds", torch.full((d_sae,), -1.0))
        self.register_buffer("latent_threshold_updates", torch.zeros(d_sae, dtype=torch.long))

    def capacity_shares(self) -> torch.Tensor:
        """(d_sae,) float64 shares ``s_j`` of the batch budget (sum 1): uniform, or Zipf with ``zipf_exponent``."""
        ranks = torch.arange(1, self.d_sae + 1, dtype=torch.float64)
        weights = ranks.pow(-float(self.zipf_exponent))
        return weights / weights.sum()

    def capacities(self, tokens: int) -> torch.Tensor:
        """(d_sae,) int64 capacities ``m_j`` of a batch of ``tokens`` tokens, summing to ``k * tokens``."""
        exact = self.k * tokens * self.capacity_shares()
        m = exact.floor()
        rest = round(self.k * tokens - float(m.sum()))
        if rest > 0:
            m[(exact - m + 1e-9 * torch.rand_like(exact)).topk(rest).indices] += 1
        return m.clamp(max=tokens).long().to(self.firing_rate.device)

    def expected_rate(self) -> torch.Tensor:
        return (self.k * self.capacity_shares()).to(self.firing_rate)

    def keep(self, z: torch.Tensor) -> torch.Tensor:
        m = self.capacities(len(z))
        m_max = int(m.max())
        keep = torch.zeros_like(z, dtype=torch.bool)
        if m_max == 0:
            return keep
        top = z.t().topk(m_max, dim=1, sorted=True).indices  # (d_sae, m_max): each latent's best tokens
        within = torch.arange(m_max, device=z.device)[None, :] < m[:, None]
        return keep.t().scatter_(1, top, within).t()

    #: ``tau_j`` of the training search is ``(1 - cut_margin)`` times latent ``j``'s previous cut
    cut_margin = 0.1

    def batch_pairs(self, x_n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        pairs = self._search_pairs(x_n)
        return super().batch_pairs(x_n) if pairs is None else self._pairs(x_n, *pairs)

    @torch.no_grad()
    def _search_pairs(self, x_n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """:meth:`keep`'s pairs (the same, up to ties) without the (N, d_sae) pre-activations: ``rows``, ``cols``,
        ``z`` (token-major), or ``None`` before the first training step.

        With the previous training batch's cut of each latent (its smallest kept activation), the encoder pass
        (:func:`~mim.sae.kernels.threshold_linear`, 1024 tokens at a time) keeps every ``z[n, j] >= tau_j =
        (1 - cut_margin) * cut_j``. A latent with at least ``m_j`` of these has all its top ``m_j`` tokens among
        them, which a top-``m`` over a (d_sae, widest count) matrix finds; the others (the cut fell, or the latent
        kept nothing last time) take the top ``m_j`` of their whole column, recomputed (``last_full_latents``
        counts them, diagnostics).
        """
        cut = getattr(self, "_latent_cut", None)
        if cut is None or cut.device != x_n.device:
            self.last_full_latents = self.d_sae
            return None
        n, m = len(x_n), self.capacities(len(x_n))
        with self.encoder_args(x_n, True) as (x, W, b, c):
            centred = x - c
            tok, lat, z = threshold_linear(centred, W, b, (1 - self.cut_margin) * cut)[:3]
            order = lat.argsort(stable=True)
            tok, lat, z = tok[order], lat[order], z[order]
            counts = torch.bincount(lat, minlength=self.d_sae)
            slot = torch.arange(len(lat), device=lat.device) - (counts.cumsum(0) - counts)[lat]
            width = min(int(counts.max()) if len(lat) else 0, n)
            pool = z.new_full((self.d_sae, width), -math.inf).index_put_((lat, slot), z)
            pool_tok = tok.new_zeros(self.d_sae, width).index_put_((lat, slot), tok)
            top = pool.topk(min(int(m.max()), width), dim=1, sorted=True).indices
            rank = torch.arange(top.shape[1], device=top.device)[None, :]
            j, r = ((rank < m[:, None]) & (counts >= m)[:, None]).nonzero(as_tuple=True)
            cols, slots = j, top[j, r]
            rows, z = pool_tok[cols, slots], pool[cols, slots]
            full = (counts < m).nonzero().squeeze(1)
            self.last_full_latents = len(full)
            if len(full):
                m_full = m[full]
                z_full = torch.addmm(b[full], centred, W[full].t()).t()  # (latents, N)
                top_v, top_i = z_full.topk(int(m_full.max()), dim=1, sorted=True)
                rank = torch.arange(top_i.shape[1], device=top_i.device)[None, :]
                j, r = ((rank < m_full[:, None]) & (top_v > 0)).nonzero(as_tuple=True)
                rows, cols, z = torch.cat([rows, top_i[j, r]]), torch.cat([cols, full[j]]), torch.cat([z, top_v[j, r]])
        order = (rows * self.d_sae + cols).argsort()
        return rows[order], cols[order], z[order]

    @torch.no_grad()
    def _update_threshold(self, cols: torch.Tensor, values: torch.Tensor) -> None:
        lowest = torch.full_like(self.latent_thresholds, math.inf)
        lowest.scatter_reduce_(0, cols, values.to(self.latent_thresholds), "amin")
        self._latent_cut = lowest  # the training search's next tau (not saved)
        seen = torch.isfinite(lowest)
        self.latent_threshold_updates.add_(seen.long())
        new = self._ema(self.latent_thresholds, lowest.masked_fill(~seen, 0), self.latent_threshold_updates)
        self.latent_thresholds.copy_(torch.where(seen, new, self.latent_thresholds))

    def code(self, x_n: torch.Tensor) -> SparseCode:
        if not bool((self.latent_threshold_updates > 0).any()):
            return self._topk_code(x_n)
        theta = self.latent_thresholds.masked_fill(self.latent_threshold_updates == 0, math.inf)
        return threshold_code(F.relu(self.pre_acts(x_n, fp32=True)), theta)


class MutualChoiceSAE(_ChoiceSAE, BatchSearch):
    """Mutual Choice SAE (Ayonrinde 2024, arXiv 2411.02124, Sec. 3): the batch's whole sparsity budget is
    allocated freely, the ``k * N`` largest entries of the token x latent matrix ``ReLU(z)`` of a batch of ``N``
    tokens stay active (no per-token or per-latent limit; the same training code as BatchTopK, Bussmann et al.
    2024), so exactly ``k * N`` entries are active whenever that many pre-activations are positive.

    Auxiliary loss: as :class:`FeatureChoiceSAE` (AuxK over dead and under-used latents, expected rate
    ``k / d_sae`` each). Inference: one global threshold, an estimate of the batch's smallest kept activation
    (plain mean over the first ``1 / (1 - threshold_beta)`` batches, then an EMA), ``f = z * (z > theta)``, as
    :class:`~mim.sae.variants.batchtopk.BatchTopKSAE` (mim's choice: the paper gives no inference rule);
    per-token TopK until the first training step.

    Training code: BatchTopK's exact sparse search (:class:`~mim.sae.variants.batch_search.BatchSearch`), so the
    (N, d_sae) pre-activations never exist at once (:meth:`keep` is the dense form of the same rule).

    Args:
        d_model, d_sae, dead_tokens: see :class:`SparseAutoencoder`.
        k: average active latents per token (the batch budget is ``k * N``).
        k_aux, aux_coeff, underused_fraction, threshold_beta: as :class:`FeatureChoiceSAE`.
        candidate_factor, candidate_search: the search of the training code (:class:`~mim.sae.variants.
            batch_search.BatchSearch`; neither changes the result).

    Raises:
        ConfigError: ``k`` outside ``[1, d_sae]``, ``k_aux < 1``, ``aux_coeff < 0``, ``underused_fraction`` or
            ``threshold_beta`` outside ``[0, 1)``, ``candidate_factor < 1``, another ``candidate_search``.
    """

    def __init__(self, d_model: int, d_sae: int, k: int = 32, k_aux: int | None = None, aux_coeff: float = 1 / 32,
                 underused_fraction: float = 0.1, threshold_beta: float = 0.9, dead_tokens: int = 10_000_000,
                 candidate_factor: float = 4.0,
                 candidate_search: Literal["auto", "threshold", "rows"] = "auto") -> None:
        super().__init__(d_model, d_sae, k, k_aux, aux_coeff, underused_fraction, threshold_beta, dead_tokens)
        self.register_buffer("threshold", torch.tensor(-1.0))
        self.register_buffer("threshold_updates", torch.tensor(0, dtype=torch.long))
        self.init_search(candidate_factor, candidate_search)

    def batch_pairs(self, x_n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._pairs(x_n, *self.batch_entries(x_n)[:3])

    def keep(self, z: torch.Tensor) -> torch.Tensor:
        budget = min(self.k * len(z), z.numel())
        flat = z.flatten().topk(budget, sorted=False).indices
        return torch.zeros(z.numel(), dtype=torch.bool, device=z.device).index_fill_(0, flat, True).view_as(z)

    @torch.no_grad()
    def _update_threshold(self, cols: torch.Tensor, values: torch.Tensor) -> None:
        if not len(values):
            return
        self.threshold_updates.add_(1)
        self.threshold.copy_(self._ema(self.threshold, values.min().to(self.threshold), self.threshold_updates))

    def code(self, x_n: torch.Tensor) -> SparseCode:
        if int(self.threshold_updates) == 0:
            return self._topk_code(x_n)
        return threshold_code(self.pre_acts(x_n, fp32=True), self.threshold)
