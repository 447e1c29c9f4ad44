"""Matryoshka SAE (Bussmann et al. 2025): nested dictionary prefixes on the BatchTopK code."""

from __future__ import annotations

import itertools
from typing import Literal

import torch

from mim.sae.kernels import ragged_decode, ragged_offsets
from mim.sae.variants.base import (
    RaggedCode,
    SparseCode,
    _check,
    batch_variance,
    squared_error,
)
from mim.sae.variants.batchtopk import BatchTopKSAE


class MatryoshkaSAE(BatchTopKSAE):
    """Matryoshka SAE (Bussmann, Nabeshima, Karvonen & Nanda 2025, "Learning Multi-Level Features with Matryoshka
    Sparse Autoencoders", arXiv 2503.17547, Sec. 3): the loss averages the reconstruction losses of nested
    prefixes of the dictionary, so the first latents must reconstruct on their own (coarse features first).
    Built on :class:`BatchTopKSAE` as Bussmann et al.: one BatchTopK code (its exact sparse step); the prefix
    ``m`` reconstruction keeps only its latents ``< m`` (plus ``b_dec``).

    The loss is the **mean** of the prefixes' FVUs, as the authors' code (bartbussmann/matryoshka_sae,
    ``GlobalBatchTopKMatryoshkaSAE.get_loss_dict``) averages its prefix losses, so AuxK's coefficient keeps
    its weight relative to the reconstruction (a sum would scale the reconstruction by the prefix count).
    Differences: that code also counts the ``b_dec``-only reconstruction as one more term of its mean (here
    ``b_dec`` starts at the geometric median and is trained by the prefixes only), and SAELens'
    ``MatryoshkaBatchTopKTrainingSAE`` sums instead. (Nesting over the number of active latents instead of the
    dictionary is MSAE, Zaigrajew et al. 2025, a different variant.)

    Args:
        prefixes: increasing prefix sizes ending at ``d_sae``; default ``d_sae/16, /8, /4, /2, d_sae``.
        (others as :class:`BatchTopKSAE`)

    Raises:
        ConfigError: empty ``prefixes``, prefixes below 1, not strictly increasing or not ending at ``d_sae``
            (and :class:`BatchTopKSAE`'s).
    """

    def __init__(self, d_model: int, d_sae: int, k: int = 32, prefixes: list[int] | None = None,
                 k_aux: int | None = None, aux_coeff: float = 1 / 32, threshold_beta: float = 0.9,
                 dead_tokens: int = 10_000_000, candidate_factor: float = 4.0,
                 candidate_search: Literal["auto", "threshold", "rows"] = "auto") -> None:
        super().__init__(d_model, d_sae, k, k_aux, aux_coeff, threshold_beta, dead_tokens, candidate_factor,
                         candidate_search)
        if prefixes is None:
            prefixes = sorted({max(d_sae // 2**i, 1) for i in range(4, -1, -1)})
        prefixes = [int(p) for p in prefixes]
        example = sorted({max(d_sae // 2**i, 1) for i in range(3, -1, -1)})
        _check(bool(prefixes) and prefixes[0] >= 1 and prefixes[-1] == d_sae
               and all(b > a for a, b in itertools.pairwise(prefixes)),
               "prefixes", prefixes, f"increase strictly and end at d_sae={d_sae} (sizes >= 1)",
               f"e.g. prefixes {example}, or leave prefixes unset for d_sae/16, /8, /4, /2, d_sae")
        self.prefixes = prefixes

    def prefix_reconstructions(self, code: SparseCode | RaggedCode) -> list[torch.Tensor]:
        """``x_hat_n`` of each prefix (N, d_model), in the order of :attr:`prefixes`.

        One ``embedding_bag`` over the code's entries, with one bag per (prefix group, token) (the entries sorted
        by that key, so each group's partial reconstructions are one contiguous (N, d_model) block), and running
        sums over the groups: the work of one decode, not one per prefix. (Plain additions, not ``cumsum``
        over a middle dimension, whose backward flips the whole (N, groups, d_model) gradient twice.)"""
        if isinstance(code, RaggedCode):
            values, indices, rows = code.values, code.indices, code.rows
        else:
            rows = torch.arange(len(code.values), device=code.values.device).repeat_interleave(code.values.shape[1])
            values, indices = code.values.reshape(-1), code.indices.reshape(-1)
        n, groups = len(code.offsets) if isinstance(code, RaggedCode) else len(code.values), len(self.prefixes)
        bounds = torch.tensor(self.prefixes, device=indices.device)
        keys = torch.bucketize(indices, bounds, right=True) * n + rows  # latent j < prefixes[g] -> group <= g
        order = keys.argsort(stable=True)
        keys = keys[order]
        parts = ragged_decode(values[order], indices[order], ragged_offsets(keys, n * groups), self.W_dec)
        x_hat, *rest = parts.view(groups, n, -1).unbind(0)
        x_hats = [x_hat + self.b_dec]
        for part in rest:
            x_hats.append(x_hats[-1] + part)
        return x_hats

    def reconstruction_losses(self, x_n: torch.Tensor, code: SparseCode | RaggedCode
                              ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        variance = batch_variance(x_n)
        x_hats = self.prefix_reconstructions(code)
        errors = [squared_error(x_n, x_hat) for x_hat in x_hats]
        fvus = [error / variance for error in errors]
        terms = {f"fvu_prefix_{m}": fvu for m, fvu in zip(self.prefixes, fvus)}
        return torch.stack(fvus).mean(), x_hats[-1], {"mse": errors[-1], "fvu": fvus[-1], **terms}
