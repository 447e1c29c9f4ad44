"""Matching-pursuit SAE: a tied-weight, unrolled greedy encoder on the decoder atoms."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mim.sae.variants.base import (
    SAELoss,
    SparseAutoencoder,
    SparseCode,
    _check_positive,
    batch_variance,
    squared_error,
)


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
        """Matching pursuit for ``steps`` (default :attr:`steps`) steps on normalised inputs ``x_n``.

        The correlations ``<r, W_dec,j>`` with every atom only choose the atom: they run without autograd (as
        SAELens' matching-pursuit SAE), and the coefficient is recomputed as ``<r, W_dec,j>`` with the chosen
        atom alone, so the backward touches ``steps`` atoms per token instead of a dense (N, d_sae) gradient.
        The loss and gradients equal plain autograd through the full correlations (only the chosen entry of
        each row carries gradient there too)."""
        residual = x_n - self.b_dec
        values, indices = [], []
        for _ in range(self.steps if steps is None else steps):
            with torch.no_grad():
                index = (residual.detach() @ self.W_dec.detach().t()).argmax(dim=1)
            atom = self.W_dec[index]  # (N, d): a differentiable gather of the chosen atoms
            value = F.relu((residual * atom).sum(1, keepdim=True))
            residual = residual - value * atom
            values.append(value)
            indices.append(index[:, None])
        if not values:
            return SparseCode(x_n.new_zeros(len(x_n), 0), torch.zeros(len(x_n), 0, dtype=torch.long))
        return SparseCode(torch.cat(values, 1), torch.cat(indices, 1))

    def loss(self, x_n: torch.Tensor) -> SAELoss:
        code = self.code(x_n)
        x_hat = self.decode_n(code)
        mse = squared_error(x_n, x_hat)
        fvu = mse / batch_variance(x_n)
        return self._result(fvu, {"mse": mse, "fvu": fvu}, x_hat, code)
