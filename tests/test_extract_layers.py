"""Several layers in one extraction pass, 16-bit stores, token layouts (registers, no cls, ConvNet stages) and the
high-norm token filter, on real CIFAR-10 images with small random-weight timm models."""

from __future__ import annotations

import shutil

import lightning as L
import pytest
import timm
import torch
from safetensors.torch import save_file

from mim.data import ImageDataModule
from mim.errors import ConfigError
from mim.export import OutputError, save_encoder
from mim.features import FeatureExtractor, FeatureStore, FeatureStoreWriter
from mim.features.extract import high_norm_tokens
from mim.sae.data import FeatureStoreDataModule

VIT_KWARGS = {"img_size": 32, "patch_size": 4, "depth": 4}  # ViT-Tiny/4, 4 blocks
LAYERS = [1, 2, 3]
TOKENS = ["cls", "mean", "patch"]
N_IMAGES = 20  # 2 per class, batches of 8, shards of 7
#: a DINOv2-with-registers layout (1 cls + 4 registers) at toy size
DINO = ("timm:vit_small_patch14_reg4_dinov2",
        {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2})
#: a SigLIP layout (no class token, attention-pool head) at toy size
SIGLIP = ("timm:vit_base_patch16_siglip_224",
          {"img_size": 32, "patch_size": 4, "depth": 2, "embed_dim": 64, "num_heads": 2})


def _dm(root, **overrides) -> ImageDataModule:
    kwargs = {"root": str(root), "batch_size": 8, "num_workers": 0, "limit_per_class": 2,
              "predict_split": "train", "train_augment": False, "return_index": True}
    return ImageDataModule(**{**kwargs, **overrides})


def _extract(path, root, model, **writer_kwargs) -> FeatureStoreWriter:
    writer = FeatureStoreWriter(str(path), **{"shard_size": 7, **writer_kwargs})
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(path.parent),
                        callbacks=[writer])
    trainer.predict(model, datamodule=_dm(root), return_predictions=False)
    return writer


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    torch.manual_seed(1)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, **VIT_KWARGS)
    return save_encoder(model, {"model_name": "vit_tiny_patch16_224", "model_kwargs": VIT_KWARGS},
                        tmp_path_factory.mktemp("enc") / "encoder.safetensors")


@pytest.fixture(scope="module")
def batches(shared_data):
    """The predict batches the extraction sees, in its order."""
    dm = _dm(shared_data)
    dm.setup("predict")
    return list(dm.predict_dataloader())


@pytest.fixture(scope="module")
def float32_stores(tmp_path_factory, encoder_file, shared_data):
    path = tmp_path_factory.mktemp("multi") / "vit"
    writer = _extract(path, shared_data, FeatureExtractor(str(encoder_file), layers=LAYERS, tokens=TOKENS))
    return path, writer


def test_several_layers_in_one_pass_equal_single_layer_extractions(float32_stores, encoder_file, shared_data,
                                                                   batches):
    path, writer = float32_stores
    assert sorted(p.name for p in path.iterdir()) == ["layer_1", "layer_2", "layer_3"]
    assert writer.store_paths == {layer: path / f"layer_{layer}" for layer in LAYERS}
    for layer in LAYERS:  # bitwise equal to a one-layer extractor on the same batches
        store = FeatureStore(path / f"layer_{layer}")
        meta = store.metadata
        assert (meta["layer"], meta["tokens"], meta["layers"], len(store)) == (layer, TOKENS, LAYERS, N_IMAGES)
        single = FeatureExtractor(str(encoder_file), layers=layer, tokens=TOKENS)
        rows = [single.predict_step(b, i)["layers"][layer] for i, b in enumerate(batches)]
        for kind in TOKENS:
            assert torch.equal(store.read(kind).features, torch.cat([r[kind] for r in rows])), (layer, kind)
    # the last block is forward_features (final norm), the others the raw residual stream
    model = single.encoder
    imgs = torch.cat([b[0] for b in batches])
    torch.testing.assert_close(FeatureStore(path / "layer_3").read("patch").features,
                               model.forward_features(imgs)[:, 1:], atol=1e-5, rtol=1e-5)
    # same settings again: every layer's store is reused, nothing is encoded
    again = _extract(path, shared_data, FeatureExtractor(str(encoder_file), layers=[3, 1, 2, -1], tokens=TOKENS))
    assert again.reused


def test_float16_store_with_high_norm_flags(float32_stores, encoder_file, shared_data, tmp_path):
    path = tmp_path / "half"
    model = FeatureExtractor(str(encoder_file), layers=LAYERS, tokens=["mean", "patch"], dtype="float16",
                             high_norm_factor=1.2)
    _extract(path, shared_data, model)
    for layer in LAYERS:
        half, full = FeatureStore(path / f"layer_{layer}"), FeatureStore(float32_stores[0] / f"layer_{layer}")
        got, ref = half.read("patch"), full.read("patch").features
        assert got.features.dtype == torch.float16 and half.metadata["dtype"] == "float16"
        scale = ref.abs().amax().item()
        torch.testing.assert_close(got.features.float(), ref, rtol=2**-10, atol=2**-10 * scale)  # fp16 rounding
        torch.testing.assert_close(half.read("mean", dtype=torch.float32).features, full.read("mean").features,
                                   rtol=2**-10, atol=2**-10 * scale)
        # flags: per image, norm > 1.2 x that image's median patch-token norm (on the float32 features)
        flags = half.read_high_norm()
        assert torch.equal(flags, high_norm_tokens(ref, 1.2))
        flagged = int(flags.sum())
        assert half.high_norm_tokens == flagged and flagged < flags.numel() / 2
        assert flagged > 0 or layer == 3  # after the final norm the token norms are alike
        # the SAE data stream skips them: exactly the unflagged tokens, in the store's float16 (cast on the device)
        dm = FeatureStoreDataModule(str(path / f"layer_{layer}"), val_store=str(path / f"layer_{layer}"),
                                    batch_size=64, val_batch_size=97)
        dm.setup("fit")
        assert dm.tokens_per_epoch == N_IMAGES * 64 - flagged
        streamed = list(dm.val_dataloader())
        feats = torch.cat([b.features for b in streamed])
        assert feats.dtype == torch.float16 and torch.equal(feats, got.features[~flags])
        kept = torch.cat([b.features for b in half.batches(50, "patch", shuffle=False, flatten=True)])
        assert len(kept) == N_IMAGES * 64  # without skip_high_norm every token comes


def test_free_space_check_counts_every_layer(tmp_path, encoder_file, shared_data, monkeypatch):
    model = FeatureExtractor(str(encoder_file), layers=LAYERS, tokens=TOKENS)
    one = N_IMAGES * model.bytes_per_image(32, 3)
    assert one == N_IMAGES * (66 * 192 * 4 + 16) and model.bytes_per_image(32) == 3 * one // N_IMAGES

    class Usage:  # room for one layer's store with its margin, not for three
        total, used, free = 10**12, 0, int(one * 1.05) + 64 * 2**20 + one

    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage())
    with pytest.raises(OutputError, match=r"20 images x 198 tokens x d_model 192 in float32, 3 layers together"):
        _extract(tmp_path / "full", shared_data, model)
    assert not list((tmp_path / "full").rglob("*.safetensors"))


def test_register_tokens_are_kept_apart(cifar_batch):
    imgs = cifar_batch[0][:4]
    extractor = FeatureExtractor(*DINO, layers=[0, 1], tokens=["cls", "register", "pooled", "mean", "patch"])
    assert (extractor.num_prefix_tokens, extractor.num_registers) == (5, 4)
    assert extractor.layer_tokens == {0: ["cls", "register", "mean", "patch"],
                                      1: ["cls", "register", "pooled", "mean", "patch"]}
    feats = extractor(imgs)
    model = extractor.encoder
    with torch.no_grad():
        x = model.norm_pre(model._pos_embed(model.patch_embed(imgs)))
        first = model.blocks[0](x)
        final = model.forward_features(imgs)  # [cls, 4 registers, 16 patches] after the final norm
        pooled = model.forward_head(final, pre_logits=True)
    for layer, seq in ((0, first), (1, final)):
        assert feats[layer]["register"].shape == (4, 4, 64) and feats[layer]["patch"].shape == (4, 16, 64)
        torch.testing.assert_close(feats[layer]["cls"], seq[:, 0])
        torch.testing.assert_close(feats[layer]["register"], seq[:, 1:5])
        torch.testing.assert_close(feats[layer]["patch"], seq[:, 5:])
        torch.testing.assert_close(feats[layer]["mean"], seq[:, 5:].mean(1))
    torch.testing.assert_close(feats[1]["pooled"], pooled)
    assert extractor.tokens_per_image(32, 1) == 1 + 4 + 1 + 1 + 16
    with pytest.raises(ConfigError, match="no register tokens.*Fix: drop register"):
        FeatureExtractor(*SIGLIP, tokens=["register"])


def test_model_without_cls_offers_its_pooled_output(cifar_batch):
    imgs = cifar_batch[0][:4]
    with pytest.raises(ConfigError, match=r"has no class token, so tokens cannot include 'cls'. Fix: use tokens \[pooled\]"):
        FeatureExtractor(*SIGLIP, tokens=["cls", "patch"])
    with pytest.raises(ConfigError, match=r"'pooled'.*do not include the last block 1. Fix: add -1"):
        FeatureExtractor(*SIGLIP, layers=[0], tokens=["pooled"])
    with pytest.raises(ConfigError, match=r"layers \[0\] would store nothing"):
        FeatureExtractor(*SIGLIP, layers=[0, 1], tokens=["pooled"])
    extractor = FeatureExtractor(*SIGLIP, layers=[0, -1], tokens=["pooled", "patch"])
    feats = extractor(imgs)
    model = extractor.encoder
    with torch.no_grad():
        final = model.forward_features(imgs)  # 64 patch tokens, no prefix
        pooled = model.forward_head(final, pre_logits=True)  # attention pool (MAP head)
    assert extractor.num_prefix_tokens == 0 and set(feats[0]) == {"patch"}
    torch.testing.assert_close(feats[1]["pooled"], pooled)
    torch.testing.assert_close(feats[1]["patch"], final)


def test_convnet_stages_in_one_pass_into_stores_of_their_widths(tmp_path, shared_data, batches):
    extractor = FeatureExtractor("timm:resnet18", layers=[2, 4], tokens=["pooled", "mean", "patch"])
    _extract(tmp_path / "resnet", shared_data, extractor)
    stage2, stage4 = FeatureStore(tmp_path / "resnet" / "layer_2"), FeatureStore(tmp_path / "resnet" / "layer_4")
    assert (stage2.d_model, stage2.metadata["patch_grid"], stage2.tokens) == (128, [4, 4], ["mean", "patch"])
    assert (stage4.d_model, stage4.metadata["patch_grid"], stage4.tokens) == (512, [1, 1], ["pooled", "mean", "patch"])
    model = extractor.encoder
    imgs = torch.cat([b[0] for b in batches])
    with torch.no_grad():
        x = model.maxpool(model.act1(model.bn1(model.conv1(imgs))))
        x2 = model.layer2(model.layer1(x))
        x4 = model.layer4(model.layer3(x2))
    torch.testing.assert_close(stage2.read("patch").features, x2.flatten(2).transpose(1, 2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stage4.read("pooled").features, x4.mean((2, 3)), atol=1e-5, rtol=1e-5)


def test_high_norm_flags_are_per_image():
    patches = torch.ones(2, 5, 3)
    patches[0, 2] *= 10  # an artefact token: 10x the median norm
    patches[1] *= 100  # a whole image of large norms is not flagged
    flags = high_norm_tokens(patches, 4.0)
    assert flags.tolist() == [[False, False, True, False, False], [False] * 5]
    with pytest.raises(ConfigError, match="factor > 1 and patch tokens"):
        FeatureExtractor("timm:resnet18", tokens=["mean"], high_norm_factor=4.0)


def test_pretrained_file_source_adopts_and_records_its_preprocessing(tmp_path, shared_data):
    torch.manual_seed(3)
    kwargs = {"img_size": 32, "patch_size": 4, "depth": 2}
    original = timm.create_model("vit_tiny_patch16_224", num_classes=0, **kwargs).eval()
    file = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in original.state_dict().items()}, str(file))
    extractor = FeatureExtractor("pretrained:vit_tiny_patch16_224.augreg_in21k", kwargs, layers=[0, 1],
                                 tokens=["cls", "mean"], pretrained_file=str(file))
    writer = FeatureStoreWriter(str(tmp_path / "store"), shard_size=64)
    dm = _dm(shared_data, limit_per_class=1)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
                        callbacks=[writer])
    trainer.predict(extractor, datamodule=dm, return_predictions=False)
    store = FeatureStore(tmp_path / "store" / "layer_1")
    pre = store.metadata["preprocessing"]  # the tag's pretrained_cfg: mean = std = 0.5, bicubic, crop 0.9
    assert (pre["mean"], pre["std"], pre["interpolation"], pre["eval_crop_pct"]) == ([0.5] * 3, [0.5] * 3,
                                                                                      "bicubic", 0.9)
    assert {"mean", "std"} <= set(pre["adopted"]) and store.metadata["encoder_source"].startswith("pretrained:")
    imgs = torch.cat([b[0] for b in dm.predict_dataloader()])  # the adopted transform
    with torch.no_grad():
        expected = original.forward_features(imgs)
    torch.testing.assert_close(store.read("cls").features, expected[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(store.read("mean").features, expected[:, 1:].mean(1), atol=1e-5, rtol=1e-5)
