"""Exact resume: a run SIGKILLed after a step checkpoint and resumed with ``--ckpt_path last`` logs the very losses
of the uninterrupted run (masks, augmentation, data order, optimiser, schedule, online probe and kNN bank)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import yaml
from cli_run import REPO, finish_mim, run_mim, start_mim

TESTS = Path(__file__).resolve().parent


def _config(source: Path, tmp: Path, name: str, kill_at: int | None, edit) -> Path:
    """The shipped ``source`` config with step checkpoints, per-step CSV logs under ``tmp/name`` and, with
    ``kill_at``, the kill switch."""
    cfg = yaml.safe_load(source.read_text())
    trainer = cfg["trainer"]
    trainer.update(default_root_dir=str(tmp / "run"), log_every_n_steps=1, enable_progress_bar=False,
                   logger={"class_path": "lightning.pytorch.loggers.CSVLogger",
                           "init_args": {"save_dir": str(tmp / "logs"), "name": name}})
    callbacks = [c for c in trainer.get("callbacks", []) if not c["class_path"].endswith("ModelCheckpoint")]
    callbacks.append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                      "init_args": {"every_n_train_steps": 1, "save_last": True, "save_top_k": 0}})
    if kill_at is not None:
        callbacks.append({"class_path": "kill_switch.KillAtStep", "init_args": {"step": kill_at}})
    trainer["callbacks"] = callbacks
    edit(cfg)
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _metrics(tmp: Path, name: str) -> dict[tuple[str, int], float]:
    """``{(metric, step): value}`` of every CSV log of ``name`` (the resumed run's rows win)."""
    out: dict[tuple[str, int], float] = {}
    for file in sorted((tmp / "logs" / name).glob("version_*/metrics.csv")):
        with open(file) as f:
            for row in csv.DictReader(f):
                for key, value in row.items():
                    if key not in ("step", "epoch") and value:
                        out[(key, int(row["step"]))] = float(value)
    return out


def _check_resume(tmp_path: Path, source: Path, edit, kill_at: int, shared_data: Path, compare: tuple[str, ...]) -> None:
    # one torch thread in every run (sums in the same order); the uninterrupted and the killed run side by side
    env = {"MIM_DATA": str(shared_data), "PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1"}
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    runs = [start_mim("fit", "-c", str(_config(source, whole, "m", None, edit)), env=env),
            start_mim("fit", "-c", str(_config(source, cut, "m", kill_at, edit)), env=env)]
    finish_mim(runs[0])
    killed = finish_mim(runs[1], check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILL: no clean-up ran
    run_mim("fit", "-c", str(_config(source, cut, "m", None, edit)), "--ckpt_path", "last", env=env)
    expected, got = _metrics(whole, "m"), _metrics(cut, "m")
    after = {k: v for k, v in expected.items() if k[1] >= kill_at and k[0].startswith(compare)}
    assert len(after) >= 3, sorted(expected)  # train/loss at 2 steps, and the epoch's validation
    for key, value in after.items():
        assert key in got, f"{key} missing after the resume"
        assert math.isclose(got[key], value, rel_tol=1e-6, abs_tol=1e-6), (key, got[key], value)
    # and the killed run's steps before the kill are the uninterrupted run's too (same seeds, same order)
    assert math.isclose(got[("train/loss", 0)], expected[("train/loss", 0)], rel_tol=1e-6)


def _tiny_images(cfg: dict, batch: int = 8, per_class: int = 2) -> None:
    cfg["trainer"]["max_epochs"] = 2
    cfg["data"]["init_args"].update(limit_per_class=per_class, val_limit_per_class=1, batch_size=batch, num_workers=1)


def test_mae_resumes_exactly(tmp_path, shared_data):
    # 20 images, batch 8: 2 steps per epoch; killed before step 3 (mid-epoch 1)
    _check_resume(tmp_path, REPO / "configs" / "mae" / "vit_tiny_cifar10_quick.yaml", _tiny_images, 3, shared_data,
                  ("train/", "val/", "probe/", "knn/"))


def test_spark_resumes_exactly(tmp_path, shared_data):
    _check_resume(tmp_path, REPO / "configs" / "spark" / "resnet18_cifar10_quick.yaml", _tiny_images, 3, shared_data,
                  ("train/", "val/", "probe/", "knn/"))


def test_sae_resumes_exactly(tmp_path, sae_stores, shared_data):
    train, val = sae_stores

    def edit(cfg: dict) -> None:
        cfg["trainer"]["max_epochs"] = 2
        cfg["trainer"]["callbacks"] = [c for c in cfg["trainer"]["callbacks"] if "ExportSAE" not in c["class_path"]]
        cfg["model"]["init_args"].update(warmup_steps=3, init_tokens=2048, downstream=False)
        cfg["model"]["init_args"]["sae"]["init_args"].update(d_sae=768, k=16, dead_tokens=4096)
        cfg["data"]["init_args"].update(train_store=str(train), val_store=str(val), batch_size=2048)

    # 12,800 token rows, batch 2048: 6 steps per epoch; killed before step 8 (mid-epoch 1)
    _check_resume(tmp_path, REPO / "configs" / "sae" / "topk_vit_tiny_cifar10.yaml", edit, 8, shared_data,
                  ("train/", "val/"))
