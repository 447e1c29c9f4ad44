import math

import pytest
import torch

from mim.backbones.vit import create_vit, encode_visible
from mim.errors import ConfigError
from mim.masking import RandomMask
from mim.methods import MAE
from mim.optim import warmup_cosine
from mim.methods.mae import masked_mse, pixel_target
from mim.patches import visible_ids

SMALL = dict(
    backbone="vit_tiny_patch16_224", img_size=32, patch_size=4,
    decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=2,
)


@pytest.fixture(scope="module")
def mae():
    torch.manual_seed(0)
    return MAE(**SMALL).eval()


def test_forward_shapes_and_loss(mae, cifar_batch):
    imgs = cifar_batch[0]
    loss, pred, mask = mae(imgs)
    assert pred.shape == (16, 64, 48) and mask.shape == (16, 64)
    assert (mask.sum(1) == 48).all()
    assert loss.ndim == 0 and math.isfinite(loss.item()) and loss.item() > 0


def test_loss_ignores_predictions_at_visible_patches(mae, cifar_batch):
    imgs = cifar_batch[0]
    mask = RandomMask(0.75)(16, (8, 8), torch.Generator().manual_seed(0))
    target = pixel_target(imgs, 4, norm_pix_loss=True)
    pred = torch.randn_like(target)
    changed = pred.clone()
    changed[~mask] = 1e3 * torch.randn_like(changed[~mask])
    assert masked_mse(pred, target, mask) == masked_mse(changed, target, mask)
    changed_masked = pred.clone()
    changed_masked[mask] += 1.0
    assert masked_mse(changed_masked, target, mask) != masked_mse(pred, target, mask)


def test_loss_is_mse_on_masked_normalised_patches():
    imgs = torch.randn(2, 3, 8, 8)
    mask = torch.tensor([[True, False, False, False], [False, True, True, False]])
    target = pixel_target(imgs, 4, norm_pix_loss=True)
    # each target patch has zero mean and (almost) unit variance
    assert torch.allclose(target.mean(-1), torch.zeros(2, 4), atol=1e-5)
    assert torch.allclose(target.var(-1), torch.ones(2, 4), atol=1e-4)
    pred = torch.zeros_like(target)
    expected = torch.stack([target[0, 0], target[1, 1], target[1, 2]]).pow(2).mean()
    assert torch.allclose(masked_mse(pred, target, mask), expected)


def test_encoder_on_visible_tokens_matches_timm_with_attention_mask(mae, cifar_batch):
    """Encoding only the visible tokens equals timm's own forward over all tokens in which the
    masked tokens are hidden from attention (per-token layers are independent of the others)."""
    imgs = cifar_batch[0][:4]
    vit = mae.encoder
    mask = RandomMask(0.75)(4, (8, 8), torch.Generator().manual_seed(1))
    ids = visible_ids(mask)
    ours = encode_visible(vit, imgs, ids)
    keys = torch.cat([torch.ones(4, 1, dtype=torch.bool), ~mask], dim=1)  # cls + visible
    attn_mask = keys[:, None, None, :].expand(-1, 1, keys.shape[1], -1)
    with torch.no_grad():
        full = vit.forward_features(imgs, attn_mask=attn_mask)
    theirs = torch.cat([full[:, :1], full[:, 1:][~mask].view(4, -1, full.shape[-1])], dim=1)
    assert ours.shape == (4, 1 + 16, 192)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_pos_embed_is_fixed_sincos(mae):
    pos = mae.encoder.pos_embed
    assert not pos.requires_grad
    assert torch.equal(pos[0, 0], torch.zeros(192))  # cls position
    assert pos[0, 1:].abs().max() <= 1.0 and pos[0, 1:].std() > 0.3
    # distinct positions get distinct embeddings
    assert torch.cdist(pos[0, 1:], pos[0, 1:]).add(torch.eye(64)).min() > 0.1


def test_training_reduces_loss_on_real_images(cifar_batch):
    torch.manual_seed(0)
    model = MAE(**SMALL)
    imgs = cifar_batch[0]
    mask = RandomMask(0.75)(16, (8, 8), torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = model(imgs, mask)[0].item()
    for _ in range(30):
        loss = model(imgs, mask)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first
    assert model.encoder.pos_embed.grad is None


def test_reconstruct_keeps_visible_pixels(mae, cifar_batch):
    imgs = cifar_batch[0][:4]
    out = mae.reconstruct(imgs, torch.Generator().manual_seed(0))
    visible = out["mask"].expand_as(imgs) == 0
    assert torch.equal(out["reconstruction"][visible], imgs[visible])
    assert out["mask"].mean().item() == pytest.approx(0.75)


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 10, 110) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 110) == pytest.approx(1.0)
    assert warmup_cosine(60, 10, 110) == pytest.approx(0.5)
    assert warmup_cosine(110, 10, 110) == pytest.approx(0.0)
    assert warmup_cosine(110, 10, 110, min_ratio=0.1) == pytest.approx(0.1)


def test_weight_decay_groups_exclude_bias_norm_pos_and_tokens_when_opted_out():
    # (the default, decay_tokens=True, decays the tokens as the official MAE: tests/test_paper_fixes.py)
    model = MAE(**SMALL, decay_tokens=False)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = model.weight_decay_groups()
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    decay = {names[id(p)] for g in groups if g["weight_decay"] == 0.05 for p in g["params"]}
    assert {"encoder.cls_token", "decoder.mask_token", "encoder.blocks.0.norm1.weight",
            "encoder.blocks.0.attn.qkv.bias"} <= no_decay
    assert "encoder.pos_embed" not in no_decay | decay  # frozen
    assert {"encoder.blocks.0.attn.qkv.weight", "decoder.decoder_pred.weight",
            "encoder.patch_embed.proj.weight"} <= decay


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mask_ratio=1.0), "mask_ratio must lie strictly between 0 and 1"),
        (dict(mask_ratio=0.0), "mask_ratio must lie strictly between 0 and 1"),
        (dict(img_size=30), "img_size 30 is not divisible by patch_size 4"),
        (dict(backbone="vit_tiny_patch16_22"), "timm has no model named 'vit_tiny_patch16_22'.*Did you mean"),
        (dict(backbone="resnet18"), "builds a ResNet, but this method needs a timm VisionTransformer"),
    ],
)
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        MAE(**{**SMALL, **kwargs})


def test_create_vit_passes_timm_kwargs():
    vit = create_vit("vit_tiny_patch16_224", 32, 4, drop_path_rate=0.1)
    assert vit.patch_embed.grid_size == (8, 8) and vit.num_classes == 0
    assert vit.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)


def test_denormalize_patches_inverts_the_normalised_target(cifar_batch):
    from mim.methods.mae import denormalize_patches
    from mim.patches import patchify

    imgs = cifar_batch[0]
    patches = patchify(imgs, 4)
    restored = denormalize_patches(pixel_target(imgs, 4, norm_pix_loss=True), patches)
    torch.testing.assert_close(restored, patches, atol=1e-4, rtol=1e-4)
