"""``SyncedBatchNorm`` in one process: on ``channels_last`` CPU maps in training it takes the fused (B*H*W, C)
path, which must equal ``nn.BatchNorm2d`` (then ``hardtanh`` for the fused clamp) in every output, gradient and
buffer; elsewhere it is ``nn.BatchNorm2d``."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mim import sync_batchnorm
from mim.sync_batchnorm import SyncedBatchNorm

CL = torch.channels_last


def _pair(channels, momentum, affine, track, clamp, dtype=torch.float64):
    ref = nn.BatchNorm2d(channels, momentum=momentum, affine=affine, track_running_stats=track, dtype=dtype)
    if affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.normal_()
    ours = SyncedBatchNorm(channels, momentum=momentum, affine=affine, track_running_stats=track, dtype=dtype,
                           clamp=clamp)  # fmt: skip
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _steps(norm, x, upstream, clamp, steps=3):
    x = x.detach().clone().requires_grad_()
    for _ in range(steps):
        out = norm(x)
        if clamp is not None and not isinstance(norm, SyncedBatchNorm):
            out = F.hardtanh(out, *clamp)
    (out * upstream).sum().backward()
    grads = [x.grad] + ([norm.weight.grad, norm.bias.grad] if norm.affine else [])
    return out, grads, [b.clone() for b in norm.buffers()]


@pytest.mark.parametrize(
    "channels, size, momentum, affine, track, clamp",
    [
        (12, 16, 0.1, True, True, None),  # folded to 192 columns
        (24, 8, None, True, True, (0.0, 6.0)),  # cumulative average; BN + ReLU6
        (48, 5, 0.3, False, True, (-0.5, 0.5)),  # no affine; a clamp that binds on both sides
        (3, 7, 0.1, True, False, None),  # batch statistics only; 294 rows fold only twice
        (384, 2, 0.1, True, True, None),  # no fold
    ],
)
def test_channels_last_path_equals_batchnorm2d(channels, size, momentum, affine, track, clamp, monkeypatch):
    calls = []
    apply = sync_batchnorm._RowsBatchNorm.apply
    monkeypatch.setattr(sync_batchnorm._RowsBatchNorm, "apply", lambda *a: calls.append(1) or apply(*a))
    ref, ours = _pair(channels, momentum, affine, track, clamp)
    g = torch.Generator().manual_seed(channels)
    x = (torch.randn(6, channels, size, size, generator=g, dtype=torch.float64) * 3 + 2).contiguous(memory_format=CL)
    upstream = torch.randn(x.shape, generator=g, dtype=torch.float64)
    out, grads, bufs = _steps(ours, x, upstream, clamp)
    ref_out, ref_grads, ref_bufs = _steps(ref, x, upstream, clamp)
    assert len(calls) == 3 and out.is_contiguous(memory_format=CL) and out.dtype == torch.float64
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    for value, truth in zip(grads, ref_grads):
        torch.testing.assert_close(value, truth, rtol=1e-10, atol=1e-12)
    for value, truth in zip(bufs, ref_bufs):
        torch.testing.assert_close(value, truth, rtol=1e-12, atol=1e-12)
    if clamp is not None:
        assert (out == clamp[0]).any()
    ours.eval()  # eval mode: the running statistics, via nn.BatchNorm2d
    ref.eval()
    torch.testing.assert_close(_steps(ours, x, upstream, clamp, 1)[0], _steps(ref, x, upstream, clamp, 1)[0])
    assert len(calls) == 3


def test_other_inputs_take_batchnorm2d(monkeypatch):
    """NCHW maps and ``(N, C)`` matrices take ``nn.BatchNorm2d`` / ``BatchNorm1d``'s path."""
    monkeypatch.setattr(sync_batchnorm._RowsBatchNorm, "apply", lambda *a: pytest.fail("took the rows path"))
    ref, ours = _pair(8, 0.1, True, True, (0.0, 6.0))
    x = torch.randn(4, 8, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(ours(x), F.hardtanh(ref(x), 0.0, 6.0))
    assert SyncedBatchNorm(8, dtype=torch.float64)(x[:, :, 0, 0]).shape == (4, 8)


def test_bfloat16_input_keeps_its_dtype_and_float32_statistics():
    """A bfloat16 map (CPU autocast's conv output) with float32 parameters: statistics in float32, output and
    input gradient in bfloat16, within bfloat16 rounding of the float32 result."""
    ref, ours = _pair(12, 0.1, True, True, (0.0, 6.0), dtype=torch.float32)
    x = (torch.randn(8, 12, 8, 8) * 2 + 1).contiguous(memory_format=CL)
    upstream = torch.randn(x.shape)
    out, grads, bufs = _steps(ours, x.bfloat16(), upstream.bfloat16(), (0.0, 6.0), steps=1)
    ref_out, ref_grads, ref_bufs = _steps(ref, x.bfloat16().float(), upstream, (0.0, 6.0), steps=1)
    assert out.dtype == grads[0].dtype == torch.bfloat16 and grads[1].dtype == torch.float32
    torch.testing.assert_close(out.float(), ref_out, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grads[0].float(), ref_grads[0], rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(bufs[0], ref_bufs[0], rtol=1e-5, atol=1e-6)


def test_convert_keeps_dtype_and_state():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).double()
    model[1].running_mean.fill_(0.25)
    converted = SyncedBatchNorm.convert(model)
    assert isinstance(converted[1], SyncedBatchNorm) and converted[1].weight.dtype == torch.float64
    assert converted[1].running_mean.dtype == torch.float64 and float(converted[1].running_mean[0]) == 0.25
