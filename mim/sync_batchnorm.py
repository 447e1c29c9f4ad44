"""Batch normalisation whose training statistics span all DDP ranks, on any device (CPU/gloo included).

``torch.nn.SyncBatchNorm`` refuses CPU tensors; this one reduces the counts, moments and gradient sums across
ranks (in :func:`mim.backbones.sparse.masked_batch_norm` with every site active, or in the fused path below), so
it is exactly ``BatchNorm`` over the batch of all ranks together. SparK's decoder uses it (the official code
converts its decoder to ``SyncBatchNorm`` under DDP, keyu-tian/SparK ``pretrain/main.py``), and so does the
online probe's head.

On CPU ``channels_last`` maps it also trains faster than ``nn.BatchNorm2d``: ATen's ``channels_last`` kernels
loop over the ``B*H*W`` rows a few channels at a time, so SparK's last decoder blocks (12-48 channels on
32x32-64x64 maps) took up to 50-60 ms per norm and step on 2 cores. Here the map is read as a ``(B*H*W, C)``
matrix, folded to 192 columns, and every sum is one vectorised pass (``benchmarks.md``: "The decoder's batch
norm as a (B*H*W, C) matrix").
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from mim.backbones.sparse import _all_reduce_, _distributed, _eval_bn_backward, masked_batch_norm, update_running_stats

#: Columns the ``(B*H*W, C)`` rows are folded to (``C`` times a power of two, while it divides ``B*H*W``).
FOLD_COLUMNS = 192


def _fold(rows: int, channels: int) -> int:
    """How many rows of a ``(rows, channels)`` matrix to put side by side (a power of two dividing ``rows``)."""
    fold = 1
    while fold * channels < FOLD_COLUMNS and rows % (2 * fold) == 0:
        fold *= 2
    return fold


class _RowsBatchNorm(torch.autograd.Function):
    """Training-mode batch norm of a ``channels_last`` ``(B, C, H, W)`` map read as its ``(M, C)`` matrix of
    ``M = B*H*W`` rows, optionally clamped (ReLU6 = clamp to [0, 6]).

    Forward: ``mean = sum(x) / M``, ``var = sum(x * (x - mean)) / M`` (two passes, biased),
    ``y = clamp(x * a + (bias - mean * a))`` with ``a = weight / sqrt(var + eps)``. Backward, the
    ``BatchNorm1d`` gradient of ``g = dy * (lo < y < hi)``: ``dx = a * g - a * invstd**2 * sum(g * (x - mean))
    / M * (x - mean) - a * sum(g) / M``, ``dweight = invstd * sum(g * (x - mean))``, ``dbias = sum(g)``. Both
    sums come from one pass of ATen's eval-mode batch-norm backward
    (:func:`mim.backbones.sparse._eval_bn_backward`) on the matrix folded to ``(M / f, f * C)``, then summed
    over the ``f`` copies of each channel; under ``sync`` ``M`` and the sums are reduced across ranks, as
    ``SyncBatchNorm`` does. Each pass allocates one map at most: on CPU a fresh map of 32 MiB or more is
    mapped anew by glibc and costs a page fault per 4 KiB (in-place ``ReLU6`` after a norm clones its input
    under autograd, hence the fused clamp).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                sync: bool, clamp: tuple[float, float] | None) -> tuple[torch.Tensor, ...]:  # fmt: skip
        rows, channels = x.numel() // x.shape[1], x.shape[1]
        fold = _fold(rows, channels)
        folded = _matrix(x, fold)
        count, total = x.new_full((1,), rows), folded.sum(0).view(fold, channels).sum(0)
        if sync:
            total, count = _all_reduce_(torch.cat([total, count])).split([channels, 1])
        mean = total / count
        sq = _eval_bn_backward(folded, folded, None, [False, True, False], mean.repeat(fold))[1]
        sq = sq.view(fold, channels).sum(0)
        var = (_all_reduce_(sq) if sync else sq) / count
        invstd = torch.rsqrt(var + eps)
        scale = invstd if weight is None else invstd * weight
        shift = -mean * scale if bias is None else bias - mean * scale
        out = torch.empty_like(x)  # channels_last, and not a view
        torch.addcmul(shift.to(x.dtype).repeat(fold), folded, scale.to(x.dtype).repeat(fold), out=_matrix(out, fold))
        if clamp is not None:
            out.clamp_(*clamp)
        ctx.save_for_backward(x, mean, invstd, weight, count, out if clamp is not None else None)
        ctx.fold, ctx.sync, ctx.clamp = fold, sync, clamp
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(mean, var, count)
        return out, mean, var, count

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor, *_: Any) -> tuple[Any, ...]:
        x, mean, invstd, weight, count, out = ctx.saved_tensors
        fold, channels = ctx.fold, x.shape[1]
        a = invstd if weight is None else invstd * weight
        grad_out = grad_out.to(x.dtype).contiguous(memory_format=torch.channels_last)
        if ctx.clamp is not None:  # a fresh map: it becomes the input gradient in place
            grad_out = torch.ops.aten.hardtanh_backward(grad_out, out, *ctx.clamp)
        _, sum_gc, sum_g = _eval_bn_backward(
            _matrix(grad_out, fold), _matrix(x, fold), None, [False, True, True], mean.to(x.dtype).repeat(fold)
        )
        sums = torch.stack([sum_g, sum_gc]).view(2, fold, channels).sum(1)
        grad_weight = grad_bias = None
        if weight is not None and ctx.needs_input_grad[1]:  # from this rank's sums, as DDP averages them itself
            grad_weight = (sums[1] * invstd).to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = sums[0].to(ctx.bias_dtype, copy=True)
        if ctx.sync:
            _all_reduce_(sums)
        k1 = -a * invstd.square() * sums[1] / count
        k0 = -a * sums[0] / count - k1 * mean  # k1 * (x - mean) = k1 * x - k1 * mean
        k1, k0, a = (t.to(x.dtype).repeat(fold) for t in (k1, k0, a))
        if ctx.clamp is not None:
            grad_x = _matrix(grad_out, fold)
            torch.addcmul(k0, grad_x, a, out=grad_x)
        else:
            grad_x = torch.addcmul(k0, _matrix(grad_out, fold), a)
        grad_x.addcmul_(_matrix(x, fold), k1)
        batch, _, height, width = x.shape
        return (grad_x.view(batch, height, width, channels).permute(0, 3, 1, 2), grad_weight, grad_bias, None, None,
                None)  # fmt: skip


class SyncedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """``BatchNorm1d`` / ``BatchNorm2d`` (same arguments, same state dict) that, in training under an
    initialised process group of more than one rank, normalises with the statistics of all ranks' batches
    and updates the running statistics with them (unbiased variance, as ``nn.BatchNorm2d``). Outside
    DDP, and in eval mode, it computes plain ``BatchNorm`` (in training on CPU ``channels_last`` maps with the
    faster fused passes described in the module docstring, equal to ATen's to rounding).

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype: as ``nn.BatchNorm2d``.
        clamp: ``(min, max)`` to clamp the output to, fused into the norm (``(0.0, 6.0)`` = BN then ReLU6), or
            ``None``.

    Input: ``(N, C)`` or ``(N, C, H, W)`` float (statistics in float32, or float64 for float64 input; output in
    the input's dtype, ``channels_last`` kept). Every rank must call it the same number of times per step (it is
    a collective under DDP).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device: Any = None, dtype: Any = None, *,
                 clamp: tuple[float, float] | None = None) -> None:  # fmt: skip
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.clamp = None if clamp is None else (float(clamp[0]), float(clamp[1]))

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.clamp is None else f", clamp={self.clamp}")

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in (2, 4):
            raise ValueError(f"SyncedBatchNorm expects (N, C) or (N, C, H, W) input, got {tuple(input.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        sync = self.training and self.track_running_stats and _distributed()
        rows = self.training and x.dim() == 4 and x.device.type == "cpu" and _channels_last(x)
        if not (sync or rows):
            return self._clamp(super().forward(x))
        factor = 0.0 if self.momentum is None else self.momentum  # as nn.BatchNorm2d
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        if not rows:  # NCHW or (N, C) under DDP
            x4 = x if x.dim() == 4 else x[:, :, None, None]
            sites = x4.new_ones(x4.shape[0], 1, *x4.shape[2:])
            out = masked_batch_norm(x4, sites, self.running_mean, self.running_var, self.weight, self.bias,
                                    factor, self.eps, sync=True).to(x.dtype)
            return self._clamp(out if x.dim() == 4 else out[:, :, 0, 0])
        compute = torch.promote_types(x.dtype, torch.float32)  # float32 statistics for half / bfloat16 inputs
        out, mean, var, count = _RowsBatchNorm.apply(x.to(compute), self.weight, self.bias, self.eps, sync,
                                                     self.clamp)  # fmt: skip
        if self.track_running_stats:
            update_running_stats(self.running_mean, self.running_var, mean, var, count, factor)
        return out.to(x.dtype)

    def _clamp(self, out: torch.Tensor) -> torch.Tensor:
        return out if self.clamp is None else F.hardtanh(out, *self.clamp)

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """``module`` with every ``nn.BatchNorm1d/2d`` replaced by a :class:`SyncedBatchNorm` holding the same
        parameters and buffers (in place for children; returns the converted root)."""
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and not isinstance(module, cls):
            like = next(iter(module.state_dict().values()), None)  # keep the dtype and device
            factory = {} if like is None else {"dtype": like.dtype, "device": like.device}
            synced = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                         **factory)  # fmt: skip
            synced.load_state_dict(module.state_dict())
            synced.train(module.training)
            return synced
        for name, child in module.named_children():
            setattr(module, name, cls.convert(child))
        return module


def _matrix(x: torch.Tensor, fold: int) -> torch.Tensor:
    """The ``(B*H*W / fold, fold * C)`` view of a ``channels_last`` ``(B, C, H, W)`` map (no copy)."""
    return x.permute(0, 2, 3, 1).view(-1, fold * x.shape[1])


def _channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


__all__ = ["FOLD_COLUMNS", "SyncedBatchNorm"]
