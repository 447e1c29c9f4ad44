"""Every shipped config under DDP (2 CPU processes, gloo) on real CIFAR-10, as users run it with several GPUs.

Each run goes through ``mim fit|validate|predict -c <config> --trainer.strategy ddp --trainer.devices 2`` for one
step on a few images, inside a hard timeout (a hang fails the test), and must leave its artefacts. For one config
of each method, and for the TopK SAE, the same step on one process with twice the batch must give the same loss,
the same parameters after the step, and the same online probe and kNN accuracies.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import timm
import torch
import yaml
from cli_run import DDP, REPO, run_mim
from safetensors.torch import load_file

from mim.export import save_encoder
from mim.features.store import FeatureStore
from mim.sae.cache import LatentCache
from mim.sae.models import load_sae

#: The paper-scale ``*_in1k.yaml`` configs (8 GPUs, ImageNet) are covered by tests/test_in1k_configs.py instead.
CONFIGS = sorted(c for c in (REPO / "configs").rglob("*.yaml") if not c.stem.endswith("_in1k"))
PRETRAIN = [c for c in CONFIGS if c.parent.name in ("mae", "colormae", "cae", "mixedae", "spark")]
#: 20 train images, 8 per rank and step: one global batch of 16 = one optimiser step; 10 validation images.
TINY_DATA = ("--data.init_args.limit_per_class", "2", "--data.init_args.val_limit_per_class", "1",
             "--data.init_args.num_workers", "0")
#: Configs whose DDP step is also checked against one process with the global batch (one per method; without
#: drop path, whose draws differ per rank).
EQUIVALENT = {"mae/vit_tiny_cifar10_quick", "cae/vit_tiny_cifar10_quick", "mixedae/vit_tiny_cifar10_quick",
              "spark/resnet18_cifar10_quick"}


def _csv_logger(root: Path) -> tuple[str, ...]:
    return ("--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.init_args.save_dir",
            str(root), "--trainer.log_every_n_steps", "1")


def _logged(log_dir: Path) -> dict[str, float]:
    """Last logged value of every metric of a CSV log."""
    out: dict[str, float] = {}
    with open(log_dir / "metrics.csv") as f:
        for row in csv.DictReader(f):
            out.update({k: float(v) for k, v in row.items() if v and k not in ("step", "epoch")})
    return out


def _assert_same_parameters(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 2e-6) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if a[name].is_floating_point():
            torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-4, msg=name)


def _callbacks(config: Path) -> dict[str, dict]:
    """``{class_path: init_args}`` of a config's callbacks."""
    found = yaml.safe_load(config.read_text())["trainer"].get("callbacks", [])
    return {c["class_path"]: c.get("init_args") or {} for c in found}


def _log_dir(root: Path) -> Path:
    (version,) = (root / "lightning_logs").iterdir()
    return version


def test_every_config_is_covered():
    covered = set(PRETRAIN) | {REPO / "configs" / p for p in (
        "eval/linear_probe_cifar10.yaml", "eval/finetune_cifar10.yaml", "eval/knn_cifar10.yaml",
        "extract/vit_tiny_cifar10.yaml", "sae/topk_vit_tiny_cifar10.yaml", "sae/latent_cache_vit_tiny_cifar10.yaml",
        "sae/splice_vit_tiny_cifar10.yaml")}
    assert set(CONFIGS) == covered, "a new config needs a DDP run in this file"


@pytest.mark.parametrize("config", PRETRAIN, ids=lambda c: f"{c.parent.name}/{c.stem}")
def test_pretraining_config_under_ddp(config, tmp_path, shared_data):
    common = ("--trainer.max_epochs", "1", *TINY_DATA)
    name = f"{config.parent.name}/{config.stem}"
    run_mim("fit", "-c", str(config), *DDP, "--trainer.default_root_dir", str(tmp_path), *common,
            *_csv_logger(tmp_path), "--data.init_args.batch_size", "8", env={"MIM_DATA": str(shared_data)})
    log_dir = _log_dir(tmp_path)
    ckpt = torch.load(log_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    # 20 images, 8 per rank and step: one global batch of 16 = one optimiser step, the same on both ranks
    assert ckpt["global_step"] == 1
    assert ckpt["ImageDataModule"]["train_sampler"] == {"epoch": 1, "batches": 0}
    callbacks = _callbacks(config)
    if callbacks.get("mim.callbacks.ReconstructionImages", {}).get("every_n_epochs", 0) == 1:
        assert (log_dir / "reconstructions" / "epoch=000.png").stat().st_size > 0
    if "mim.callbacks.ExportEncoder" in callbacks:
        meta = yaml.safe_load((log_dir / "encoder.json").read_text())
        encoder = timm.create_model(meta["model_name"], pretrained=True,
                                    pretrained_cfg_overlay={"file": str(log_dir / "encoder.safetensors")},
                                    **meta["model_kwargs"])
        prefix = ckpt["mim_encoder"]["prefix"] + "."
        trained = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
        for name, value in encoder.state_dict().items():  # the export is the trained (not the initial) encoder
            torch.testing.assert_close(value, trained[name], msg=name)
    if any("OnlineLinearProbe" in c for c in callbacks):  # the probe's head state is saved by every run
        assert any(k.startswith("OnlineLinearProbe") for k in ckpt["callbacks"])
    if name not in EQUIVALENT:
        return
    one = tmp_path / "one"
    run_mim("fit", "-c", str(config), "--trainer.accelerator", "cpu", "--trainer.devices", "1",
            "--trainer.default_root_dir", str(one), *common, *_csv_logger(one),
            "--data.init_args.batch_size", "16", env={"MIM_DATA": str(shared_data)})
    single = torch.load(_log_dir(one) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    _assert_same_parameters(ckpt["state_dict"], single["state_dict"])
    ddp_logs, one_logs = _logged(log_dir), _logged(_log_dir(one))
    for metric in ("train/loss", "val/loss", "probe/val_top1", "knn/val_top1", "epoch_probe/val_top1"):
        assert ddp_logs[metric] == pytest.approx(one_logs[metric], rel=1e-5, abs=1e-6), metric


@pytest.mark.parametrize("name", ["linear_probe_cifar10", "finetune_cifar10"])
def test_eval_fit_config_under_ddp(name, tmp_path, shared_data):
    run_mim("fit", "-c", str(REPO / "configs" / "eval" / f"{name}.yaml"), *DDP, "--trainer.max_epochs", "1",
            "--trainer.default_root_dir", str(tmp_path), *TINY_DATA, "--data.init_args.batch_size", "8",
            env={"MIM_DATA": str(shared_data)})
    ckpt = torch.load(_log_dir(tmp_path) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 1


def test_knn_config_under_ddp(tmp_path, shared_data):
    res = run_mim("validate", "-c", str(REPO / "configs" / "eval" / "knn_cifar10.yaml"), *DDP,
                  "--trainer.default_root_dir", str(tmp_path), *TINY_DATA, "--data.init_args.batch_size", "8",
            env={"MIM_DATA": str(shared_data)})
    assert "knn/top1" in res.stdout


def test_extract_sae_cache_and_splice_configs_under_ddp(tmp_path, shared_data):
    """The analysis chain under DDP: extraction, SAE training (= one process of the global batch), the latent
    cache (= the SAE's codes of every token) and the splice-in evaluation (= the same numbers on one process)."""
    torch.manual_seed(0)
    encoder = save_encoder(timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=4),
                           {"model_name": "vit_tiny_patch16_224", "model_kwargs": {"img_size": 32, "patch_size": 4}},
                           tmp_path / "encoder.safetensors")
    store = tmp_path / "store"
    run_mim("predict", "-c", str(REPO / "configs" / "extract" / "vit_tiny_cifar10.yaml"), *DDP,
            "--model.init_args.encoder", str(encoder),
            "--trainer.default_root_dir", str(tmp_path), "--trainer.callbacks.init_args.path", str(store),
            "--data.init_args.limit_per_class", "2", "--data.init_args.batch_size", "8",
            "--data.init_args.num_workers", "0", env={"MIM_DATA": str(shared_data)})
    meta = yaml.safe_load((store / "metadata.json").read_text())
    assert meta["count"] == 20 and meta["world_size"] == 2
    assert {s["rank"] for s in meta["shards"]} == {0, 1}

    sae_root = tmp_path / "sae"
    run_mim("fit", "-c", str(REPO / "configs" / "sae" / "topk_vit_tiny_cifar10.yaml"), *DDP,
            "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(sae_root),
            "--data.init_args.train_store", str(store), "--data.init_args.val_store", str(store),
            "--data.init_args.batch_size", "320", "--model.init_args.init_tokens", "640")
    log_dir = _log_dir(sae_root)
    weights = load_file(log_dir / "sae.safetensors")
    ckpt = torch.load(log_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2  # 1,280 token rows, 320 per rank and step
    torch.testing.assert_close(weights["W_dec"], ckpt["state_dict"]["sae.W_dec"])

    # the same 2 steps on one process with the global batch of 640 rows
    one = tmp_path / "sae_one"
    run_mim("fit", "-c", str(REPO / "configs" / "sae" / "topk_vit_tiny_cifar10.yaml"), "--trainer.accelerator", "cpu",
            "--trainer.devices", "1", "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(one),
            "--data.init_args.train_store", str(store), "--data.init_args.val_store", str(store),
            "--data.init_args.batch_size", "640", "--model.init_args.init_tokens", "640")
    single = torch.load(_log_dir(one) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    _assert_same_parameters(ckpt["state_dict"], single["state_dict"], atol=1e-5)

    # the latent cache of the trained SAE: both ranks' shards, every token's code as the SAE gives it
    cache = tmp_path / "cache"
    run_mim("predict", "-c", str(REPO / "configs" / "sae" / "latent_cache_vit_tiny_cifar10.yaml"), *DDP,
            "--model.init_args.sae", str(log_dir / "sae.safetensors"), "--data.init_args.store", str(store),
            "--data.init_args.batch_size", "4", "--trainer.callbacks.init_args.path", str(cache))
    latents = LatentCache(cache)
    assert latents.metadata["world_size"] == 2 and {s["rank"] for s in latents.metadata["shards"]} == {0, 1}
    sae = load_sae(log_dir / "sae.safetensors")
    rows = FeatureStore(store).read("patch")
    for row in (0, 7, 19):
        image = int(rows.indices[row])
        with torch.no_grad():
            want = sae.encode(rows.features[row].float()).to_dense(sae.d_sae)
        torch.testing.assert_close(latents.dense(image), want, atol=1e-5, rtol=1e-5)

    # splice-in evaluation: 2 ranks give the numbers of 1 process (the head is fitted on the same images)
    results = []
    for name, devices in (("splice_ddp", DDP), ("splice_one", ("--trainer.accelerator", "cpu", "--trainer.devices", "1"))):
        root = tmp_path / name
        run_mim("validate", "-c", str(REPO / "configs" / "sae" / "splice_vit_tiny_cifar10.yaml"), *devices,
                "--model.init_args.sae", str(log_dir / "sae.safetensors"), "--model.init_args.store", str(store),
                "--model.init_args.pool", "avg", "--model.init_args.head_images_per_class", "2",
                "--data.init_args.val_limit_per_class", "2", "--data.init_args.batch_size", "4",
                "--data.init_args.num_workers", "0", "--trainer.default_root_dir", str(root),
                "--trainer.logger.init_args.save_dir", str(root), env={"MIM_DATA": str(shared_data)})
        results.append(json.loads((_log_dir(root) / "splice.json").read_text()))
    assert results[0]["top1_clean"] == results[1]["top1_clean"]
    for key in ("top1_recon", "top1_zero", "top1_mean", "kl_recon", "kl_zero"):
        assert results[0][key] == pytest.approx(results[1][key], rel=1e-4, abs=1e-6), key


def test_nan_loss_on_one_rank_stops_every_rank(tmp_path, shared_data):
    """A NaN on one rank must not leave the other waiting in a collective: all stop at the same step."""
    config = REPO / "configs" / "mae" / "vit_tiny_cifar10_quick.yaml"
    res = run_mim("fit", "-c", str(config), *DDP, "--trainer.max_epochs", "1", "--trainer.default_root_dir",
                  str(tmp_path), *TINY_DATA, "--data.init_args.limit_per_class", "4", "--data.init_args.batch_size", "8",
                  "--trainer.callbacks+=kill_switch.NaNImagesOnRank", "--trainer.callbacks.step", "1",
                  "--trainer.callbacks.rank", "1", env={"MIM_DATA": str(shared_data), "PYTHONPATH": str(REPO / "tests")},
                  timeout=240, check=False)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "mim: error:" in res.stderr and "at global step 1" in res.stderr
