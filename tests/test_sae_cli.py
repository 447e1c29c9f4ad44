"""``mim fit`` / ``mim validate`` of an SAE on real feature stores: configs/sae/topk_vit_tiny_cifar10.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mim.cli import cli_main
from mim.features import FeatureStore, FeatureStoreError
from mim.sae import TopKSAE, load_sae
from mim.sae.module import SAETraining

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "sae" / "topk_vit_tiny_cifar10.yaml"


def _args(stores, root: Path, *extra: str) -> list[str]:
    train, val = stores
    return [
        "-c", str(CONFIG), f"--trainer.default_root_dir={root}", "--trainer.max_epochs=2",
        "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1",
        f"--data.init_args.train_store={train}", f"--data.init_args.val_store={val}",
        "--data.init_args.batch_size=1024", "--model.init_args.sae.init_args.d_sae=512",
        "--model.init_args.sae.init_args.k=16", "--model.init_args.warmup_steps=5", "--model.init_args.lr=2e-3",
        "--model.init_args.init_tokens=4096", *extra,
    ]


def test_fit_then_validate_reports_metrics_and_exports_the_sae(sae_stores, tmp_path):
    cli = cli_main(["fit", *_args(sae_stores, tmp_path)])
    trainer, module = cli.trainer, cli.model
    assert isinstance(module, SAETraining) and isinstance(module.sae, TopKSAE)
    assert trainer.global_step == 2 * 12  # 12,800 patch tokens / 1024 per batch, last one dropped
    assert bool(module.sae.initialized) and module.sae.input_scale.item() != 1.0
    # lr: 5 warm-up steps to the peak, then constant, then linear decay to 0 over the last 20 % (4 steps)
    lrs = [module.lr_schedulers().lr_lambdas[0](step) for step in range(24)]
    assert lrs[0] == pytest.approx(0.2) and lrs[4] == lrs[20] == 1.0 and lrs[21:] == [0.75, 0.5, 0.25]
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.0
    metrics = trainer.callback_metrics
    for key in ("val/fvu", "val/explained_variance", "val/l0", "val/dead_latents", "val/dense_latents",
                "val/cosine_similarity", "val/relative_reconstruction_bias", "val/decoder_coherence",
                "val/probe_top1_raw", "val/probe_top1_codes", "val/probe_top1_reconstruction",
                "val/accuracy_retained", "train/fvu", "train/auxk"):
        assert key in metrics, key
    assert metrics["val/l0"].item() == pytest.approx(16)
    assert 0 < metrics["val/fvu"].item() < 0.7
    assert metrics["val/explained_variance"].item() == pytest.approx(1 - metrics["val/fvu"].item(), abs=1e-6)

    # the exported SAE reproduces the trained module's outputs
    exported = Path(trainer.log_dir) / "sae.safetensors"
    sae = load_sae(exported)
    val = FeatureStore(sae_stores[1]).read("patch").features.reshape(-1, 192)[:512]
    with torch.no_grad():
        torch.testing.assert_close(sae(val).x_hat, module.sae.cpu()(val).x_hat)

    # mim validate from the checkpoint gives the same validation FVU
    ckpt = Path(trainer.checkpoint_callback.last_model_path)
    fvu = metrics["val/fvu"].item()
    cli = cli_main(["validate", *_args(sae_stores, tmp_path / "val"), f"--ckpt_path={ckpt}"])
    assert cli.trainer.callback_metrics["val/fvu"].item() == pytest.approx(fvu, rel=1e-5)


def test_store_with_another_d_model_is_refused(sae_stores, tmp_path):
    with pytest.raises(FeatureStoreError, match="has d_model 192 but the SAE has d_model 384"):
        cli_main(["fit", *_args(sae_stores, tmp_path, "--model.init_args.sae.init_args.d_model=384")])
