"""BatchTopK SAE: ``k`` active latents per token on average over the batch, a global threshold at inference."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mim.sae.kernels import ragged_offsets
from mim.sae.variants.base import (
    RaggedCode,
    SAELoss,
    SparseCode,
    _check,
    _without_autocast,
    batch_variance,
    host_ints,
    squared_error,
    threshold_code,
)
from mim.sae.variants.topk import TopKSAE, aux_candidates


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
    loss are :class:`TopKSAE`'s. The estimate stays on the device (no sync).

    Sparse training step (exact): the (N, d_sae) pre-activations never exist at once. The encoder pass
    (:func:`~mim.sae.kernels.select_linear`, no autograd) keeps each row's ``m = ceil(candidate_factor * k)``
    largest pre-activations as candidates (and, with dead latents, AuxK's candidates in the same pass); the
    global top ``k * N`` of their ReLU is taken, at cut value ``t`` (the ``k*N``-th largest candidate). A row's
    other entries are at most its ``m``-th candidate, so the selection equals the dense one unless some row's
    ``m``-th candidate is positive and ``>= t`` (checked exactly, every step). Those rows (the fallback, per row)
    are recomputed in full and join the pool with all their entries, and the top ``k * N`` is taken again: the
    other rows' entries outside their candidates are below ``t``, which is at most the true cut, so the pool
    holds every winner. The kept entries form a :class:`~mim.sae.variants.base.RaggedCode` (rows keep their own
    counts, which vary widely), so the decoder and the encoder's backward touch only them and AuxK's
    candidates. The step reads two integers to the host (the overflowing rows and the entries: one sync on an
    accelerator); the fallback reads once more.

    Precision: the pre-activations of the training code (and AuxK's) and of the inference threshold comparison
    are computed in float32 also under autocast (:meth:`SparseAutoencoder.pre_acts` with ``fp32``), and the
    ``threshold`` buffer is float32, so the estimate and its use do not depend on ``--trainer.precision``.

    Args:
        threshold_beta: EMA decay of the threshold estimate, in ``[0, 1)``.
        candidate_factor: candidates per row of the sparse step, as a multiple of ``k`` (>= 1; a larger factor
            makes the fallback rarer and the common step slower; it never changes the result).
        (others as :class:`TopKSAE`)

    Raises:
        ConfigError: ``threshold_beta`` outside ``[0, 1)``, ``candidate_factor < 1`` (and :class:`TopKSAE`'s).
    """

    def __init__(self, d_model: int, d_sae: int, k: int = 32, k_aux: int | None = None, aux_coeff: float = 1 / 32,
                 threshold_beta: float = 0.9, dead_tokens: int = 10_000_000, candidate_factor: float = 4.0) -> None:
        super().__init__(d_model, d_sae, k, k_aux, aux_coeff, dead_tokens)
        _check(0 <= threshold_beta < 1, "threshold_beta", threshold_beta, "lie in [0, 1)",
               "set threshold_beta to e.g. 0.9 (0: the last batch's minimum only)")
        _check(candidate_factor >= 1, "candidate_factor", candidate_factor, "be >= 1 (candidates per row / k)",
               "set candidate_factor to e.g. 4")
        self.threshold_beta, self.candidate_factor = threshold_beta, candidate_factor
        self.register_buffer("threshold", torch.tensor(-1.0))
        self.register_buffer("threshold_updates", torch.tensor(0, dtype=torch.long))
        #: whether the last training code needed the exact fallback (diagnostics; not saved)
        self.last_fallback = False

    def code(self, x_n: torch.Tensor) -> SparseCode:
        if float(self.threshold) < 0:
            return super().code(x_n)
        return threshold_code(self.pre_acts(x_n, fp32=True), self.threshold)

    def batch_code(self, x_n: torch.Tensor) -> SparseCode:
        """The training code: top ``k * N`` of ``ReLU(z)`` over the batch (rows padded to the largest count);
        ``z`` in float32 (class docstring). Updates the threshold estimate in training mode."""
        code = self._batch_select(x_n, None)[0]
        if self.training:
            self._update_threshold(code)
        return code.to_padded()

    def _candidates(self, x_n: torch.Tensor, m: int, dead: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row the ``m`` largest ``z`` (float32), then AuxK's candidates (with ``dead``): values and ids."""
        k_aux = self.k_aux

        def select(z: torch.Tensor) -> torch.Tensor:
            top = z.topk(m, dim=1, sorted=False).indices
            return top if dead is None else torch.cat([top, aux_candidates(z, dead, k_aux)], dim=1)

        return self.select_pre_acts(x_n, select, fp32=True)

    def _batch_select(self, x_n: torch.Tensor, dead: torch.Tensor | None
                      ) -> tuple[RaggedCode, torch.Tensor, torch.Tensor]:
        """The exact batch top-k code from row candidates (class docstring) as a ragged code, and AuxK's
        candidate values (not activated) and ids (``(N, 0)`` without ``dead``)."""
        n, kn = len(x_n), self.k * len(x_n)
        m = min(self.d_sae, math.ceil(self.candidate_factor * self.k))
        with torch.no_grad():
            values, indices = self._candidates(x_n, m, dead)
            f = F.relu(values[:, :m])
            top = f.flatten().topk(min(kn, f.numel()), sorted=False)
            cut = top.values.min() if top.values.numel() else f.new_tensor(math.inf)
            keep = torch.zeros(f.numel(), dtype=torch.bool, device=f.device).index_fill_(0, top.indices, True)
            keep = keep.view_as(f) & (f > 0)
            last = f.min(1).values  # each row's m-th candidate bounds its other entries
            over = (last > 0) & (last >= cut) if m < self.d_sae else torch.zeros_like(last, dtype=torch.bool)
            n_over, nnz = host_ints(over.sum(), keep.sum())
            self.last_fallback = n_over > 0
            if not n_over:
                rows, slots = torch.nonzero_static(keep, size=nnz).unbind(1)
                cols, vals = indices[rows, slots], values[rows, slots]
            else:  # rows that may hold more winners than m: their whole rows join the pool, the cut is redone
                rows_o = torch.nonzero_static(over, size=n_over).squeeze(1)
                with _without_autocast(x_n.device):
                    z_o = F.linear(x_n[rows_o].float() - self.b_dec.float(), self.W_enc.float(), self.b_enc.float())
                pool = torch.cat([f.masked_fill(over[:, None], 0).flatten(), F.relu(z_o).flatten()])
                top = pool.topk(min(kn, pool.numel()), sorted=False)
                chosen = top.indices[top.values > 0]  # the fallback's own sync
                first = chosen < f.numel()
                pos, pos_o = chosen[first], chosen[~first] - f.numel()
                rows = torch.cat([pos // m, rows_o[pos_o // self.d_sae]])
                cols = torch.cat([indices[:, :m].flatten()[pos], pos_o % self.d_sae])
                vals = torch.cat([values[:, :m].flatten()[pos], z_o.flatten()[pos_o]])
                order = rows.argsort(stable=True)
                rows, cols, vals = rows[order], cols[order], vals[order]
        code = RaggedCode(vals, cols, rows, ragged_offsets(rows, n))
        code = code._replace(values=F.relu(self.attach_ragged(x_n, code, fp32=True)))
        aux_values, aux_indices = values[:, m:], indices[:, m:]
        if dead is not None:
            aux_values = self.attach_pre_acts(x_n, aux_values, aux_indices, fp32=True)
        return code, aux_values, aux_indices

    @torch.no_grad()
    def _update_threshold(self, code: SparseCode | RaggedCode) -> None:
        """Average the batch's smallest kept activation into :attr:`threshold` (no sync; a batch that kept
        nothing leaves it unchanged)."""
        kept_min = code.values.detach().float().masked_fill(code.values <= 0, math.inf).amin() \
            if code.values.numel() else code.values.new_tensor(math.inf, dtype=torch.float32)
        has = torch.isfinite(kept_min)
        self.threshold_updates.add_(has.long())
        rate = (1.0 / self.threshold_updates.clamp_min(1).float()).clamp_min(1 - self.threshold_beta)
        new = torch.lerp(self.threshold.clamp_min(0), kept_min.where(has, 0.0).to(self.threshold.dtype), rate)
        self.threshold.copy_(torch.where(has, new, self.threshold))

    def reconstruction_losses(self, x_n: torch.Tensor, code: SparseCode | RaggedCode
                              ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """``(loss, x_hat_n, terms)`` of the reconstruction (Matryoshka overrides it)."""
        x_hat = self.decode_n(code)
        mse = squared_error(x_n, x_hat)
        fvu = mse / batch_variance(x_n)
        return fvu, x_hat, {"mse": mse, "fvu": fvu}

    def loss(self, x_n: torch.Tensor) -> SAELoss:
        dead = self.step_dead_latents()
        code, aux_values, aux_indices = self._batch_select(x_n, dead)
        if self.training:
            self._update_threshold(code)
        loss, x_hat, terms = self.reconstruction_losses(x_n, code)
        auxk = torch.zeros_like(loss)
        if dead is not None:
            auxk = self.dead_auxk(x_n, x_hat, F.relu(aux_values), aux_indices, dead)
        return self._result(loss + self.aux_coeff * auxk, {**terms, "auxk": auxk}, x_hat, code)
