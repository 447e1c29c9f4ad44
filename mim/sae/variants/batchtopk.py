"""BatchTopK SAE: ``k`` active latents per token on average over the batch, a global threshold at inference."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from mim.sae.kernels import ragged_offsets
from mim.sae.variants.base import (
    RaggedCode,
    SAELoss,
    SparseCode,
    _check,
    batch_variance,
    squared_error,
    threshold_code,
)
from mim.sae.variants.batch_search import BatchSearch
from mim.sae.variants.topk import TopKSAE, aux_candidates


class BatchTopKSAE(TopKSAE, BatchSearch):
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

    Sparse training step (exact): the (N, d_sae) pre-activations never exist at once; the kept entries form a
    :class:`~mim.sae.variants.base.RaggedCode` (rows keep their own counts, which vary widely), so the decoder and
    the encoder's backward touch only them and AuxK's candidates, which come from the same encoder pass. The
    global top ``k * N`` is found by :class:`~mim.sae.variants.batch_search.BatchSearch` (a threshold search on
    CPU, a per-row candidate search with an exact fallback elsewhere).

    Precision: the pre-activations of the training code (and AuxK's) and of the inference threshold comparison
    are computed in float32 also under autocast (:meth:`SparseAutoencoder.pre_acts` with ``fp32``), and the
    ``threshold`` buffer is float32, so the estimate and its use do not depend on ``--trainer.precision``.

    Args:
        threshold_beta: EMA decay of the threshold estimate, in ``[0, 1)``.
        candidate_factor, candidate_search: the search of the sparse step (:class:`~mim.sae.variants.batch_search.
            BatchSearch`; neither changes the result).
        (others as :class:`TopKSAE`)

    Raises:
        ConfigError: ``threshold_beta`` outside ``[0, 1)``, ``candidate_factor < 1``, another
            ``candidate_search`` (and :class:`TopKSAE`'s).
    """

    def __init__(self, d_model: int, d_sae: int, k: int = 32, k_aux: int | None = None, aux_coeff: float = 1 / 32,
                 threshold_beta: float = 0.9, dead_tokens: int = 10_000_000, candidate_factor: float = 4.0,
                 candidate_search: Literal["auto", "threshold", "rows"] = "auto") -> None:
        super().__init__(d_model, d_sae, k, k_aux, aux_coeff, dead_tokens)
        _check(0 <= threshold_beta < 1, "threshold_beta", threshold_beta, "lie in [0, 1)",
               "set threshold_beta to e.g. 0.9 (0: the last batch's minimum only)")
        self.threshold_beta = threshold_beta
        self.register_buffer("threshold", torch.tensor(-1.0))
        self.register_buffer("threshold_updates", torch.tensor(0, dtype=torch.long))
        self.init_search(candidate_factor, candidate_search)

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

    def _batch_select(self, x_n: torch.Tensor, dead: torch.Tensor | None
                      ) -> tuple[RaggedCode, torch.Tensor, torch.Tensor]:
        """The exact batch top-k code as a ragged code, and AuxK's candidate values (not activated) and ids
        (``(N, 0)`` without ``dead``)."""
        k_aux = self.k_aux
        aux = None if dead is None else (lambda z: aux_candidates(z, dead, k_aux))
        rows, cols, vals, values, indices = self.batch_entries(x_n, aux)
        code = RaggedCode(vals, cols, rows, ragged_offsets(rows, len(x_n)))
        code = code._replace(values=F.relu(self.attach_ragged(x_n, code, fp32=True)))
        if dead is not None:
            values = self.attach_pre_acts(x_n, values, indices, fp32=True)
        return code, values, indices

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
