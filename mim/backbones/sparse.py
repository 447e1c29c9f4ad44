"""SparK's sparse encoder: a plain timm ConvNet that computes only on the visible (active) sites.

SparK (Tian et al., ICLR 2023, arXiv 2301.03580, Sec. 3.1 "Sparse masked modeling") treats the
unmasked pixels as sparse voxels: every convolution, pooling and normalisation sees only the
active sites, so the ConvNet never meets the "mask pattern" a dense zero-filled image would show.
Batch normalisation takes its statistics from the active sites only (Sec. 3.1, "sparse BN").

How it runs here: the timm model stays a plain, unmodified timm model (no module swap, no
patching). For one forward :class:`SparseEncoder` enters :func:`active_sites`, a
``TorchFunctionMode`` that holds the mask and intercepts the functional ops the model calls:

- ``conv2d`` / ``linear`` (on ``(B, H, W, C)`` maps) / ``layer_norm`` / pooling: output zeroed
  outside the active set at that scale (backend ``"masked"``, the official approach: dense
  convolution, then re-masking, official ``pretrain/encoder.py``; the convolution is
  :func:`mim.backbones.tap_conv.conv2d`, ATen's with a GEMM weight gradient on CPU maps of up to 4x4
  sites). On CPU ``channels_last`` maps with at most :data:`~mim.backbones.active_conv.MAX_ACTIVE_FRACTION`
  of the output sites active, the same values are computed at the active sites only
  (:mod:`mim.backbones.active_conv`: gathered patches times the weight matrix). With backend
  ``"spconv"``, ``conv2d`` is a true sparse convolution on the active sites (:mod:`mim.backbones.spconv_backend`);
- ``batch_norm``: mean and variance over the active sites only, reduced across ranks under DDP.

Every layer keeps the invariant "zero outside the active sites", so the elementwise ops in between
(activations, residual additions, layer scale, drop path) need no handling. The maps may be NCHW or
``torch.channels_last`` (NHWC memory, what :class:`mim.methods.SparK` uses by default): the
``(B, 1, H, W)`` masks broadcast over either layout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair
from torch.overrides import TorchFunctionMode

from mim.backbones import active_conv, tap_conv
from mim.backbones.vit import check_model_name
from mim.errors import ConfigError

Backend = Literal["masked", "spconv"]
BACKENDS = ("masked", "spconv")
#: Strides of the four feature maps SparK densifies and decodes (paper Sec. 3.2, Fig. 3).
FEATURE_STRIDES = (4, 8, 16, 32)
#: Stride of the mask grid: one mask cell per stride-32 feature site (paper Sec. 3.1).
MASK_STRIDE = FEATURE_STRIDES[-1]
#: Norm layers whose statistics mix spatial positions in a way the active-site rule does not cover.
_UNSUPPORTED_NORMS = (nn.GroupNorm, nn.InstanceNorm2d, nn.LocalResponseNorm)

#: ``conv2d(input, weight, bias, stride, padding, dilation, groups, sites)`` replacing the dense one.
SparseConv = Callable[..., torch.Tensor]


def upsample_active(active: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour upsampling of an active map to ``size``: ``(B, 1, h, w)`` -> ``(B, 1, H, W)``.

    Raises:
        ValueError: ``size`` is not an integer multiple of the mask grid.
    """
    (h, w), (big_h, big_w) = active.shape[-2:], tuple(size)
    if big_h % h or big_w % w:
        raise ValueError(
            f"a {big_h}x{big_w} feature map is not a multiple of the {h}x{w} mask grid; the input "
            f"side must be divisible by {MASK_STRIDE}."
        )
    return active.repeat_interleave(big_h // h, dim=2).repeat_interleave(big_w // w, dim=3)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and (
        torch.distributed.get_world_size() > 1
    )


def _all_reduce_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place."""
    torch.distributed.all_reduce(tensor)
    return tensor


class _MaskedBatchNorm(torch.autograd.Function):
    """Batch norm over the active sites with a hand-written backward: a few fused passes instead of
    autograd's chain of elementwise ops (the difference between 1.6x and 1.3x a dense ResNet pass).

    Forward: ``y = (x - mean) * sites * invstd * weight + bias * sites`` with ``mean``, ``var`` over
    the active sites. Backward (the BatchNorm1d gradient on the active rows, zero elsewhere), with
    ``g = dy * sites``, ``c = (x - mean) * sites``, ``a = weight * invstd`` and sums over the batch
    and sites: ``dx = a * g - a * invstd**2 * sum(g * c) / n * c - a * sum(g) / n * sites``,
    ``dweight = invstd * sum(g * c)``, ``dbias = sum(g)``; under ``sync`` the counts and the sums
    are reduced across ranks, as ``SyncBatchNorm`` does.

    ``sum(g * c) = sum(dy * c)`` (``c`` is zero off the sites) and ``a * dy`` come from one fused pass,
    ATen's eval-mode batch-norm backward (``native_batch_norm_backward`` with mean 0, variance 1, eps 0,
    weight ``a``, applied to ``dy`` and ``c``), which reads NCHW and ``channels_last`` maps alike (an
    ``einsum`` for ``sum(g * c)`` costs a transposing copy and a batched matmul, slowest in
    ``channels_last``); ``sum(g)`` is a matrix-vector product of ``dy`` with the site map, so ``g`` is
    never allocated (on CPU a fresh map of 32 MiB or more costs as much as a few passes over it: glibc
    maps it anew and the kernel faults every page in). The forward's sum of squares comes from the same
    kernel (:func:`_sum_sq`).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, sites: torch.Tensor, weight: torch.Tensor | None,
                bias: torch.Tensor | None, eps: float, sync: bool) -> tuple[torch.Tensor, ...]:  # fmt: skip
        count, total = sites.sum().reshape(1), x.sum(dim=(0, 2, 3))
        if sync:
            total, count = _all_reduce_(torch.cat([total, count])).split([total.numel(), 1])
        count = count.clamp_min(1)
        mean = total / count
        # x is zero outside the sites, so x - mean * sites is (x - mean) on them and zero elsewhere, in one pass
        centred = torch.addcmul(x, sites, -mean[None, :, None, None])
        sq = _sum_sq(centred)
        var = (_all_reduce_(sq) if sync else sq) / count
        invstd = torch.rsqrt(var + eps)
        scale = invstd if weight is None else invstd * weight
        out = centred * scale[None, :, None, None]
        if bias is not None:  # centred is zero outside the active sites: only the bias needs the mask
            out = out.addcmul_(sites, bias[None, :, None, None])
        ctx.save_for_backward(centred, sites, invstd, weight, count)
        ctx.sync, ctx.has_bias = sync, bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor, _mean: Any, _var: Any) -> tuple[Any, ...]:
        centred, sites, invstd, weight, count = ctx.saved_tensors
        a = invstd if weight is None else invstd * weight  # in the compute dtype (float32 / float64)
        # centred is zero outside the sites, so sum(dy * centred) needs no mask; sum(dy) over the sites does
        grad_a, sum_gc = _fused_grad_sums(grad_out, centred, a)
        sums = torch.stack([_masked_channel_sum(grad_out, sites), sum_gc])
        grad_weight = sums[1] * invstd if weight is not None and ctx.needs_input_grad[2] else None
        grad_bias = sums[0].clone() if ctx.has_bias and ctx.needs_input_grad[3] else None
        if ctx.sync:
            _all_reduce_(sums)
        k1 = -a * invstd.square() * sums[1] / count
        k0 = -a * sums[0] / count
        # a * dy + k0 on the sites (zero elsewhere), plus k1 * centred, which is zero outside them already
        grad_x = grad_a.add_(k0[None, :, None, None]).mul_(sites).addcmul_(centred, k1[None, :, None, None])
        if grad_weight is not None:  # each gradient in its parameter's dtype (float32 weights, float64 input)
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(ctx.bias_dtype)
        return grad_x, None, grad_weight, grad_bias, None, None


def _sum_sq(x: torch.Tensor) -> torch.Tensor:
    """``sum(x * x)`` over dims 0, 2, 3 of a ``(B, C, H, W)`` map, as ``(C,)``.

    ATen's batch-norm backward kernel (:func:`_eval_bn_backward`: ``grad_weight = sum(dy * x)``) in one
    pass, for any memory format: on a ``channels_last`` map ``linalg.vector_norm`` over dims (0, 2, 3)
    takes a strided path about 30x slower (23 ms against 0.8 ms for a ``(128, 64, 32, 32)`` float32 map
    on 2 CPU cores), and it rounds more (relative error against float64 2e-5 against 4e-5).
    """
    return _eval_bn_backward(x, x, None, [False, True, False])[1]


def _masked_channel_sum(x: torch.Tensor, sites: torch.Tensor) -> torch.Tensor:
    """``sum(x * sites)`` over dims 0, 2, 3 of a ``(B, C, H, W)`` map and a ``(B, 1, H, W)`` site map, as
    ``(C,)``, without materialising ``x * sites``: a matrix-vector product over ``(B*H*W, C)`` rows for a
    ``channels_last`` map, a batched one over ``(C, H*W)`` blocks otherwise."""
    batch, channels = x.shape[:2]
    sites = sites.to(x.dtype)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return sites.reshape(1, -1).matmul(x.permute(0, 2, 3, 1).reshape(-1, channels)).reshape(channels)
    return torch.bmm(x.reshape(batch, channels, -1), sites.reshape(batch, -1, 1)).sum(dim=(0, 2))


def _fused_grad_sums(g: torch.Tensor, centred: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a * g, sum(g * centred))``, the sum over dims 0, 2, 3 of two ``(B, C, H, W)`` maps, in one pass
    (:func:`_eval_bn_backward`). ``a``: ``(C,)`` in the maps' dtype."""
    grad_a, sum_gc, _ = _eval_bn_backward(g, centred, a, [True, True, False])
    return grad_a, sum_gc


def _eval_bn_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, output_mask: list[bool],
                      mean: torch.Tensor | None = None) -> tuple[torch.Tensor | None, ...]:
    """ATen's eval-mode batch-norm backward with running mean ``mean`` (default 0), running variance 1 and eps 0
    (so its ``invstd`` is exactly 1): ``(dy * weight, sum(dy * (x - mean)), sum(dy))`` over every dim but 1,
    fused, for any memory format and for ``(N, C)`` matrices, on CPU and CUDA; the outputs ``output_mask`` leaves
    out are ``None``."""
    ones = torch.ones(x.shape[1], dtype=x.dtype, device=x.device)
    mean = torch.zeros_like(ones) if mean is None else mean
    return torch.ops.aten.native_batch_norm_backward(
        dy, x, weight, mean, ones, None, None, False, 0.0, output_mask
    )


class _ActiveSites(TorchFunctionMode):
    """Function mode holding the active map for one forward; see the module docstring."""

    def __init__(self, active: torch.Tensor, conv: SparseConv | None, sync_stats: bool) -> None:
        super().__init__()
        self.active, self.conv, self.sync_stats = active, conv, sync_stats
        self._masks: dict[tuple[Any, ...], torch.Tensor] = {}
        self._conv_cache: dict[Any, Any] = {}  # per-forward state of the sparse conv (index pairs)
        self._handlers = {
            F.conv2d: self._conv2d,
            F.batch_norm: self._batch_norm,
            F.layer_norm: self._channels_last,
            F.linear: self._channels_last,
            F.max_pool2d: self._channels_first,
            F.avg_pool2d: self._channels_first,
        }

    # -- masks at every scale -------------------------------------------------------------------
    def sites(self, size: Sequence[int], dtype: torch.dtype | None = None) -> torch.Tensor:
        """``(B, 1, H, W)`` active map at spatial ``size``: bool, or ``dtype`` (cached per forward)."""
        key = (tuple(size), dtype)
        if key not in self._masks:
            mask = upsample_active(self.active, size)
            self._masks[key] = mask if dtype is None else mask.to(dtype)
        return self._masks[key]

    def _mask_nchw(self, out: torch.Tensor) -> torch.Tensor:
        return out.mul_(self.sites(out.shape[-2:], out.dtype))

    def _mask_nhwc(self, out: torch.Tensor) -> torch.Tensor:
        return out.mul_(self.sites(out.shape[1:3], out.dtype).permute(0, 2, 3, 1))

    # -- handlers -------------------------------------------------------------------------------
    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        handler = self._handlers.get(func)
        if handler is None:
            return func(*args, **(kwargs or {}))
        return handler(func, *args, **(kwargs or {}))

    def _conv2d(self, func: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.conv is not None:
            return self.conv(*args, sites=self.sites, cache=self._conv_cache, **kwargs)
        out = self._active_conv(*args, **kwargs)
        return self._mask_nchw(tap_conv.conv2d(*args, **kwargs)) if out is None else out

    def _active_conv(
        self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: Any = 1,
        padding: Any = 0, dilation: Any = 1, groups: int = 1,
    ) -> torch.Tensor | None:  # fmt: skip
        """The convolution computed at the active sites only (:mod:`mim.backbones.active_conv`; its gather
        indices cached per forward), or ``None`` where that path does not apply."""
        if not active_conv.takes_active_path(input, weight, padding, groups):
            return None
        stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
        kernel = tuple(weight.shape[-2:])
        key = ("active", tuple(input.shape), kernel, stride, padding, dilation)
        if key not in self._conv_cache:
            out = tap_conv.conv_output_size(input.shape[-2:], kernel, stride, padding, dilation)
            self._conv_cache[key] = active_conv.site_index(
                self.sites(out), input.shape[-2:], kernel, stride, padding, dilation, input.shape[1]
            )
        sites = self._conv_cache[key]
        if sites.fraction > active_conv.MAX_ACTIVE_FRACTION:
            return None
        return active_conv.active_conv2d(input, weight, bias, sites)

    def _channels_first(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        out = func(*args, **kwargs)
        if isinstance(out, tuple):  # max_pool2d(return_indices=True)
            return (self._mask_nchw(out[0]), *out[1:])
        return self._mask_nchw(out)

    def _channels_last(self, func: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = func(*args, **kwargs)
        # (B, H, W, C) maps (ConvNeXt's LayerNorm and MLP); other shapes are not spatial.
        return self._mask_nhwc(out) if out.ndim == 4 else out

    def _batch_norm(
        self,
        func: Any,
        input: torch.Tensor,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        training: bool = False,
        momentum: float = 0.1,
        eps: float = 1e-5,
    ) -> torch.Tensor:
        if not training and running_mean is not None:  # running statistics: per-site affine map
            out = func(input, running_mean, running_var, weight, bias, training, momentum, eps)
            return self._mask_nchw(out)
        return masked_batch_norm(
            input, self.sites(input.shape[-2:], input.dtype), running_mean, running_var,
            weight, bias, momentum, eps, sync=self.sync_stats and _distributed(),
        )  # fmt: skip


def masked_batch_norm(
    x: torch.Tensor,
    sites: torch.Tensor,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    sync: bool = False,
) -> torch.Tensor:
    """Batch normalisation with statistics over the active sites only (SparK Sec. 3.1, sparse BN).

    Args:
        x: ``(B, C, H, W)`` float (NCHW or ``channels_last``), zero outside the active sites. Statistics and normalisation run in
            ``float32``, or in ``float64`` for a ``float64`` input (half / bfloat16 inputs are promoted to
            ``float32``); the output has the input's dtype, and so has its gradient.
        sites: ``(B, 1, H, W)`` float in {0, 1}, 1 = active.
        running_mean, running_var: ``(C,)`` buffers updated in place (unbiased variance, as
            ``nn.BatchNorm2d``), or ``None``.
        weight, bias: ``(C,)`` affine parameters or ``None``.
        momentum: running-average factor (``nn.BatchNorm2d`` passes its effective factor).
        eps: added to the variance.
        sync: sum the counts, moments and gradient sums over all ranks, as ``SyncBatchNorm``.

    Returns:
        ``(B, C, H, W)``, zero outside the active sites. Equals ``BatchNorm1d`` on the gathered
        active feature vectors (the official ``SparseBatchNorm2d``) without gathering.

    A batch without any active site gives zeros (the count is clamped to 1; no host sync).
    """
    dtype = x.dtype  # statistics and normalisation in float32 (also under autocast), float64 kept
    compute = torch.promote_types(dtype, torch.float32)
    out, mean, var = _MaskedBatchNorm.apply(x.to(compute), sites.to(compute), weight, bias, eps, sync)
    if running_mean is not None and running_var is not None:
        with torch.no_grad():
            factor = 0.1 if momentum is None else momentum
            count = sites.sum()
            if sync:
                count = _all_reduce_(count.clone())
            update_running_stats(running_mean, running_var, mean, var, count, factor)
    return out.to(dtype)


@torch.no_grad()
def update_running_stats(running_mean: torch.Tensor, running_var: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                         count: torch.Tensor, factor: float) -> None:  # fmt: skip
    """``nn.BatchNorm2d``'s running-statistics update, in place: ``running = (1 - factor) * running + factor * batch``
    with the batch's unbiased variance ``var * count / (count - 1)`` (``var`` biased over ``count`` values)."""
    unbiased = var * (count / (count - 1).clamp_min(1))
    running_mean.lerp_(mean.to(running_mean.dtype), factor)
    running_var.lerp_(unbiased.to(running_var.dtype), factor)


@contextlib.contextmanager
def active_sites(
    active: torch.Tensor, conv: SparseConv | None = None, sync_stats: bool = True
) -> Iterator[Callable[..., torch.Tensor]]:
    """Run the enclosed torch code sparsely on the active sites of ``active``.

    Args:
        active: ``(B, 1, h, w)`` bool, ``True`` = visible, on the coarsest grid; every feature map
            inside must have a size that is a multiple of ``(h, w)``.
        conv: replacement for dense ``conv2d`` (the spconv backend); ``None`` = dense + re-mask.
        sync_stats: reduce batch-norm statistics across ranks when running distributed.

    Yields:
        ``sites(size, dtype=None)``, the active map at any spatial size.
    """
    mode = _ActiveSites(active, conv, sync_stats)
    with mode:
        yield mode.sites


def check_convnet(model: nn.Module, name: str) -> list[int]:
    """Indices of ``model.feature_info`` at strides 4, 8, 16 and 32 (for ``forward_intermediates``).

    Raises:
        ConfigError: the model has no feature at one of those strides (e.g. a ViT), or a norm layer
            whose statistics cannot be restricted to the active sites (GroupNorm, InstanceNorm).
    """
    info = getattr(model, "feature_info", None) or []
    reductions = [f.get("reduction") for f in info]
    if any(s not in reductions for s in FEATURE_STRIDES) or not hasattr(model, "forward_intermediates"):
        raise ConfigError(
            f"SparK needs a ConvNet with 4 feature scales at strides {FEATURE_STRIDES}, but timm's "
            f"'{name}' has feature strides {reductions}. Fix: use a timm ResNet or ConvNeXt, e.g. "
            "resnet18, resnet50, convnext_atto (ViTs belong to MAE / ColorMAE / CAE / MixedAE)."
        )
    for module_name, module in model.named_modules():
        if isinstance(module, _UNSUPPORTED_NORMS):
            raise ConfigError(
                f"'{name}' uses {type(module).__name__} ({module_name}), whose statistics SparK cannot "
                "restrict to the visible sites. Fix: choose a backbone with BatchNorm or LayerNorm."
            )
    return [max(i for i, r in enumerate(reductions) if r == s) for s in FEATURE_STRIDES]


def create_convnet(name: str, **kwargs: Any) -> nn.Module:
    """A randomly initialised timm ConvNet without head (``num_classes=0``) for SparK.

    Raises:
        ConfigError: unknown name, or a model without the 4 feature scales (see :func:`check_convnet`).
    """
    check_model_name(name, example="resnet18, resnet50, convnext_atto", pattern="resnet*")
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    check_convnet(model, name)
    return model


class SparseEncoder(nn.Module):
    """A timm ConvNet that encodes only the active sites, returning SparK's 4 feature maps.

    Args:
        model: a plain timm ConvNet (ResNet, ConvNeXt, ...) with features at strides 4/8/16/32;
            it is used as is and stays loadable with ``timm.create_model``.
        backend: ``"masked"`` (dense conv + re-masking, the official simulation; on CPU ``channels_last`` maps
            the same values computed at the active sites only, :mod:`mim.backbones.active_conv`) or ``"spconv"``
            (submanifold / strided sparse convolutions from spconv with the same weights; needs
            ``pip install 'mim-lightning[sparse]'``; no grouped or depthwise convolution).
        sync_stats: under DDP, reduce the sparse batch-norm statistics across ranks (official
            ``SparseSyncBatchNorm2d``).

    Raises:
        ConfigError: bad ``backend``, a model without 4 feature scales, ``"spconv"`` without spconv
            installed or with a grouped convolution (ConvNeXt).
    """

    def __init__(self, model: nn.Module, backend: Backend = "masked", sync_stats: bool = True) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}.")
        name = getattr(model, "default_cfg", {}).get("architecture", type(model).__name__)
        self.out_indices = check_convnet(model, name)
        self.model, self.backend, self.sync_stats = model, backend, sync_stats
        self.channels = [model.feature_info[i]["num_chs"] for i in self.out_indices]
        self._conv: SparseConv | None = None
        if backend == "spconv":
            from mim.backbones.spconv_backend import check_spconv_model, spconv_conv2d

            check_spconv_model(model, name)
            self._conv = spconv_conv2d

    def forward(self, imgs: torch.Tensor, active: torch.Tensor) -> list[torch.Tensor]:
        """Encode the visible part of ``imgs``.

        Args:
            imgs: ``(B, C, H, W)`` float, ``H`` and ``W`` divisible by 32.
            active: ``(B, 1, H/32, W/32)`` bool, ``True`` = visible (SparK's "active" sites).

        Returns:
            4 maps ``(B, C_i, H/s, W/s)`` for ``s`` = 4, 8, 16, 32, zero outside the active sites.

        Raises:
            ValueError: ``H`` or ``W`` not divisible by 32, or ``active`` of the wrong shape.
        """
        check_input(imgs, active)
        x = imgs * upsample_active(active, imgs.shape[-2:]).to(imgs.dtype)
        with active_sites(active, self._conv, self.sync_stats):
            return self.model.forward_intermediates(x, indices=self.out_indices, intermediates_only=True)


def check_input(imgs: torch.Tensor, active: torch.Tensor | None = None) -> None:
    """Raise ``ValueError`` unless ``imgs (B, C, H, W)`` has sides divisible by 32 and ``active`` (when
    given) is the matching ``(B, 1, H/32, W/32)`` bool grid."""
    height, width = imgs.shape[-2:]
    if imgs.ndim != 4 or height % MASK_STRIDE or width % MASK_STRIDE:
        raise ValueError(
            f"SparK needs (B, C, H, W) images with H and W divisible by {MASK_STRIDE}, got "
            f"{tuple(imgs.shape)}. Fix: set --data.img_size and --model.img_size to a multiple of "
            f"{MASK_STRIDE} (e.g. 64 for CIFAR's 32 px images, 224 for ImageNet)."
        )
    grid = (imgs.shape[0], 1, height // MASK_STRIDE, width // MASK_STRIDE)
    if active is not None and (tuple(active.shape) != grid or active.dtype != torch.bool):
        raise ValueError(f"active must be a bool tensor of shape {grid}, got {active.dtype} {tuple(active.shape)}.")


__all__ = [
    "BACKENDS",
    "FEATURE_STRIDES",
    "MASK_STRIDE",
    "SparseEncoder",
    "active_sites",
    "check_convnet",
    "check_input",
    "create_convnet",
    "masked_batch_norm",
    "update_running_stats",
    "upsample_active",
]
