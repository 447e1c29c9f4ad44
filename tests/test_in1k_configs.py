"""Every paper-scale config (``configs/*/*_in1k.yaml``) parses with the CLI's parser, keeps the batch its
header states, and trains one step on a tiny stand-in: the same classes and code path, with a small
model, a few real CIFAR-10 images served as an ImageFolder tree, one CPU device."""

import math
import re
from pathlib import Path

import lightning as L
import pytest
import yaml

from mim.cli import cli_main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(REPO.glob("configs/*/*_in1k.yaml"))
TINY_VIT = "{depth: 1, embed_dim: 64, num_heads: 2}"
TINY_KWARGS = "{img_size: 32, patch_size: 8, depth: 1, embed_dim: 64, num_heads: 2}"

#: Model overrides per class: only sizes change (the stand-in), never the method's code path.
STAND_IN = {
    "mim.methods.MAE": ["--model.init_args.decoder_embed_dim", "32", "--model.init_args.decoder_depth", "1",
                        "--model.init_args.decoder_num_heads", "2"],
    "mim.methods.mixedae.MixedAE": ["--model.init_args.decoder_embed_dim", "32", "--model.init_args.decoder_depth",
                                    "1", "--model.init_args.decoder_num_heads", "2"],
    "mim.methods.cae.CAE": ["--model.init_args.regressor_depth", "1", "--model.init_args.decoder_depth", "1",
                            "--model.init_args.num_heads", "2"],
    "mim.methods.SparK": ["--model.init_args.img_size", "64", "--model.init_args.decoder_width", "64"],
    "mim.eval.linear_probe.LinearProbe": ["--model.init_args.model_kwargs", TINY_KWARGS],
    "mim.eval.finetune.FineTune": ["--model.init_args.model_kwargs", TINY_KWARGS],
}  # fmt: skip
VIT_METHODS = ("mim.methods.MAE", "mim.methods.mixedae.MixedAE", "mim.methods.cae.CAE")


class _FirstLR(L.Callback):
    """The learning rate of the first optimiser step."""

    lr: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.lr is None:
            self.lr = trainer.optimizers[0].param_groups[0]["lr"]


def test_every_method_and_eval_has_an_in1k_config():
    names = {p.relative_to(REPO / "configs").as_posix() for p in CONFIGS}
    assert {
        "mae/vit_base_in1k.yaml", "mae/vit_large_in1k.yaml", "colormae/vit_base_in1k.yaml", "cae/vit_base_in1k.yaml",
        "mixedae/vit_base_in1k.yaml", "spark/resnet50_in1k.yaml", "spark/convnext_small_in1k.yaml",
        "eval/linear_probe_vit_base_in1k.yaml", "eval/finetune_vit_base_in1k.yaml",
    } <= names  # fmt: skip


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_in1k_config_trains_one_step_on_a_stand_in(config, shared_data, tmp_path):
    text = config.read_text()
    cfg = yaml.safe_load(text)
    trainer, data, model = cfg["trainer"], cfg["data"]["init_args"], cfg["model"]
    # the header's effective batch is what the config gives
    stated = int(re.search(r"Effective batch = .* = (\d+)", text).group(1))
    assert data["batch_size"] * trainer["devices"] * trainer["num_nodes"] * trainer["accumulate_grad_batches"] == stated
    assert data["dataset"] == "imagefolder" and data["root"] is None and data["img_size"] == 224  # MIM_DATA
    assert text.startswith("# ") and re.search(r"arXiv \d{4}\.\d{5}", text.split("\n\n")[0])  # cites its paper
    model_class = model["class_path"]
    img_size = "64" if model_class == "mim.methods.SparK" else "32"
    args = ["-c", str(config), "--trainer.default_root_dir", str(tmp_path), "--trainer.accelerator", "cpu",
            "--trainer.devices", "1", "--trainer.num_nodes", "1", "--trainer.strategy", "auto",
            "--trainer.accumulate_grad_batches", "1", "--trainer.precision", "32-true", "--trainer.max_steps", "1",
            "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
            "--trainer.enable_progress_bar", "false",
            "--data.init_args.root", str(shared_data / "cifar10"), "--data.init_args.img_size", img_size,
            "--data.init_args.batch_size", "4", "--data.init_args.limit_per_class", "1",
            "--data.init_args.val_limit_per_class", "1", "--data.init_args.num_workers", "0",
            *STAND_IN[model_class]]  # fmt: skip
    if model_class in VIT_METHODS:
        kwargs = TINY_VIT if "backbone_kwargs" not in model["init_args"] else TINY_VIT[:-1] + ", init_values: 0.1}"
        args += ["--model.init_args.img_size", "32", "--model.init_args.patch_size", "8",
                 "--model.init_args.backbone_kwargs", kwargs]  # fmt: skip
    if model_class == "mim.methods.SparK":  # one narrow block per stage: the same stages, blocks and ops
        small = {"resnet50": "{layers: [1, 1, 1, 1], channels: [16, 32, 64, 128], stem_width: 16}", "convnext_small": "{depths: [1, 1, 1, 1], dims: [32, 64, 96, 128]}"}
        args += ["--model.init_args.backbone_kwargs", small[model["init_args"]["backbone"]]]
    if "ColorNoiseMask" in text:
        args += ["--model.init_args.mask.init_args.bank_size", "8", "--model.init_args.mask.init_args.bank_hw", "16"]
    cli = cli_main(args, run=False)
    first = _FirstLR()
    cli.trainer.callbacks.append(first)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 1
    assert math.isfinite(float(cli.trainer.callback_metrics["train/loss"]))
    if model_class == "mim.methods.SparK":  # official lr_wd_annealing: the first step at 0.005x the peak
        assert first.lr == pytest.approx(0.005 * 2e-4 * 4 / 256)
