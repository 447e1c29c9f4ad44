"""Mixed precision on the CPU: a few real ``lightning.Trainer`` steps of every pretraining method and every SAE
variant under ``bf16-mixed`` and ``16-mixed`` autocast, on real CIFAR-10 images / a real feature store.

Lightning 2.6 turns ``Trainer(accelerator="cpu", precision="16-mixed")`` into ``bf16-mixed`` (with a warning), so
the fp16 cases pass the plugin itself, ``MixedPrecision("16-mixed", "cpu")``: CPU autocast to float16 with a
``GradScaler``, what ``16-mixed`` does on a GPU.
"""

from __future__ import annotations

import functools
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision

from mim.data import ImageDataModule
from mim.features import FeatureStore
from mim.masking import ColorNoiseMask
from mim.methods import MAE, SparK
from mim.methods.cae import CAE
from mim.methods.mixedae import MixedAE
from mim.sae import VARIANTS, JumpReLUSAE
from mim.sae.data import FeatureStoreDataModule
from mim.sae.module import SAETraining
from mim.sae.variants.jumprelu import _JumpReLU, _Step

PRECISIONS = ["bf16-mixed", "16-mixed"]
AUTOCAST_DTYPE = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}

#: The quick configs' ViT-Tiny/4 at 32 px (2 blocks) and SparK's ResNet-18 / ConvNeXt-Atto at 64 px (one block
#: per stage, 8-128 channels), with small decoders: the dtype paths do not depend on depth or width, and on a
#: CPU without AVX512-FP16, fp16 matmuls run ~30x slower than fp32 and fp16 convolutions use a slow fallback
#: kernel (a full-width ResNet-18 step took 20 s).
VIT = dict(backbone="vit_tiny_patch16_224", img_size=32, patch_size=4, backbone_kwargs={"depth": 2},
           warmup_epochs=0, lr=1e-3)
DECODER = dict(decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=2)
SPARK = dict(img_size=64, decoder_width=32, warmup_epochs=0, lr=1e-3)
RESNET = dict(backbone="resnet18", backbone_kwargs={"layers": (1, 1, 1, 1), "channels": (16, 32, 64, 128)})
CONVNEXT = dict(backbone="convnext_atto", backbone_kwargs={"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64)})
METHODS = {
    "mae": lambda: MAE(**VIT, **DECODER),
    "colormae": lambda: MAE(**VIT, **DECODER, mask=functools.partial(ColorNoiseMask, color="green")),
    "cae": lambda: CAE(**VIT, regressor_depth=1, decoder_depth=1),
    "mixedae": lambda: MixedAE(**VIT, **DECODER),
    "spark_resnet18": lambda: SparK(**RESNET, **SPARK),
    "spark_convnext_atto": lambda: SparK(**CONVNEXT, **SPARK),
    "spark_resnet18_spconv": lambda: SparK(**RESNET, backend="spconv", **SPARK),
}
SAE_KWARGS = {
    "TopKSAE": {"k": 8},
    "AbsTopKSAE": {"k": 8},
    "BatchTopKSAE": {"k": 8},
    "MatryoshkaSAE": {"k": 8, "prefixes": [32, 128, 256]},
    "TopAFASAE": {"k_max": 16},
    "ReLUSAE": {"l1_coeff": 0.05},
    "JumpReLUSAE": {"l0_coeff": 0.05},
    "MPSAE": {"steps": 4},
    "FeatureChoiceSAE": {"k": 8},
    "MutualChoiceSAE": {"k": 8},
    "MSAE": {"ks": [4, 8]},
    "ArchetypalSAE": {"k": 8},
}


def _trainer(precision: str, steps: int) -> L.Trainer:
    """A CPU trainer for ``steps`` optimiser steps, then one validation batch (also under autocast)."""
    kwargs = {"precision": precision} if precision == "bf16-mixed" else {"plugins": [MixedPrecision(precision, "cpu")]}
    return L.Trainer(accelerator="cpu", devices=1, max_steps=steps, val_check_interval=steps, limit_val_batches=1,
                     num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, **kwargs)


def _record_autocast(module: L.LightningModule) -> list:
    """Wrap ``module.training_step`` to record the CPU autocast dtype it runs under (None: autocast off)."""
    seen, step = [], module.training_step

    def training_step(*args, **kwargs):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return step(*args, **kwargs)

    module.training_step = training_step
    return seen


def _fit_and_check(module: L.LightningModule, datamodule, precision: str, steps: int) -> L.Trainer:
    params = {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}
    autocast = _record_autocast(module)
    trainer = _trainer(precision, steps)
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == steps
    assert autocast == [AUTOCAST_DTYPE[precision]] * steps  # the steps really ran under autocast
    loss = trainer.callback_metrics["train/loss"]
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())
    changed = [name for name, p in module.named_parameters() if name in params and not torch.equal(p, params[name])]
    assert len(changed) >= 0.9 * len(params), sorted(set(params) - set(changed))
    for name, p in module.named_parameters():
        assert p.dtype == torch.float32 and torch.isfinite(p).all(), name
    return trainer


@pytest.fixture(scope="module")
def images(shared_data) -> dict[int, ImageDataModule]:
    """Real CIFAR-10, 10 training and 10 val images: batches of 4 at 32 px (ViT methods; MixedAE mixes 4 images
    into one) and of 2 at 64 px (SparK). Set up once: finding the images scans the 60,000-file tree."""
    modules = {}
    for img_size, batch_size in ((32, 4), (64, 2)):
        modules[img_size] = ImageDataModule(root=str(shared_data), img_size=img_size, batch_size=batch_size,
                                            num_workers=0, limit_per_class=1, val_limit_per_class=1)
        modules[img_size].setup("fit")
    return modules


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("method", list(METHODS))
def test_method_trains_under_mixed_precision(method, precision, images):
    if method.endswith("spconv"):
        pytest.importorskip("spconv")
    torch.manual_seed(0)
    module = METHODS[method]()
    trainer = _fit_and_check(module, images[64 if method.startswith("spark") else 32], precision, steps=2)
    assert math.isfinite(trainer.callback_metrics["val/loss"].item())  # validation ran under autocast too


@pytest.fixture(scope="module")
def sae_tokens(sae_stores) -> torch.Tensor:
    """(1024, 192) real patch tokens of the training store."""
    return FeatureStore(sae_stores[0]).read("patch").features.reshape(-1, 192)[:1024]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_sae_variant_trains_under_mixed_precision(name, precision, sae_stores):
    torch.manual_seed(0)
    sae = VARIANTS[name](192, 256, dead_tokens=256, **SAE_KWARGS[name])  # latents die after one batch: AuxK runs
    module = SAETraining(sae, lr=1e-3, warmup_steps=0, init_tokens=512)
    datamodule = FeatureStoreDataModule(str(sae_stores[0]), str(sae_stores[1]), batch_size=256, val_batch_size=512)
    trainer = _fit_and_check(module, datamodule, precision, steps=3)
    metrics = trainer.callback_metrics
    assert 0 < metrics["val/fvu"].item() < 1.5 and metrics["val/l0"].item() > 0
    # fused Adam, except under fp16's gradient scaler (Lightning could not clip gradients there)
    assert bool(trainer.optimizers[0].defaults["fused"]) is (precision != "16-mixed")
    for buffer_name, buffer in sae.named_buffers():
        assert buffer.dtype in (torch.float32, torch.int64, torch.bool), buffer_name
    if hasattr(sae, "threshold"):  # BatchTopK / Matryoshka: the estimate was taken in float32
        assert sae.threshold.dtype == torch.float32 and sae.threshold.item() > 0


def test_jumprelu_threshold_gets_a_gradient_under_bf16_autocast(sae_tokens):
    """With theta = 0.7 the bf16 numbers nearest to it are 0.69921875 and 0.703125, both outside the
    pseudo-derivative window ``|z - theta| < bandwidth / 2 = 0.0005``: pre-activations from a bf16 matmul
    never land in it and theta gets exactly zero gradient (the bug); float32 pre-activations do."""
    torch.manual_seed(0)
    sae = JumpReLUSAE(192, 512, l0_coeff=1.0, bandwidth=1e-3, init_threshold=0.7)
    sae.initialize(sae_tokens)
    x_n = sae.normalize(sae_tokens)
    theta = sae.log_threshold.exp()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sae.loss(x_n).loss
        z_bf16 = sae.pre_acts(x_n)  # what the loss used before: the matmul in autocast's bf16
    loss.backward()
    grad = sae.log_threshold.grad
    assert (grad != 0).sum() > 100  # most of the 512 thresholds move

    # the old computation, on bf16 pre-activations: no entry in the window, no gradient at all
    assert z_bf16.dtype == torch.bfloat16
    assert not ((z_bf16.float() - theta.detach()).abs() < 5e-4).any()
    log_threshold = sae.log_threshold.detach().clone().requires_grad_()
    old_theta = log_threshold.exp()
    old_f = _JumpReLU.apply(z_bf16.detach().float(), old_theta, 1e-3)
    old_l0 = _Step.apply(z_bf16.detach().float(), old_theta, 1e-3).sum(-1).mean()
    (old_f.sum() + old_l0).backward()
    assert torch.count_nonzero(log_threshold.grad) == 0

    # and the new gradient is the float32 one
    sae.zero_grad()
    sae.loss(x_n).loss.backward()
    torch.testing.assert_close(grad, sae.log_threshold.grad)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_sae_loss_and_gradients_under_bf16_autocast_match_float32(name, sae_tokens):
    """The bf16 step is the float32 step up to bf16 rounding of the encoder matmul (none for JumpReLU and
    BatchTopK / Matryoshka, whose pre-activations are float32)."""
    torch.manual_seed(0)
    sae = VARIANTS[name](192, 256, **SAE_KWARGS[name])
    sae.initialize(sae_tokens)
    x_n = sae.normalize(sae_tokens)
    results = []
    for autocast in (False, True):
        sae.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = sae.loss(x_n)
        out.loss.backward()
        grads = torch.cat([p.grad.flatten() for p in sae.parameters()])
        results.append((out.loss.detach(), grads, out.x_hat.dtype))
    (loss32, grad32, _), (loss16, grad16, x_hat_dtype) = results
    assert loss16.dtype == x_hat_dtype == grad16.dtype == torch.float32  # reconstructions and losses in fp32
    assert loss16.item() == pytest.approx(loss32.item(), rel=0.03)
    assert _cosine(grad16, grad32) > 0.97


@pytest.mark.parametrize("search", ["compact", "rows"])
@pytest.mark.parametrize("name", ["ReLUSAE", "JumpReLUSAE"])
def test_threshold_variants_sparse_step_under_bf16_autocast_matches_float32(name, search, sae_tokens):
    """The sparse step (a sparse code: few entries per token) under bf16 autocast, with either support search, is
    the float32 step up to bf16 rounding of ReLU's encoder matmul (JumpReLU's pre-activations are float32)."""
    torch.manual_seed(0)
    sae = VARIANTS[name](192, 256, support_search=search, sparse_max_fraction=0.5, **SAE_KWARGS[name])
    sae.initialize(sae_tokens)
    with torch.no_grad():
        sae.b_enc.fill_(-0.3 if name == "ReLUSAE" else -1.5)
    x_n = sae.normalize(sae_tokens)
    results = []
    for autocast in (False, True):
        sae._support_width = 64  # the sparse step
        sae.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = sae.loss(x_n)
        out.loss.backward()
        results.append((out.loss.detach(), torch.cat([p.grad.flatten() for p in sae.parameters()]), out.x_hat.dtype))
    (loss32, grad32, _), (loss16, grad16, x_hat_dtype) = results
    assert x_hat_dtype == torch.float32 and 0 < float(out.l0) < 64
    assert loss16.item() == pytest.approx(loss32.item(), rel=0.03)
    assert _cosine(grad16, grad32) > 0.97


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()
