"""JumpReLU SAE: learned per-latent thresholds trained through straight-through pseudo-derivatives."""

from __future__ import annotations

import math

import torch
from torch import nn

from mim.sae.kernels import LatentSort, ragged_offsets, sampled_dots
from mim.sae.variants.base import (
    SAELoss,
    SparseAutoencoder,
    SparseCode,
    SupportStep,
    _check,
    _check_fraction,
    _check_non_negative,
    _check_positive,
    column_counts,
    dense_encoder_grads,
    host_ints,
    threshold_code,
)


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    """Rectangle kernel ``K(u) = H(u + 1/2) - H(u - 1/2)``."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


def _to_threshold(grad: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """The gradient of elementwise ``theta`` entries summed over the rows ``theta`` was broadcast along."""
    return grad.sum(0) if grad.dim() > theta.dim() else grad


class _JumpReLU(torch.autograd.Function):
    """``z * H(z - theta)``; d/dz = ``H(z - theta)``, d/dtheta = ``-(theta / eps) K((z - theta) / eps)``
    (Rajamanoharan et al. 2024, arXiv 2407.14435, eq. 11). ``theta`` is (d_sae,) against a dense ``z`` (N, d_sae),
    or has ``z``'s shape (the thresholds gathered at a padded code's ids; the gather sums the gradient)."""

    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta)

    @staticmethod
    def backward(ctx, grad):
        z, theta = ctx.saved_tensors
        grad_z = grad * (z > theta)
        grad_theta = _to_threshold(grad * -(theta / ctx.eps) * _rectangle((z - theta) / ctx.eps), theta)
        return grad_z, grad_theta, None


class _Step(torch.autograd.Function):
    """``H(z - theta)``; no gradient to ``z``, d/dtheta = ``-(1 / eps) K((z - theta) / eps)`` (eq. 12 of
    Rajamanoharan et al. 2024); shapes as :class:`_JumpReLU`."""

    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        z, theta = ctx.saved_tensors
        grad_theta = _to_threshold(grad * -(1.0 / ctx.eps) * _rectangle((z - theta) / ctx.eps), theta)
        return None, grad_theta, None


class _DenseJumpReLU(torch.autograd.Function):
    """The dense JumpReLU step, fused: ``z = (x - b_dec) W_enc^T + b_enc``, ``f = z H(z - theta)``,
    ``x_hat = f W_dec + b_dec`` and ``l0 = E_n sum_i H(z_ni - theta_i)``, with the gradients of
    :class:`_JumpReLU` and :class:`_Step` (eqs. 11-12 of Rajamanoharan et al. 2024) and of the two linear maps.

    Autograd through those Functions allocates a dozen (N, d_sae) maps (``f``, the step, both kernels' ``u``,
    their products) and computes ``d (x - b_dec) = dz W_enc``, a (N, d_sae) x (d_sae, d) matmul only ``b_dec``
    needs (its gradient is ``-(sum_n dz_n) W_enc``). Here ``f`` overwrites ``z``; the rectangle kernels' window
    ``|z - theta| < eps / 2`` is found in the forward as a list of entries (``u = (z - theta) / eps`` evaluated
    on the entries within ``eps`` of ``theta`` exactly as :func:`_rectangle` does, so the same entries); the
    backward takes the thresholds' gradient from ``df = dx_hat W_dec^T`` at the window's entries only (sampled
    dots), then makes ``df`` in row blocks through one reused buffer, masked to ``dz``, into ``dW_enc`` (and, only
    if ``x`` needs it, ``dx``) (:func:`~mim.sae.variants.base.dense_encoder_grads`); then ``dW_dec``.

    Inputs: ``x`` (N, d), ``W_enc`` (d_sae, d), ``b_enc`` (d_sae,), ``b_dec`` (d,), ``W_dec`` (d_sae, d),
    ``theta`` (d_sae,) > 0, ``eps`` (float). Returns ``x_hat`` (N, d), ``l0`` (scalar) and, without gradient,
    the firing counts (d_sae,) int64 (:func:`column_counts` of ``z > theta``) and the support size
    ``#{z > theta - eps / 2}`` (int64 scalar).
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, W_dec, theta, eps):
        x_c = x - b_dec
        z = torch.addmm(b_enc, x_c, W_enc.t())
        above = z > theta
        fired = column_counts(above)
        n_fired = fired.sum()
        rows, cols = ((z > theta - eps) & (z < theta + eps)).nonzero(as_tuple=True)  # the kernels' candidates
        z_w, theta_w = z[rows, cols], theta[cols]
        # #{z > theta - eps / 2}: the entries above theta, and those below it, which all lie in the candidates
        support = n_fired + ((z_w > theta_w - eps / 2) & (z_w <= theta_w)).sum()
        inside = _rectangle((z_w - theta_w) / eps).bool()
        rows, cols = rows[inside], cols[inside]
        f = z.masked_fill_(~above, 0.0)
        x_hat = torch.addmm(b_dec, f, W_dec)
        l0 = n_fired.to(x.dtype) / len(x)
        ctx.save_for_backward(x_c, W_enc, W_dec, theta, f, rows, cols)
        ctx.eps = eps
        ctx.mark_non_differentiable(fired, support)
        ctx.set_materialize_grads(False)  # an unused output gets None, not a zero map (handled in backward)
        return x_hat, l0, fired, support

    @staticmethod
    def backward(ctx, grad_x_hat, grad_l0, _grad_fired, _grad_support):
        x_c, W_enc, W_dec, theta, f, rows, cols = ctx.saved_tensors
        eps, n = ctx.eps, len(x_c)
        if grad_x_hat is None:
            grad_x_hat = x_c.new_zeros(x_c.shape)
        grad_x_hat = grad_x_hat.contiguous()
        grad_theta = None
        if ctx.needs_input_grad[5]:  # eq. 11 (the reconstruction through f) + eq. 12 (the L0 term), on the window
            offsets = ragged_offsets(rows, n)  # rows ascend (nonzero's order)
            per_entry = sampled_dots(grad_x_hat, W_dec, cols, offsets) * -(theta[cols] / eps)  # df at the window
            if grad_l0 is not None:
                per_entry = per_entry + grad_l0 / n * -(1.0 / eps)
            grad_theta = theta.new_zeros(theta.shape).index_add_(0, cols, per_entry)
        # d f / d z = H(z - theta): f > 0 exactly there (theta > 0)
        grad_x, grad_W_enc, grad_b_enc = dense_encoder_grads(grad_x_hat, W_dec, None, f, x_c, W_enc,
                                                             ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        grad_W_dec = f.t() @ grad_x_hat if ctx.needs_input_grad[4] else None
        grad_b_dec = grad_x_hat.sum(0) - grad_b_enc @ W_enc if ctx.needs_input_grad[3] else None
        return (grad_x, grad_W_enc, grad_b_enc if ctx.needs_input_grad[2] else None, grad_b_dec, grad_W_dec,
                grad_theta, None)


class JumpReLUSAE(SupportStep, SparseAutoencoder):
    """JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead", arXiv 2407.14435, Sec. 3-4):
    ``f = z * H(z - theta)`` with a learned threshold per latent (``theta = exp(log_threshold)``), loss =
    ``E||x_n - x_hat_n||^2 + l0_coeff * E||f||_0``. The step function has no gradient; ``theta`` learns through the
    straight-through pseudo-derivatives with a rectangle kernel of width ``bandwidth`` (eqs. 11-12); ``z`` gets
    gradient only from the reconstruction. The decoder rows are kept at unit norm (dictionary_learning's
    JumpReLU trainer does the same). The paper encodes ``x`` itself; here, as in every variant, ``b_dec`` is
    subtracted first (SAELens' default). The paper scales inputs to ``E||x||^2 = d``, this SAE to
    ``E||x|| = sqrt(d)``: about the same scale.

    ``l0_coeff`` is warmed up linearly from 0 over the first ``l0_warmup_steps`` training steps (SAELens'
    ``l0_warm_up_steps``; counted by the ``step`` buffer). Dead latents (optional, ``pre_act_coeff > 0``):
    SAELens' pre-activation loss ``pre_act_coeff * E_n sum_{j dead} ReLU(theta_j - z_nj) ||W_dec,j||``
    (:meth:`~mim.sae.variants.base.SupportStep.dead_pre_act_loss`), on the dead latents' columns only.

    Sparse training step (exact, :class:`~mim.sae.variants.base.SupportStep`): every term touches only the support
    ``S = {z > theta - bandwidth / 2}``: ``f`` is 0 and has no gradient below ``theta``, eq. 11's window
    ``|z - theta| < bandwidth / 2`` (where the reconstruction's ``d loss / d f`` reaches ``theta``) and eq. 12's
    (the L0 term's) lie inside ``S``, and ``E||f||_0`` counts entries above ``theta``. So the code holds ``S``
    (zeros in the window below ``theta``), the encoder's backward runs on ``S`` only, and the thresholds'
    gradients are summed from ``S`` (on the CPU ``S`` is compacted block by block; elsewhere a row with more
    candidates in ``S`` than the candidate width is recomputed in full). The dense step runs while ``S`` is wide
    (early in training): fused (:class:`_DenseJumpReLU`), or plain autograd under autocast. One sync per step (one
    more when a row needs the fallback).

    Precision: ``z`` is computed in float32 also under autocast (:meth:`SparseAutoencoder.pre_acts` with ``fp32``),
    as are the comparison with ``theta`` and the pseudo-derivatives; with a bf16 ``z`` the window
    ``|z - theta| < bandwidth / 2`` would hold no value once ``theta`` exceeds ~0.13 (bf16 spacing > 0.001), and
    ``theta`` would get no gradient. So this variant gains no speed from mixed precision.

    Args:
        l0_coeff: sparsity coefficient lambda.
        bandwidth: kernel width epsilon (paper: 0.001).
        init_threshold: initial theta (paper: 0.001).
        l0_warmup_steps: steps of the linear ``l0_coeff`` warm-up (0: none, SAELens' default).
        pre_act_coeff: coefficient of the dead latents' pre-activation loss (0: off, SAELens' default).
        sparse_max_fraction: the candidate width (3 x the mean support count + 16), as a fraction of ``d_sae``,
            above which the dense step runs (speed only; the result is the same).
        support_search: how the sparse step finds the support: ``"auto"``, ``"compact"`` or ``"rows"``
            (:meth:`~mim.sae.variants.base.SupportStep.init_support_search`; speed only, the same entries).
        (others as :class:`SparseAutoencoder`)

    Raises:
        ConfigError: ``l0_coeff``, ``bandwidth`` or ``init_threshold`` not > 0, ``l0_warmup_steps < 0``,
            ``pre_act_coeff < 0``, ``sparse_max_fraction`` outside ``(0, 1]`` or an unknown ``support_search``
            (and the base class's).
    """

    def __init__(self, d_model: int, d_sae: int, l0_coeff: float = 1.0, bandwidth: float = 0.001,
                 init_threshold: float = 0.001, dead_tokens: int = 10_000_000, l0_warmup_steps: int = 0,
                 pre_act_coeff: float = 0.0, sparse_max_fraction: float = 0.1, support_search: str = "auto") -> None:
        for name, value in (("l0_coeff", l0_coeff), ("bandwidth", bandwidth), ("init_threshold", init_threshold)):
            _check_positive(name, value)
        _check(l0_warmup_steps >= 0, "l0_warmup_steps", l0_warmup_steps, "be >= 0",
               "set l0_warmup_steps >= 0 (0: no warm-up)")
        _check_non_negative("pre_act_coeff", pre_act_coeff)
        _check_fraction("sparse_max_fraction", sparse_max_fraction)
        self.init_support_search(support_search)
        self.l0_coeff, self.bandwidth, self.init_threshold = l0_coeff, bandwidth, init_threshold
        self.l0_warmup_steps, self.pre_act_coeff, self.sparse_max_fraction = (
            l0_warmup_steps, pre_act_coeff, sparse_max_fraction)
        super().__init__(d_model, d_sae, dead_tokens)
        self.log_threshold = nn.Parameter(torch.full((d_sae,), math.log(init_threshold)))
        self.register_buffer("step", torch.tensor(0, dtype=torch.long))
        #: whether the last sparse training step recomputed some rows in full (diagnostics; not saved)
        self.last_fallback = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # SAEs saved before the warm-up existed have no step counter: start it at 0
        state_dict.setdefault(prefix + "step", torch.zeros((), dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def code(self, x_n: torch.Tensor) -> SparseCode:
        return threshold_code(self.pre_acts(x_n, fp32=True), self.log_threshold.float().exp())

    def loss(self, x_n: torch.Tensor) -> SAELoss:
        theta = self.log_threshold.float().exp()
        eps, dead = self.bandwidth, self.dead_latents()
        width = self.sparse_width()
        dense = code = None  # the dense step's code (or its firing counts), or the sparse step's entries
        if width is None and self.fused_dense_step(x_n):  # the dense step fused (_DenseJumpReLU)
            x_hat, l0, dense, support = _DenseJumpReLU.apply(
                x_n, self.W_enc, self.b_enc, self.b_dec, self.W_dec, theta, eps)
            nnz, n_dead = host_ints(support, dead.sum())
            self.note_support(nnz / max(len(x_n), 1))
            self.last_fallback = False
        elif width is None:  # the dense step under autocast: autograd (z and the kernels in float32)
            z = self.pre_acts(x_n, fp32=True)
            dense = _JumpReLU.apply(z, theta, eps)
            l0 = _Step.apply(z, theta, eps).sum(-1).mean()
            # the support the next step's width follows: f != 0 and the zeros within bandwidth / 2 below theta
            nnz, n_dead = host_ints((z.detach() > theta.detach() - eps / 2).sum(), dead.sum())
            self.note_support(nnz / max(len(x_n), 1))
            self.last_fallback = False
            x_hat = self.dense_decode_n(dense)
        else:  # the support z > theta - bandwidth / 2 only (exact; class docstring)
            code, n_dead = self.support_entries(x_n, theta, eps / 2, True, width, dead)
            sort = LatentSort()  # the encoder's and decoder's backwards share one sort of the entries
            z = self.attach_ragged(x_n, code, fp32=True, sort=sort)
            theta_s = theta[code.indices]  # the gather sums the entries' threshold gradients per latent
            l0 = _Step.apply(z, theta_s, eps).sum() / len(x_n)
            code = code._replace(values=_JumpReLU.apply(z, theta_s, eps))
            x_hat = self.decode_n(code, sort)
        return self.penalised_result(x_n, x_hat, "l0_penalty", l0, self.l0_coeff, self.l0_warmup_steps,
                                     lambda: self.dead_pre_act_loss(x_n, dead, n_dead, theta, True), dense, code)
