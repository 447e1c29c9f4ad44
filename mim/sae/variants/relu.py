"""ReLU SAE with the decoder-norm-weighted L1 penalty."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mim.sae.kernels import LatentSort
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


class _DenseReLUL1(torch.autograd.Function):
    """The dense ReLU-L1 step, fused: ``f = ReLU((x - b_dec) W_enc^T + b_enc)``, ``x_hat = f W_dec + b_dec``,
    ``l1 = E_n sum_i f_ni norms_i``, with a hand-written backward equal to autograd's (float32).

    Autograd through the same ops allocates a fresh (N, d_sae) map per elementwise op (``relu``, ``f * norms``, the
    L1 gradient's broadcast, ``relu``'s backward) and computes ``d (x - b_dec) = dz W_enc``, a third
    (N, d_sae) x (d_sae, d) matmul of the backward, although only ``b_dec`` needs it: its gradient is
    ``-(sum_n dz_n) W_enc``, a vector-matrix product. Here the forward makes one (N, d_sae) map (``f``, ReLU in
    place) and the backward none: ``dz = (dx_hat W_dec^T + dl1 / N * norms) * (f > 0)`` goes in row blocks through
    one reused buffer into ``dW_enc = dz^T (x - b_dec)`` and, only if ``x`` needs a gradient, ``dz W_enc``
    (:func:`dense_encoder_grads`); then ``dW_dec = f^T dx_hat``.

    Inputs: ``x`` (N, d), ``W_enc`` (d_sae, d), ``b_enc`` (d_sae,), ``b_dec`` (d,), ``W_dec`` (d_sae, d), ``norms``
    (d_sae,) (the decoder row norms, differentiable upstream), all of one float dtype. Returns ``x_hat`` (N, d),
    ``l1`` (scalar) and, without gradient, the firing counts (d_sae,) int64 (:func:`column_counts` of ``f > 0``).
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, W_dec, norms):
        x_c = x - b_dec
        f = torch.addmm(b_enc, x_c, W_enc.t()).relu_()
        fired = column_counts(f)
        f_sum = f.sum(0)
        x_hat = torch.addmm(b_dec, f, W_dec)
        l1 = f_sum.dot(norms) / len(x)
        ctx.save_for_backward(x_c, W_enc, W_dec, norms, f, f_sum)
        ctx.mark_non_differentiable(fired)
        ctx.set_materialize_grads(False)  # an unused output gets None, not a zero map (handled in backward)
        return x_hat, l1, fired

    @staticmethod
    def backward(ctx, grad_x_hat, grad_l1, _grad_fired):
        x_c, W_enc, W_dec, norms, f, f_sum = ctx.saved_tensors
        if grad_x_hat is None:
            grad_x_hat = x_c.new_zeros(x_c.shape)
        grad_x_hat = grad_x_hat.contiguous()
        scale = (grad_l1 if grad_l1 is not None else x_c.new_zeros(())) / len(x_c)
        grad_x, grad_W_enc, grad_b_enc = dense_encoder_grads(grad_x_hat, W_dec, norms * scale, f, x_c, W_enc,
                                                             ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        grad_W_dec = f.t() @ grad_x_hat if ctx.needs_input_grad[4] else None
        grad_b_dec = grad_x_hat.sum(0) - grad_b_enc @ W_enc if ctx.needs_input_grad[3] else None
        grad_norms = f_sum * scale if ctx.needs_input_grad[5] else None
        return grad_x, grad_W_enc, grad_b_enc if ctx.needs_input_grad[2] else None, grad_b_dec, grad_W_dec, grad_norms


class ReLUSAE(SupportStep, SparseAutoencoder):
    """ReLU SAE with the L1 penalty weighted by decoder norms (Conerly et al. 2024, "Circuits Updates – April
    2024", transformer-circuits.pub/2024/april-update, "Training SAEs"): ``f = ReLU(z)``, loss =
    ``E||x_n - x_hat_n||^2 + l1_coeff * E sum_i f_i ||W_dec,i||``. The decoder is not norm-constrained (the
    penalty makes shrinking it useless); its rows start at norm ``decoder_init_norm`` (0.1; the update draws
    them with norms 0.05-1). ``l1_coeff`` is warmed up linearly over the first ``l1_warmup_steps`` steps
    of training (the update: the first 5 %), counted by the SAE's ``step`` buffer. The update encodes ``x``
    itself and starts ``b_dec`` at 0; here, as in every variant, ``b_dec`` (the geometric median) is
    subtracted first (module docstring).

    Dead latents (optional, ``pre_act_coeff > 0``): SAELens' pre-activation loss
    (:meth:`~mim.sae.variants.base.SupportStep.dead_pre_act_loss` with threshold 0),
    ``pre_act_coeff * E_n sum_{j dead} ReLU(-z_nj) ||W_dec,j||``, on the dead latents' columns only.

    Sparse training step (exact, :class:`~mim.sae.variants.base.SupportStep`): the positive entries of ``z``
    (compacted block by block on the CPU; elsewhere from row-wise candidates, rows with more recomputed in full),
    the decoder, the L1 term and the encoder's backward only at them; the dense step while the code is dense (the
    candidate width for the mean positive count above ``sparse_max_fraction * d_sae``): fused
    (:class:`_DenseReLUL1`), or plain autograd under autocast. One sync per step (one more when a row needs the
    fallback).

    Args:
        l1_coeff: the sparsity coefficient lambda (the update used 5 with ``E||x|| = sqrt(d)``).
        l1_warmup_steps: steps of the linear lambda warm-up (0: none).
        pre_act_coeff: coefficient of the dead latents' pre-activation loss (0: off, SAELens' default).
        sparse_max_fraction: the candidate width (3 x the mean positive count + 16), as a fraction of ``d_sae``,
            above which the dense step runs (speed only; the result is the same).
        support_search: how the sparse step finds the support: ``"auto"``, ``"compact"`` or ``"rows"``
            (:meth:`~mim.sae.variants.base.SupportStep.init_support_search`; speed only, the same entries).
        (others as :class:`SparseAutoencoder`)

    Raises:
        ConfigError: ``l1_coeff <= 0``, ``l1_warmup_steps < 0``, ``pre_act_coeff < 0``, ``sparse_max_fraction``
            outside ``(0, 1]`` or an unknown ``support_search`` (and the base class's).
    """

    unit_norm_decoder = False

    def __init__(self, d_model: int, d_sae: int, l1_coeff: float = 5.0, l1_warmup_steps: int = 0,
                 dead_tokens: int = 10_000_000, pre_act_coeff: float = 0.0, sparse_max_fraction: float = 0.1,
                 support_search: str = "auto") -> None:
        _check_positive("l1_coeff", l1_coeff)
        _check(l1_warmup_steps >= 0, "l1_warmup_steps", l1_warmup_steps, "be >= 0",
               "set l1_warmup_steps >= 0 (0: no warm-up)")
        _check_non_negative("pre_act_coeff", pre_act_coeff)
        _check_fraction("sparse_max_fraction", sparse_max_fraction)
        self.init_support_search(support_search)
        self.l1_coeff, self.l1_warmup_steps = l1_coeff, l1_warmup_steps
        self.pre_act_coeff, self.sparse_max_fraction = pre_act_coeff, sparse_max_fraction
        super().__init__(d_model, d_sae, dead_tokens)
        self.register_buffer("step", torch.tensor(0, dtype=torch.long))
        #: whether the last sparse training step recomputed some rows in full (diagnostics; not saved)
        self.last_fallback = False

    def decoder_init_norm(self) -> float:
        return 0.1

    def code(self, x_n: torch.Tensor) -> SparseCode:
        return threshold_code(self.pre_acts(x_n), 0.0)

    def loss(self, x_n: torch.Tensor) -> SAELoss:
        dead = self.dead_latents()
        norms = self.W_dec.norm(dim=1)
        width = self.sparse_width()
        dense = code = None  # the dense step's code (or its firing counts), or the sparse step's entries
        if width is None and self.fused_dense_step(x_n):  # the dense step fused (_DenseReLUL1)
            x_hat, l1, dense = _DenseReLUL1.apply(x_n, self.W_enc, self.b_enc, self.b_dec, self.W_dec, norms)
            nnz, n_dead = host_ints(dense.sum(), dead.sum())
            self.note_support(nnz / max(len(x_n), 1))
            self.last_fallback = False
        elif width is None:  # the dense step under autocast: autograd, the encoder matmul in the autocast dtype
            dense = F.relu(self.pre_acts(x_n))
            nnz, n_dead = host_ints((dense.detach() > 0).sum(), dead.sum())
            l1 = (dense * norms).sum(-1).mean()
            self.note_support(nnz / max(len(x_n), 1))
            self.last_fallback = False
            x_hat = self.dense_decode_n(dense)
        else:  # the positive entries only (exact; class docstring)
            code, n_dead = self.support_entries(x_n, None, 0.0, False, width, dead)
            sort = LatentSort()  # the encoder's and decoder's backwards share one sort of the entries
            code = code._replace(values=F.relu(self.attach_ragged(x_n, code, sort=sort)))
            l1 = (code.values * norms[code.indices]).sum() / len(x_n)
            x_hat = self.decode_n(code, sort)
        return self.penalised_result(x_n, x_hat, "l1", l1, self.l1_coeff, self.l1_warmup_steps,
                                     lambda: self.dead_pre_act_loss(x_n, dead, n_dead, None, False), dense, code)
