"""2-D (transposed) convolutions whose weight gradient on CPU is a sum of per-tap matrix products where that is faster.

On CPU, oneDNN's weight-gradient kernel is slow when the map is tiny: for SparK's ResNet-18 at 64 px
(stride-32 maps of 2x2 sites, batch 128) the weight gradient of a 512 -> 512 3x3 convolution takes several
times its forward. Written per kernel tap it is a plain matrix product. For a convolution, with ``x_ij``
the (zero-padded) input shifted by tap ``(i, j)`` and sampled at the stride, laid out as ``(B*H'*W', C_in)``
rows, and ``dY`` the ``(B*H'*W', C_out)`` output gradient: ``dW[:, :, i, j] = dY^T x_ij``. For a
transposed convolution the roles swap: the input's ``(B*H*W, C_in)`` rows against the output gradient
sampled at tap ``(i, j)``. The GEMMs cost the FLOPs of the weight gradient and run at GEMM speed.

On large maps the per-tap slices ``x_ij`` would be copies. For a stride-1 convolution the taps are constant
row offsets instead: with the input zero-padded and read as ``(B*H_p*W_p, C_in)`` rows and ``dY`` placed at the
top-left of a zero ``(B*H_p*W_p, C_out)`` matrix, tap ``(i, j)`` is the block of input rows shifted by
``d_i * W_p + d_j`` (``d`` the dilation). Rows where ``dY`` is zero (the padding band) add nothing, so each tap is
one GEMM over views, in chunks (:func:`shifted_weight_grad`). On 2 AVX2 CPU cores this beats oneDNN's
weight gradient for SparK's UNet convolutions of 96 or more input channels on maps of 28x28 and more (at 224 px,
batch 16: 192 -> 192 at 28x28 86-92 against 119-121 ms; 96 -> 96 at 56x56 92-94 against 95-153 ms, oneDNN's time
varying between runs), not on smaller maps or fewer channels (:data:`MIN_SHIFT_CHANNELS`, :data:`MIN_SHIFT_SITES`).

The forward and the input gradient stay ATen's (oneDNN / cuDNN). Only the weight gradient of a CPU (transposed)
convolution whose GEMMs have at most :data:`MAX_TAP_SITES` rows per image (output sites of a convolution, input
sites of a transposed one), or of a stride-1 ``channels_last`` convolution with at least :data:`MIN_SHIFT_CHANNELS`
input channels and :data:`MIN_SHIFT_SITES` output sites per image, ``groups == 1`` and zero padding takes this
path; everything else is ``F.conv2d`` / ``F.conv_transpose2d`` unchanged. Same values to float32 rounding (another
summation order): ``tests/test_tap_conv.py`` checks them against ATen's gradients in float64, and
``tools/bench_spark.py --official`` the whole SparK step against the official code's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.utils import _pair

#: GEMM rows per image (``H' * W'`` output sites of a convolution, ``H * W`` input sites of a transposed one)
#: up to which the weight gradient is computed per tap (CPU only). Measured on 2 CPU cores, batch 128: at
#: 2x2 and 4x4 maps the per-tap GEMMs beat oneDNN's weight gradient (512 -> 512 3x3 at 2x2: 21 against
#: 68-166 ms; 384 -> 192 at 4x4: 24 against 36 ms), at 8x8 they are level, at 16x16 and above slower.
MAX_TAP_SITES = 16
#: Input channels and output sites per image from which a stride-1 ``channels_last`` convolution's weight gradient
#: is computed by :func:`shifted_weight_grad` (CPU only). Measured on 2 CPU cores against oneDNN, 3x3 kernels
#: (``tools/bench_spark_kernels.py --table decoder``): 0.61-1.02x, mostly about 0.8x, for 96-192 input channels on
#: 56x56 and 28x28 maps (batch 16); 0.8-1.0x on 14x14 maps, level at 64 input channels; 1.2-1.5x slower on 4x4 to
#: 16x16 maps at batch 128, where oneDNN runs near its peak.
MIN_SHIFT_CHANNELS = 96
MIN_SHIFT_SITES = 28 * 28
#: Elements of the ``dY`` and input row blocks per chunk of :func:`shifted_weight_grad` (16 MiB of float32).
SHIFT_CHUNK_ELEMENTS = 1 << 22

Pair = tuple[int, int]


def conv_output_size(size: Sequence[int], kernel: Sequence[int], stride: Pair, padding: Pair, dilation: Pair) -> Pair:
    """``(H', W')`` of ``F.conv2d`` on an ``(H, W)`` map (``size``) with these ``(h, w)`` arguments."""
    return tuple(  # type: ignore[return-value]
        (n + 2 * p - d * (k - 1) - 1) // s + 1 for n, k, s, p, d in zip(size, kernel, stride, padding, dilation)
    )


def tap_weight_grad(
    rows: torch.Tensor, grid: torch.Tensor, kernel: Pair, stride: Pair, padding: tuple[Pair, Pair], dilation: Pair
) -> torch.Tensor:
    """``G[i, j] = rows^T grid_ij``, the per-tap products of both weight gradients.

    Args:
        rows: ``(B, A, h, w)`` map whose ``B*h*w`` sites are the GEMM rows (a convolution's output gradient;
            a transposed convolution's input).
        grid: ``(B, C, H, W)`` map sampled per tap (the convolution's input; the transposed convolution's
            output gradient).
        kernel, stride, dilation: ``(h, w)`` pairs; tap ``(i, j)`` reads ``grid`` at
            ``(stride * y + dilation * i - top, stride * x + dilation * j - left)`` for the site ``(y, x)`` of
            ``rows`` (zero outside ``grid``).
        padding: ``((top, bottom), (left, right))`` applied to ``grid`` first (negative crops).

    Returns:
        ``(A, C, kh, kw)`` in ``rows``' dtype.
    """
    batch, a, out_h, out_w = rows.shape
    c = grid.shape[1]
    n = batch * out_h * out_w
    lhs = rows.permute(0, 2, 3, 1).reshape(n, a).t()  # a view for channels_last maps
    (top, bottom), (left, right) = padding
    padded = F.pad(grid, (left, right, top, bottom)).permute(0, 2, 3, 1)
    grads = rows.new_empty(kernel[0], kernel[1], a, c)
    for i in range(kernel[0]):
        y0 = i * dilation[0]
        for j in range(kernel[1]):
            x0 = j * dilation[1]
            ys = slice(y0, y0 + stride[0] * (out_h - 1) + 1, stride[0])
            xs = slice(x0, x0 + stride[1] * (out_w - 1) + 1, stride[1])
            torch.mm(lhs, padded[:, ys, xs].reshape(n, c), out=grads[i, j])
    return grads.permute(2, 3, 0, 1)


def shifted_weight_grad(
    grad_out: torch.Tensor, input: torch.Tensor, kernel: Pair, padding: Pair, dilation: Pair
) -> torch.Tensor:
    """The weight gradient of a stride-1 convolution as per-tap GEMMs over shifted row blocks (module docstring).

    Args:
        grad_out: ``(B, C_out, H', W')`` output gradient.
        input: ``(B, C_in, H, W)`` input; ``channels_last`` saves a copy.
        kernel, padding, dilation: ``(h, w)`` pairs as ``F.conv2d`` takes them (stride 1).

    Returns:
        ``(C_out, C_in, kh, kw)`` in ``grad_out``'s dtype (half / bfloat16 chunks summed in float32).
    """
    batch, c_in = input.shape[:2]
    c_out, (out_h, out_w) = grad_out.shape[1], grad_out.shape[-2:]
    padded = F.pad(input, (padding[1], padding[1], padding[0], padding[0]))
    pad_h, pad_w = padded.shape[-2:]
    rows = padded.permute(0, 2, 3, 1).reshape(-1, c_in)
    grad_rows = grad_out.new_zeros(batch, pad_h, pad_w, c_out)
    grad_rows[:, :out_h, :out_w] = grad_out.permute(0, 2, 3, 1)
    grad_rows = grad_rows.view(-1, c_out)
    shifts = [i * dilation[0] * pad_w + j * dilation[1] for i in range(kernel[0]) for j in range(kernel[1])]
    acc = torch.promote_types(grad_out.dtype, torch.float32)
    grads = grad_out.new_zeros(len(shifts), c_out, c_in, dtype=acc)
    n = grad_rows.shape[0] - shifts[-1]  # the last output site reads the last input row
    step = max(1, SHIFT_CHUNK_ELEMENTS // (c_in + c_out))
    for start in range(0, n, step):
        end = min(n, start + step)
        lhs = grad_rows[start:end].t()
        for tap, shift in enumerate(shifts):
            if acc == grad_out.dtype:
                grads[tap].addmm_(lhs, rows[start + shift : end + shift])
            else:
                grads[tap] += (lhs @ rows[start + shift : end + shift]).to(acc)
    return grads.to(grad_out.dtype).view(*kernel, c_out, c_in).permute(2, 3, 0, 1)


def _shifts(input: torch.Tensor, stride: Pair, sites: int, transposed: bool) -> bool:
    """Whether this convolution's weight gradient is :func:`shifted_weight_grad`'s."""
    return (
        not transposed
        and stride == (1, 1)
        and input.shape[1] >= MIN_SHIFT_CHANNELS
        and sites >= MIN_SHIFT_SITES
        and input.is_contiguous(memory_format=torch.channels_last)
    )


def _like(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``grad`` in ``weight``'s memory format (the optimiser updates in place)."""
    nhwc = weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    return grad.contiguous(memory_format=torch.channels_last if nhwc else torch.contiguous_format)


class _TapConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Pair,
                padding: Pair, dilation: Pair, transposed: bool, output_padding: Pair) -> torch.Tensor:  # fmt: skip
        ctx.save_for_backward(input, weight)
        ctx.conf = (stride, padding, dilation, transposed, output_padding)
        ctx.has_bias = bias is not None
        if transposed:
            return F.conv_transpose2d(input, weight, bias, stride, padding, output_padding, 1, dilation)
        return F.conv2d(input, weight, bias, stride, padding, dilation)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        input, weight = ctx.saved_tensors
        stride, padding, dilation, transposed, output_padding = ctx.conf
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = torch.ops.aten.convolution_backward(
                grad_out, input, weight, None, stride, padding, dilation, transposed, output_padding, 1,
                [True, False, False],
            )[0]  # fmt: skip
        if ctx.needs_input_grad[1]:
            kernel = tuple(weight.shape[-2:])
            if _shifts(input, stride, grad_out.shape[-2] * grad_out.shape[-1], transposed):
                grad_weight = shifted_weight_grad(grad_out, input, kernel, padding, dilation)
            elif transposed:  # output (s*y - p + d*i) gets input (y) * w[:, :, i]; the bottom pad can be negative
                pads = tuple((p, p - op) for p, op in zip(padding, output_padding))
                grad_weight = tap_weight_grad(input, grad_out, kernel, stride, pads, dilation)
            else:
                grad_weight = tap_weight_grad(grad_out, input, kernel, stride, tuple((p, p) for p in padding), dilation)
            grad_weight = _like(grad_weight, weight)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum(dim=(0, 2, 3))
        return grad_input, grad_weight, grad_bias, None, None, None, None, None


def _tap_conv(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Pair, padding: Pair,
              dilation: Pair, transposed: bool, output_padding: Pair) -> torch.Tensor:  # fmt: skip
    if torch.is_autocast_enabled("cpu"):  # cast as autocast would for a convolution, then run without it
        dtype = torch.get_autocast_dtype("cpu")
        input, weight = input.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        with torch.autocast("cpu", enabled=False):
            return _TapConv2d.apply(input, weight, bias, stride, padding, dilation, transposed, output_padding)
    return _TapConv2d.apply(input, weight, bias, stride, padding, dilation, transposed, output_padding)


def _takes_tap_path(input: torch.Tensor, weight: torch.Tensor, sites: int, groups: int, shifts: bool = False) -> bool:
    return (
        torch.is_grad_enabled()
        and weight.requires_grad
        and input.device.type == "cpu"
        and input.ndim == 4
        and groups == 1
        and (sites <= MAX_TAP_SITES or shifts)
    )


def conv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: int = 1,
) -> torch.Tensor:
    """``F.conv2d`` with the same arguments, values and gradients; on CPU maps of at most :data:`MAX_TAP_SITES`
    output sites, and on large stride-1 ``channels_last`` maps of many channels (:data:`MIN_SHIFT_CHANNELS`,
    :data:`MIN_SHIFT_SITES`), its weight gradient is computed per tap (module docstring). String paddings
    (``"same"``) and grouped convolutions go to ``F.conv2d``."""
    if isinstance(padding, str):
        return F.conv2d(input, weight, bias, stride, padding, dilation, groups)
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    out = conv_output_size(input.shape[-2:], weight.shape[-2:], stride, padding, dilation)
    shifts = input.ndim == 4 and _shifts(input, stride, out[0] * out[-1], False)
    if not _takes_tap_path(input, weight, out[0] * out[-1], groups, shifts):
        return F.conv2d(input, weight, bias, stride, padding, dilation, groups)
    return _tap_conv(input, weight, bias, stride, padding, dilation, False, (0, 0))


def conv_transpose2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: Any = 1,
    padding: Any = 0,
    output_padding: Any = 0,
    groups: int = 1,
    dilation: Any = 1,
) -> torch.Tensor:
    """``F.conv_transpose2d`` with the same arguments, values and gradients; on CPU inputs of at most
    :data:`MAX_TAP_SITES` sites its weight gradient is computed per tap (module docstring)."""
    if not _takes_tap_path(input, weight, input.shape[-2] * input.shape[-1], groups):
        return F.conv_transpose2d(input, weight, bias, stride, padding, output_padding, groups, dilation)
    return _tap_conv(input, weight, bias, _pair(stride), _pair(padding), _pair(dilation), True, _pair(output_padding))


class TapConv2d(nn.Conv2d):
    """``nn.Conv2d`` running :func:`conv2d` (same arguments, parameters and state dict)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros":
            return super().forward(input)
        return conv2d(input, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class TapConvTranspose2d(nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` running :func:`conv_transpose2d` (same arguments, parameters and state dict;
    ``forward(input)`` only, no ``output_size``)."""

    def forward(self, input: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if output_size is not None:
            return super().forward(input, output_size)
        return conv_transpose2d(
            input, self.weight, self.bias, self.stride, self.padding, self.output_padding, self.groups, self.dilation
        )


__all__ = [
    "MAX_TAP_SITES",
    "MIN_SHIFT_CHANNELS",
    "MIN_SHIFT_SITES",
    "SHIFT_CHUNK_ELEMENTS",
    "TapConv2d",
    "TapConvTranspose2d",
    "conv2d",
    "conv_output_size",
    "conv_transpose2d",
    "shifted_weight_grad",
    "tap_weight_grad",
]
