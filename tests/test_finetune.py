"""Fine-tuning (MAE recipe): layer-decay groups, drop path, mixup, fresh head, `mim fit` from the YAML."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import timm
import torch
from timm.layers import DropPath
from timm.loss import SoftTargetCrossEntropy
from torch import nn

from mim.cli import cli_main
from mim.data import ImageDataModule
from mim.errors import ConfigError
from mim.eval.encoders import load_encoder_from
from mim.eval.finetune import FineTune, layer_decay_param_groups
from mim.export import save_encoder

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "eval" / "finetune_cifar10.yaml"
VIT = "vit_tiny_patch16_224"
VIT_KW = {"img_size": 32, "patch_size": 4}
SHORT_KW = {**VIT_KW, "depth": 4}  # ViT-Tiny/4 with 4 blocks: what the training tests run, to stay fast
LR, DECAY = 1e-3, 0.75


def _groups_by_name(model: nn.Module, groups: list[dict]) -> dict[str, dict]:
    names = {id(p): n for n, p in model.named_parameters()}
    out = {names[id(p)]: g for g in groups for p in g["params"]}
    assert len(out) == sum(len(g["params"]) for g in groups) == len(names), "each parameter in exactly one group"
    return out


def test_vit_layer_decay_groups_follow_the_mae_formula():
    model = timm.create_model(VIT, num_classes=10, **VIT_KW)
    by_name = _groups_by_name(model, layer_decay_param_groups(model, LR, 0.05, DECAY))
    # 14 layers (stem, 12 blocks, head): layer j gets lr * 0.75 ** (13 - j)
    expected = {"cls_token": DECAY**13, "pos_embed": DECAY**13, "patch_embed.proj.weight": DECAY**13}
    expected.update({f"blocks.{i}.mlp.fc1.weight": DECAY ** (12 - i) for i in range(12)})
    expected.update({f"blocks.{i}.norm1.bias": DECAY ** (12 - i) for i in range(12)})
    expected.update({"norm.weight": DECAY, "head.weight": 1.0, "head.bias": 1.0})  # timm: final norm with block 11
    for name, scale in expected.items():
        assert by_name[name]["lr"] == pytest.approx(LR * scale), name
    no_decay = ["cls_token", "pos_embed", "patch_embed.proj.bias", "blocks.3.norm1.weight", "blocks.3.attn.qkv.bias",
                "norm.weight", "head.bias"]
    assert all(by_name[n]["weight_decay"] == 0 for n in no_decay)
    decay = ["patch_embed.proj.weight", "blocks.3.attn.qkv.weight", "blocks.11.mlp.fc2.weight", "head.weight"]
    assert all(by_name[n]["weight_decay"] == 0.05 for n in decay)


def test_resnet_layer_decay_is_per_stage():
    model = timm.create_model("resnet18", num_classes=10)
    by_name = _groups_by_name(model, layer_decay_param_groups(model, LR, 0.05, DECAY))
    # 6 layers: stem (conv1, bn1), layer1..layer4, fc; layer j gets lr * 0.75 ** (5 - j)
    for name, param in model.named_parameters():
        stage = 0 if name.startswith(("conv1", "bn1")) else 5 if name.startswith("fc") else int(name[5])
        assert by_name[name]["lr"] == pytest.approx(LR * DECAY ** (5 - stage)), name
        assert by_name[name]["weight_decay"] == (0 if param.ndim <= 1 else 0.05), name


def test_drop_path_rises_linearly_and_global_pool_avg_matches_timm():
    module = FineTune(f"timm:{VIT}", VIT_KW, num_classes=10, drop_path_rate=0.2, global_pool="avg")
    module.build(10)
    model = module.encoder
    rates = torch.linspace(0, 0.2, 12).tolist()
    assert isinstance(model.blocks[0].drop_path1, nn.Identity)
    for block, rate in zip(model.blocks[1:], rates[1:]):
        assert isinstance(block.drop_path1, DropPath) and block.drop_path1.drop_prob == pytest.approx(rate)
        assert block.drop_path2.drop_prob == pytest.approx(rate)
    # MAE global pool: the final norm is gone, a fresh fc_norm follows the mean of the patch tokens
    assert isinstance(model.norm, nn.Identity) and torch.equal(model.fc_norm.weight, torch.ones(192))
    assert model.get_classifier().weight.abs().max() < 1e-4 and not model.get_classifier().bias.any()
    rebuilt = timm.create_model(VIT, **module.encoder_config["model_kwargs"])  # what on_load_checkpoint does
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def _export(tmp_path: Path) -> tuple[nn.Module, Path]:
    source = timm.create_model(VIT, num_classes=0, **SHORT_KW)
    return source, save_encoder(source, {"model_name": VIT, "model_kwargs": {**SHORT_KW, "num_classes": 0}},
                                tmp_path / "encoder.safetensors")


class TargetSpy(L.Callback):
    """Records what the training loss receives and the encoder weights when training starts."""

    def __init__(self):
        self.targets, self.start = [], None

    def on_train_start(self, trainer, pl_module):
        self.start = {k: v.clone() for k, v in pl_module.encoder.state_dict().items()}
        pl_module.criterion.register_forward_hook(lambda mod, args, out: self.targets.append((mod, args[1], out)))


def test_fit_mixes_labels_trains_the_encoder_and_starts_from_the_export(tmp_path, shared_data):
    source, path = _export(tmp_path)
    dm = ImageDataModule(root=str(shared_data), batch_size=8, num_workers=0, limit_per_class=2, val_limit_per_class=1)
    module, spy = FineTune(str(path), blr=1e-3), TargetSpy()
    trainer = L.Trainer(max_steps=2, callbacks=[spy], default_root_dir=tmp_path, logger=False, accelerator="cpu",
                        enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0)
    trainer.fit(module, dm)
    # the loaded encoder equals the source, the head is new (MAE init: trunc_normal std 2e-5, zero bias)
    for key, value in source.state_dict().items():
        assert torch.equal(spy.start[key], value), key
    assert spy.start["head.weight"].shape == (10, 192) and spy.start["head.weight"].abs().max() < 1e-4
    # training saw soft (mixed, smoothed) targets through SoftTargetCrossEntropy, with a finite loss
    assert len(spy.targets) == 2
    for criterion, targets, loss in spy.targets:
        assert isinstance(criterion, SoftTargetCrossEntropy) and targets.shape == (8, 10)
        assert torch.allclose(targets.sum(1), torch.ones(8)) and targets.max() < 1 and torch.isfinite(loss)
    # unlike the probe, every part of the encoder moved
    after = module.encoder.state_dict()
    for key in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.3.mlp.fc2.weight", "head.weight"):
        assert not torch.equal(after[key], spy.start[key]), key
    # group lrs: lr = blr * 8 / 256, scaled per layer (initial_lr is what the warmup/cosine lambda multiplies)
    lr = 1e-3 * 8 / 256
    assert sorted({round(g["initial_lr"] / lr, 9) for g in trainer.optimizers[0].param_groups}) == [
        round(DECAY**k, 9) for k in range(5, -1, -1)
    ]
    assert 0 <= trainer.callback_metrics["val/top1"] <= 1 and 0 <= trainer.callback_metrics["val/top5"] <= 1


def test_odd_batch_drops_its_last_image_and_plain_ce_without_mixing(cifar_batch):
    imgs, labels = cifar_batch
    module = FineTune(f"timm:{VIT}", SHORT_KW, num_classes=10)
    module.build(10)
    seen = []
    module.criterion.register_forward_hook(lambda mod, args, out: seen.append(args[1].shape))
    assert torch.isfinite(module.training_step((imgs[:7], labels[:7]), 0)) and seen == [(6, 10)]
    assert module.training_step((imgs[:1], labels[:1]), 0) is None
    plain = FineTune(f"timm:{VIT}", SHORT_KW, num_classes=10, mixup=0, cutmix=0, label_smoothing=0.1)
    plain.build(10)
    assert plain.mixup_fn is None and isinstance(plain.criterion, nn.CrossEntropyLoss)
    assert plain.criterion.label_smoothing == 0.1 and torch.isfinite(plain.training_step((imgs[:7], labels[:7]), 0))


def test_mim_fit_from_yaml_fine_tunes_an_export_and_resumes(tmp_path, shared_data, monkeypatch):
    monkeypatch.setenv("MIM_DATA", str(shared_data))
    source, path = _export(tmp_path)
    tiny = ["--trainer.default_root_dir", str(tmp_path), "--trainer.max_epochs", "1",
            "--trainer.log_every_n_steps", "1",
            "--data.init_args.root", str(shared_data), "--data.init_args.batch_size", "8",
            "--data.init_args.limit_per_class", "3", "--data.init_args.val_limit_per_class", "1",
            "--data.init_args.num_workers", "0", "--model.init_args.encoder", str(path),
            "--trainer.val_check_interval", "2"]
    # 3 batches an epoch, validation (and last.ckpt) after step 2: the resumed run continues mid-epoch
    cli = cli_main(["fit", "-c", str(CONFIG), "--trainer.max_steps", "2", *tiny])
    assert 0 <= cli.trainer.callback_metrics["val/top1"] <= 1
    last = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    tuned = {k: v.clone() for k, v in cli.model.encoder.state_dict().items()}
    assert not torch.equal(tuned["blocks.0.attn.qkv.weight"], source.state_dict()["blocks.0.attn.qkv.weight"])
    resumed = cli_main(["fit", "-c", str(CONFIG), "--ckpt_path", str(last), *tiny, "--trainer.max_steps", "3"])
    assert resumed.trainer.global_step == 3
    # the checkpoint alone (source file gone) rebuilds the classifier, and yields the fine-tuned encoder
    path.unlink()
    restored = FineTune.load_from_checkpoint(last, map_location="cpu")
    assert restored.encoder.state_dict().keys() == tuned.keys()
    assert all(torch.equal(restored.encoder.state_dict()[k], v) for k, v in tuned.items())
    encoder, info = load_encoder_from(last)
    assert info["model_kwargs"]["num_classes"] == 10
    assert all(torch.equal(encoder.state_dict()[k], v) for k, v in tuned.items() if not k.startswith("head."))

def test_bad_inputs_give_readable_config_errors(tmp_path, shared_data):
    with pytest.raises(ConfigError, match=r"layer_decay must lie in \(0, 1\], got 0"):
        FineTune(f"timm:{VIT}", layer_decay=0)
    with pytest.raises(ConfigError, match="layer_decay must lie in"):
        FineTune(f"timm:{VIT}", layer_decay=1.5)
    with pytest.raises(ConfigError, match="mixup and cutmix alphas must be >= 0, got mixup=-0.1"):
        FineTune(f"timm:{VIT}", mixup=-0.1)
    with pytest.raises(ConfigError, match="cutmix=-1"):
        FineTune(f"timm:{VIT}", cutmix=-1)
    with pytest.raises(ConfigError, match="global_pool='avg' applies to ViTs; resnet18"):
        FineTune("timm:resnet18", global_pool="avg").build(10)

    def fit(module, batch_size=8):
        dm = ImageDataModule(root=str(shared_data), batch_size=batch_size, num_workers=0, limit_per_class=1,
                             val_limit_per_class=1)
        L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  default_root_dir=tmp_path, accelerator="cpu").fit(module, dm)

    with pytest.raises(ConfigError, match="the dataset has 10 classes but the fine-tune head has num_classes=100"):
        fit(FineTune(f"timm:{VIT}", SHORT_KW, num_classes=100))
    with pytest.raises(ConfigError, match="batch size must be even, got 7"):
        fit(FineTune(f"timm:{VIT}", SHORT_KW), batch_size=7)
