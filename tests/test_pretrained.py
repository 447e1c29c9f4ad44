"""Public pretrained timm encoders (``pretrained:<name>.<tag>``): loading from a local safetensors file,
refusals (pickle, missing, wrong model, offline without a file), and the model's own preprocessing reaching
the datamodule's transforms. Offline: the "pretrained" files are made here from random timm models."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import cv2
import lightning as L
import pytest
import timm
import torch
from safetensors.torch import save_file

from mim.data import ImageDataModule
from mim.errors import ConfigError, UserError
from mim.eval import KNNEval, LinearProbe
from mim.eval.encoders import (
    EncoderLoadError,
    EncoderNotFoundError,
    PretrainedWeightsUnavailableError,
    encoder_data_config,
    load_encoder_from,
    weights_sha256,
)
from mim.eval.finetune import FineTune

VIT = "vit_tiny_patch16_224"
VIT_TAG = f"pretrained:{VIT}.augreg_in21k"  # mean = std = 0.5, crop_pct 0.9
R18_TAG = "pretrained:resnet18.tv_in1k"  # torchvision weights: bilinear, crop_pct 0.875, ImageNet mean / std
VIT4 = {"img_size": 32, "patch_size": 4}
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _save(model: torch.nn.Module, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """Random ViT-Tiny/4 (32 px) and ResNet-18 weights saved as "pretrained" safetensors files, and a
    narrower one-block ViT (width 96, not ViT-Tiny's 192) as a file of another model."""
    folder = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(3)
    vit = timm.create_model(VIT, num_classes=0, **VIT4).eval()
    small = timm.create_model(VIT, num_classes=0, embed_dim=96, depth=1, **VIT4).eval()
    r18 = timm.create_model("resnet18", num_classes=0).eval()
    return {
        "vit": (_save(vit, folder / "vit.safetensors"), vit),
        "small": (_save(small, folder / "small.safetensors"), small),
        "r18": (_save(r18, folder / "r18.safetensors"), r18),
    }


def test_pretrained_file_gives_the_same_features(files, cifar_batch) -> None:
    imgs = cifar_batch[0]
    path, original = files["vit"]
    model, info = load_encoder_from(VIT_TAG, VIT4, pretrained_file=path)
    with torch.no_grad():
        assert torch.equal(model.eval().forward_features(imgs), original.forward_features(imgs))
    assert info["pretrained"] == f"{VIT}.augreg_in21k" and info["pretrained_file"] == str(path)
    assert info["weights_sha256"] == weights_sha256(original)
    # the model as built (32 px, patch 4) decides the input size; the rest is the tag's pretrained_cfg
    assert info["data_config"] == {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3,
                                   "interpolation": "bicubic", "crop_pct": 0.9, "crop_mode": "center"}
    # timm's own checkpoint adaptation runs: the 8x8 position embeddings are resized for 64 px
    big, info = load_encoder_from(VIT_TAG, {"img_size": 64, "patch_size": 4}, pretrained_file=files["vit"][0])
    assert big.pos_embed.shape == (1, 1 + 16 * 16, 192) and info["data_config"]["input_size"] == [3, 64, 64]
    assert torch.equal(big.pos_embed[:, 0], files["vit"][1].pos_embed[:, 0])  # the cls position is kept
    assert torch.equal(big.blocks[0].attn.qkv.weight, files["vit"][1].blocks[0].attn.qkv.weight)


def test_pickle_files_are_refused_unread(tmp_path) -> None:
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    data = pickle.dumps({"conv1.weight": Payload()})
    for name in ("weights.pth", "weights.bin", "weights.safetensors"):  # the last: a pickle renamed
        (tmp_path / name).write_bytes(data)
        with pytest.raises(EncoderLoadError, match="safetensors") as err:
            load_encoder_from(R18_TAG, pretrained_file=tmp_path / name)
        assert name in str(err.value)
    assert not marker.exists()  # nothing was unpickled


def _replace_downloads(monkeypatch, download) -> None:
    """Route timm's two download paths (Hugging Face hub, torch hub URL) to ``download``."""
    import timm.models._builder as builder
    import timm.models._hub as hub

    monkeypatch.setattr(hub, "hf_hub_download", download)
    monkeypatch.setattr(builder, "load_state_dict_from_url", download)


def test_offline_without_a_file_names_model_cache_and_fix(monkeypatch, tmp_path) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError("the network was asked")

    _replace_downloads(monkeypatch, no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(PretrainedWeightsUnavailableError) as err:
        load_encoder_from("pretrained:vit_base_patch14_reg4_dinov2.lvd142m")
    text = str(err.value)
    assert isinstance(err.value, UserError)
    assert "vit_base_patch14_reg4_dinov2.lvd142m" in text and str(tmp_path / "hub") in text
    assert "HF_HUB_OFFLINE" in text and "--model.init_args.pretrained_file" in text and ".safetensors" in text


def test_download_failure_is_one_user_error(monkeypatch, tmp_path) -> None:
    import huggingface_hub.constants

    def down(*args, **kwargs):
        raise ConnectionError("no route to huggingface.co")

    _replace_downloads(monkeypatch, down)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(PretrainedWeightsUnavailableError, match="no route to huggingface.co") as err:
        load_encoder_from("pretrained:resnet18.a1_in1k")
    assert "resnet18.a1_in1k" in str(err.value) and "pretrained_file" in str(err.value)


def test_missing_wrong_and_misused_files(files, tmp_path) -> None:
    with pytest.raises(EncoderNotFoundError, match="pretrained_file"):
        load_encoder_from(R18_TAG, pretrained_file=tmp_path / "absent.safetensors")
    with pytest.raises(EncoderLoadError, match="'cls_token' is not in it"):  # a ResNet file for a ViT
        load_encoder_from(VIT_TAG, VIT4, pretrained_file=files["r18"][0])
    with pytest.raises(EncoderLoadError, match="first mismatching key is 'cls_token'"):  # width 96 for ViT-Ti's 192
        load_encoder_from(VIT_TAG, VIT4, pretrained_file=files["small"][0])
    with pytest.raises(ConfigError, match="pretrained:"):
        load_encoder_from("timm:resnet18", pretrained_file=files["r18"][0])
    with pytest.raises(ConfigError, match="resnet18.a1_in1k"):
        load_encoder_from("pretrained:resnet18.no_such_tag", pretrained_file=files["r18"][0])
    with pytest.raises(ConfigError, match="pretrained_file"):
        load_encoder_from(R18_TAG, {"pretrained_cfg_overlay": {"file": "x.pth"}})
    with pytest.raises(ConfigError, match=r"patch_size=8 would resample the \(4, 4\) px patch embedding"):
        load_encoder_from(VIT_TAG, {"img_size": 32, "patch_size": 8}, pretrained_file=files["vit"][0])


def test_preprocessing_is_adopted_and_user_values_win(shared_data) -> None:
    with torch.device("meta"):  # the pretrained_cfg only: no weights, no memory
        clip = timm.create_model("vit_base_patch16_clip_224.openai", pretrained=False, num_classes=0)
        tv = timm.create_model("resnet18.tv_in1k", pretrained=False, num_classes=0)
    clip_cfg, tv_cfg = encoder_data_config(clip), encoder_data_config(tv)
    assert clip_cfg["mean"] == [0.48145466, 0.4578275, 0.40821073] and tv_cfg["interpolation"] == "bilinear"
    root = str(shared_data)
    plain = ImageDataModule(root=root, num_workers=0)  # nothing adopted: today's CIFAR defaults
    assert plain.preprocessing == {"img_size": 32, "mean": list(CIFAR_MEAN), "std": [0.2470, 0.2435, 0.2616],
                                   "interpolation": "bicubic", "eval_crop_pct": 1.0, "eval_crop_mode": "center",
                                   "adopted": []}
    dm = ImageDataModule(root=root, num_workers=0, batch_size=10, val_limit_per_class=1)
    dm.setup("validate")  # set up first: adoption rebuilds the transforms of the open split
    dm.adopt_data_config(clip_cfg)
    assert dm.preprocessing["img_size"] == 224 and dm.preprocessing["eval_crop_pct"] == 0.9
    normalize = dm.val_set.dataset.transform.transforms[-2]
    assert tuple(normalize.mean) == tuple(clip_cfg["mean"]) and tuple(normalize.std) == tuple(clip_cfg["std"])
    imgs, _ = next(iter(dm.val_dataloader()))
    assert imgs.shape == (10, 3, 224, 224)
    pixels = imgs * torch.tensor(clip_cfg["std"]).view(3, 1, 1) + torch.tensor(clip_cfg["mean"]).view(3, 1, 1)
    assert -0.02 < float(pixels.min()) and float(pixels.max()) < 1.02  # un-normalised with CLIP's stats: [0, 1]
    # bilinear reaches both pipelines; the user's img_size, mean and crop fraction win
    user = ImageDataModule(root=root, num_workers=0, img_size=32, mean=CIFAR_MEAN, eval_crop_pct=1.0,
                           limit_per_class=1, val_limit_per_class=1)
    user.setup("fit")
    user.adopt_data_config(tv_cfg)
    assert user.preprocessing["adopted"] == ["eval_crop_mode", "interpolation", "std"]
    assert (user.img_size, user.mean, user.std, user.eval_crop_pct) == (32, CIFAR_MEAN, tuple(IMAGENET_STD), 1.0)
    assert user.val_set.dataset.transform.transforms[1].interpolation == cv2.INTER_LINEAR
    assert user.train_set.dataset.transform.transforms[0].interpolation == cv2.INTER_LINEAR  # RandomResizedCrop
    with pytest.raises(ConfigError, match="interpolation"):
        ImageDataModule(interpolation="cubic")


def _trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path), **kwargs)


def test_linear_probe_fits_a_pretrained_encoder_with_its_preprocessing(files, shared_data, tmp_path, caplog) -> None:
    path, original = files["vit"]
    model = LinearProbe(VIT_TAG, VIT4, optimizer="sgd", lr=0.1, warmup_epochs=0, pretrained_file=str(path))
    assert model.hparams["pretrained_file"] == str(path)  # saved, so checkpoints reload the same weights
    dm = ImageDataModule(root=str(shared_data), num_workers=0, batch_size=10, limit_per_class=2,
                         val_limit_per_class=1, train_augment=False)
    with caplog.at_level(logging.INFO):
        _trainer(tmp_path, max_steps=2, limit_val_batches=1, num_sanity_val_steps=0).fit(model, datamodule=dm)
    assert f"Preprocessing of {VIT}.augreg_in21k" in caplog.text
    assert dm.preprocessing == {"img_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic",
                                "eval_crop_pct": 0.9, "eval_crop_mode": "center",
                                "adopted": ["eval_crop_mode", "eval_crop_pct", "img_size", "interpolation", "mean",
                                            "std"]}
    imgs, _ = next(iter(dm.train_dataloader()))
    with torch.no_grad():
        assert torch.equal(model.encoder.forward_features(imgs), original.forward_features(imgs))
    assert torch.isfinite(torch.stack([p.detach().sum() for p in model.head.parameters()])).all()


def test_knn_and_finetune_take_pretrained_sources(files, shared_data, tmp_path) -> None:
    path, original = files["r18"]
    knn = KNNEval(R18_TAG, k=3, pretrained_file=str(path))
    dm = ImageDataModule(root=str(shared_data), num_workers=0, batch_size=20, img_size=32, limit_per_class=2,
                         val_limit_per_class=1, train_augment=False)
    result = _trainer(tmp_path).validate(knn, datamodule=dm, verbose=False)[0]
    assert 0.0 <= result["knn/top1"] <= 1.0 and knn.bank.shape == (20, 512)
    assert dm.preprocessing["interpolation"] == "bilinear" and dm.img_size == 32  # the user's size wins
    assert dm.train_set.dataset.transform.transforms[1].interpolation == cv2.INTER_LINEAR  # the bank's images too
    tune = FineTune(R18_TAG, num_classes=10, pretrained_file=str(path))
    tune.build(10)
    assert torch.equal(tune.encoder.layer4[1].conv2.weight, original.layer4[1].conv2.weight)
    assert tune.encoder_info["pretrained"] == "resnet18.tv_in1k" and tune.encoder.fc.out_features == 10
    assert tune.encoder_info["data_config"]["input_size"] == [3, 224, 224]  # a ConvNet: the tag's size
