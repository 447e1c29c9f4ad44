import json
import math
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from mim.cli import cli_main
from mim.errors import ConfigError
from mim.export import load_encoder
from mim.masking import BlockMask, RandomMask
from mim.methods.cae import CAE
from mim.patches import visible_ids

REPO = Path(__file__).resolve().parents[1]
QUICK = REPO / "configs" / "cae" / "vit_tiny_cifar10_quick.yaml"
SMALL = dict(backbone="vit_tiny_patch16_224", img_size=32, patch_size=4, regressor_depth=1, decoder_depth=1)


@pytest.fixture(scope="module")
def cae():
    torch.manual_seed(0)
    return CAE(**SMALL).eval()


def _mask(batch=16, ratio=0.5, seed=0):
    return RandomMask(ratio)(batch, (8, 8), torch.Generator().manual_seed(seed))


def test_defaults_follow_the_paper():
    model = CAE(img_size=32, patch_size=4)
    assert isinstance(model.mask_generator, BlockMask) and model.mask_generator.mask_ratio == 0.5
    assert model.align_weight == 2.0
    assert len(model.regressor.blocks) == 4 and len(model.decoder.blocks) == 4
    assert model.hparams["mask"]["class_path"].endswith("BlockMask")


def test_shapes_and_finite_losses(cae, cifar_batch):
    imgs = cifar_batch[0]
    out = cae(imgs)
    num_masked = 32
    assert out.mask.shape == (16, 64) and (out.mask.sum(1) == num_masked).all()
    assert out.latent_pred.shape == (16, num_masked, 192)  # regressor output: (B, N_m, D)
    assert out.latent_target.shape == (16, num_masked, 192)
    assert out.pred.shape == (16, num_masked, 48)
    for value in (out.loss, out.loss_rec, out.loss_align):
        assert value.ndim == 0 and math.isfinite(value.item())
    torch.testing.assert_close(out.loss, out.loss_rec + 2.0 * out.loss_align)


def test_alignment_target_has_no_gradient(cifar_batch):
    torch.manual_seed(0)
    model = CAE(**SMALL).train()
    imgs, mask = cifar_batch[0][:8], _mask(8)
    # Every encoder pass is seen at its first block: the visible pass builds a graph, the target pass none.
    seen = []
    hook = model.encoder.blocks[0].register_forward_hook(lambda m, i, o: seen.append((o.shape[1], o.requires_grad)))
    out = model(imgs, mask)
    hook.remove()
    assert seen == [(1 + 32, True), (1 + 32, False)]
    assert not out.latent_target.requires_grad and out.latent_target.grad_fn is None
    # The alignment loss alone moves the encoder only through the visible path: its gradient equals
    # the one of the same loss against a constant copy of the target.
    model.zero_grad()
    out.loss_align.backward()
    grads = {n: p.grad.clone() for n, p in model.encoder.named_parameters() if p.grad is not None}
    assert grads and any(g.abs().sum() > 0 for g in grads.values())
    model.zero_grad()
    ids_keep, ids_masked = visible_ids(mask), visible_ids(~mask)
    latent_pred = model.regressor(model.forward_encoder(imgs, ids_keep), ids_keep, ids_masked)
    torch.nn.functional.mse_loss(latent_pred, out.latent_target.clone()).backward()
    for name, grad in grads.items():
        torch.testing.assert_close(model.encoder.get_parameter(name).grad, grad, msg=name)


def test_training_reduces_loss_on_real_images(cifar_batch):
    torch.manual_seed(0)
    model = CAE(**SMALL)
    imgs, mask = cifar_batch[0], _mask()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = model(imgs, mask)
    for _ in range(20):
        out = model(imgs, mask)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert out.loss.item() < 0.7 * first.loss.item()
    assert out.loss_rec.item() < first.loss_rec.item()
    assert model.encoder.pos_embed.grad is None


def test_reconstruct_keeps_visible_pixels(cae, cifar_batch):
    imgs = cifar_batch[0][:4]
    out = cae.reconstruct(imgs, torch.Generator().manual_seed(0))
    assert out["reconstruction"].shape == imgs.shape and out["mask"].shape == (4, 1, 32, 32)
    visible = out["mask"].expand_as(imgs) == 0
    assert torch.equal(out["reconstruction"][visible], imgs[visible])
    assert not torch.equal(out["reconstruction"][~visible], imgs[~visible])
    assert out["mask"].mean().item() == pytest.approx(0.5)


def test_teacher_target_is_frozen_and_loads_weights(tmp_path, cifar_batch):
    kwargs = dict(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=2)
    source = timm.create_model("vit_tiny_patch16_224", num_classes=0, **kwargs)
    weights = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(weights))
    model = CAE(**SMALL, teacher="vit_tiny_patch16_224", teacher_weights=str(weights), teacher_kwargs=kwargs).train()
    assert not model.teacher.training and not any(p.requires_grad for p in model.teacher.parameters())
    for key, value in load_file(str(weights)).items():
        assert torch.equal(model.teacher.state_dict()[key], value), key
    imgs = cifar_batch[0][:4]
    out = model(imgs, _mask(4))
    assert out.pred.shape == (4, 32, 48)  # teacher width; its 4x4 grid is repeated onto 8x8
    out.loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    groups = model.weight_decay_groups()
    optimised = {id(p) for g in groups for p in g["params"]}
    assert optimised and not any(id(p) in optimised for p in model.teacher.parameters())
    rec = model.reconstruct(imgs, torch.Generator().manual_seed(0))
    assert rec["reconstruction"].shape == imgs.shape


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(align_weight=-1.0), "align_weight must be >= 0"),
        (dict(teacher="vit_tiny_patch16_22"), "timm has no model named 'vit_tiny_patch16_22'"),
        (dict(teacher_weights="x.safetensors"), "teacher_weights is set but teacher is not"),
        (dict(teacher="vit_tiny_patch16_224", teacher_weights="/nowhere/x.safetensors"), "does not exist"),
        (dict(teacher="vit_tiny_patch16_224"), "fails on 32 px images"),
        (dict(regressor_depth=0), "regressor_depth >= 1"),
        (dict(mask_ratio=1.0), "mask_ratio must lie strictly between 0 and 1"),
        (dict(backbone="resnet18"), "needs a timm VisionTransformer"),
    ],
)
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        CAE(**{**SMALL, **kwargs})


def test_fit_from_quick_yaml_writes_checkpoint_png_and_loadable_encoder(tmp_path, shared_data, monkeypatch):
    monkeypatch.setenv("MIM_DATA", str(shared_data))
    tiny = [
        "--trainer.max_steps", "3", "--trainer.max_epochs", "1", "--trainer.log_every_n_steps", "1",
        "--data.init_args.batch_size", "8", "--data.init_args.limit_per_class", "3",
        "--data.init_args.val_limit_per_class", "1", "--data.init_args.num_workers", "0",
        "--model.init_args.regressor_depth", "1", "--model.init_args.decoder_depth", "1",
    ]
    cli = cli_main(["fit", "-c", str(QUICK), "--trainer.default_root_dir", str(tmp_path), *tiny])
    assert type(cli.model) is CAE
    log_dir = Path(cli.trainer.log_dir)
    assert list((log_dir / "checkpoints").glob("*.ckpt")), "a checkpoint is written"
    pngs = list((log_dir / "reconstructions").glob("*.png"))
    assert pngs and pngs[0].stat().st_size > 1000
    metrics = cli.trainer.callback_metrics
    for key in ("train/loss", "train/loss_rec", "train/loss_align", "val/loss"):
        assert math.isfinite(float(metrics[key])), key
    weights = log_dir / "encoder.safetensors"
    assert json.loads(weights.with_suffix(".json").read_text())["model_name"] == "vit_tiny_patch16_224"
    reloaded = load_encoder(weights).eval()
    for key, value in cli.model.encoder.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    assert json.loads(weights.with_suffix(".json").read_text())["model_kwargs"]["init_values"] == 0.1


@pytest.mark.parametrize("config", sorted((REPO / "configs" / "cae").glob("*.yaml")), ids=lambda c: c.stem)
def test_every_cae_config_gives_the_encoder_layer_scale_0_1(config):
    """The official recipe's encoder LayerScale (``--layer_scale_init_value 0.1``, Atten4Vis/CAE
    ``scripts/cae_base_800e.sh``) in every shipped CAE config; the encoder init (``mae_init_``) keeps it at 0.1."""
    import yaml

    init_args = yaml.safe_load(config.read_text())["model"]["init_args"]
    assert init_args["backbone_kwargs"]["init_values"] == 0.1
    torch.manual_seed(0)
    model = CAE(**SMALL, backbone_kwargs={"init_values": init_args["backbone_kwargs"]["init_values"], "depth": 2})
    for block in model.encoder.blocks:
        for gamma in (block.ls1.gamma, block.ls2.gamma):
            assert torch.equal(gamma, torch.full_like(gamma, 0.1))
