"""SparK: sparse encoder (both backends), sparse BN, densify + decoder, loss, export, errors."""

import copy
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from timm.optim import Lamb

from mim.backbones.sparse import SparseEncoder, create_convnet, masked_batch_norm, upsample_active
from mim.cli import cli_main
from mim.errors import ConfigError
from mim.eval.encoders import load_encoder_from, weights_sha256
from mim.export import load_encoder, save_encoder
from mim.methods import SparK
from mim.methods.spark import cosine_weight_decay

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(img_size=64, decoder_width=64)


@pytest.fixture(scope="module")
def imgs64(cifar_batch):
    """The 16 real CIFAR-10 images upsampled 2x to 64 px, as the SparK configs feed them."""
    return F.interpolate(cifar_batch[0], scale_factor=2, mode="bilinear", align_corners=False)


def _active(batch: int, grid: int = 2, seed: int = 0) -> torch.Tensor:
    active = torch.rand(batch, 1, grid, grid, generator=torch.Generator().manual_seed(seed)) > 0.5
    active[:, 0, 0, 0] = True  # at least one visible cell per image
    return active


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_masked_batch_norm_equals_batchnorm1d_on_gathered_active_sites(channels_last):
    """The official sparse BN gathers the active feature vectors and runs BatchNorm1d on them; in either
    memory format (the backward's masked channel sum takes a different product for each)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    active = _active(4, grid=3)
    sites = upsample_active(active, (12, 12))
    x = torch.randn(4, 8, 12, 12) * 3 + 1
    x = (x * sites).contiguous(memory_format=fmt)
    bn = torch.nn.BatchNorm1d(8)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    rm, rv = torch.zeros(8), torch.ones(8)
    upstream = torch.randn(4, 8, 12, 12).contiguous(memory_format=fmt)  # nonzero off the sites too
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    weight, bias = bn.weight.detach().clone().requires_grad_(), bn.bias.detach().clone().requires_grad_()
    ours = masked_batch_norm(x_ours, sites.float(), rm, rv, weight, bias, 0.1, bn.eps)
    (ours * upstream).sum().backward()
    gathered = x_theirs.permute(0, 2, 3, 1)[sites[:, 0]]
    theirs = torch.zeros_like(x.permute(0, 2, 3, 1))
    theirs[sites[:, 0]] = bn(gathered)
    theirs = theirs.permute(0, 3, 1, 2)
    (theirs * upstream).sum().backward()
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rm, bn.running_mean)
    torch.testing.assert_close(rv, bn.running_var)
    # the hand-written backward equals autograd through BatchNorm1d on the gathered rows
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weight.grad, bn.weight.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bias.grad, bn.bias.grad, atol=1e-5, rtol=1e-5)
    ours, theirs = ours.detach(), theirs.detach()
    # and not what a dense BN over the zero-filled map gives
    dense = F.batch_norm(x, None, None, bn.weight, bn.bias, True) * sites
    assert (dense - ours).abs().max() > 0.1


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50", "convnext_atto"])
def test_sparse_encoder_never_sees_masked_pixels(backbone, imgs64):
    enc = SparseEncoder(create_convnet(backbone))
    imgs, active = imgs64[:8], _active(8)
    feats = enc(imgs, active)
    assert [f.shape[-1] for f in feats] == [16, 8, 4, 2]
    assert [f.shape[1] for f in feats] == enc.channels
    scribbled = imgs + 10 * torch.randn_like(imgs) * ~upsample_active(active, (64, 64))
    again = enc(scribbled, active)
    for f, g in zip(feats, again):
        hidden = ~upsample_active(active, f.shape[-2:])
        assert (f * hidden).abs().max() == 0, "zero outside the active sites"
        assert f.abs().max() > 0
        torch.testing.assert_close(f, g, atol=1e-5, rtol=1e-5)  # masked pixels change nothing


def test_all_active_in_eval_mode_is_the_plain_timm_model(imgs64):
    model = create_convnet("convnext_atto").eval()
    enc = SparseEncoder(model)
    ones = torch.ones(8, 1, 2, 2, dtype=torch.bool)
    with torch.no_grad():
        sparse = enc(imgs64[:8], ones)
        dense = model.forward_intermediates(imgs64[:8], indices=enc.out_indices, intermediates_only=True)
    for s, d in zip(sparse, dense):
        torch.testing.assert_close(s, d)


def _encode_and_grads(model, backend, imgs, active):
    model = copy.deepcopy(model)
    feats = SparseEncoder(model, backend)(imgs, active)
    loss = sum((f * torch.linspace(-1, 1, f.shape[1])[None, :, None, None]).square().mean() for f in feats)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return feats, grads, dict(model.named_buffers())


def test_spconv_and_masked_backends_agree_on_real_images(imgs64):
    """Same features on the active sites, same parameter gradients, same BN statistics (ResNet-18),
    with two torch threads (spconv on CPU is only right on one: the backend guards it)."""
    torch.manual_seed(0)
    model = create_convnet("resnet18")
    imgs, active = imgs64, _active(16, seed=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        masked = _encode_and_grads(model, "masked", imgs, active)
        sparse = _encode_and_grads(model, "spconv", imgs, active)
        assert torch.get_num_threads() == 2, "the spconv guards restore the thread count after backward"
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(masked[0], sparse[0]):
        sites = upsample_active(active, a.shape[-2:]).expand_as(a)
        torch.testing.assert_close(b[sites], a[sites], atol=1e-4, rtol=1e-4)
        assert (b[~sites] == 0).all()
    for name, grad in masked[1].items():
        scale = grad.abs().max().clamp_min(1e-8)
        torch.testing.assert_close(sparse[1][name] / scale, grad / scale, atol=1e-4, rtol=0, msg=name)
    for name, buf in masked[2].items():
        torch.testing.assert_close(sparse[2][name], buf, atol=1e-4, rtol=1e-4, msg=name)


def test_spconv_cpu_workarounds_live_in_one_place():
    from spconv.pytorch import ops

    from mim.backbones.spconv_backend import active_indices, import_spconv

    import_spconv()
    if not torch.cuda.is_available():
        assert ops.get_current_stream() == 0  # the CPU backward no longer asks CUDA for a stream
    # a non-contiguous active map still gives contiguous int32 (batch, y, x), row-major
    grid = torch.zeros(2, 1, 4, 3, dtype=torch.bool)
    grid[0, 0, 1, 2] = grid[1, 0, 3, 0] = grid[1, 0, 0, 1] = True
    transposed = grid.transpose(2, 3).contiguous().transpose(2, 3)
    assert not transposed.is_contiguous()
    idx = active_indices(transposed)
    assert idx.is_contiguous() and idx.dtype == torch.int32
    assert idx.tolist() == [[0, 1, 2], [1, 0, 1], [1, 3, 0]]


def test_spark_forward_loss_on_masked_patches_only(imgs64):
    torch.manual_seed(0)
    model = SparK("resnet18", **SMALL)
    mask = model.sample_mask(16, torch.Generator().manual_seed(0))
    assert mask.shape == (16, 4) and (mask.sum(1) == 2).all()  # round(0.6 * 4) cells masked
    loss, pred, same_mask = model(imgs64, mask)
    assert pred.shape == (16, 4, 32 * 32 * 3) and torch.equal(mask, same_mask)
    assert math.isfinite(loss.item()) and 0.5 < loss.item() < 2.0  # ~1 for normalised targets
    recon = model.reconstruct(imgs64[:4], torch.Generator().manual_seed(0))
    visible = recon["mask"] == 0
    assert torch.equal(recon["reconstruction"][visible.expand(-1, 3, -1, -1)], imgs64[:4][visible.expand(-1, 3, -1, -1)])


@pytest.mark.parametrize("backbone", ["resnet18", "convnext_atto"])
def test_spark_learns_on_real_images(backbone, imgs64):
    """A few AdamW steps on 16 real images lower the masked-patch loss (fixed masks)."""
    torch.manual_seed(0)
    model = SparK(backbone, **SMALL)
    mask = model.sample_mask(16, torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        loss = model(imgs64, mask)[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # ~1.0 at the start (normalised targets); falls step after step (an untrained model stays flat)
    assert losses[-1] < 0.97 * losses[0] and all(b < a for a, b in zip(losses, losses[1:])), losses


def test_decoder_fills_masked_sites_with_per_scale_mask_tokens():
    model = SparK("resnet18", **SMALL).eval()
    dec = model.decoder
    assert [t.shape[1] for t in dec.mask_tokens] == [512, 256, 128, 64]  # coarse first
    feats = [torch.zeros(2, c, 64 // s, 64 // s) for c, s in zip(model.sparse_encoder.channels, (4, 8, 16, 32))]
    active = torch.zeros(2, 1, 2, 2, dtype=torch.bool)
    active[:, 0, 0, 0] = True
    with torch.no_grad():
        dense = dec.densify(feats, active)
        dec.mask_tokens[0].add_(1.0)
        changed = dec.densify(feats, active)
    assert [d.shape[1] for d in dense] == [64, 32, 16, 8]  # widths halve from decoder_width
    assert not torch.allclose(dense[0], changed[0]) and torch.equal(dense[1], changed[1])


def test_exported_encoder_loads_with_timm_and_gives_sparks_features(tmp_path, imgs64):
    model = SparK("convnext_atto", **SMALL)
    model(imgs64)[0].backward()  # one training forward: BN/LN stats, nothing special
    path = save_encoder(model.encoder, model.encoder_config, tmp_path / "encoder.safetensors")
    timm_model = load_encoder(path).eval()
    model.eval()
    ones = torch.ones(16, 1, 2, 2, dtype=torch.bool)
    with torch.no_grad():
        inside = model.sparse_encoder(imgs64, ones)[-1]
        torch.testing.assert_close(timm_model.forward_features(imgs64), inside)


def test_weight_decay_follows_the_official_cosine():
    assert cosine_weight_decay(0, 100, 0.04, 0.2) == pytest.approx(0.04)
    assert cosine_weight_decay(99, 100, 0.04, 0.2) == pytest.approx(0.2)
    assert cosine_weight_decay(50, 101, 0.04, 0.2) == pytest.approx(0.12)


def test_bad_input_gives_readable_errors(monkeypatch, imgs64):
    with pytest.raises(ConfigError, match="4 feature scales"):
        SparK("vit_tiny_patch16_224", **SMALL)
    with pytest.raises(ConfigError, match="multiple of 32"):
        SparK("resnet18", img_size=48)
    with pytest.raises(ConfigError, match="mask_ratio must lie strictly between 0 and 1"):
        SparK("resnet18", mask_ratio=1.2, **SMALL)
    with pytest.raises(ConfigError, match="depthwise"):
        SparK("convnext_atto", backend="spconv", **SMALL)
    with pytest.raises(ConfigError, match="backend must be one of"):
        SparK("resnet18", backend="torchsparse", **SMALL)
    with pytest.raises(ValueError, match="divisible by 32"):
        SparK("resnet18", **SMALL)(torch.randn(2, 3, 48, 48))
    monkeypatch.setitem(sys.modules, "spconv", None)
    monkeypatch.setitem(sys.modules, "spconv.pytorch", None)
    with pytest.raises(ConfigError, match=r"pip install 'mim-lightning\[sparse\]'"):
        SparK("resnet18", backend="spconv", **SMALL)


@pytest.mark.parametrize(
    "config", sorted((REPO / "configs" / "spark").glob("*_cifar10*.yaml")), ids=lambda p: p.stem
)  # the *_in1k.yaml configs: tests/test_in1k_configs.py
def test_configs_build(config, shared_data, monkeypatch):
    monkeypatch.setenv("MIM_DATA", str(shared_data))
    cli = cli_main(["-c", str(config)], run=False)
    assert isinstance(cli.model, SparK) and cli.model.img_size == cli.datamodule.img_size == 64


@pytest.mark.parametrize(
    "config, backend", [("resnet18_cifar10.yaml", "spconv"), ("convnext_atto_cifar10_quick.yaml", "masked")]
)
def test_fit_from_yaml_with_probes_export_lamb_and_clipping(config, backend, tmp_path, shared_data, monkeypatch):
    monkeypatch.setenv("MIM_DATA", str(shared_data))
    cli = cli_main(
        ["-c", str(REPO / "configs" / "spark" / config), "--trainer.default_root_dir", str(tmp_path),
         "--trainer.precision", "32-true", "--trainer.devices", "1", "--trainer.max_steps", "3",
         "--trainer.max_epochs", "1", "--trainer.check_val_every_n_epoch", "1", "--trainer.log_every_n_steps", "1",
         "--data.init_args.batch_size", "8", "--data.init_args.limit_per_class", "3",
         "--data.init_args.val_limit_per_class", "1", "--data.init_args.num_workers", "0",
         "--model.init_args.decoder_width", "64", "--model.init_args.backend", backend],
        run=False,
    )  # fmt: skip
    clips = []
    original = cli.model.clip_gradients
    cli.model.clip_gradients = lambda opt, **kw: (clips.append(kw), original(opt, **kw))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    log_dir = Path(cli.trainer.log_dir)
    metrics = cli.trainer.callback_metrics
    assert metrics["probe/val_top1"] >= 0 and metrics["knn/val_top1"] >= 0 and math.isfinite(metrics["val/loss"])
    if "quick" in config:  # the full configs draw pictures every 5 epochs
        assert list((log_dir / "reconstructions").glob("*.png"))
    optimizer = cli.trainer.optimizers[0]
    assert isinstance(optimizer, Lamb)
    decays = sorted(g["weight_decay"] for g in optimizer.param_groups)
    assert decays[0] == 0.0 and decays[-1] == pytest.approx(cosine_weight_decay(2, 3, 0.04, 0.2))
    assert clips == [{"gradient_clip_val": 5.0, "gradient_clip_algorithm": "norm"}] * 3
    from_ckpt, info = load_encoder_from(cli.trainer.checkpoint_callback.last_model_path)  # weights_only load
    assert info["weights_sha256"] == weights_sha256(cli.model.encoder) == weights_sha256(from_ckpt)
    timm_model = load_encoder(log_dir / "encoder.safetensors").eval()
    ones = torch.ones(2, 1, 2, 2, dtype=torch.bool)
    imgs = torch.randn(2, 3, 64, 64)
    cli.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(timm_model.forward_features(imgs), cli.model.sparse_encoder(imgs, ones)[-1])
