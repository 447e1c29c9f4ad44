"""Every constructor argument a user can get wrong gives one ``mim: error:`` line that names the cause and
the fix: in-process over methods, masks, evaluation modules, extraction and data, then through the real
``mim`` command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mim.data import ImageDataModule
from mim.errors import UserError
from mim.eval import FineTune, KNNEval, LinearProbe
from mim.features import FeatureExtractor, FeatureStoreWriter
from mim.masking import BlockMask, ColorNoiseMask, RandomMask
from mim.methods import CAE, MAE, MixedAE, SparK

REPO = Path(__file__).resolve().parents[1]
VIT4 = {"backbone": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 4}
DEC = {"decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2}
SMALL_VIT = {**VIT4, "backbone_kwargs": {"depth": 1}}
TIMM_VIT = "timm:vit_tiny_patch16_224"

# (constructor, kwargs, words the message must hold)
CASES = {
    "mae heads": (MAE, {**VIT4, "decoder_embed_dim": 128, "decoder_num_heads": 3},
                  ["decoder_embed_dim 128 is not divisible by decoder_num_heads 3", "Fix:", "one of 1, 2, 4, 8"]),
    "mae sincos width": (MAE, {**VIT4, **DEC, "decoder_embed_dim": 130}, ["multiple of 4", "Fix:"]),
    "mae decoder depth": (MAE, {**VIT4, **DEC, "decoder_depth": 0}, ["decoder_depth must be >= 1", "Fix:"]),
    "mae mask ratio": (MAE, {**VIT4, **DEC, "mask_ratio": 1.0}, ["mask_ratio must lie strictly between 0 and 1"]),
    "mae patch divides": (MAE, {**DEC, "backbone": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 5},
                          ["img_size 32 is not divisible by patch_size 5", "Fix:"]),
    "mae one patch": (MAE, {**DEC, "backbone": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 32},
                      ["1x1 patch grid", "Fix:"]),
    "mae unknown backbone": (MAE, {**VIT4, **DEC, "backbone": "vit_tiny_patch4_32"},
                             ["timm has no model named 'vit_tiny_patch4_32'", "timm.list_models"]),
    "mae convnet backbone": (MAE, {**VIT4, **DEC, "backbone": "resnet18"}, ["VisionTransformer", "SparK"]),
    "mae backbone kwarg": (MAE, {**VIT4, **DEC, "backbone_kwargs": {"drop_pth_rate": 0.1}},
                           ["['drop_pth_rate'] are not arguments of timm's VisionTransformer", "Fix:"]),
    "mae backbone heads": (MAE, {**VIT4, **DEC, "backbone_kwargs": {"num_heads": 5}},
                           ["divisible by num_heads", "Fix:"]),
    "cae heads": (CAE, {**SMALL_VIT, "num_heads": 5}, ["not divisible by num_heads 5", "one of 1, 2, 3, 4, 6"]),
    "cae regressor depth": (CAE, {**SMALL_VIT, "regressor_depth": 0}, ["regressor_depth >= 1", "Fix:"]),
    "cae drop path": (CAE, {**SMALL_VIT, "drop_path_rate": 1.5}, ["drop_path_rate in [0, 1)", "Fix:"]),
    "mixedae ratio": (MixedAE, {**SMALL_VIT, **DEC, "mixing_ratio": 0.3}, ["mixing_ratio r must be 1/g", "Fix:"]),
    "mixedae heads": (MixedAE, {**SMALL_VIT, **DEC, "decoder_num_heads": 3}, ["not divisible by decoder_num_heads 3"]),
    "mixedae temperature": (MixedAE, {**SMALL_VIT, **DEC, "temperature": 0}, ["temperature must be > 0", "Fix:"]),
    "spark img size": (SparK, {"backbone": "resnet18", "img_size": 48}, ["multiple of 32", "Fix:"]),
    "spark decoder width": (SparK, {"backbone": "resnet18", "img_size": 64, "decoder_width": 16},
                            ["decoder_width must be >= 32", "Fix:"]),
    "spark backbone typo": (SparK, {"backbone": "resnet_18", "img_size": 64}, ["Did you mean: resnet18"]),
    "spark backbone kwarg": (SparK, {"backbone": "resnet18", "img_size": 64, "backbone_kwargs": {"foo": 1}},
                             ["does not take backbone_kwargs {'foo': 1}", "Fix:"]),
    "spark clip": (SparK, {"backbone": "resnet18", "img_size": 64, "clip_grad": -1}, ["clip_grad", ">= 0", "Fix:"]),
    "block mask": (BlockMask, {"mask_ratio": 0.5, "min_num_patches": 0}, ["min_num_patches must be >= 1", "Fix:"]),
    "color mask": (ColorNoiseMask, {"mask_ratio": 0.75, "color": "pink"}, ["'pink'", "red, blue, green, purple"]),
    "random mask": (RandomMask, {"mask_ratio": 1.5}, ["got 1.5", "Fix:"]),
    "probe pool": (LinearProbe, {"encoder": TIMM_VIT, "pool": "max"}, ["pool must be 'cls' or 'mean'"]),
    "probe missing file": (LinearProbe, {"encoder": "runs/nowhere/encoder.safetensors"},
                           ["encoder.safetensors does not exist", "Fix:", "timm:<model_name>"]),
    "probe model kwarg": (LinearProbe, {"encoder": TIMM_VIT, "model_kwargs": {"img_sz": 32}},
                          ["timm cannot build 'vit_tiny_patch16_224'", "img_sz", "Fix:"]),
    "knn k": (KNNEval, {"encoder": "timm:resnet18", "pool": "mean", "k": 0}, ["k must be >= 1"]),
    "finetune layer decay": (FineTune, {"encoder": "timm:resnet18", "layer_decay": 0}, ["layer_decay", "(0, 1]"]),
    "extract tokens": (FeatureExtractor, {"encoder": "timm:resnet18", "tokens": ["all"]}, ["tokens must be"]),
    "extract layer": (FeatureExtractor, {"encoder": "timm:resnet18", "tokens": ["mean"], "layers": [2, 9]},
                      ["layers [9] out of range", "Fix:"]),
    "store shard size": (FeatureStoreWriter, {"path": "unused", "shard_size": 0}, ["shard_size must be >= 1"]),
    "data name": (ImageDataModule, {"dataset": "imagenet1k"}, ["Unknown dataset 'imagenet1k'", "cifar10"]),
    "data batch size": (ImageDataModule, {"batch_size": 0}, ["batch_size must be >= 1"]),
    "data fraction": (ImageDataModule, {"fraction": 1.5}, ["fraction must be in (0, 1]"]),
    "data predict split": (ImageDataModule, {"predict_split": "test"}, ["predict_split must be 'train' or 'val'"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_wrong_value_gives_a_user_error_naming_it(case):
    cls, kwargs, words = CASES[case]
    with pytest.raises(UserError) as info:
        cls(**kwargs)
    message = str(info.value)
    for word in words:
        assert word in message, (word, message)
    assert "\n" not in message, "one line"


# (config, override, words) through the real command line
CLI_CASES = {
    "mae heads": ("configs/mae/vit_tiny_cifar10_quick.yaml", ["fit", "--model.init_args.decoder_num_heads", "3"],
                  ["decoder_embed_dim 128 is not divisible by decoder_num_heads 3"]),
    "spark width": ("configs/spark/resnet18_cifar10_quick.yaml", ["fit", "--model.init_args.decoder_width", "16"],
                    ["decoder_width must be >= 32"]),
    "probe encoder": ("configs/eval/linear_probe_cifar10.yaml",
                      ["fit", "--model.init_args.encoder", "runs/nowhere/encoder.safetensors"],
                      ["runs/nowhere/encoder.safetensors does not exist"]),
}


def test_wrong_values_on_the_command_line_give_one_error_line(shared_data):
    """The real ``mim`` console entry point, one process per case, run side by side (each pays the imports)."""
    env = {**os.environ, "MIM_DATA": str(shared_data)}
    env.pop("MIM_TRACEBACK", None)
    procs = {
        case: subprocess.Popen([sys.executable, "-m", "mim.cli", subcommand, "-c", config, *override], cwd=REPO,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        for case, (config, (subcommand, *override), _) in CLI_CASES.items()
    }
    try:
        results = {case: (proc.communicate(timeout=120)[1], proc.returncode) for case, proc in procs.items()}
    finally:
        for proc in procs.values():
            proc.kill()
    for case, (stderr, code) in results.items():
        assert code == 2, (case, stderr[-3000:])
        assert "Traceback" not in stderr, case
        line = next(line for line in stderr.splitlines() if line.startswith("mim: error:"))
        for word in CLI_CASES[case][2]:
            assert word in line, (case, word, line)
