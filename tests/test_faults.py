"""Faults a user can meet, each refused with one message and no lost work: crafted checkpoints that
would run code when unpickled, a NaN / inf loss, an unwritable output folder, a disk too small for a
feature store. Real CIFAR-10 images, tiny models."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import lightning as L
import pytest
import timm
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from mim import cli
from mim.data import ImageDataModule
from mim.errors import UserError
from mim.eval import LinearProbe
from mim.eval.encoders import EncoderLoadError, UnsafeCheckpointError, load_encoder_from, read_checkpoint
from mim.export import OutputError, check_writable, load_encoder, save_encoder
from mim.features import FeatureExtractor, FeatureStoreWriter
from mim.masking import ColorNoiseMask
from mim.methods import CAE, MAE, MixedAE, SparK
from mim.methods.base import NonFiniteLossError
from mim.sae.models import load_sae, save_sae
from mim.sae.variants import TopKSAE

REPO = Path(__file__).resolve().parents[1]
QUICK = REPO / "configs" / "mae" / "vit_tiny_cifar10_quick.yaml"
VIT4 = {"backbone": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 4}
ONE_BLOCK = {**VIT4, "backbone_kwargs": {"depth": 1}}  # small checkpoints: fast saves
TINY_DECODER = {"decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2}


class _Payload:
    """Pickles as a call of ``os.system("touch <marker>")``: what a crafted checkpoint would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def craft(path: Path, marker: Path) -> Path:
    """A torch file that looks like a mim checkpoint and runs the payload when unpickled."""
    torch.save({"state_dict": {"w": torch.zeros(2)}, "mim_encoder": {"model_name": "resnet18"},
                "hyper_parameters": {"x": _Payload(marker)}}, path)  # fmt: skip
    return path


@pytest.fixture()
def evil(tmp_path):
    marker = tmp_path / "PAYLOAD_RAN"
    return craft(tmp_path / "evil.ckpt", marker), marker


def test_the_crafted_payload_is_live(tmp_path):
    """Control: without weights_only the crafted file does run its payload (so the refusals below mean something)."""
    marker = tmp_path / "ran"
    torch.load(craft(tmp_path / "x.ckpt", marker), weights_only=False)
    assert marker.exists()


def test_crafted_checkpoint_is_refused_by_every_encoder_loader(evil, tmp_path):
    path, marker = evil
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.ckpt is refused: .*posix\.system.*nothing from it was run"):
        read_checkpoint(path)
    with pytest.raises(UnsafeCheckpointError, match="Fix: use a checkpoint of a run you trust"):
        load_encoder_from(path)
    with pytest.raises(UnsafeCheckpointError):  # the probes, kNN, fine-tune and extraction load through it
        LinearProbe(str(path))
    # a pickle renamed .safetensors, read by mim's loader, timm's (mim.export.load_encoder) and the SAE's
    fake = tmp_path / "encoder.safetensors"
    shutil.copy(path, fake)
    fake.with_suffix(".json").write_text(json.dumps({"model_name": "resnet18", "model_kwargs": {}}))
    with pytest.raises(EncoderLoadError, match="not a readable safetensors file"):
        load_encoder_from(fake)
    with pytest.raises(EncoderLoadError, match="not a readable safetensors file"):
        load_encoder(fake)
    sae = tmp_path / "sae.safetensors"
    save_sae(TopKSAE(8, 16, k=2), sae)
    shutil.copy(path, sae)
    with pytest.raises(Exception):  # noqa: B017  safetensors refuses it (its message is the SAE module's concern)
        load_sae(sae)
    assert not marker.exists()


def test_exported_json_cannot_point_timm_at_a_pickle(evil, tmp_path):
    path, marker = evil
    weights = save_encoder(timm.create_model("resnet18", num_classes=0), {"model_name": "resnet18", "model_kwargs": {}},
                           tmp_path / "enc.safetensors")  # fmt: skip
    meta = weights.with_suffix(".json")
    config = json.loads(meta.read_text())
    for key, value in (("checkpoint_path", str(path)), ("pretrained_cfg_overlay", {"file": str(path)})):
        meta.write_text(json.dumps({**config, "model_kwargs": {key: value}}))
        for load in (load_encoder, load_encoder_from):
            with pytest.raises(EncoderLoadError, match=f"model_kwargs set {key}"):
                load(weights)
    assert not marker.exists()


def _cli_error(monkeypatch, capsys, *args: str) -> str:
    """Run the ``mim`` console script in-process; return stderr after its exit with code 2."""
    monkeypatch.setattr(sys, "argv", ["mim", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("mim: error:") and "Traceback" not in err
    return err


def test_mim_fit_refuses_a_crafted_ckpt_path(evil, tmp_path, shared_data, monkeypatch, capsys):
    path, marker = evil
    monkeypatch.setenv("MIM_DATA", str(shared_data))
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # what would make Lightning's own load unsafe
    base = ["fit", "-c", str(QUICK), "--trainer.default_root_dir", str(tmp_path / "run")]
    err = _cli_error(monkeypatch, capsys, *base, "--ckpt_path", str(path))
    assert str(path) in err and "posix.system" in err and "Fix:" in err
    err = _cli_error(monkeypatch, capsys, *base, "--weights_only", "false")
    assert "weights_only=True only" in err and "Fix: drop --weights_only false" in err
    assert not marker.exists()


TINY_FIT = """
seed_everything: 0
trainer:
  accelerator: cpu
  max_steps: {steps}
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  limit_val_batches: 0
  default_root_dir: {root}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {root}/ckpt, save_last: true, every_n_train_steps: 1}}
model:
  class_path: mim.methods.MAE
  init_args:
    backbone: vit_tiny_patch16_224
    img_size: 32
    patch_size: 4
    backbone_kwargs: {{depth: 1}}
    mask: {{class_path: mim.masking.ColorNoiseMask, init_args: {{color: red, bank_size: 8}}}}
    decoder_embed_dim: 32
    decoder_depth: 1
    decoder_num_heads: 2
    warmup_epochs: 0
data:
  class_path: mim.data.ImageDataModule
  init_args: {{batch_size: 4, limit_per_class: 1, num_workers: 0}}
"""


def test_resume_of_a_real_checkpoint_loads_weights_only(tmp_path, shared_data, monkeypatch):
    """A checkpoint of a CLI run holds only allow-listed types, and its hyper-parameters (the mask included)
    parse back: ``--ckpt_path`` resumes it, with weights_only forced on."""
    monkeypatch.setenv("MIM_DATA", str(shared_data))
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_FIT.format(steps=2, root=tmp_path))
    cli.cli_main(["fit", "-c", str(config)])
    last = tmp_path / "ckpt" / "last.ckpt"
    ckpt = read_checkpoint(last)  # weights_only=True
    assert ckpt["global_step"] == 2
    assert ckpt["hyper_parameters"]["mask"]["class_path"].endswith("ColorNoiseMask")
    config.write_text(TINY_FIT.format(steps=3, root=tmp_path))
    resumed = cli.cli_main(["fit", "-c", str(config), "--ckpt_path", str(last)])
    assert resumed.config_init["fit"]["weights_only"] is True
    assert resumed.trainer.global_step == 3
    assert isinstance(resumed.model.mask_generator, ColorNoiseMask) and resumed.model.mask_generator.color == "red"
    assert MAE.load_from_checkpoint(last).mask_generator.color == "red"  # load_from_checkpoint too


class _InjectNaN(Callback):
    """At global step ``step``: NaN images, a NaN weight (before the forward), or a NaN gradient of the
    step before (an update that would overflow although the loss of that step was finite)."""

    def __init__(self, step: int, where: str) -> None:
        self.step, self.where = step, where

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and self.where == "images":
            batch[0].fill_(float("nan"))
        if trainer.global_step == self.step and self.where == "weights":
            with torch.no_grad():
                pl_module.encoder.patch_embed.proj.weight[0, 0, 0, 0] = float("nan")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.step - 1 and self.where == "update":
            pl_module.encoder.patch_embed.proj.weight.grad[0, 0, 0, 0] = float("nan")


def _finite(ckpt: dict) -> bool:
    return all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


@pytest.mark.parametrize("where", ["images", "weights", "update"])
def test_nan_loss_names_step_term_and_a_good_checkpoint(where, tmp_path, shared_data):
    step = 2
    dm = ImageDataModule(root=str(shared_data), batch_size=4, limit_per_class=1, num_workers=0)
    model = MAE(**ONE_BLOCK, **TINY_DECODER, warmup_epochs=0)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1, save_last=True)
    trainer = L.Trainer(accelerator="cpu", max_steps=10, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0,
                        callbacks=[ckpt, _InjectNaN(step, where)])  # fmt: skip
    with pytest.raises(NonFiniteLossError) as info:
        trainer.fit(model, dm)
    message = str(info.value)
    assert isinstance(info.value, UserError) and isinstance(info.value, FloatingPointError)
    last = read_checkpoint(tmp_path / "last.ckpt")
    assert _finite(last)
    if where == "update":  # the NaN gradient is caught before the update: no file ever holds its weights
        assert f"the gradient of encoder.patch_embed.proj.weight is NaN/inf at global step {step - 1}" in message
        assert last["global_step"] == step - 1, "the failing step wrote nothing"
    else:
        assert f"at global step {step}" in message and "train/loss (MSE on the masked patches) became nan" in message
        assert last["global_step"] == step, "the failing step wrote nothing"
        assert f"--ckpt_path {tmp_path / 'last.ckpt'} (global step {step}, finite weights)" in message


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")  # training_step without a trainer
def test_nan_message_names_the_term_of_every_method(cifar_batch):
    imgs = cifar_batch[0][:8].clone()
    imgs[0, :, :8, :8] = float("nan")
    models = {
        "MAE train/loss (MSE on the masked patches) became nan": MAE(**ONE_BLOCK, **TINY_DECODER),
        "CAE train/loss became nan (train/loss_rec = nan": CAE(**ONE_BLOCK, regressor_depth=1, decoder_depth=1),
        "MixedAE train/loss became nan (train/recon_loss = nan": MixedAE(**ONE_BLOCK, **TINY_DECODER),
        "SparK train/loss (MSE on the masked patches)": SparK("resnet18", img_size=64, decoder_width=32),
    }
    for term, model in models.items():
        x = torch.nn.functional.interpolate(imgs, size=64) if isinstance(model, SparK) else imgs
        with pytest.raises(NonFiniteLossError, match=re.escape(term) + r".* at global step 0\. Fix:"):
            model.training_step((x, cifar_batch[1][:8]), 0)


def test_check_writable_explains_a_file_in_the_path(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(OutputError, match=r"store .*file\.txt/store cannot be written: .*file\.txt is a file"):
        check_writable(blocker / "store", "the store", "pass another folder.")
    assert check_writable(tmp_path / "a" / "b", "the store", "-") == tmp_path / "a" / "b"
    assert (tmp_path / "a" / "b").is_dir() and not list((tmp_path / "a" / "b").iterdir())


def _extract(store: Path, shared_data: Path, tokens=("cls", "mean", "patch")) -> FeatureExtractor:
    dm = ImageDataModule(root=str(shared_data), batch_size=16, num_workers=0, val_limit_per_class=2, return_index=True)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(store.parent), callbacks=[FeatureStoreWriter(str(store), shard_size=8)])
    model = FeatureExtractor("timm:vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4}, tokens=list(tokens))
    model.predict_step = _count_calls(model.predict_step)
    trainer.predict(model, datamodule=dm, return_predictions=False)
    return model


def _count_calls(fn):
    def wrapped(*args, **kwargs):
        wrapped.calls += 1
        return fn(*args, **kwargs)

    wrapped.calls = 0
    return wrapped


def test_feature_store_estimate_matches_the_written_store(tmp_path, shared_data):
    store = tmp_path / "store"
    model = _extract(store, shared_data)
    written = sum(f.stat().st_size for f in store.glob("rank*-*.safetensors"))
    estimate = 20 * model.bytes_per_image(32)
    assert model.tokens_per_image(32) == 66 and estimate == 20 * (66 * 192 * 4 + 16)
    assert 0.98 < written / estimate < 1.02, (written, estimate)


def test_feature_store_refuses_an_unwritable_folder_and_a_small_disk(tmp_path, shared_data, monkeypatch):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(OutputError, match=r"the feature store folder .*file\.txt/store cannot be written"):
        _extract(blocker / "store", shared_data)

    class Usage:
        total, used, free = 10**12, 10**12 - 10**6, 10**6

    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage())
    store = tmp_path / "store"
    with pytest.raises(OutputError) as info:
        _extract(store, shared_data)
    message = str(info.value)
    assert "needs about 0.00 GB (20 images x 66 tokens x d_model 192 in float32)" in message
    assert "its disk has 0.00 GB free" in message and "Fix:" in message and "dtype bfloat16" in message
    assert not list(store.glob("*")), "nothing was written"


def test_mim_fit_refuses_an_unwritable_run_folder(tmp_path, shared_data, monkeypatch, capsys):
    monkeypatch.setenv("MIM_DATA", str(shared_data))
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    err = _cli_error(monkeypatch, capsys, "fit", "-c", str(QUICK), "--trainer.default_root_dir", str(blocker / "run"),
                     "--model.init_args.decoder_depth", "1")  # fmt: skip
    assert "default_root_dir" in err and "file.txt is a file" in err and "Fix: choose a folder" in err
