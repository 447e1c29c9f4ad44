"""MixedAE (Chen et al., CVPR 2023, arXiv 2303.17152): mixing, un-mixing, homologous attention,
homologous contrastive loss, training, bad inputs and the `mim fit` run, on real CIFAR-10 images."""

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from mim.backbones.homologous import homologous_attention, homologous_block_forward, topk_key_mask
from mim.errors import ConfigError
from mim.masking import MaskGenerator, RandomMask
from mim.methods.mixedae import (
    MixedAE,
    homologous_contrastive_loss,
    mix_patches,
    sample_sources,
    source_ids,
    source_mask,
    unmix_tokens,
)
from mim.patches import gather_tokens, patchify

REPO = Path(__file__).resolve().parents[1]
QUICK = REPO / "configs" / "mixedae" / "vit_tiny_cifar10_quick.yaml"
SMALL = dict(
    backbone="vit_tiny_patch16_224", img_size=32, patch_size=4,
    decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=2,
)
G, N, K = 4, 64, 16  # group size 1/r, patches (8x8 grid), patches per source r*N


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MixedAE(**SMALL).eval()


class Checkerboard(MaskGenerator):
    """A fixed structured mask (visible = even positions), to check that slot 0 follows the generator."""

    def __call__(self, batch_size, grid_hw, generator=None):
        length = grid_hw[0] * grid_hw[1]
        return (torch.arange(length) % 2 == 1).expand(batch_size, -1).clone()


# -- mixing ------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
def test_mixing_is_a_partition_with_r_n_positions_per_source(seed):
    sources = sample_sources(8, (8, 8), G, RandomMask(0.75), torch.Generator().manual_seed(seed))
    assert sources.shape == (8, N) and sources.dtype == torch.int64
    assert sources.min() >= 0 and sources.max() < G  # every position has exactly one source
    for row in sources:
        assert torch.bincount(row, minlength=G).tolist() == [K] * G
    mask = source_mask(sources, G)  # (B, N): True where another source owns the position
    assert mask.shape == (8 * G, N)
    assert ((~mask).reshape(8, G, N).sum(1) == 1).all()  # the G sources' own sets cover each position once


class FirstRows(MaskGenerator):
    """Visible = the first 16 positions (two grid rows)."""

    def __call__(self, batch_size, grid_hw, generator=None):
        return (torch.arange(grid_hw[0] * grid_hw[1]) >= K).expand(batch_size, -1).clone()


def test_first_slot_follows_the_mask_generator():
    sources = sample_sources(3, (8, 8), 2, Checkerboard(0.5))
    even = torch.arange(N) % 2 == 0
    assert (sources[:, even] == 0).all() and (sources[:, ~even] == 1).all()  # g = 2: mask and complement
    sources = sample_sources(3, (8, 8), G, FirstRows(0.75))
    assert (sources[:, :K] == 0).all()  # g = 4: slot 0 = the generator's visible set, the rest split evenly
    assert all(torch.bincount(row, minlength=G).tolist() == [K] * G for row in sources)


def test_mask_generator_with_wrong_count_is_refused():
    with pytest.raises(ValueError, match="needs exactly r\\*N = 16"):
        sample_sources(2, (8, 8), G, RandomMask(0.5))


def test_mixed_image_takes_each_position_from_its_source(model, cifar_batch):
    imgs = cifar_batch[0]
    sources = model.sample_sources(4, torch.Generator().manual_seed(0))
    mixed = patchify(model.mix(imgs, sources), 4)
    patches = patchify(imgs, 4)
    for m in range(4):
        for n in range(N):
            assert torch.equal(mixed[m, n], patches[m * G + sources[m, n], n])


def test_unmixing_returns_each_source_patches_to_their_places(cifar_batch):
    imgs = cifar_batch[0]  # 16 real images -> 4 mixes
    patches = patchify(imgs, 4)
    sources = sample_sources(4, (8, 8), G, RandomMask(0.75), torch.Generator().manual_seed(3))
    mixed = mix_patches(patches, sources)
    ids = source_ids(sources, G)
    assert ids.shape == (16, K) and (ids.diff(dim=1) > 0).all()  # increasing positions
    own = unmix_tokens(mixed, ids, G)
    assert torch.equal(own, gather_tokens(patches, ids))  # exact: each source's own patches
    # put them back on an empty canvas: each image is exact at its own positions, nothing elsewhere
    canvas = torch.zeros_like(patches).scatter(1, ids[..., None].expand(-1, -1, patches.shape[-1]), own)
    mask = source_mask(sources, G)
    assert torch.equal(canvas[~mask], patches[~mask])
    assert (canvas[mask] == 0).all()
    # and the G sources of a mix, pasted together, give the mixed image back
    assert torch.equal(canvas.reshape(4, G, N, -1).sum(1), mixed)


# -- homologous attention ----------------------------------------------------------------------
def _tokens(model, imgs):
    vit = model.encoder
    return vit.norm_pre(vit._pos_embed(vit.patch_embed(imgs)))


def test_homologous_attention_keeps_exactly_k_keys_per_query(model, cifar_batch):
    block = model.encoder.blocks[0]
    x = block.norm1(_tokens(model, cifar_batch[0][:4]))
    with torch.no_grad():
        out, weights = homologous_attention(block.attn, x, K, num_prefix_tokens=1, return_weights=True)
    assert out.shape == x.shape and weights.shape == (4, 3, 1 + N, 1 + N)
    patch_weights = weights[..., 1:]
    assert ((patch_weights > 0).sum(-1) == K).all()  # exactly K patch keys per query, every head
    assert (weights[..., 0] > 0).all()  # the cls key is always attended
    torch.testing.assert_close(weights.sum(-1), torch.ones(4, 3, 1 + N))
    # the kept keys are the K highest scores of each query
    attn = block.attn
    q, k, _ = attn.qkv(x).reshape(4, 1 + N, 3, 3, -1).permute(2, 0, 3, 1, 4).unbind(0)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    kth = logits[..., 1:].topk(K, dim=-1).values[..., -1:]
    assert ((patch_weights > 0) == (logits[..., 1:] >= kth)).all()


def test_topk_mask_counts():
    logits = torch.randn(2, 3, 9, 9)
    keep = topk_key_mask(logits, 3, num_prefix_tokens=1)
    assert (keep.sum(-1) == 4).all() and keep[..., 0].all()
    with pytest.raises(ValueError, match="top-k must lie in"):
        topk_key_mask(logits, 9, num_prefix_tokens=1)


def test_homologous_block_with_all_keys_equals_timm_block(model, cifar_batch):
    block = model.encoder.blocks[3]
    x = _tokens(model, cifar_batch[0][:4])
    with torch.no_grad():
        torch.testing.assert_close(homologous_block_forward(block, x, N, 1), block(x), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(homologous_block_forward(block, x, K, 1), block(x), atol=1e-3)


def test_encoder_stays_a_plain_timm_vit(model):
    assert type(model.encoder) is VisionTransformer
    assert not any("segment" in key for key in model.encoder.state_dict())
    assert model.homologous_layers == frozenset(range(12)) and model.topk == K


# -- homologous contrastive loss ---------------------------------------------------------------
def test_contrastive_loss_is_minimal_when_features_cluster_by_source():
    torch.manual_seed(0)
    temperature, mixes, dim = 0.1, 4, 32
    sources = sample_sources(mixes, (8, 8), G, RandomMask(0.75), torch.Generator().manual_seed(0))
    # one direction per source at the vertices of a regular simplex (cosine -1/(G-1) between sources)
    vertices = torch.eye(G, dim) - torch.eye(G, dim).mean(0, keepdim=True)
    clustered = vertices[sources] + 1e-4 * torch.randn(mixes, N, dim)
    shuffled = clustered[:, torch.randperm(N)]
    loss_clustered = homologous_contrastive_loss(clustered, sources, temperature)
    loss_shuffled = homologous_contrastive_loss(shuffled, sources, temperature)
    loss_random = homologous_contrastive_loss(torch.randn(mixes, N, dim), sources, temperature)
    positives, negatives = K - 1, N - K
    bound = math.log(positives + negatives * math.exp((-1 / (G - 1) - 1) / temperature))
    assert loss_clustered.item() == pytest.approx(bound, abs=1e-3)  # the optimum for G separated clusters
    assert loss_clustered.item() >= math.log(positives) - 1e-6  # infimum log(|P|)
    assert loss_clustered.item() - math.log(positives) < 1e-3
    assert loss_shuffled > loss_clustered + 1.0 and loss_random > loss_clustered + 1.0


def test_contrastive_loss_ignores_other_mixes():
    sources = sample_sources(2, (8, 8), G, RandomMask(0.75), torch.Generator().manual_seed(1))
    feats = torch.randn(2, N, 8)
    both = homologous_contrastive_loss(feats, sources, 0.1)
    alone = torch.stack([homologous_contrastive_loss(feats[i : i + 1], sources[i : i + 1], 0.1) for i in range(2)])
    torch.testing.assert_close(both, alone.mean())


# -- the whole method --------------------------------------------------------------------------
def test_forward_shapes_and_losses(model, cifar_batch):
    imgs = cifar_batch[0]
    out = model(imgs)
    assert out.pred.shape == (16, N, 48) and out.mask.shape == (16, N) and out.sources.shape == (4, N)
    assert (out.mask.sum(1) == N - K).all()
    assert math.isfinite(out.loss.item()) and out.recon_loss > 0 and out.contrastive_loss > math.log(K - 1)
    torch.testing.assert_close(out.loss, out.recon_loss + out.contrastive_loss)


def test_training_reduces_loss_on_real_images(cifar_batch):
    torch.manual_seed(0)
    model = MixedAE(**SMALL)
    imgs = cifar_batch[0]
    sources = model.sample_sources(4, torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = model(imgs, sources)
    for _ in range(20):
        out = model(imgs, sources)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert out.loss.item() < 0.85 * first.loss.item()
    assert out.recon_loss.item() < 0.6 * first.recon_loss.item()
    assert out.contrastive_loss.item() < first.contrastive_loss.item() - 0.1
    assert model.segment_embed.grad is not None and model.encoder.pos_embed.grad is None


def test_reconstruct_keeps_each_image_own_pixels(model, cifar_batch):
    imgs = cifar_batch[0][:6]  # not a multiple of 4: padded internally
    out = model.reconstruct(imgs, torch.Generator().manual_seed(0))
    assert out["reconstruction"].shape == imgs.shape and out["mask"].shape == (6, 1, 32, 32)
    own = out["mask"].expand_as(imgs) == 0
    assert torch.equal(out["reconstruction"][own], imgs[own])
    assert out["mask"].mean().item() == pytest.approx(0.75)
    assert torch.equal(out["mixed"][own], imgs[own])  # each image's own patches are in its mix


@pytest.mark.filterwarnings(r"ignore:You are trying to `self.log\(\)`")
def test_validation_drops_the_remainder_of_a_short_batch(model, cifar_batch):
    imgs, labels = cifar_batch
    assert model.validation_step((imgs[:10], labels[:10]), 0) is not None  # uses 8 of 10
    assert model.validation_step((imgs[:3], labels[:3]), 1) is None  # fewer than a group: skipped


# -- bad inputs --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mixing_ratio=0.3), "mixing_ratio r must be 1/g for a whole number g >= 2.*got 0.3"),
        (dict(mixing_ratio=1.0), "mixing_ratio r must be 1/g"),
        (dict(mixing_ratio=0.0), "mixing_ratio r must be 1/g"),
        (dict(mixing_ratio=1 / 3), "64 patches\\) cannot be split into 3 equal parts"),
        (dict(homologous_layers=[12]), "homologous_layers \\[12\\] out of range"),
        (dict(temperature=0.0), "temperature must be > 0"),
        (dict(backbone="resnet18"), "needs a timm VisionTransformer"),
    ],
)
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        MixedAE(**{**SMALL, **kwargs})


@pytest.mark.parametrize("batch_size", [6, 2])
def test_batch_not_divisible_by_group_is_refused_in_forward(model, batch_size):
    with pytest.raises(ConfigError, match=f"multiple of 4; got {batch_size}. Fix: --data.batch_size"):
        model(torch.randn(batch_size, 3, 32, 32))


def test_batch_size_is_checked_before_training(shared_data, tmp_path):
    from mim.data import ImageDataModule

    dm = ImageDataModule(root=str(shared_data), batch_size=30, num_workers=0, limit_per_class=3, val_limit_per_class=1)
    trainer = L.Trainer(max_steps=1, default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    model = MixedAE(**SMALL, lr=1e-3)
    with pytest.raises(ConfigError, match="the datamodule's batch_size must be a positive multiple of 4; got 30"):
        trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 0


# -- the command line --------------------------------------------------------------------------
def test_fit_from_yaml_writes_checkpoint_png_and_loadable_encoder(tmp_path, shared_data, monkeypatch):
    from mim.cli import cli_main
    from mim.export import load_encoder

    monkeypatch.setenv("MIM_DATA", str(shared_data))
    cli = cli_main([
        "fit", "-c", str(QUICK), "--trainer.default_root_dir", str(tmp_path),
        "--trainer.max_steps", "3", "--trainer.max_epochs", "1", "--trainer.log_every_n_steps", "1",
        "--data.init_args.batch_size", "8", "--data.init_args.limit_per_class", "3",
        "--data.init_args.val_limit_per_class", "1", "--data.init_args.num_workers", "0",
        "--model.init_args.decoder_depth", "1",
    ])
    log_dir = Path(cli.trainer.log_dir)
    assert isinstance(cli.model, MixedAE) and cli.trainer.global_step == 3
    assert list((log_dir / "checkpoints").glob("*.ckpt")), "a checkpoint is written"
    pngs = list((log_dir / "reconstructions").glob("*.png"))
    assert pngs and pngs[0].stat().st_size > 1000
    assert math.isfinite(float(cli.trainer.callback_metrics["val/loss"]))
    encoder = cli.model.encoder.eval()
    reloaded = load_encoder(log_dir / "encoder.safetensors").eval()
    for key, value in encoder.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.forward_features(imgs), encoder.forward_features(imgs))
