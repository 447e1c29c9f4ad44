"""Encoders for evaluation: exported safetensors, mim checkpoints, random-init timm; bad files."""

import json

import pytest
import timm
import torch

from mim.eval.encoders import EncoderLoadError, load_encoder_from, weights_sha256
from mim.export import save_encoder
from mim.methods import MAE

VIT4 = {"img_size": 32, "patch_size": 4}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, **VIT4)
    path = save_encoder(model, {"model_name": "vit_tiny_patch16_224", "model_kwargs": {**VIT4, "num_classes": 0}},
                        tmp_path_factory.mktemp("enc") / "encoder.safetensors")  # fmt: skip
    return model, path


def test_exported_file_round_trip_and_hash(exported, cifar_batch):
    model, path = exported
    for source in (path, path.with_suffix(".json")):
        loaded, info = load_encoder_from(source)
        assert info["model_name"] == "vit_tiny_patch16_224" and info["weights_sha256"] == weights_sha256(model)
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval().forward_features(cifar_batch[0]), model.eval().forward_features(cifar_batch[0]))


def test_new_head_keeps_the_encoder_weights(exported):
    model, path = exported
    loaded, _ = load_encoder_from(path, num_classes=10, drop_path_rate=0.1)
    assert loaded.head.out_features == 10
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_mim_checkpoint_of_a_method(tmp_path):
    torch.manual_seed(0)
    mae = MAE("vit_tiny_patch16_224", decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, **VIT4)
    ckpt = {"state_dict": mae.state_dict()}
    mae.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "last.ckpt")
    loaded, info = load_encoder_from(tmp_path / "last.ckpt")
    assert info["weights_sha256"] == weights_sha256(mae.encoder)
    del ckpt["mim_encoder"]
    torch.save(ckpt, tmp_path / "old.ckpt")
    with pytest.raises(EncoderLoadError, match="no 'mim_encoder' entry"):
        load_encoder_from(tmp_path / "old.ckpt")


def test_random_init_timm_model():
    model, info = load_encoder_from("timm:resnet18")
    assert info["model_name"] == "resnet18" and model.num_features == 512
    vit, _ = load_encoder_from("timm:vit_tiny_patch16_224", model_kwargs=VIT4)
    assert vit.patch_embed.grid_size == (8, 8)


def test_bad_files_give_readable_errors(exported, tmp_path):
    model, path = exported
    meta = json.loads(path.with_suffix(".json").read_text())
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a safetensors file at all")
    garbage.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(EncoderLoadError, match="not a readable safetensors file"):
        load_encoder_from(garbage)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    truncated.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(EncoderLoadError, match="truncated"):
        load_encoder_from(truncated)
    other = tmp_path / "other.safetensors"
    other.write_bytes(path.read_bytes())
    other.with_suffix(".json").write_text(json.dumps({**meta, "model_name": "vit_small_patch16_224"}))
    with pytest.raises(EncoderLoadError, match=r"first mismatching key 'cls_token' has shape \(1, 1, 192\)"):
        load_encoder_from(other)
    with pytest.raises(FileNotFoundError):
        load_encoder_from(tmp_path / "missing.safetensors")
