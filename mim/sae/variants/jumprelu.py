"""JumpReLU SAE: learned per-latent thresholds trained through straight-through pseudo-derivatives."""

from __future__ import annotations

import math

import torch
from torch import nn

from mim.sae.variants.base import (
    SAELoss,
    SparseAutoencoder,
    SparseCode,
    _check_positive,
    squared_error,
    support_code,
    threshold_code,
)


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
