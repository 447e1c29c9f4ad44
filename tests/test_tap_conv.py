"""``mim.backbones.tap_conv``: the per-tap weight gradients equal ATen's, and only small CPU maps take them."""

import pytest
import torch
import torch.nn.functional as F

from mim.backbones import tap_conv
from mim.backbones.tap_conv import TapConv2d, TapConvTranspose2d, conv2d, conv_transpose2d

TAP = "_TapConv2dBackward"
CONV_CASES = [  # (c_in, c_out, size, kernel, stride, padding, dilation)
    (16, 24, 2, 3, 1, 1, 1),  # SparK's stride-32 map at 64 px
    (8, 16, 4, 3, 2, 1, 1),  # strided, as ResNet's first block of a stage
    (8, 8, 4, 1, 2, 0, 1),  # the 1x1 downsample shortcut
    (6, 5, 5, (3, 2), (1, 2), (1, 0), 1),  # non-square kernel, stride and padding (3x3 output)
    (4, 4, 4, 3, 1, 2, 2),  # dilated (4x4 output)
]
TRANSPOSED_CASES = [  # (c_in, c_out, size, kernel, stride, padding, output_padding, dilation)
    (16, 24, 2, 4, 2, 1, 0, 1),  # SparK's UNet upsampling at 2x2
    (8, 6, 4, 4, 2, 1, 0, 1),
    (6, 5, 3, (3, 2), (2, 1), (1, 0), (1, 0), 1),  # output padding, non-square
    (4, 4, 3, 3, 2, 0, 1, 2),  # output padding above the padding (the bottom pad crops), dilated
]


def _grads(fn, x, w, b, *args):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    b = None if b is None else b.clone().requires_grad_()
    out = fn(x, w, b, *args)
    upstream = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    (out * upstream).sum().backward()
    return out, [out.detach(), x.grad, w.grad] + ([] if b is None else [b.grad])


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv2d_equals_f_conv2d_in_float64(case, channels_last):
    """Output and the input, weight and bias gradients equal ATen's to 1e-12 (float64), NCHW and channels_last,
    and the weight gradient comes in the weight's memory format."""
    c_in, c_out, size, kernel, stride, padding, dilation = case
    g = torch.Generator().manual_seed(0)
    kh, kw = kernel if isinstance(kernel, tuple) else (kernel, kernel)
    x = torch.randn(3, c_in, size, size, generator=g, dtype=torch.float64)
    w = torch.randn(c_out, c_in, kh, kw, generator=g, dtype=torch.float64)
    b = torch.randn(c_out, generator=g, dtype=torch.float64)
    if channels_last:
        x, w = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
    out, ours = _grads(conv2d, x, w, b, stride, padding, dilation)
    assert type(out.grad_fn).__name__ == TAP
    _, ref = _grads(F.conv2d, x, w, b, stride, padding, dilation)
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
    assert ours[2].is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("case", TRANSPOSED_CASES)
def test_conv_transpose2d_equals_f_conv_transpose2d_in_float64(case):
    c_in, c_out, size, kernel, stride, padding, output_padding, dilation = case
    g = torch.Generator().manual_seed(1)
    kh, kw = kernel if isinstance(kernel, tuple) else (kernel, kernel)
    x = torch.randn(3, c_in, size, size, generator=g, dtype=torch.float64)
    w = torch.randn(c_in, c_out, kh, kw, generator=g, dtype=torch.float64)
    b = torch.randn(c_out, generator=g, dtype=torch.float64)
    args = (stride, padding, output_padding, 1, dilation)
    out, ours = _grads(conv_transpose2d, x, w, b, *args)
    assert type(out.grad_fn).__name__ == TAP
    _, ref = _grads(F.conv_transpose2d, x, w, b, *args)
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


def test_only_small_cpu_maps_with_trained_weights_take_the_tap_path():
    w = torch.randn(8, 8, 3, 3, requires_grad=True)
    small, large = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 8, 8)  # 16 and 64 output sites
    assert type(conv2d(small, w, padding=1).grad_fn).__name__ == TAP
    assert type(conv2d(large, w, padding=1).grad_fn).__name__ == "ConvolutionBackward0"
    grouped = torch.randn(8, 4, 3, 3, requires_grad=True)
    assert type(conv2d(small, grouped, padding=1, groups=2).grad_fn).__name__ == "ConvolutionBackward0"
    assert conv2d(small, w.detach(), padding=1).grad_fn is None  # frozen weights: plain F.conv2d
    assert type(conv2d(small, w, padding="same").grad_fn).__name__ == "ConvolutionBackward0"
    with torch.no_grad():
        assert conv2d(small, w, padding=1).grad_fn is None
    up = torch.randn(8, 8, 4, 4, requires_grad=True)  # the rows of a transposed conv are its input sites
    assert type(conv_transpose2d(small, up, stride=2, padding=1).grad_fn).__name__ == TAP
    assert type(conv_transpose2d(large, up, stride=2, padding=1).grad_fn).__name__ == "ConvolutionBackward0"


def test_conv2d_under_cpu_autocast_runs_in_bfloat16_like_f_conv2d():
    """Under CPU autocast the tap path computes in bfloat16, gives float32 parameters float32 gradients, and
    its weight gradient is as close to the float32 one as ``F.conv2d``'s under autocast."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 16, 2, 2, generator=g)
    w = (0.1 * torch.randn(16, 16, 3, 3, generator=g)).requires_grad_()
    F.conv2d(x, w, None, 1, 1).square().sum().backward()
    truth, errors = w.grad.clone(), []
    for fn in (conv2d, F.conv2d):
        w.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(x, w, None, 1, 1)
        assert out.dtype == torch.bfloat16
        assert (type(out.grad_fn).__name__ == TAP) == (fn is conv2d)
        out.float().square().sum().backward()
        assert w.grad.dtype == torch.float32
        errors.append(((w.grad - truth).norm() / truth.norm()).item())
    assert errors[0] < 2 * errors[1] + 1e-3 and errors[0] < 2e-2, errors


@pytest.mark.parametrize("cls, ref_cls, kwargs", [
    (TapConv2d, torch.nn.Conv2d, {"kernel_size": 3, "padding": 1}),
    (TapConvTranspose2d, torch.nn.ConvTranspose2d, {"kernel_size": 4, "stride": 2, "padding": 1}),
])  # fmt: skip
def test_tap_layers_are_drop_in_nn_layers(cls, ref_cls, kwargs, monkeypatch):
    """Same parameters, state dict and output as the ``nn`` layer; with :data:`MAX_TAP_SITES` 0 they are it."""
    ref = ref_cls(8, 4, **kwargs)
    ours = cls(8, 4, **kwargs)
    ours.load_state_dict(ref.state_dict())
    assert ours.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(ours(x), ref(x))
    assert type(ours(x).grad_fn).__name__ == TAP
    monkeypatch.setattr(tap_conv, "MAX_TAP_SITES", 0)
    assert type(ours(x).grad_fn).__name__ == "ConvolutionBackward0"


SHIFT_CASES = [  # (c_in, c_out, (h, w), kernel, padding, dilation), all stride 1
    (6, 5, (7, 9), 3, 1, 1),  # 3x3, non-square map
    (6, 4, (6, 6), (3, 2), (1, 0), 1),  # non-square kernel and padding
    (5, 3, (8, 7), 3, 2, 2),  # dilated
    (4, 6, (5, 5), 1, 0, 1),  # 1x1
    (4, 3, (5, 6), 3, 0, 1),  # no padding
]


@pytest.mark.parametrize("chunk", [1 << 22, 7])  # one chunk; chunks of 1 row, split across images
@pytest.mark.parametrize("case", SHIFT_CASES)
def test_shifted_weight_grad_equals_f_conv2d_in_float64(case, chunk, monkeypatch):
    """With the thresholds lowered so these small maps take it, the shifted-rows weight gradient, the input gradient
    and the output equal ATen's to 1e-12 (float64, channels_last), in one chunk and in chunks of one row."""
    monkeypatch.setattr(tap_conv, "MIN_SHIFT_CHANNELS", 1)
    monkeypatch.setattr(tap_conv, "MIN_SHIFT_SITES", 1)
    monkeypatch.setattr(tap_conv, "MAX_TAP_SITES", 0)
    monkeypatch.setattr(tap_conv, "SHIFT_CHUNK_ELEMENTS", chunk)
    calls = []
    shifted = tap_conv.shifted_weight_grad
    monkeypatch.setattr(tap_conv, "shifted_weight_grad", lambda *a: calls.append(1) or shifted(*a))
    c_in, c_out, size, kernel, padding, dilation = case
    g = torch.Generator().manual_seed(3)
    kh, kw = kernel if isinstance(kernel, tuple) else (kernel, kernel)
    cl = torch.channels_last
    x = torch.randn(3, c_in, *size, generator=g, dtype=torch.float64).contiguous(memory_format=cl)
    w = torch.randn(c_out, c_in, kh, kw, generator=g, dtype=torch.float64).contiguous(memory_format=cl)
    b = torch.randn(c_out, generator=g, dtype=torch.float64)
    out, ours = _grads(conv2d, x, w, b, 1, padding, dilation)
    assert type(out.grad_fn).__name__ == TAP and calls == [1]
    _, ref = _grads(F.conv2d, x, w, b, 1, padding, dilation)
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
    assert ours[2].is_contiguous(memory_format=cl)


def test_shifted_weight_grad_in_bfloat16_sums_chunks_in_float32(monkeypatch):
    """bfloat16 inputs over many chunks: within bfloat16 rounding of the float64 gradient (each chunk's product
    rounds once; the chunks are summed in float32)."""
    monkeypatch.setattr(tap_conv, "SHIFT_CHUNK_ELEMENTS", 64)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 8, 12, 12, generator=g, dtype=torch.float64)
    dy = torch.randn(4, 6, 12, 12, generator=g, dtype=torch.float64)
    truth = tap_conv.shifted_weight_grad(dy, x, (3, 3), (1, 1), (1, 1))
    low = tap_conv.shifted_weight_grad(dy.bfloat16(), x.bfloat16(), (3, 3), (1, 1), (1, 1))
    assert low.dtype == torch.bfloat16
    assert ((low.double() - truth).norm() / truth.norm()).item() < 1e-2


def test_only_large_stride_one_channels_last_maps_of_many_channels_take_the_shifted_path():
    """At the real thresholds: a 96-channel 28x28 channels_last map does; NCHW, stride 2, 95 channels or a 27x27
    map do not (ATen's weight gradient), and neither do frozen weights."""
    cl = torch.channels_last
    w = torch.randn(4, 96, 3, 3, requires_grad=True)
    big = torch.randn(1, 96, 28, 28).contiguous(memory_format=cl)
    assert type(conv2d(big, w, padding=1).grad_fn).__name__ == TAP
    assert type(conv2d(big.contiguous(), w, padding=1).grad_fn).__name__ == "ConvolutionBackward0"
    assert type(conv2d(big, w, stride=2, padding=1).grad_fn).__name__ == "ConvolutionBackward0"
    narrow = torch.randn(1, 95, 28, 28).contiguous(memory_format=cl)
    assert type(conv2d(narrow, w[:, :95], padding=1).grad_fn).__name__ == "ConvolutionBackward0"
    small = torch.randn(1, 96, 27, 27).contiguous(memory_format=cl)
    assert type(conv2d(small, w, padding=1).grad_fn).__name__ == "ConvolutionBackward0"
    assert conv2d(big, w.detach(), padding=1).grad_fn is None
