"""The active-site convolution (mim.backbones.active_conv) against ATen's dense convolution plus re-masking."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mim.backbones import active_conv
from mim.backbones.sparse import upsample_active

CL = torch.channels_last

# (in channels, out channels, kernel, stride, padding, dilation, input size, mask grid), the convolutions of timm's
# ResNets and ConvNeXts plus a dilated one and a non-square map
CASES = [
    (8, 6, 3, 1, 1, 1, (16, 16), (2, 2)),  # ResNet 3x3
    (8, 12, 3, 2, 1, 1, (16, 24), (2, 3)),  # ResNet downsampling 3x3, non-square
    (8, 12, 1, 2, 0, 1, (16, 16), (2, 2)),  # ResNet 1x1 shortcut
    (3, 8, 7, 2, 3, 1, (32, 32), (2, 2)),  # ResNet stem (image input, no input gradient)
    (3, 8, 4, 4, 0, 1, (32, 32), (2, 2)),  # ConvNeXt stem
    (8, 12, 2, 2, 0, 1, (16, 16), (2, 2)),  # ConvNeXt downsampling
    (8, 6, 3, 1, 2, 2, (16, 16), (4, 4)),  # dilated
    (8, 6, 3, 1, 1, 1, (4, 4), (4, 4)),  # one site per cell (a stride-32 map)
]


def _inputs(case, seed=0, batch=3, dtype=torch.float64, active=None):
    c_in, c_out, k, s, p, d, size, grid = case
    gen = torch.Generator().manual_seed(seed)
    if active is None:
        active = torch.rand(batch, 1, *grid, generator=gen) > 0.5
        active[0, 0, 0, 0] = True
    x = torch.randn(batch, c_in, *size, generator=gen, dtype=dtype) * upsample_active(active, size)
    x = x.contiguous(memory_format=CL).requires_grad_(c_in != 3)
    w = torch.randn(c_out, c_in, k, k, generator=gen, dtype=dtype).contiguous(memory_format=CL).requires_grad_()
    b = torch.randn(c_out, generator=gen, dtype=dtype, requires_grad=True)
    return x, w, b, active


def _reference(x, w, b, case, active):
    """Dense convolution, then the output masked: the official ``SparseConv2d``."""
    _, _, _, s, p, d, _, _ = case
    y = F.conv2d(x, w, b, s, p, d)
    return y * upsample_active(active, y.shape[-2:])


def _active(x, w, b, case, active):
    _, _, k, s, p, d, _, _ = case
    out = [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n in x.shape[-2:]]
    sites = upsample_active(active, out)
    sites = active_conv.site_index(sites, x.shape[-2:], (k, k), (s, s), (p, p), (d, d), x.shape[1])
    return active_conv.active_conv2d(x, w, b, sites)


def _grads(fn, x, w, b, case, active, grad_out):
    tensors = [t for t in (x, w, b) if t.requires_grad]
    for t in tensors:
        t.grad = None
    y = fn(x, w, b, case, active)
    y.backward(grad_out)
    return y.detach(), [t.grad.clone() for t in tensors]


@pytest.mark.parametrize("chunk", [1 << 20, 40])  # one chunk; many, split inside the padding taps
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"k{c[2]}s{c[3]}p{c[4]}d{c[5]}c{c[0]}")
def test_equals_dense_convolution_and_masking_in_float64(case, chunk, monkeypatch):
    """Output (zero off the sites, channels_last), the input gradient everywhere (inactive sites next to active
    ones get the dense path's gradient too), the weight gradient in the weight's memory format and the bias
    gradient equal ATen's ``conv2d * mask`` to 1e-12, for every convolution shape timm's ResNets and ConvNeXts
    use, with the gathered rows in one chunk and in chunks of 40 elements."""
    monkeypatch.setattr(active_conv, "CHUNK_ELEMENTS", chunk)
    x, w, b, active = _inputs(case)
    with torch.no_grad():
        shape = _reference(x, w, b, case, active).shape
    grad_out = torch.randn(shape, dtype=x.dtype, generator=torch.Generator().manual_seed(1))
    ref_out, ref_grads = _grads(_reference, x, w, b, case, active, grad_out)
    out, grads = _grads(_active, x, w, b, case, active, grad_out)
    assert out.is_contiguous(memory_format=CL)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    assert len(grads) == len(ref_grads) == (3 if x.requires_grad else 2)
    for got, ref in zip(grads, ref_grads):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    assert grads[-2].is_contiguous(memory_format=CL)
    if x.requires_grad and case[2] > case[3]:  # kernels wider than their stride reach inactive neighbours
        assert (grads[0] * ~upsample_active(active, x.shape[-2:])).abs().sum() > 0


def test_without_active_sites_gives_zeros():
    """A batch whose sites are all masked: zero output and zero gradients, no error."""
    case = CASES[0]
    x, w, b, active = _inputs(case, batch=2, active=torch.zeros(2, 1, 2, 2, dtype=torch.bool))
    out, grads = _grads(_active, x, w, b, case, active, torch.ones(2, 6, 16, 16, dtype=torch.float64))
    assert out.shape == (2, 6, 16, 16) and not out.any()
    assert all(not g.any() for g in grads)


def test_cpu_autocast_runs_in_bfloat16():
    """Under CPU autocast the convolution runs in bfloat16, as ``F.conv2d`` would, and stays within bfloat16 rounding
    of the float32 result; the float32 parameters get float32 gradients."""
    case = CASES[0]
    x, w, b, active = _inputs(case, dtype=torch.float32)
    grad_out = torch.randn(3, 6, 16, 16)
    ref_out, ref_grads = _grads(_active, x, w, b, case, active, grad_out)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = _grads(_active, x, w, b, case, active, grad_out)
    assert out.dtype == torch.bfloat16
    assert [g.dtype for g in grads] == [torch.float32] * 3
    torch.testing.assert_close(out.float(), ref_out, rtol=0.03, atol=0.1)
    for got, ref in zip(grads, ref_grads):
        assert (got - ref).norm() / ref.norm() < 0.02


def test_which_calls_take_the_path():
    """A CPU channels_last map with one group and numeric padding; not NCHW maps, grouped (depthwise) convolutions,
    string padding or mixed dtypes outside autocast."""
    x = torch.zeros(2, 8, 8, 8).contiguous(memory_format=CL)
    w = torch.zeros(8, 8, 3, 3)
    assert active_conv.takes_active_path(x, w, 1, 1)
    assert not active_conv.takes_active_path(x.contiguous(), w, 1, 1)
    assert not active_conv.takes_active_path(x, w[:, :1], 1, 8)
    assert not active_conv.takes_active_path(x, w, "same", 1)
    assert not active_conv.takes_active_path(x, w.double(), 1, 1)


def test_site_index_fraction_and_chunks(monkeypatch):
    """The index reads each tap's input row (0 in the padding, listed in ``padding_taps``), the chunks cover the
    sites once, and ``fraction`` is the share of active output sites."""
    monkeypatch.setattr(active_conv, "CHUNK_ELEMENTS", 9 * 2 * 3)  # 3 sites a chunk at 2 channels
    sites = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    sites[0, 0, 0, :2] = sites[0, 0, 3, 3] = True
    index = active_conv.site_index(sites, (4, 4), (3, 3), (1, 1), (1, 1), (1, 1), channels=2)
    assert index.fraction == 3 / 16
    assert index.out_index.tolist() == [0, 1, 15]
    # site (0, 0): taps (1, 1), (1, 2), (2, 1), (2, 2) inside, at rows 0, 1, 4, 5
    assert index.index[0].tolist() == [0, 0, 0, 0, 0, 1, 0, 4, 5]
    assert index.padding_taps[:5].tolist() == [0, 1, 2, 3, 6]
    assert [c[:2] for c in index.chunks] == [(0, 3)]
    monkeypatch.setattr(active_conv, "CHUNK_ELEMENTS", 2 * 9 * 2)
    index = active_conv.site_index(sites, (4, 4), (3, 3), (1, 1), (1, 1), (1, 1), channels=2)
    assert [c[:2] for c in index.chunks] == [(0, 2), (2, 3)]
    assert index.chunks[-1][3] == index.padding_taps.numel()
