"""Offline linear probe (MAE protocol) on real CIFAR-10 subsets."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import timm
import torch

from mim.cli import cli_main
from mim.data import ImageDataModule
from mim.errors import ConfigError
from mim.eval.encoders import weights_sha256
from mim.eval.linear_probe import LinearProbe
from mim.export import save_encoder

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "eval" / "linear_probe_cifar10.yaml"
VIT = {"encoder": "timm:vit_tiny_patch16_224", "model_kwargs": {"img_size": 32, "patch_size": 4}}
TINY_FIT = [
    "--trainer.max_steps", "2", "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
    "--data.init_args.limit_per_class", "2", "--data.init_args.val_limit_per_class", "2",
    "--data.init_args.batch_size", "8", "--data.init_args.num_workers", "0",
]


def _data(root: Path, per_class: int, val_per_class: int, batch_size: int = 8, **kwargs) -> ImageDataModule:
    return ImageDataModule(
        root=str(root), limit_per_class=per_class, val_limit_per_class=val_per_class, batch_size=batch_size,
        num_workers=0, train_augment=False, **kwargs,
    )


def _trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, **kwargs,
    )


class _EncoderStaysInEval(L.Callback):
    """Asserts the encoder is in eval mode at every step; keeps the head as it was before training."""

    def on_train_start(self, trainer, pl_module):
        self.head_before = {k: v.clone() for k, v in pl_module.head.state_dict().items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        assert not pl_module.encoder.training and pl_module.head.training


@pytest.mark.parametrize("source", [VIT, {"encoder": "timm:resnet18"}], ids=["vit_tiny_cls", "resnet18_gap"])
def test_probe_trains_only_the_head(source, shared_data, tmp_path):
    model = LinearProbe(**source, optimizer="sgd", lr=0.1, warmup_epochs=0)
    encoder_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    assert not any(p.requires_grad for p in model.encoder.parameters())
    spy = _EncoderStaysInEval()
    _trainer(tmp_path, max_steps=5, limit_val_batches=1, callbacks=[spy]).fit(model, _data(shared_data, 4, 1))
    assert model.num_classes == 10 and model.hparams["num_classes"] == 10, "num_classes comes from the data"
    after = model.encoder.state_dict()
    if source["encoder"] == "timm:resnet18":
        assert any("running_mean" in k for k in after), "the ConvNet case checks BatchNorm buffers too"
    assert after.keys() == encoder_before.keys()
    for key, value in encoder_before.items():
        assert torch.equal(after[key], value), f"encoder {key} changed"
    for key, value in spy.head_before.items():
        assert not torch.equal(model.head.state_dict()[key], value), f"head {key} did not train"


def _spy_encoder(model: LinearProbe) -> list[int]:
    seen: list[int] = []
    forward = model.encoder.forward_features

    def counting(imgs: torch.Tensor) -> torch.Tensor:
        seen.append(imgs.shape[0])
        return forward(imgs)

    model.encoder.forward_features = counting
    return seen


def test_cached_probe_matches_uncached_and_encodes_each_image_once(shared_data, tmp_path):
    results = {}
    for cache in (False, True):
        L.seed_everything(0)
        model = LinearProbe(encoder="timm:resnet18", optimizer="lars", blr=2.0, warmup_epochs=1, cache_features=cache)
        seen = _spy_encoder(model)
        trainer = _trainer(tmp_path, max_epochs=3)
        trainer.fit(model, _data(shared_data, 4, 2, return_index=True))  # 40 train images = 5 batches
        results[cache] = (float(trainer.callback_metrics["val/top1"]), model.head.state_dict(), sum(seen))
    (top1, head, encoded), (top1_cached, head_cached, encoded_cached) = results[False], results[True]
    assert top1_cached == top1
    for key, value in head.items():
        torch.testing.assert_close(head_cached[key], value, atol=1e-6, rtol=0, msg=key)
    assert encoded_cached == 40 + 20, "each train and val image is encoded exactly once"
    assert encoded > 3 * 40 + 3 * 20, "without the cache every epoch encodes again (a real difference)"


def test_caching_without_indices_is_refused(shared_data, tmp_path):
    model = LinearProbe(**VIT, lr=0.1, cache_features=True)
    with pytest.raises(ConfigError, match="return_index true"):
        _trainer(tmp_path, max_steps=1, num_sanity_val_steps=0).fit(model, _data(shared_data, 1, 1))


def test_probe_on_random_init_encoder_beats_chance(shared_data, tmp_path):
    L.seed_everything(0)
    model = LinearProbe(**VIT, optimizer="sgd", lr=0.05, warmup_epochs=1, cache_features=True)
    trainer = _trainer(tmp_path, max_epochs=10, num_sanity_val_steps=0, check_val_every_n_epoch=10)
    trainer.fit(model, _data(shared_data, 30, 10, batch_size=30, return_index=True))  # 300 train, 100 val
    top1, top5 = float(trainer.callback_metrics["val/top1"]), float(trainer.callback_metrics["val/top5"])
    assert top1 > 0.2, f"linear probe top-1 {top1:.3f} is not above chance (0.1)"
    assert top5 >= top1


def test_head_and_data_class_counts_must_agree(shared_data, tmp_path):
    model = LinearProbe(**VIT, num_classes=100, lr=0.1)
    with pytest.raises(ConfigError) as err:
        _trainer(tmp_path, max_steps=1).fit(model, _data(shared_data, 1, 1))
    message = str(err.value)
    assert "num_classes=100" in message and "10 classes" in message
    assert "Fix: set --model.init_args.num_classes 10" in message


def test_label_beyond_the_head_is_refused_without_datamodule(shared_data, tmp_path):
    data = _data(shared_data, 1, 1, batch_size=10)
    data.setup("fit")
    model = LinearProbe(**VIT, num_classes=5, lr=0.1)
    with pytest.raises(ConfigError, match=r"label \d but LinearProbe has num_classes=5"):
        _trainer(tmp_path, max_steps=1).fit(model, train_dataloaders=data.train_dataloader())


def test_config_builds_and_fits_two_steps_on_an_exported_encoder(shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("MIM_DATA", str(shared_data))
    cli = cli_main(["-c", str(CONFIG)], run=False)
    assert isinstance(cli.model, LinearProbe) and cli.model.cache_features and cli.model.optimizer_name == "sgd"
    assert cli.model.encoder_info["model_name"] == "vit_tiny_patch16_224"
    assert cli.datamodule.hparams.return_index and not cli.datamodule.hparams.train_augment
    assert cli.trainer.max_epochs == 90 and cli.datamodule.batch_size == 256

    kwargs = {"img_size": 32, "patch_size": 4, "num_classes": 0}
    encoder = timm.create_model("vit_tiny_patch16_224", **kwargs)
    config = {"model_name": "vit_tiny_patch16_224", "model_kwargs": kwargs}
    path = save_encoder(encoder, config, tmp_path / "encoder.safetensors")
    cli = cli_main(["fit", "-c", str(CONFIG), "--model.init_args.encoder", str(path),
                    "--trainer.default_root_dir", str(tmp_path), *TINY_FIT])
    assert cli.model.encoder_info["weights_sha256"] == weights_sha256(encoder)
    assert cli.trainer.global_step == 2
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and 0 <= float(metrics["val/top1"]) <= float(metrics["val/top5"]) <= 1
    assert list(Path(cli.trainer.log_dir).glob("checkpoints/*.ckpt"))
