"""SparK's speed options change no result: ``channels_last`` on / off, the fused masked-BN backward
against the einsum formula it replaced, the per-tap weight gradient of the small maps' convolutions
against ATen's, and the decoder's fused (B*H*W, C) batch norm + ReLU6 against ``nn.BatchNorm2d`` give the same
loss, parameter gradients and BN statistics."""

import copy

import pytest
import torch
import torch.nn.functional as F

from mim import sync_batchnorm
from mim.backbones import active_conv, sparse, tap_conv
from mim.backbones.sparse import MASK_STRIDE, upsample_active
from mim.methods import SparK
from mim.methods.mae import pixel_target


def einsum_backward(ctx, grad_out, _mean, _var):
    """The masked-BN backward before the fused one (``torch.einsum`` for ``sum(g * c)``): the reference."""
    centred, sites, invstd, weight, count = ctx.saved_tensors
    g = grad_out * sites
    sums = torch.stack([g.sum(dim=(0, 2, 3)), torch.einsum("bchw,bchw->c", g, centred)])
    grad_weight = sums[1] * invstd if weight is not None and ctx.needs_input_grad[2] else None
    grad_bias = sums[0].clone() if ctx.has_bias and ctx.needs_input_grad[3] else None
    a = invstd if weight is None else invstd * weight
    k1 = -a * invstd.square() * sums[1] / count
    k0 = -a * sums[0] / count
    grad_x = torch.addcmul(g * a[None, :, None, None], centred, k1[None, :, None, None])
    grad_x = grad_x.add_(k0[None, :, None, None]).mul_(sites)
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    if grad_bias is not None:
        grad_bias = grad_bias.to(ctx.bias_dtype)
    return grad_x, None, grad_weight, grad_bias, None, None


def _step(model, imgs, mask):
    """Loss, gradients and buffers of one training step (forward + backward) on a copy of ``model``."""
    model = copy.deepcopy(model)
    pred = model(imgs, mask)[1]
    # masked_mse in the input's dtype (mim's computes in float32, which would blur the float64 step)
    per_patch = (pred - pixel_target(imgs, MASK_STRIDE, True)).square().mean(dim=-1)
    loss = (per_patch * mask).sum() / mask.sum()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return loss.detach(), grads, {n: b.clone() for n, b in model.named_buffers() if b.is_floating_point()}


def _relative_error(value: torch.Tensor, truth: torch.Tensor) -> float:
    return ((value.double() - truth).norm() / truth.norm().clamp_min(1e-30)).item()


def _assert_same_step(step, reference):
    """Two float64 :func:`_step` results: the same loss (1e-12), gradients and buffers (1e-10)."""
    (loss, grads, bufs), (ref_loss, ref_grads, ref_bufs) = step, reference
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    for n, ref in ref_grads.items():
        if ref is not None:
            assert _relative_error(grads[n], ref) < 1e-10, n
    for n, ref in ref_bufs.items():
        torch.testing.assert_close(bufs[n], ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backbone, batch", [("resnet18", 8), ("convnext_atto", 4)])  # float64 depthwise convs are slow
def test_channels_last_and_fused_bn_backward_change_no_result(backbone, batch, cifar_batch, monkeypatch):
    """On 8 (ResNet-18) or 4 (ConvNeXt-Atto) real CIFAR-10 images at 64 px, NCHW + fused backward and channels_last + fused backward
    give the loss of NCHW + einsum backward (the reference) to 1e-5, and every parameter gradient as
    close to the float64 step as the reference is (the float32 rounding of a few gradients that
    cancel, e.g. biases before a BN, is ~1e-4 of their norm; a wrong formula would be off by ~1).
    The combination einsum + channels_last is left out: slow, and not what runs."""
    imgs = F.interpolate(cifar_batch[0][:batch], scale_factor=2, mode="bilinear", align_corners=False)
    torch.manual_seed(0)
    nchw = SparK(backbone, img_size=64, decoder_width=64, channels_last=False)
    last = SparK(backbone, img_size=64, decoder_width=64, channels_last=True)
    last.load_state_dict(nchw.state_dict())
    conv = next(m for m in last.encoder.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    mask = nchw.sample_mask(batch, torch.Generator().manual_seed(0))
    fused = sparse._MaskedBatchNorm.backward
    truth_loss, truth, _ = _step(copy.deepcopy(nchw).double(), imgs.double(), mask)  # fused, float64
    monkeypatch.setattr(sparse._MaskedBatchNorm, "backward", staticmethod(einsum_backward))
    ref_loss, ref_grads, ref_bufs = _step(nchw, imgs, mask)
    monkeypatch.setattr(sparse._MaskedBatchNorm, "backward", fused)
    assert 0.5 < ref_loss.item() < 2.0
    torch.testing.assert_close(truth_loss, ref_loss.double(), rtol=1e-5, atol=0)
    for key, model in [("nchw", nchw), ("channels_last", last)]:
        loss, grads, bufs = _step(model, imgs, mask)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0, msg=lambda m, key=key: f"{key} loss: {m}")
        assert grads.keys() == ref_grads.keys()
        for n, ref in ref_grads.items():
            if ref is None:  # a parameter outside the SparK step (e.g. ConvNeXt's head norm)
                assert grads[n] is None and truth[n] is None, n
                continue
            ref_error, error = _relative_error(ref, truth[n]), _relative_error(grads[n], truth[n])
            # 1e-4: oneDNN's channels_last weight gradient of the 7x7 stem sums in another order with 2 threads
            # than with 1 (7e-5 against 2e-6 on the same step); a wrong formula is off by ~1
            assert error <= 3 * ref_error + 1e-4, f"{key} {n}: {error:.2e} vs the reference's {ref_error:.2e}"
        for n, ref in ref_bufs.items():
            torch.testing.assert_close(bufs[n], ref, rtol=1e-4, atol=1e-5, msg=lambda m, key=key, n=n: f"{key} {n}: {m}")


def test_tap_weight_gradient_changes_no_spark_result(cifar_batch, monkeypatch):
    """On 8 real CIFAR-10 images at 64 px (ResNet-18, decoder width 64, channels_last): the convolutions on the
    2x2 and 4x4 maps (encoder stages 3-4, the decoder's densify projections, first block and first two
    upsamplings) take the per-tap weight gradient, and every gradient equals the step with ATen's weight
    gradient (float64 to 1e-10). The encoder takes this path where the active-site convolution does not (NCHW
    maps, masks above ``active_conv.MAX_ACTIVE_FRACTION``): that one is switched off here."""
    imgs = F.interpolate(cifar_batch[0][:8], scale_factor=2, mode="bilinear", align_corners=False).double()
    model = SparK("resnet18", img_size=64, decoder_width=64).double()
    mask = model.sample_mask(8, torch.Generator().manual_seed(0))
    monkeypatch.setattr(active_conv, "MAX_ACTIVE_FRACTION", -1.0)
    calls = []
    backward = tap_conv._TapConv2d.backward

    def counting(ctx, grad_out):
        calls.append(tuple(grad_out.shape[-2:]))
        return backward(ctx, grad_out)

    monkeypatch.setattr(tap_conv._TapConv2d, "backward", staticmethod(counting))
    loss, grads, bufs = _step(model, imgs, mask)
    # (output-gradient sizes) encoder: layer3 (5 convs with 4x4 outputs incl. its 1x1 shortcut) + layer4 (5 with
    # 2x2); decoder: 2 densify projections (2x2, 4x4), block 0's 2 convs (4x4) and the transposed convs of blocks
    # 0 and 1 (2x2 -> 4x4, 4x4 -> 8x8)
    assert sorted(calls) == sorted([(2, 2)] * 6 + [(4, 4)] * 9 + [(8, 8)]), calls
    monkeypatch.setattr(tap_conv, "MAX_TAP_SITES", 0)
    calls.clear()
    reference = _step(model, imgs, mask)
    assert not calls
    _assert_same_step((loss, grads, bufs), reference)


def test_decoder_rows_batch_norm_changes_no_spark_result(cifar_batch, monkeypatch):
    """On 8 real CIFAR-10 images at 64 px (ResNet-18, decoder width 64, channels_last): the decoder's 10 norms (2
    per UNet block) take the (B*H*W, C) path, the first of each with ReLU6 fused, and every gradient and buffer
    equals the step with ATen's ``channels_last`` batch norm and ReLU6 (float64 to 1e-10)."""
    imgs = F.interpolate(cifar_batch[0][:8], scale_factor=2, mode="bilinear", align_corners=False).double()
    model = SparK("resnet18", img_size=64, decoder_width=64).double()
    mask = model.sample_mask(8, torch.Generator().manual_seed(0))
    calls = []
    apply = sync_batchnorm._RowsBatchNorm.apply
    monkeypatch.setattr(sync_batchnorm._RowsBatchNorm, "apply", lambda *a: calls.append(a[-1]) or apply(*a))
    loss, grads, bufs = _step(model, imgs, mask)
    assert calls == [(0.0, 6.0), None] * 5, calls
    monkeypatch.setattr(sync_batchnorm, "_channels_last", lambda x: False)
    calls.clear()
    reference = _step(model, imgs, mask)
    assert not calls
    _assert_same_step((loss, grads, bufs), reference)


def test_shifted_weight_gradient_changes_no_spark_result(cifar_batch, monkeypatch):
    """On 8 real CIFAR-10 images at 64 px (ResNet-18, decoder width 64, channels_last), with the shifted-rows
    thresholds lowered to every map: the decoder's 14 stride-1 convolutions (4 densify projections, the 5 blocks'
    two) take it, and every gradient equals the step with ATen's weight gradient (float64 to 1e-10)."""
    imgs = F.interpolate(cifar_batch[0][:8], scale_factor=2, mode="bilinear", align_corners=False).double()
    model = SparK("resnet18", img_size=64, decoder_width=64).double()
    mask = model.sample_mask(8, torch.Generator().manual_seed(0))
    monkeypatch.setattr(tap_conv, "MIN_SHIFT_CHANNELS", 1)
    monkeypatch.setattr(tap_conv, "MIN_SHIFT_SITES", 1)
    calls = []
    shifted = tap_conv.shifted_weight_grad
    monkeypatch.setattr(tap_conv, "shifted_weight_grad", lambda *a: calls.append(tuple(a[0].shape[-2:])) or shifted(*a))
    loss, grads, bufs = _step(model, imgs, mask)
    # densify projections at 2x2 (1x1 kernel) .. 16x16, the blocks' convolutions at 4x4 .. 64x64
    assert sorted(calls) == [(2, 2)] + [(4, 4)] * 3 + [(8, 8)] * 3 + [(16, 16)] * 3 + [(32, 32)] * 2 + [(64, 64)] * 2
    monkeypatch.setattr(tap_conv, "MIN_SHIFT_CHANNELS", 10**9)
    calls.clear()
    reference = _step(model, imgs, mask)
    assert not calls
    _assert_same_step((loss, grads, bufs), reference)


@pytest.mark.parametrize("size", [64, 224])
def test_active_site_convolutions_change_no_spark_result(size, cifar_batch, monkeypatch):
    """On real CIFAR-10 images (8 at 64 px, 2 at 224 px; ResNet-18, decoder width 64, channels_last), all 20 encoder
    convolutions (stem, 16 in the blocks, 3 shortcuts) run at the active sites only, and the loss, every gradient
    and buffer equal the step with the dense convolutions plus re-masking (float64 to 1e-10)."""
    batch = 8 if size == 64 else 2
    imgs = F.interpolate(cifar_batch[0][:batch], size=size, mode="bilinear", align_corners=False).double()
    model = SparK("resnet18", img_size=size, decoder_width=64).double()
    mask = model.sample_mask(batch, torch.Generator().manual_seed(0))
    calls = []
    apply = active_conv._ActiveConv2d.apply
    monkeypatch.setattr(active_conv._ActiveConv2d, "apply", lambda *a: calls.append(a[-1].fraction) or apply(*a))
    loss, grads, bufs = _step(model, imgs, mask)
    assert len(calls) == 20 and all(0 < f <= active_conv.MAX_ACTIVE_FRACTION for f in calls), calls
    monkeypatch.setattr(active_conv, "MAX_ACTIVE_FRACTION", -1.0)
    calls.clear()
    reference = _step(model, imgs, mask)
    assert not calls
    _assert_same_step((loss, grads, bufs), reference)


def test_sparse_encoder_in_channels_last_keeps_the_active_sites(cifar_batch):
    """In channels_last the encoder's maps stay zero outside the active sites, masked pixels change
    nothing, and its features equal the NCHW ones."""
    imgs = F.interpolate(cifar_batch[0][:8], scale_factor=2, mode="bilinear", align_corners=False)
    torch.manual_seed(0)
    model = SparK("resnet18", img_size=64, decoder_width=64, channels_last=True)
    active = torch.rand(8, 1, 2, 2, generator=torch.Generator().manual_seed(3)) > 0.5
    active[:, 0, 0, 0] = True
    hidden_pixels = ~upsample_active(active, (64, 64))
    scribbled = imgs + 10 * torch.randn_like(imgs) * hidden_pixels
    cl = torch.channels_last
    with torch.no_grad():
        feats = model.sparse_encoder(imgs.contiguous(memory_format=cl), active)
        again = model.sparse_encoder(scribbled.contiguous(memory_format=cl), active)
        flat = copy.deepcopy(model.sparse_encoder).to(memory_format=torch.contiguous_format)(imgs, active)
    assert feats[0].is_contiguous(memory_format=cl)
    for f, g, h in zip(feats, again, flat):
        hidden = ~upsample_active(active, f.shape[-2:])
        assert (f * hidden).abs().max() == 0 and f.abs().max() > 0
        torch.testing.assert_close(g, f, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(h, f, atol=1e-5, rtol=1e-5)


def test_fused_bn_backward_keeps_float64():
    """float64 input, float32 parameters: output and input gradient float64, parameter gradients float32,
    equal to the einsum reference."""
    g = torch.Generator().manual_seed(0)
    active = torch.rand(4, 1, 2, 2, generator=g) > 0.5
    active[:, 0, 0, 0] = True
    sites = upsample_active(active, (6, 6)).double()
    x = ((torch.randn(4, 5, 6, 6, generator=g, dtype=torch.float64) * 2 + 1) * sites).contiguous(
        memory_format=torch.channels_last
    )
    upstream = torch.randn(4, 5, 6, 6, generator=g, dtype=torch.float64)
    weight, bias = torch.rand(5, generator=g) + 0.5, torch.randn(5, generator=g)
    grads = []
    for backward in (sparse._MaskedBatchNorm.backward, einsum_backward):
        xi, w, b = (t.clone().requires_grad_() for t in (x, weight, bias))
        original = sparse._MaskedBatchNorm.backward
        sparse._MaskedBatchNorm.backward = staticmethod(backward)
        try:
            out = sparse.masked_batch_norm(xi, sites, weight=w, bias=b)
            (out * upstream).sum().backward()
        finally:
            sparse._MaskedBatchNorm.backward = original
        assert out.dtype == xi.grad.dtype == torch.float64 and w.grad.dtype == b.grad.dtype == torch.float32
        grads.append((xi.grad, w.grad, b.grad))
    for new, old in zip(*grads):
        torch.testing.assert_close(new, old, rtol=1e-6, atol=1e-6)
