"""Alignments with the official code: SparK's parameter groups, float64 sparse BN, schedule and crop;
exact block masks; token weight decay; CAE's embedding init; ColorMAE's official banks and spectra;
MixedAE's cls option."""

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from timm.optim import Lamb

from mim.backbones.sparse import masked_batch_norm, upsample_active
from mim.errors import ConfigError
from mim.masking import BlockMask, ColorNoiseMask, mask_config
from mim.masking.color_noise import make_noise_bank
from mim.methods import CAE, MAE, MixedAE, SparK
from mim.optim import lr_wd_annealing, weight_decay_groups

REPO = Path(__file__).resolve().parents[1]
VIT = dict(backbone="vit_tiny_patch16_224", img_size=32, patch_size=4, backbone_kwargs={"depth": 1})
#: SparK on a narrow ResNet-18 (one block per stage): the same parameter names and groups, quick to build.
SPARK = dict(backbone="resnet18", img_size=64, decoder_width=64,
             backbone_kwargs={"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64]})  # fmt: skip


def _names(model: torch.nn.Module, groups: list[dict]) -> tuple[set[str], set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    decay = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    return no_decay, decay


# -- SparK -----------------------------------------------------------------------------------------
def test_spark_decoder_mask_tokens_skip_weight_decay_and_lamb_trust_ratio():
    model = SparK(**SPARK)
    groups = model.weight_decay_groups()
    no_decay, decay = _names(model, groups)
    tokens = {f"decoder.mask_tokens.{i}" for i in range(4)}
    assert tokens <= no_decay and not tokens & decay  # 4-D (1, C, 1, 1): only the name rule catches them
    assert "sparse_encoder.model.conv1.weight" in decay and "decoder.head.weight" in decay
    assert "decoder.head.bias" in no_decay and "sparse_encoder.model.bn1.weight" in no_decay
    optimizer = model.create_optimizer(groups, lr=1e-3)
    assert isinstance(optimizer, Lamb) and not optimizer.defaults["always_adapt"]
    # timm's Lamb adapts (trust ratio) only groups with weight decay: give the token a big norm and a
    # tiny gradient; with a trust ratio its first step would be ||w|| / ||update|| times larger than lr.
    token = model.decoder.mask_tokens[0]
    with torch.no_grad():
        token.fill_(10.0)
    for p in model.parameters():
        p.grad = None
    token.grad = torch.full_like(token, 1e-3)
    before = token.detach().clone()
    optimizer.step()
    step = (before - token.detach()).abs()
    assert torch.allclose(step, torch.full_like(step, 1e-3), rtol=1e-3)  # Adam's first step: lr * sign


def test_masked_batch_norm_keeps_float64_forward_and_backward():
    active = torch.rand(3, 1, 2, 2, generator=torch.Generator().manual_seed(0)) > 0.4
    active[:, 0, 0, 0] = True
    sites = upsample_active(active, (4, 4)).double()
    x = (torch.randn(3, 3, 4, 4, dtype=torch.float64) * 3 + 1) * sites
    weight = torch.rand(3, dtype=torch.float64) + 0.5
    bias = torch.randn(3, dtype=torch.float64)
    x.requires_grad_(True), weight.requires_grad_(True), bias.requires_grad_(True)
    out = masked_batch_norm(x, sites, None, None, weight, bias)
    assert out.dtype == torch.float64
    # BatchNorm1d (float64) on the gathered active feature vectors, as the official SparseBatchNorm2d
    rows = x.permute(0, 2, 3, 1)[sites[:, 0].bool()]
    ref = F.batch_norm(rows, None, None, weight, bias, training=True)
    torch.testing.assert_close(out.permute(0, 2, 3, 1)[sites[:, 0].bool()], ref, rtol=1e-12, atol=1e-12)
    # (the input is zero outside the active sites by contract: perturb only the active entries)
    assert torch.autograd.gradcheck(lambda a, w, b: masked_batch_norm(a * sites, sites, None, None, w, b), (x, weight, bias))
    # float32 weights with a float64 input: gradients come back in each tensor's dtype
    w32 = weight.detach().float().requires_grad_(True)
    masked_batch_norm(x, sites, None, None, w32, None).square().sum().backward()
    assert w32.grad.dtype == torch.float32 and x.grad.dtype == torch.float64


def test_lr_wd_annealing_matches_official_endpoints():
    warmup, total = 10, 110
    assert lr_wd_annealing(0, warmup, total) == pytest.approx(0.005)
    assert lr_wd_annealing(5, warmup, total) == pytest.approx(0.005 + 0.995 * 0.5)
    assert lr_wd_annealing(warmup, warmup, total) == pytest.approx(1.0)
    assert lr_wd_annealing(total - 1, warmup, total) == pytest.approx(0.001)
    middle = warmup + (total - 1 - warmup) / 2
    assert lr_wd_annealing(int(middle), warmup, total) == pytest.approx(0.001 + 0.999 * 0.5, abs=0.02)
    rule = SparK(**SPARK).lr_rule(1.0)
    assert rule(0, warmup, total) == pytest.approx(0.005) and rule(total - 1, warmup, total) == pytest.approx(0.001)
    rule = SparK(**SPARK, min_lr=0.0, warmup_start_ratio=0.0).lr_rule(1.0)
    assert rule(0, warmup, total) == 0.0 and rule(total - 1, warmup, total) == pytest.approx(0.0)
    with pytest.raises(ConfigError, match="warmup_start_ratio"):
        SparK(**SPARK, warmup_start_ratio=1.5)


def test_spark_configs_crop_like_official_pretraining():
    configs = sorted((REPO / "configs" / "spark").glob("*.yaml"))
    assert len(configs) >= 4
    for path in configs:
        assert yaml.safe_load(path.read_text())["data"]["init_args"]["crop_scale"] == [0.67, 1.0], path.name


# -- token weight decay / CAE init -------------------------------------------------------------------
def test_tokens_get_weight_decay_as_official_unless_opted_out():
    model = MAE(**VIT, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    no_decay, decay = _names(model, model.weight_decay_groups())
    assert {"encoder.cls_token", "decoder.mask_token", "encoder.patch_embed.proj.weight"} <= decay
    assert {"encoder.blocks.0.norm1.weight", "encoder.blocks.0.attn.qkv.bias"} <= no_decay
    assert "encoder.pos_embed" not in no_decay | decay  # frozen sin-cos
    opted_out = MAE(**VIT, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, decay_tokens=False)
    no_decay, decay = _names(opted_out, opted_out.weight_decay_groups())
    assert {"encoder.cls_token", "decoder.mask_token"} <= no_decay and "encoder.patch_embed.proj.weight" in decay
    cae = CAE(**VIT, regressor_depth=1, decoder_depth=1)
    no_decay, decay = _names(cae, cae.weight_decay_groups())
    assert {"encoder.cls_token", "regressor.mask_token"} <= decay
    mixed = MixedAE(**VIT, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, decay_tokens=False)
    no_decay, decay = _names(mixed, mixed.weight_decay_groups())
    assert {"encoder.cls_token", "decoder.mask_token"} <= no_decay and "segment_embed" in decay
    groups = weight_decay_groups([("a.mask_tokens.0", torch.nn.Parameter(torch.ones(1, 2, 1, 1)))], 0.1, ["mask_token"])
    assert [len(g["params"]) for g in groups] == [1, 0]


def test_cae_patch_embedding_and_tokens_init_as_official():
    torch.manual_seed(0)
    model = CAE(backbone="vit_tiny_patch16_224", img_size=32, patch_size=16, backbone_kwargs={"depth": 1},
                regressor_depth=1, decoder_depth=1)  # fmt: skip
    weight = model.encoder.patch_embed.proj.weight  # 192 x 768 values: statistics are tight
    assert weight.abs().max() <= 0.02 and 0.0095 < weight.std() < 0.0125  # N(0, 0.02) cut at one std: 0.0108
    assert torch.count_nonzero(model.encoder.patch_embed.proj.bias) == 0
    for token in (model.encoder.cls_token, model.regressor.mask_token):
        assert token.abs().max() <= 0.02 and token.std() > 0.005
    # MAE keeps its Xavier-uniform patch embedding: bound sqrt(6 / (fan_in + fan_out)) = 0.0625 here
    mae = MAE(backbone="vit_tiny_patch16_224", img_size=32, patch_size=16, backbone_kwargs={"depth": 1},
              decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)  # fmt: skip
    assert mae.encoder.patch_embed.proj.weight.abs().max() > 0.05  # Xavier bound sqrt(6 / 960) = 0.079


def test_cae_embed_init_mae_scales_with_the_patch_fan_in():
    """``embed_init="mae"``: Xavier-uniform patch projection (bound sqrt(6 / (48 + 192)) = 0.158 at patch 4),
    cls token normal 0.02; the regressor's mask token keeps CAE's cut normal; an unknown value is one error."""
    torch.manual_seed(0)
    model = CAE(backbone="vit_tiny_patch16_224", img_size=32, patch_size=4, backbone_kwargs={"depth": 1},
                regressor_depth=1, decoder_depth=1, embed_init="mae")  # fmt: skip
    weight = model.encoder.patch_embed.proj.weight  # 192 x 48 values
    assert weight.abs().max() <= 0.1582 and 0.08 < weight.std() < 0.1  # uniform(+-0.158): std 0.091
    assert model.encoder.cls_token.abs().max() > 0.02  # 192 normals of std 0.02: some beyond one std
    assert model.regressor.mask_token.abs().max() <= 0.02
    with pytest.raises(ConfigError, match="embed_init"):
        CAE(backbone="vit_tiny_patch16_224", img_size=32, patch_size=4, embed_init="xavier")


def test_cae_encoder_init_does_not_depend_on_the_head():
    """One seed gives one random-init encoder whatever the regressor and decoder: head ablations share the
    random-init baseline row."""

    def encoder(**head):
        torch.manual_seed(0)
        return CAE(backbone="vit_tiny_patch16_224", img_size=32, patch_size=16, backbone_kwargs={"depth": 2},
                   **head).encoder.state_dict()  # fmt: skip

    base = encoder(regressor_depth=1, decoder_depth=1)
    heads = ({"regressor_depth": 4, "decoder_depth": 4}, {"regressor_depth": 1, "decoder_depth": 0, "num_heads": 6})
    for head in heads:
        other = encoder(**head)
        assert all(torch.equal(base[name], other[name]) for name in base), head


# -- BlockMask ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid", [(14, 14), (8, 8), (2, 2), (7, 5)])
@pytest.mark.parametrize("ratio", [0.4, 0.5, 0.75])
def test_block_mask_exact_count_by_retrying_blocks(grid, ratio, monkeypatch):
    import mim.masking.block as block

    calls = {"sample": 0}
    random_sample = block.random.Random.sample

    def spy(self, *args, **kwargs):  # the random fill draws with Random.sample: it must not run
        calls["sample"] += 1
        return random_sample(self, *args, **kwargs)

    monkeypatch.setattr(block.random.Random, "sample", spy)
    mask = BlockMask(ratio)(64, grid, torch.Generator().manual_seed(1))
    target = min(max(round(ratio * grid[0] * grid[1]), 1), grid[0] * grid[1] - 1)
    assert (mask.sum(1) == target).all()
    assert calls["sample"] == 0


def test_block_mask_random_fill_is_an_explicit_option():
    gen = BlockMask(0.75, random_fill=True)
    assert mask_config(gen)["init_args"]["random_fill"] is True
    mask = gen(64, (14, 14), torch.Generator().manual_seed(0))
    assert (mask.sum(1) == 147).all()
    same = BlockMask(0.75)(8, (14, 14), torch.Generator().manual_seed(3))
    assert torch.equal(same, BlockMask(0.75)(8, (14, 14), torch.Generator().manual_seed(3)))
    with pytest.raises(ConfigError, match="at least 2x2"):
        BlockMask(0.5)(2, (1, 8))


# -- ColorMAE ----------------------------------------------------------------------------------------
def _radial_power(bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean power per radial frequency band of ``(N, S, S)`` maps: (low, mid, high) thirds of (0, 0.5]."""
    side = bank.shape[-1]
    power = torch.fft.fft2(bank - bank.mean(dim=(1, 2), keepdim=True)).abs().square().mean(0)
    freq = (torch.fft.fftfreq(side).view(-1, 1) ** 2 + torch.fft.fftfreq(side).view(1, -1) ** 2).sqrt()
    edges = [0.0, 0.06, 0.2, 0.5]  # below green's peak band, around it (0.15 c/p), above it
    bands = [power[(freq > lo) & (freq <= hi)].mean() for lo, hi in zip(edges, edges[1:])]
    return torch.stack(bands), power


def test_color_noise_spectra_have_their_intended_shapes():
    low_mid_high = {}
    for color in ("red", "blue", "green", "purple"):
        low_mid_high[color], _ = _radial_power(make_noise_bank(color, 64, 32, 0, 1.0, 2.0))
    red, blue, green, purple = (low_mid_high[c] for c in ("red", "blue", "green", "purple"))
    assert red[0] > red[1] > red[2]  # low-pass
    assert blue[0] < blue[1] < blue[2]  # high-pass
    assert green[1] > green[0] and green[1] > green[2]  # band-pass
    assert purple[1] < purple[0] and purple[1] < purple[2]  # band-stop
    # purple keeps the low frequencies blue removes: a different filter, not blue again
    assert purple[0] / purple[2] > 5 * blue[0] / blue[2]


def test_color_noise_mask_reads_official_npz_bank(tmp_path):
    rng = np.random.default_rng(0)
    maps = rng.random((5, 16, 16)).astype(np.float32)
    maps[:, :4, :4] += 10.0  # a bright top-left block in every map
    path = tmp_path / "green_noise_data_5.npz"
    np.savez_compressed(path, maps, rng.random(3))  # the first array is the bank, as the official loader
    gen = ColorNoiseMask(0.75, bank_file=str(path))
    assert torch.equal(gen.bank(), torch.from_numpy(maps))
    mask = gen(32, (16, 16), torch.Generator().manual_seed(0))
    assert (mask.sum(1) == 192).all()
    visible = ~mask.view(32, 16, 16)
    corners = torch.stack([visible[:, :4, :4], visible[:, :4, -4:], visible[:, -4:, :4], visible[:, -4:, -4:]], 1)
    assert corners.flatten(2).all(-1).any(1).all()  # the bright block (at some flipped corner) stays visible
    assert mask_config(gen)["init_args"]["bank_file"] == str(path)
    assert torch.equal(pickle.loads(pickle.dumps(gen))(4, (8, 8), torch.Generator().manual_seed(1)),
                       gen(4, (8, 8), torch.Generator().manual_seed(1)))  # fmt: skip
    with pytest.raises(ConfigError, match="smaller than the 20x20"):
        gen(2, (20, 20))
    with pytest.raises(ConfigError, match="does not exist"):
        ColorNoiseMask(0.75, bank_file=str(tmp_path / "missing.npz"))
    bad = tmp_path / "bad.npz"
    np.savez(bad, np.zeros((4, 4)))
    with pytest.raises(ConfigError, match=r"shape \(N, S, S'\)"):
        ColorNoiseMask(0.75, bank_file=str(bad))


# -- MixedAE -----------------------------------------------------------------------------------------
def test_mixedae_cls_attention_option(cifar_batch):
    imgs = cifar_batch[0][:4]
    kwargs = dict(VIT, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    torch.manual_seed(0)
    always = MixedAE(**kwargs)
    topk = MixedAE(**kwargs, cls_attention="topk")
    topk.load_state_dict(always.state_dict())
    sources = always.sample_sources(1, torch.Generator().manual_seed(0))
    a, b = always(imgs, sources), topk(imgs, sources)
    assert math.isfinite(b.loss.item()) and not torch.allclose(a.pred, b.pred)
    with pytest.raises(ConfigError, match="cls_attention"):
        MixedAE(**kwargs, cls_attention="never")


# -- CAE with DALL-E's dVAE tokens -------------------------------------------------------------------
@pytest.fixture(scope="module")
def dalle_file(tmp_path_factory):
    from safetensors.torch import save_file

    from mim.methods.dalle import DalleEncoder

    torch.manual_seed(0)
    small = DalleEncoder(n_hid=16, n_blk_per_group=1, vocab_size=32)  # the released one: n_hid 256, 2, 8192
    path = tmp_path_factory.mktemp("dalle") / "dalle_encoder.safetensors"
    save_file({k: v.contiguous() for k, v in small.state_dict().items()}, str(path))
    return path


def test_dalle_encoder_layout_matches_the_released_one():
    from mim.methods.dalle import DalleEncoder

    with torch.device("meta"):  # shapes only
        encoder = DalleEncoder()
    shapes = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    assert shapes["blocks.input.w"] == (256, 3, 7, 7) and shapes["blocks.output.conv.w"] == (8192, 2048, 1, 1)
    assert shapes["blocks.group_2.block_1.id_path.w"] == (512, 256, 1, 1)
    assert shapes["blocks.group_4.block_2.res_path.conv_2.w"] == (512, 512, 3, 3)
    assert 53e6 < sum(v.numel() for v in encoder.state_dict().values()) < 55e6  # DALL-E's encoder: ~54 M
    with torch.no_grad():  # stride 8: a 112 px view gives 14x14 codes
        assert DalleEncoder(n_hid=16, n_blk_per_group=1, vocab_size=32)(torch.rand(1, 3, 112, 112)).shape == (1, 32, 14, 14)


def test_cae_dalle_target_cross_entropy_on_masked_patches(cifar_batch, dalle_file, monkeypatch):
    from mim.methods.dalle import map_pixels

    model = CAE(**VIT, regressor_depth=1, decoder_depth=1, target="dalle", dalle_weights=str(dalle_file)).eval()
    assert not any(p.requires_grad for p in model.tokenizer.parameters())
    imgs = cifar_batch[0][:4]
    mask = BlockMask(0.5)(4, (8, 8), torch.Generator().manual_seed(0))
    tokens = model.target_tokens(imgs)
    assert tokens.shape == (4, 64) and tokens.dtype == torch.int64 and 0 <= tokens.min() and tokens.max() < 32
    out = model(imgs, mask)
    assert out.pred.shape == (4, 32, 32)  # 32 masked patches x 32 codes
    labels = tokens[mask].view(4, 32)  # masked positions in increasing order, as the decoder's
    torch.testing.assert_close(out.loss_rec, F.cross_entropy(out.pred.flatten(0, 1), labels.flatten()))
    scrambled = tokens.masked_fill(~mask, 31) if tokens[~mask].ne(31).any() else tokens.masked_fill(~mask, 0)
    monkeypatch.setattr(model, "target_tokens", lambda x: scrambled)  # codes of visible patches: no effect
    torch.testing.assert_close(model(imgs, mask).loss_rec, out.loss_rec)
    out.loss.backward()
    assert model.encoder.patch_embed.proj.weight.grad is not None
    # the tokenizer's view: the same crop, un-normalised, at 8 px per patch, map_pixels-ed
    view = model.tokenizer_view(imgs)
    assert view.shape == (4, 3, 64, 64) and view.min() >= 0.1 - 1e-6 and view.max() <= 0.9 + 1e-6
    pixels = (imgs * model.pixel_std + model.pixel_mean).clamp(0, 1)
    expected = map_pixels(F.interpolate(pixels, size=(64, 64), mode="bicubic", antialias=True).clamp(0, 1))
    torch.testing.assert_close(view, expected)
    torch.testing.assert_close(model.tokenizer_view(imgs.flip(-1)), view.flip(-1))  # geometry kept
    big = CAE(backbone="vit_tiny_patch16_224", img_size=224, patch_size=16, backbone_kwargs={"depth": 1},
              regressor_depth=1, decoder_depth=1, target="dalle", dalle_weights=str(dalle_file))  # fmt: skip
    assert big.tokenizer_view(torch.zeros(1, 3, 224, 224)).shape == (1, 3, 112, 112)  # the paper's 112 px view


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(target="dalle"), "dalle_weights"),
        (dict(target="dalle", dalle_weights="/nowhere/dalle.safetensors"), "does not exist"),
        (dict(target="teacher"), "teacher"),
        (dict(target="tokens"), "target must be"),
    ],
)
def test_cae_target_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        CAE(**VIT, regressor_depth=1, decoder_depth=1, **kwargs)


def test_load_dalle_encoder_rejects_other_weights(tmp_path):
    from safetensors.torch import save_file

    from mim.methods.dalle import load_dalle_encoder

    path = tmp_path / "other.safetensors"
    save_file({"blocks.input.w": torch.zeros(16, 3, 7, 7)}, str(path))
    with pytest.raises(ConfigError, match="not a DALL-E dVAE encoder"):
        load_dalle_encoder(str(path))
