"""Splicing an SAE into a frozen timm encoder (mim/sae/splice.py) and the splice-in evaluation
(mim/sae/splice_eval.py), on real CIFAR-10 features of a ViT-Tiny/4 (the ``sae_stores`` fixture: block 6)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch

from mim.cli import cli_main
from mim.data import ImageDataModule
from mim.errors import ConfigError
from mim.eval.encoders import load_encoder_from
from mim.features.store import FeatureStore
from mim.sae.downstream import pool_store
from mim.sae.models import save_sae
from mim.sae.splice import capture, check_hook_point, hook_point, intervene, reference_tokens, splice
from mim.sae.splice_eval import SpliceMetric, check_images, fit_linear_head, store_mean
from mim.sae.variants import SparseAutoencoder, SparseCode, TopKSAE

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "sae" / "splice_vit_tiny_cifar10.yaml"
LAYER = 6  # the sae_stores fixture's block


class IdentitySAE(SparseAutoencoder):
    """A real SparseAutoencoder whose reconstruction is its input bit for bit: ``W_dec = I``, ``b_dec = 0``, scale 1,
    and the code of ``x`` is ``x`` itself (one slot per dimension). With ``zero=True`` the decoder is 0 instead, so
    every reconstruction is 0."""

    def __init__(self, d_model: int, zero: bool = False) -> None:
        super().__init__(d_model, d_model)
        with torch.no_grad():
            self.W_dec.copy_(torch.zeros(d_model, d_model) if zero else torch.eye(d_model))

    def code(self, x_n: torch.Tensor) -> SparseCode:
        ids = torch.arange(self.d_model, device=x_n.device).expand(len(x_n), -1)
        return SparseCode(x_n - self.b_dec, ids)


@pytest.fixture(scope="module")
def vit(sae_stores):
    model, _ = load_encoder_from(str(sae_stores[0].parent / "encoder.safetensors"))
    return model.eval()


@pytest.fixture(scope="module")
def train_images(shared_data):
    """The first 5 training images per class (a subset of the store's 20), eval transform: (50, 3, 32, 32), (50,)."""
    dm = ImageDataModule(root=str(shared_data), limit_per_class=5, train_augment=False, num_workers=0)
    dm.setup("fit")
    items = [dm.train_set[i] for i in range(len(dm.train_set))]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def pooled(model, imgs):
    return model.forward_head(model.forward_features(imgs), pre_logits=True)


@pytest.fixture(scope="module")
def head(vit, train_images):
    """A linear head on the clean pooled features of the 50 training images, and those clean logits."""
    imgs, labels = train_images
    with torch.no_grad():
        feats = pooled(vit, imgs)
    head = fit_linear_head(feats, labels, 10)
    return head, head(feats)


@pytest.fixture(scope="module")
def topk_sae(sae_stores):
    """A TopK SAE (384 latents, k 8) trained for 200 steps of 512 patch tokens on the train store (one thread:
    deterministic, and fast on a shared machine)."""
    x = FeatureStore(sae_stores[0]).read("patch").features.reshape(-1, 192).float()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        sae = TopKSAE(192, 384, k=8)
        sae.initialize(x[torch.randperm(len(x), generator=gen)[:4096]])
        opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
        for _ in range(200):
            out = sae.loss(sae.normalize(x[torch.randint(len(x), (512,), generator=gen)]))
            opt.zero_grad()
            out.loss.backward()
            sae.remove_parallel_grad_()
            opt.step()
            sae.normalize_decoder_()
    finally:
        torch.set_num_threads(threads)
    assert float(out.terms["fvu"].detach()) < 0.15  # it learned to reconstruct
    return sae.requires_grad_(False).eval()


def test_hook_points_give_the_extracted_features(vit, cifar_batch):
    """The rows a splice hands to the SAE are the features FeatureExtractor stores: a ViT block, the last block
    after the final norm (hooked on model.norm), the class token, and ResNet stages."""
    imgs = cifar_batch[0][:2]
    assert hook_point(vit, 6)[0] == "blocks.6"
    assert hook_point(vit, -1, final_norm=True)[0] == "norm"
    for layer, final_norm, tokens in ((6, False, "patch"), (11, True, "patch"), (11, True, "cls")):
        check_hook_point(vit, layer, imgs, final_norm, tokens)  # raises on a mismatch
    with capture(vit, 11) as seen:  # block 11 itself is before the final norm: not what a last-layer store holds
        vit.forward_features(imgs)
    assert not torch.allclose(seen[0], reference_tokens(vit, 11, imgs, final_norm=True), atol=1e-3)
    resnet = timm.create_model("resnet10t", num_classes=0).eval()
    assert hook_point(resnet, 3)[0] == "layer3"
    for layer in (2, 4):
        check_hook_point(resnet, layer, imgs, final_norm=layer == 4)
    with pytest.raises(ConfigError, match="out of range"):
        hook_point(resnet, 5)


def test_identity_sae_recovers_all_and_zero_sae_none(vit, head, train_images, sae_stores):
    """An SAE whose reconstruction is its input recovers 100 % (KL 0) and one that reconstructs 0 recovers 0 %
    (it is zero ablation), also when the metric's states are summed from two halves (as DDP does)."""
    head = head[0]
    rows = torch.cat([(train_images[1] == c).nonzero()[:1, 0] for c in range(10)])  # 1 head-training image per class
    imgs, labels = train_images[0][rows], train_images[1][rows]
    mean = store_mean(FeatureStore(sae_stores[0]))

    def logits(sae=None, mode=None):
        with torch.no_grad():
            if mode is None:
                return head(pooled(vit, imgs))
            with splice(vit, LAYER, sae, mode, mean):
                return head(pooled(vit, imgs))

    clean, zero, mean_abl = logits(), logits(mode="zero"), logits(mode="mean")
    identity, nothing = IdentitySAE(192), IdentitySAE(192, zero=True)
    recon_identity, recon_zero = logits(identity, "recon"), logits(nothing, "recon")
    assert torch.allclose(recon_identity, clean, atol=1e-5)
    assert torch.equal(recon_zero, zero)

    results = {}
    for name, recon in (("identity", recon_identity), ("zero", recon_zero)):
        metric = SpliceMetric(["recon", "zero", "mean"])
        metric.update(clean, {"recon": recon, "zero": zero, "mean": mean_abl}, labels)
        results[name] = {k: float(v) for k, v in metric.compute().items()}
        half1, half2 = SpliceMetric(["recon", "zero", "mean"]), SpliceMetric(["recon", "zero", "mean"])
        for part, rows in ((half1, slice(0, 4)), (half2, slice(4, None))):
            part.update(clean[rows], {"recon": recon[rows], "zero": zero[rows], "mean": mean_abl[rows]}, labels[rows])
        half1.merge_state(half2)
        merged = {k: float(v) for k, v in half1.compute().items()}
        assert merged == pytest.approx(results[name], abs=1e-5)
    ident, null = results["identity"], results["zero"]
    assert ident["top1_clean"] > ident["top1_zero"] + 0.3 and ident["top1_clean"] > ident["top1_mean"]
    assert ident["top1_recon"] == ident["top1_clean"]
    assert ident["accuracy_recovered_zero"] == 1.0 and ident["accuracy_recovered_mean"] == 1.0
    assert ident["kl_recon"] == pytest.approx(0.0, abs=1e-6) and ident["kl_zero"] > 0.1
    assert ident["ce_recovered_zero"] == pytest.approx(1.0, abs=1e-4)
    assert null["accuracy_recovered_zero"] == 0.0 and null["ce_recovered_zero"] == 0.0
    assert null["kl_recon"] == pytest.approx(null["kl_zero"]) and null["kl_recovered_zero"] == 0.0


def test_mean_ablation_writes_the_store_mean(vit, sae_stores, cifar_batch):
    """Mean ablation puts the store's per-dimension patch-token mean on every patch token; the class token passes."""
    store = FeatureStore(sae_stores[0])
    mean = store_mean(store)
    assert torch.allclose(mean, store.read("patch").features.float().mean(dim=(0, 1)), atol=1e-5)
    imgs = cifar_batch[0][:4]
    with torch.no_grad(), capture(vit, LAYER, tokens="cls") as clean_cls:
        vit.forward_features(imgs)
    with torch.no_grad(), splice(vit, LAYER, mode="mean", mean=mean), capture(vit, LAYER) as patch, \
            capture(vit, LAYER, tokens="cls") as cls:
        vit.forward_features(imgs)
    assert patch[0].shape == (4 * 64, 192) and torch.equal(patch[0], mean.expand(4 * 64, -1))
    assert torch.equal(cls[0], clean_cls[0])
    with pytest.raises(ConfigError, match="needs the activation mean"):
        with splice(vit, LAYER, mode="mean"):
            pass


def test_hooks_are_removed_after_an_error(vit, topk_sae, cifar_batch):
    imgs = cifar_batch[0][:2]
    with torch.no_grad():
        clean = vit.forward_features(imgs)
    block = vit.blocks[LAYER]
    for manager in (splice(vit, LAYER, topk_sae), intervene(vit, LAYER, topk_sae, ablate=[0])):
        with pytest.raises(RuntimeError, match="boom"):
            with manager:
                assert len(block._forward_hooks) == 1
                raise RuntimeError("boom")
        assert not block._forward_hooks
    with torch.no_grad():
        assert torch.equal(vit.forward_features(imgs), clean)


def test_interventions(vit, topk_sae, head, train_images, sae_stores):
    """No edit leaves the encoder's output unchanged bit for bit; a clamp moves the tokens along the latent's
    decoder row; ablating the most class-selective latent lowers that class's logit more than the others'."""
    sae = topk_sae
    imgs, labels = train_images
    head, clean_logits = head
    with torch.no_grad():
        clean = vit.forward_features(imgs[:8])
        with intervene(vit, LAYER, sae):
            assert torch.equal(vit.forward_features(imgs[:8]), clean)
        with capture(vit, LAYER) as before:
            vit.forward_features(imgs[:2])
        with intervene(vit, LAYER, sae, clamp={5: 3.0}), capture(vit, LAYER) as after:
            vit.forward_features(imgs[:2])
    dense = sae.encode(before[0]).to_dense(sae.d_sae)
    expected = before[0] + (3.0 - dense[:, 5:6]) * sae.W_dec[5] / sae.input_scale
    assert torch.allclose(after[0], expected, atol=1e-4)

    # the latent with the largest class-mean difference of its image-pooled code (train store)
    codes = pool_store(sae, sae_stores[0])
    diff = torch.stack([codes.codes[codes.labels == c].mean(0) - codes.codes[codes.labels != c].mean(0)
                        for c in range(10)])
    cls, latent = divmod(int(diff.argmax()), sae.d_sae)
    rows = labels == cls
    with torch.no_grad(), intervene(vit, LAYER, sae, ablate=[latent]):
        ablated = head(pooled(vit, imgs[rows]))
    change = ablated - clean_logits[rows]
    others = torch.cat([change[:, :cls], change[:, cls + 1:]], dim=1)
    assert change[:, cls].mean() < others.mean() - 0.1, (cls, latent, change.mean(0))
    with pytest.raises(ConfigError, match="outside"):
        intervene(vit, LAYER, sae, ablate=[sae.d_sae]).__enter__()


def test_check_images_refuses_other_preprocessing(sae_stores):
    meta = FeatureStore(sae_stores[0]).metadata
    check_images(meta, ImageDataModule(dataset="cifar10", img_size=32))
    with pytest.raises(ConfigError, match=r"img_size: store 32, datamodule 64.*--data.init_args.img_size"):
        check_images(meta, ImageDataModule(dataset="cifar10", img_size=64))
    with pytest.raises(ConfigError, match="mean: store"):
        check_images(meta, ImageDataModule(dataset="cifar10", img_size=32, mean=(0.5, 0.5, 0.5)))


def test_mim_validate_config(topk_sae, sae_stores, shared_data, tmp_path):
    """``mim validate -c configs/sae/splice_vit_tiny_cifar10.yaml`` (in process) on the test store and a real SAE."""
    sae_path = save_sae(topk_sae, tmp_path / "sae.safetensors")
    cli = cli_main([
        "validate", "-c", str(CONFIG), "--model.init_args.sae", str(sae_path),
        "--model.init_args.store", str(sae_stores[0]), "--model.init_args.head_images_per_class", "1",
        "--data.init_args.root", str(shared_data), "--data.init_args.val_limit_per_class", "1",
        "--data.init_args.batch_size", "20", "--data.init_args.num_workers", "0", "--trainer.accelerator", "cpu",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false",
    ])
    logged = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    result = json.loads((Path(cli.trainer.log_dir) / "splice.json").read_text())
    assert (Path(cli.trainer.log_dir) / "splice_head.safetensors").is_file()
    assert result["layer"] == LAYER and result["hook"] == f"blocks.{LAYER}"
    assert logged["splice/top1_clean"] == pytest.approx(result["top1_clean"])
    for mode in ("recon", "zero", "mean", "random"):
        assert 0.0 <= result[f"top1_{mode}"] <= 1.0 and result[f"kl_{mode}"] >= 0.0
    assert result["kl_recon"] < result["kl_zero"]  # the reconstruction is closer to the clean run than ablation
    for key in ("accuracy_recovered_zero", "accuracy_recovered_mean", "kl_recovered_zero", "kl_ratio_random"):
        assert key in result
