"""BatchTopK SAE: ``k`` active latents per token on average over the batch, a global threshold at inference."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mim.sae.variants.base import (
    SAELoss,
    SparseCode,
    _check,
    batch_variance,
    squared_error,
    threshold_code,
)
from mim.sae.variants.topk import TopKSAE


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
