"""2-D convolution computed at the active sites only: gathered input patches times the weight matrix (CPU).

SparK's encoder (Tian et al., ICLR 2023, arXiv 2301.03580, Sec. 3.1) needs each convolution's output at the
active (visible) sites only. The official code convolves the whole zero-filled map and re-masks it
(``pretrain/encoder.py``, ``SparseConv2d``), so at mask ratio 0.6 it computes 2.5x the outputs it keeps. Here
the ``N`` active output sites are computed alone:

- forward: the ``kh*kw`` input sites each active output site reads are gathered from the ``channels_last``
  map's ``(B*H*W, C)`` rows into an ``(N, kh*kw*C)`` matrix (im2col restricted to the active sites; taps in
  the zero padding read zeros), multiplied by the ``(kh*kw*C, C_out)`` weight matrix in one GEMM, and
  scattered into a zero ``(B, C_out, H', W')`` map;
- backward: with ``dY`` the ``(N, C_out)`` output gradient at the active sites, the weight gradient is
  ``dY^T cols`` and the input gradient ``dY W^T`` added back to the rows it was gathered from
  (``index_add_``).

This is the gather-GEMM-scatter dataflow of sparse-convolution libraries (spconv; TorchSparse, Tang et al.,
MLSys 2022, Sec. 3) with the official masked convolution's semantics: inactive neighbours are read from the
map as they are. The output, the weight and bias gradients and the input gradient (everywhere, inactive sites
next to active ones included) equal those of ``F.conv2d(x, w, b, ...) * sites`` up to summation order
(``tests/test_active_conv.py``, in float64). The rows are processed in chunks of
:data:`CHUNK_ELEMENTS` gathered elements, so the gathered matrix stays small and in cache.

Measured on 2 CPU cores at mask ratio 0.6 (forward + backward, ``tools/bench_spark_kernels.py``): ResNet-18's
20 encoder convolutions take 0.49-0.53x the time of the dense convolution plus re-masking at 224 px (batch 16,
0.4 of the sites active), 0.61x at 64 px (batch 128, 0.5 active); with every site active the GEMMs take 1.1-1.3x
oneDNN's, hence :data:`MAX_ACTIVE_FRACTION`. The SparK step against the official one: ``docs/benchmarks.md``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch.autograd.function import once_differentiable

from mim.backbones.tap_conv import Pair, _like

#: Gathered elements (rows x ``kh*kw*C``) per chunk: 4 MiB of float32. Measured on 2 CPU cores, 1 Mi elements
#: was as fast as or faster than 0.5, 2, 4 Mi and the whole matrix at once, for every ResNet-18 stage.
CHUNK_ELEMENTS = 1 << 20
#: Largest fraction of active output sites for which the gathered GEMM is used; above it, ATen's dense
#: convolution (plus re-masking) is as fast (with all sites active the GEMMs take 1.1-1.3x oneDNN's time).
MAX_ACTIVE_FRACTION = 0.75


class SiteIndex(NamedTuple):
    """Where the active output sites of one convolution read their input.

    Attributes:
        index: ``(N, kh*kw)`` int64, the input row (``(b*H + y)*W + x``) each active output site reads per tap,
            taps in row-major ``(i, j)`` order; 0 for taps in the padding.
        padding_taps: int64 positions in ``index.flatten()`` of the taps in the padding, ascending.
        out_index: ``(N,)`` int64, the output row (``(b*H' + y')*W' + x'``) of each active site, ascending.
        chunks: ``(start, end, lo, hi)`` per chunk of output sites: ``padding_taps[lo:hi]`` fall in it.
        out_size: ``(B, H', W')``.
    """

    index: torch.Tensor
    padding_taps: torch.Tensor
    out_index: torch.Tensor
    chunks: list[tuple[int, int, int, int]]
    out_size: tuple[int, int, int]

    @property
    def fraction(self) -> float:
        """Active output sites over all output sites."""
        batch, height, width = self.out_size
        return self.out_index.numel() / max(1, batch * height * width)


def site_index(
    sites: torch.Tensor, in_size: Pair, kernel: Pair, stride: Pair, padding: Pair, dilation: Pair, channels: int
) -> SiteIndex:
    """The gather indices of a convolution whose output is wanted at ``sites`` only.

    Args:
        sites: ``(B, 1, H', W')`` bool, the active output sites (``H'``, ``W'`` the convolution's output size).
        in_size: ``(H, W)`` of the input map.
        kernel, stride, padding, dilation: ``(h, w)`` pairs as ``F.conv2d`` takes them.
        channels: input channels ``C`` (sets the chunk length).

    Returns:
        :class:`SiteIndex` on ``sites``' device.
    """
    batch, _, out_h, out_w = sites.shape
    height, width = in_size
    b, y, x = sites[:, 0].nonzero(as_tuple=True)
    taps = kernel[0] * kernel[1]
    dev = sites.device
    tap_y = torch.arange(kernel[0], device=dev).repeat_interleave(kernel[1]) * dilation[0]
    tap_x = torch.arange(kernel[1], device=dev).repeat(kernel[0]) * dilation[1]
    in_y = (y * stride[0] - padding[0])[:, None] + tap_y
    in_x = (x * stride[1] - padding[1])[:, None] + tap_x
    inside = (in_y >= 0) & (in_y < height) & (in_x >= 0) & (in_x < width)
    index = torch.where(inside, (b[:, None] * height + in_y) * width + in_x, 0)
    padding_taps = (~inside).flatten().nonzero().flatten()
    n = index.shape[0]
    step = max(1, CHUNK_ELEMENTS // (taps * channels))
    starts = list(range(0, n, step))
    bounds = torch.searchsorted(padding_taps, torch.tensor([*starts, n], device=dev) * taps).tolist()
    chunks = [(a, min(n, a + step), bounds[i], bounds[i + 1]) for i, a in enumerate(starts)]
    return SiteIndex(index, padding_taps, (b * out_h + y) * out_w + x, chunks, (batch, out_h, out_w))


def _gather(rows: torch.Tensor, sites: SiteIndex, start: int, end: int, lo: int, hi: int) -> torch.Tensor:
    """``(end - start, kh*kw*C)`` input patches of output sites ``start:end``, zeros for taps in the padding."""
    cols = rows.index_select(0, sites.index[start:end].flatten())
    if hi > lo:
        cols.index_fill_(0, sites.padding_taps[lo:hi] - start * sites.index.shape[1], 0)
    return cols.view(end - start, -1)


class _ActiveConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                sites: SiteIndex) -> torch.Tensor:  # fmt: skip
        channels, out_channels = input.shape[1], weight.shape[0]
        rows = input.permute(0, 2, 3, 1).reshape(-1, channels)  # a view of a channels_last map
        wmat = weight.permute(0, 2, 3, 1).reshape(out_channels, -1)  # (C_out, kh*kw*C), taps then channels
        batch, out_h, out_w = sites.out_size
        out = input.new_zeros(batch * out_h * out_w, out_channels)
        for start, end, lo, hi in sites.chunks:
            cols = _gather(rows, sites, start, end, lo, hi)
            res = cols @ wmat.t() if bias is None else torch.addmm(bias, cols, wmat.t())
            out.index_copy_(0, sites.out_index[start:end], res)
        ctx.save_for_backward(input, weight)
        ctx.sites, ctx.has_bias = sites, bias is not None
        return out.view(batch, out_h, out_w, out_channels).permute(0, 3, 1, 2)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        input, weight = ctx.saved_tensors
        sites: SiteIndex = ctx.sites
        batch, channels, height, width = input.shape
        out_channels = weight.shape[0]
        rows = input.permute(0, 2, 3, 1).reshape(-1, channels)
        grad_rows = grad_out.permute(0, 2, 3, 1).reshape(-1, out_channels)  # copies unless channels_last
        wmat = weight.permute(0, 2, 3, 1).reshape(out_channels, -1)
        acc = torch.promote_types(input.dtype, torch.float32)  # half / bfloat16 sums accumulate in float32
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = ctx.has_bias and ctx.needs_input_grad[2]
        grad_x = input.new_zeros(batch * height * width, channels, dtype=acc) if need_x else None
        grad_w = weight.new_zeros(out_channels, wmat.shape[1], dtype=acc) if need_w else None
        grad_b = weight.new_zeros(out_channels, dtype=acc) if need_b else None
        for start, end, lo, hi in sites.chunks:
            g = grad_rows.index_select(0, sites.out_index[start:end])
            if need_w:
                grad_w += (g.t() @ _gather(rows, sites, start, end, lo, hi)).to(acc)
            if need_x:
                grad_cols = (g @ wmat).view(-1, channels)
                if hi > lo:  # taps in the padding were gathered from row 0: they must not land there
                    grad_cols.index_fill_(0, sites.padding_taps[lo:hi] - start * sites.index.shape[1], 0)
                grad_x.index_add_(0, sites.index[start:end].flatten(), grad_cols.to(acc))
            if need_b:
                grad_b += g.sum(dim=0, dtype=acc)
        if grad_x is not None:
            grad_x = grad_x.to(input.dtype).view(batch, height, width, channels).permute(0, 3, 1, 2)
        if grad_w is not None:  # (C_out, kh, kw, C) memory: channels_last
            grad_w = grad_w.to(weight.dtype).view(out_channels, *weight.shape[2:], channels).permute(0, 3, 1, 2)
            grad_w = _like(grad_w, weight)
        if grad_b is not None:
            grad_b = grad_b.to(weight.dtype)
        return grad_x, grad_w, grad_b, None


def takes_active_path(input: torch.Tensor, weight: torch.Tensor, padding: Any, groups: int) -> bool:
    """Whether :func:`active_conv2d` can run this ``F.conv2d`` call: a CPU ``channels_last`` 4-D input, one
    group, numeric padding, input and weight of one dtype (under CPU autocast: after the cast)."""
    return (
        input.device.type == "cpu"
        and input.ndim == 4
        and groups == 1
        and not isinstance(padding, str)
        and input.is_contiguous(memory_format=torch.channels_last)
        and (torch.is_autocast_enabled("cpu") or input.dtype == weight.dtype)
    )


def active_conv2d(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, sites: SiteIndex
) -> torch.Tensor:
    """``F.conv2d(input, weight, bias, ...) * mask`` computed at the active output sites only (module docstring).

    Args:
        input: ``(B, C, H, W)`` float on CPU, ``channels_last`` (:func:`takes_active_path`).
        weight: ``(C_out, C, kh, kw)``, ``bias``: ``(C_out,)`` or ``None``; under CPU autocast all three are cast
            to its dtype, as ``F.conv2d`` would be.
        sites: :func:`site_index` of this convolution (stride, padding and dilation are in it).

    Returns:
        ``(B, C_out, H', W')`` ``channels_last``, zero outside the active sites.
    """
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        input, weight = input.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        with torch.autocast("cpu", enabled=False):
            return _ActiveConv2d.apply(input, weight, bias, sites)
    return _ActiveConv2d.apply(input, weight, bias, sites)


__all__ = ["CHUNK_ELEMENTS", "MAX_ACTIVE_FRACTION", "SiteIndex", "active_conv2d", "site_index", "takes_active_path"]
