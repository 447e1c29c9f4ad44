"""`mim fit` end to end from the shipped YAML, on real CIFAR-10 images."""

import os
import subprocess
import sys
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file

from mim.cli import cli_main
from mim.export import load_encoder

REPO = Path(__file__).resolve().parents[1]
QUICK = REPO / "configs" / "mae" / "vit_tiny_cifar10_quick.yaml"
TINY_RUN = [
    "--trainer.max_steps", "3", "--trainer.max_epochs", "1", "--trainer.log_every_n_steps", "1",
    "--data.init_args.batch_size", "8", "--data.init_args.limit_per_class", "3",
    "--data.init_args.val_limit_per_class", "1", "--data.init_args.num_workers", "0",
    "--model.init_args.decoder_depth", "1",
]


def test_fit_from_yaml_writes_checkpoint_png_and_timm_loadable_encoder(tmp_path, shared_data, monkeypatch):
    monkeypatch.setenv("MIM_DATA", str(shared_data))
    cli = cli_main(["fit", "-c", str(QUICK), "--trainer.default_root_dir", str(tmp_path), *TINY_RUN])
    log_dir = Path(cli.trainer.log_dir)
    assert (log_dir / "config.yaml").is_file()
    assert list((log_dir / "checkpoints").glob("*.ckpt")), "a checkpoint is written"
    pngs = list((log_dir / "reconstructions").glob("*.png"))
    assert pngs and pngs[0].stat().st_size > 1000
    assert cli.trainer.callback_metrics["probe/val_top1"] >= 0
    assert cli.trainer.callback_metrics["knn/val_top1"] >= 0

    weights, meta = log_dir / "encoder.safetensors", log_dir / "encoder.json"
    assert weights.is_file() and meta.is_file()
    encoder = cli.model.encoder.eval()
    # 1) plain timm, no mim involved
    import json

    config = json.loads(meta.read_text())
    reloaded = timm.create_model(
        config["model_name"], pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)), **config["model_kwargs"]
    ).eval()
    # 2) the helper
    helper = load_encoder(weights).eval()
    saved = load_file(str(weights))
    for key, value in encoder.state_dict().items():
        assert torch.equal(saved[key], value), key
        assert torch.equal(reloaded.state_dict()[key], value), key
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.forward_features(imgs), encoder.forward_features(imgs))
        torch.testing.assert_close(helper.forward_features(imgs), encoder.forward_features(imgs))


def test_every_option_is_overridable(shared_data, monkeypatch):
    monkeypatch.setenv("MIM_DATA", str(shared_data))
    cli = cli_main(
        ["-c", str(QUICK), "--model.init_args.mask_ratio", "0.6", "--trainer.max_epochs", "7",
         "--data.init_args.batch_size", "32"],
        run=False,
    )
    assert cli.model.mask_generator.mask_ratio == 0.6
    assert cli.trainer.max_epochs == 7 and cli.datamodule.batch_size == 32


def _run_cli(*args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "mim.cli", *args], capture_output=True, text=True, env=env, cwd=REPO)


def test_bad_config_value_gives_one_readable_message(shared_data):
    res = _run_cli("fit", "-c", str(QUICK), "--model.init_args.mask_ratio", "1.5",
                   env_extra={"MIM_DATA": str(shared_data)})
    assert res.returncode == 2
    assert "mask_ratio must lie strictly between 0 and 1, got 1.5" in res.stderr
    assert "Traceback" not in res.stderr


def test_missing_dataset_gives_one_readable_message(tmp_path):
    res = _run_cli("fit", "-c", str(QUICK), "--data.init_args.root", str(tmp_path / "nowhere"))
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert str(tmp_path / "nowhere") in res.stderr
