"""The ``spconv`` backend of :class:`mim.backbones.sparse.SparseEncoder`: true sparse convolution.

Each dense ``conv2d`` of the timm model becomes, on the active sites only, a spconv submanifold
convolution (stride 1, "same" padding: output sites = input sites) or a strided sparse convolution
whose output is then restricted to the active set at the output scale (SparK, Tian et al. 2023,
arXiv 2301.03580, Sec. 3.1: the encoder "only operates on" the non-masked sites). The weights are
the timm ``nn.Conv2d`` weights themselves (permuted to spconv's ``(out, kh, kw, in)`` layout inside
the autograd graph), so gradients land on the timm parameters and both backends share one model.
Between convolutions the maps stay dense (zero outside the active sites), so batch norm, pooling
and the residual additions are the same code as the ``masked`` backend.

The known spconv 2.3.8 CPU problems (``shared/DESIGN.md``) are worked around here and only here:

1. The CPU backward asks ``torch.cuda.current_stream()`` and fails without CUDA: on machines
   without CUDA, spconv's stream getter is replaced by one returning the null stream ``0``, which its
   CPU kernels ignore (:func:`import_spconv`).
2. Non-contiguous index tensors silently give wrong active sets: indices are built only by
   :func:`active_indices` (contiguous ``int32`` ``(N, 3)`` = batch, y, x).
3. More than one torch thread gives wrong CPU results: the spconv forward runs under one thread
   (:func:`one_thread`), and autograd gates (:class:`_BackwardThreads`) do the same for its
   backward, restoring the thread count afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from mim.backbones.tap_conv import conv_output_size
from mim.errors import ConfigError

_INSTALL_HINT = (
    "Fix: pip install 'mim-lightning[sparse]' (the CPU wheel `spconv`; on CUDA 12 machines "
    "`spconv-cu126`), or use the dense simulation with --model.init_args.backend masked."
)


def import_spconv() -> Any:
    """Import ``spconv.pytorch`` (with the CPU stream workaround applied once).

    Raises:
        ConfigError: spconv is not installed (names the extra to install).
    """
    try:
        import spconv.pytorch as spconv
        from spconv.pytorch import ops
    except ImportError as err:
        raise ConfigError(f"backend='spconv' needs the spconv package, which is not installed. {_INSTALL_HINT}") from err
    if not torch.cuda.is_available() and not getattr(ops.get_current_stream, "_mim_null_stream", False):

        def null_stream() -> int:  # workaround 1: no CUDA, no stream to ask for
            return 0

        null_stream._mim_null_stream = True  # type: ignore[attr-defined]
        ops.get_current_stream = null_stream
    return spconv


def check_spconv_model(model: nn.Module, name: str) -> None:
    """Raise :class:`ConfigError` unless spconv is installed and every ``nn.Conv2d`` of ``model`` is
    an ordinary (``groups=1``) convolution: spconv has no grouped or depthwise kernels."""
    import_spconv()
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            raise ConfigError(
                f"backend='spconv' cannot run '{name}': {module_name} is a grouped/depthwise convolution "
                f"(groups={module.groups}) and spconv has no such kernel (nor does any other sparse "
                "library). Fix: use --model.init_args.backend masked for ConvNeXt (the official SparK "
                "approach), or a ResNet for spconv."
            )


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the enclosed code with ``torch.set_num_threads(1)`` (workaround 3), then restore."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _BackwardThreads(torch.autograd.Function):
    """Identity in forward; its backward sets torch's thread count (workaround 3 for the backward).

    Placed on the output of a spconv call with ``threads=1`` (its backward runs first) and on its
    inputs (features and weight) with the previous count (their backward runs after spconv's,
    restoring it; at least one of them is in the graph whenever the output is).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, threads: int) -> torch.Tensor:
        ctx.threads = threads
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        torch.set_num_threads(ctx.threads)
        return grad, None


def active_indices(active: torch.Tensor) -> torch.Tensor:
    """``(B, 1, H, W)`` bool -> ``(N, 3)`` contiguous ``int32`` (batch, y, x) of the active sites,
    row-major (workaround 2: spconv silently misreads non-contiguous indices)."""
    return active[:, 0].nonzero().to(torch.int32).contiguous()


def _pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)  # type: ignore[return-value]


def _padding(padding: Any, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int]) -> tuple[int, int]:
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        if stride != (1, 1) or any(d * (k - 1) % 2 for k, d in zip(kernel, dilation)):
            raise ValueError("spconv backend: padding='same' needs stride 1 and symmetric padding.")
        return tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation))  # type: ignore[return-value]
    return _pair(padding)


def _spconv_module(
    spconv: Any, cache: dict[Any, Any], cin: int, cout: int, kernel: Any, stride: Any, padding: Any, dilation: Any, subm: bool
) -> nn.Module:
    """A template spconv module per configuration, kept in the per-forward ``cache`` (its weight is
    substituted by the timm weight at every call)."""
    key = ("module", cin, cout, kernel, stride, padding, dilation, subm)
    if key not in cache:
        if subm:  # index pairs cached per active set (the tensor's indice_dict) and kernel
            module = spconv.SubMConv2d(cin, cout, kernel, dilation=dilation, bias=False, indice_key=f"subm{kernel}{dilation}")
        else:
            module = spconv.SparseConv2d(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, bias=False)
        cache[key] = module
    return cache[key]


def spconv_conv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: int = 1,
    *,
    sites: Callable[..., torch.Tensor],
    cache: dict[Any, Any],
) -> torch.Tensor:
    """``F.conv2d`` computed by spconv on the active sites of ``input``; same arguments.

    Args:
        input: ``(B, C_in, H, W)`` float, zero outside the active sites.
        weight: ``(C_out, C_in, kh, kw)`` timm conv weight (gradients flow to it).
        sites: ``sites(size)`` -> ``(B, 1, h, w)`` bool active map at any scale.
        cache: per-forward dict (held by the function mode, dropped after the forward): the spconv
            module templates, and the submanifold index pairs shared between convolutions with the
            same active set and kernel (spconv's ``indice_key``).

    Returns:
        ``(B, C_out, H', W')`` dense, equal to ``conv2d(input, ...)`` on the active output sites and
        zero elsewhere.

    Raises:
        ConfigError: ``groups != 1`` (spconv has no grouped convolution).
    """
    if groups != 1:
        raise ConfigError("backend='spconv' got a grouped convolution; use --model.init_args.backend masked.")
    spconv = import_spconv()
    kernel, stride, dilation = tuple(weight.shape[-2:]), _pair(stride), _pair(dilation)
    padding = _padding(padding, kernel, stride, dilation)
    batch, _, height, width = input.shape
    out_h, out_w = conv_output_size((height, width), kernel, stride, padding, dilation)
    subm = stride == (1, 1) and (out_h, out_w) == (height, width)
    active_in = sites((height, width))
    indices = active_indices(active_in)
    on_cpu = input.device.type == "cpu"
    with torch.autocast(input.device.type, enabled=False):
        feats = input.permute(0, 2, 3, 1)[active_in[:, 0]].to(weight.dtype)
        weight_krsc = weight.permute(0, 2, 3, 1).contiguous()
        if on_cpu:  # whichever of the two needs a gradient restores the thread count after spconv
            threads = torch.get_num_threads()
            feats = _BackwardThreads.apply(feats, threads)
            weight_krsc = _BackwardThreads.apply(weight_krsc, threads)
        dict_key = f"pairs{height}x{width}"
        tensor = spconv.SparseConvTensor(feats, indices, [height, width], batch, indice_dict=cache.setdefault(dict_key, {}))
        module = _spconv_module(spconv, cache, weight.shape[1], weight.shape[0], kernel, stride, padding, dilation, subm)
        params = {"weight": weight_krsc}
        with one_thread() if on_cpu else contextlib.nullcontext():
            out = torch.func.functional_call(module, params, (tensor,))
        out_feats = _BackwardThreads.apply(out.features, 1) if on_cpu else out.features
        coords = out.indices.long()
        dense = out_feats.new_zeros(batch, out_h, out_w, weight.shape[0])
        dense = dense.index_put((coords[:, 0], coords[:, 1], coords[:, 2]), out_feats)
        dense = dense.permute(0, 3, 1, 2)
        active_out = sites((out_h, out_w), dense.dtype)
        if not subm:  # a strided sparse conv also reaches sites next to active ones: keep the mask's
            dense = dense * active_out
        if bias is not None:
            dense = dense + bias[None, :, None, None] * active_out
    return dense


__all__ = ["active_indices", "check_spconv_model", "import_spconv", "one_thread", "spconv_conv2d"]
