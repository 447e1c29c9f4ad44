"""Matryoshka SAE (nested dictionary prefixes) on the BatchTopK code."""

from __future__ import annotations

import itertools

import torch

from mim.sae.kernels import sparse_decode
from mim.sae.variants.base import (
    SparseCode,
    _check,
    batch_variance,
    squared_error,
)
from mim.sae.variants.batchtopk import BatchTopKSAE


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
