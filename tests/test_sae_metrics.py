"""SAE metrics (FVU, explained variance, L0, dead / dense / 1 % latents, cosine, relative bias, L2 ratio,
coherence, mean max decoder cosine), the downstream probes, and the training loop's recipe (gradient clipping
after the decoder projection, no host sync in the step, non-finite loss checks, stored-dtype loading), on real
feature stores (the ``sae_stores`` fixture)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mim.errors import ConfigError
from mim.features.store import FeatureStore, FeatureStoreError
from mim.sae.downstream import downstream_probe, pool_store
from mim.sae.metrics import (
    FVU,
    DeadLatents,
    DenseLatents,
    ExplainedVariance,
    L2Ratio,
    LatentFiring,
    MeanCosineSimilarity,
    MeanL0,
    RelativeReconstructionBias,
    decoder_coherence,
    decoder_cosine_stats,
    max_decoder_cosine,
    mean_max_decoder_cosine,
    sae_metrics,
)
from mim.sae.variants import SparseCode, TopKSAE


@pytest.fixture(scope="module")
def patch_tokens(sae_stores) -> torch.Tensor:
    """(12800, 192) float32 patch tokens of the real train store."""
    return FeatureStore(sae_stores[0]).read("patch").features.reshape(-1, 192)


def _noisy(x: torch.Tensor) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return 0.9 * x + 0.5 * x.std() * torch.randn(x.shape, generator=generator)


def test_fvu_equals_float64_reference_with_per_dimension_mean(patch_tokens):
    x, x_hat = patch_tokens, _noisy(patch_tokens)
    x64, r64 = x.double(), (x.double() - x_hat.double())
    reference = r64.square().sum() / (x64 - x64.mean(0)).square().sum()
    scalar_mean_version = r64.square().sum() / (x64 - x64.mean()).square().sum()
    fvu = FVU(192)
    fvu.update(x, x_hat)
    value = fvu.compute()
    assert value.dtype == torch.float64
    torch.testing.assert_close(value, reference, rtol=1e-10, atol=0)
    assert 0.05 < float(value) < 1.0
    assert abs(float(scalar_mean_version) / float(reference) - 1) > 0.01  # the scalar-mean FVU differs (~3 %)
    ev = ExplainedVariance(192)
    ev.update(x, x_hat)
    torch.testing.assert_close(ev.compute(), 1 - reference, rtol=1e-10, atol=0)


def test_fvu_chunked_merged_and_low_precision_updates(patch_tokens):
    x, x_hat = patch_tokens, _noisy(patch_tokens)
    whole = FVU(192)
    whole.update(x, x_hat)
    chunked = FVU(192)
    for start, stop in ((0, 1), (1, 5000), (5000, 12800)):
        chunked.update(x[start:stop], x_hat[start:stop])
    torch.testing.assert_close(chunked.compute(), whole.compute(), rtol=1e-12, atol=0)
    # DDP: torchmetrics sums the states of the ranks; merge_state applies the same reduction
    rank0, rank1 = FVU(192), FVU(192)
    rank0.update(x[:7000], x_hat[:7000])
    rank1.update(x[7000:], x_hat[7000:])
    rank0.merge_state(rank1)
    torch.testing.assert_close(rank0.compute(), whole.compute(), rtol=1e-12, atol=0)
    # (n, L, d) inputs are flattened; bf16 inputs are summed in float64 (reference from the same bf16 values)
    xb, xb_hat = x.bfloat16(), x_hat.bfloat16()
    low = FVU(192)
    low.update(xb.reshape(200, 64, 192), xb_hat.reshape(200, 64, 192))
    x64 = xb.double()
    ref = (x64 - xb_hat.double()).square().sum() / (x64 - x64.mean(0)).square().sum()
    torch.testing.assert_close(low.compute(), ref, rtol=1e-10, atol=0)


def test_reconstruction_metrics_reject_bad_shapes(patch_tokens):
    with pytest.raises(ConfigError, match="d_model=100"):
        FVU(100).update(patch_tokens, patch_tokens)
    with pytest.raises(ConfigError, match="one shape"):
        MeanCosineSimilarity().update(patch_tokens, patch_tokens[:, :10])


def test_cosine_and_relative_reconstruction_bias(patch_tokens):
    x = patch_tokens
    cos, gamma = MeanCosineSimilarity(), RelativeReconstructionBias()
    for chunk in x.split(5000):
        cos.update(chunk, 0.5 * chunk)
        gamma.update(chunk, 0.5 * chunk)
    torch.testing.assert_close(cos.compute(), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(gamma.compute(), torch.tensor(0.5, dtype=torch.float64))
    # hand case: x = (1, 0), x_hat = (1, 1): cos = 1/sqrt(2); gamma = ||x_hat||^2 / <x_hat, x> = 2
    cos, gamma = MeanCosineSimilarity(), RelativeReconstructionBias()
    x2, x2_hat = torch.tensor([[1.0, 0.0], [0.0, 3.0]]), torch.tensor([[1.0, 1.0], [0.0, -3.0]])
    cos.update(x2, x2_hat)
    gamma.update(x2, x2_hat)
    assert float(cos.compute()) == pytest.approx((1 / math.sqrt(2) - 1) / 2)
    assert float(gamma.compute()) == pytest.approx((2 + 9) / (1 - 9))


def test_l0_and_latent_firing_on_a_hand_made_code():
    d_sae = 6
    code = SparseCode(  # unused slots are 0 with any id; row 2 repeats latent 4 (matching pursuit)
        values=torch.tensor([[1.0, -2.0, 0.0], [0.5, 0.0, 0.0], [3.0, 1.0, 0.2], [0.0, 0.0, 0.0]]),
        indices=torch.tensor([[0, 3, 5], [0, 5, 5], [4, 1, 4], [2, 2, 2]]),
    )
    l0 = MeanL0()
    l0.update(code)
    assert float(l0.compute()) == pytest.approx((2 + 1 + 2 + 0) / 4)  # latent 4 counts once in row 2
    firing = LatentFiring(d_sae, dense_threshold=0.3)
    firing.update(SparseCode(code.values[:2], code.indices[:2]))
    firing.update(SparseCode(code.values[2:], code.indices[2:]))
    # tokens fired on: latent 0: rows 0, 1; 1: row 2; 2: none; 3: row 0; 4: row 2 (once); 5: none
    expected = torch.tensor([2, 1, 0, 1, 1, 0], dtype=torch.float64) / 4
    torch.testing.assert_close(firing.frequencies(), expected)
    result = firing.compute()
    assert float(result["dead_latents"]) == pytest.approx(2 / 6)
    assert float(result["dense_latents"]) == pytest.approx(1 / 6)  # only latent 0 fires on > 30 % of tokens
    dead, dense = DeadLatents(d_sae, 0.3), DenseLatents(d_sae, 0.3)
    dead.update(code)
    dense.update(code)
    assert float(dead.compute()) == pytest.approx(2 / 6)
    assert float(dense.compute()) == pytest.approx(1 / 6)


def test_decoder_coherence_equals_brute_force_in_any_chunking():
    W_dec = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    unit = W_dec / W_dec.norm(dim=1, keepdim=True)
    cos = (unit @ unit.T).abs() - torch.eye(50)
    brute = float(cos.max())
    for chunk_size in (1, 7, 50, 1000):
        assert decoder_coherence(W_dec, chunk_size) == pytest.approx(brute, abs=1e-6)
    W_dec[17] = -3 * W_dec[4]  # an anti-parallel atom: coherence 1
    assert decoder_coherence(W_dec, 16) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ConfigError, match="d_sae >= 2"):
        decoder_coherence(W_dec[:1])


def test_mean_max_decoder_cosine_is_saebenchs_per_latent_signed_max():
    """SAEBench's average_max_decoder_cosine_sim: per latent the largest *signed* cosine with another atom, then the
    mean; blocked computation equals the full matrix, and one duplicated atom does not saturate it."""
    W_dec = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    unit = W_dec / W_dec.norm(dim=1, keepdim=True)
    cos = (unit @ unit.T).fill_diagonal_(-math.inf)
    per_latent = cos.amax(1)
    for chunk_size in (None, 1, 7, 300, 1000):
        torch.testing.assert_close(max_decoder_cosine(W_dec, chunk_size), per_latent, atol=1e-6, rtol=0)
    base = mean_max_decoder_cosine(W_dec, 64)
    assert base == pytest.approx(float(per_latent.double().mean()), abs=1e-6)
    W_dec[17] = 3 * W_dec[4]  # a duplicated atom: coherence saturates, the mean moves by ~2/300
    stats = decoder_cosine_stats(W_dec, 64)
    assert float(stats["decoder_coherence"]) == pytest.approx(1.0, abs=1e-6)
    assert float(stats["mean_max_decoder_cosine"]) == pytest.approx(mean_max_decoder_cosine(W_dec), abs=1e-12)
    assert float(stats["mean_max_decoder_cosine"]) < base + 0.01
    W_dec[17] = -W_dec[4]  # anti-parallel: |cos| = 1 for the coherence, but SAEBench's signed max ignores it
    assert decoder_coherence(W_dec) == pytest.approx(1.0, abs=1e-6)
    assert float(max_decoder_cosine(W_dec)[17]) < 0.99
    with pytest.raises(ConfigError, match="d_sae >= 2"):
        mean_max_decoder_cosine(W_dec[:1])


def test_decoder_cosines_in_bounded_blocks(monkeypatch):
    """Never a full d_sae x d_sae matrix: each block holds at most _COSINE_BLOCK_ELEMENTS cosines (2^24 by default,
    682 rows at d_sae 24,576 instead of a 2.4 GB float32 matrix); shrunk here to 2^16 to test it at d_sae 3000."""
    from mim.sae import metrics

    assert metrics._check_decoder(torch.empty(24_576, 768, device="meta"), None, "x") == 682
    monkeypatch.setattr(metrics, "_COSINE_BLOCK_ELEMENTS", 1 << 16)
    d_sae = 3000
    W_dec = torch.randn(d_sae, 8, generator=torch.Generator().manual_seed(1))
    largest = []
    matmul = torch.Tensor.__matmul__

    def spy(a, b):
        out = matmul(a, b)
        largest.append(out.numel())
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    stats = metrics.decoder_cosine_stats(W_dec)
    per_latent = metrics.max_decoder_cosine(W_dec)
    monkeypatch.setattr(torch.Tensor, "__matmul__", matmul)
    assert max(largest) <= 1 << 16 and len(largest) == 2 * math.ceil(d_sae / ((1 << 16) // d_sae))
    unit = W_dec / W_dec.norm(dim=1, keepdim=True)
    cos = (unit @ unit.T).fill_diagonal_(-math.inf)
    torch.testing.assert_close(per_latent, cos.amax(1), atol=1e-6, rtol=0)
    assert float(stats["mean_max_decoder_cosine"]) == pytest.approx(float(cos.amax(1).double().mean()), abs=1e-6)
    assert float(stats["decoder_coherence"]) == pytest.approx(float(cos.fill_diagonal_(0).abs().max()), abs=1e-6)


def test_l2_ratio_is_the_per_token_mean_with_saebenchs_guard(patch_tokens):
    x = patch_tokens
    norm = x.norm(dim=1, keepdim=True)
    scale = 0.5 + norm / norm.max()  # longer tokens shrunk less: the mean of ratios != the ratio of means
    x_hat = scale * x  # per-token ratio = scale
    metric = L2Ratio()
    for chunk in range(0, len(x), 5000):
        metric.update(x[chunk : chunk + 5000], x_hat[chunk : chunk + 5000])
    value = metric.compute()
    assert value.dtype == torch.float64
    assert float(value) == pytest.approx(float(scale.double().mean()), rel=1e-6)
    ratio_of_means = float(x_hat.norm(dim=1).mean() / x.norm(dim=1).mean())
    assert abs(ratio_of_means - float(value)) > 0.01  # not E||x_hat|| / E||x||
    # an all-zero input token is divided by 1 (SAEBench), not by ~0
    metric = L2Ratio()
    metric.update(torch.tensor([[0.0, 0.0], [3.0, 4.0]]), torch.tensor([[0.3, 0.4], [6.0, 8.0]]))
    assert float(metric.compute()) == pytest.approx((0.5 + 2.0) / 2)


def test_freq_over_1_percent_counts_latents_above_one_percent_of_tokens():
    """200 tokens: latent 0 fires on 3 (1.5 %), latent 1 on 2 (1 %, not above), latent 2 on 1, latent 3 never."""
    n, d_sae = 200, 4
    values, indices = torch.zeros(n, 1), torch.full((n, 1), 3)
    for latent, rows in ((0, [0, 1, 2]), (1, [3, 4]), (2, [5])):
        values[rows, 0], indices[rows, 0] = 1.0, latent
    metrics = sae_metrics(2, d_sae, dense_threshold=0.5)
    x = torch.randn(n, 2)
    metrics.update(x=x, x_hat=x, code=SparseCode(values, indices))
    result = metrics.compute()
    assert float(result["freq_over_1_percent"]) == pytest.approx(1 / 4)
    assert float(result["dense_latents"]) == 0.0 and float(result["dead_latents"]) == pytest.approx(1 / 4)
    assert float(result["l2_ratio"]) == pytest.approx(1.0)


def test_sae_metrics_collection_on_a_real_sae(sae_stores, patch_tokens):
    sae = TopKSAE(d_model=192, d_sae=768, k=16)
    sae.initialize(patch_tokens[:2048])
    metrics = sae_metrics(192, 768, prefix="val/")
    singles = {"val/fvu": FVU(192), "val/cosine_similarity": MeanCosineSimilarity(), "val/l0": MeanL0()}
    with torch.no_grad():
        for batch in FeatureStore(sae_stores[1]).batches(2000, shuffle=False, flatten=True):
            out = sae(batch.features)
            metrics.update(x=batch.features, x_hat=out.x_hat, code=out.code)
            singles["val/fvu"].update(batch.features, out.x_hat)
            singles["val/cosine_similarity"].update(batch.features, out.x_hat)
            singles["val/l0"].update(out.code)
    result = metrics.compute()
    assert set(result) == {f"val/{k}" for k in ("fvu", "explained_variance", "l0", "dead_latents", "dense_latents",
                                                "freq_over_1_percent", "cosine_similarity",
                                                "relative_reconstruction_bias", "l2_ratio")}
    for key, single in singles.items():
        torch.testing.assert_close(result[key], single.compute(), rtol=1e-12, atol=0)
    torch.testing.assert_close(result["val/explained_variance"], 1 - result["val/fvu"])
    assert 0 < float(result["val/l0"]) <= 16
    assert 0 <= float(result["val/dead_latents"]) < 1 and 0 <= float(result["val/dense_latents"]) <= 1


class IdentitySAE(nn.Module):
    """A stand-in SAE whose code is the input itself (d_sae = d_model) and whose reconstruction is exact."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.d_model = self.d_sae = d_model
        self.unused = nn.Parameter(torch.zeros(()))

    def encode(self, x: torch.Tensor) -> SparseCode:
        return SparseCode(x, torch.arange(self.d_model).expand(x.shape[0], -1))

    def decode(self, code: SparseCode) -> torch.Tensor:
        return code.values


def test_pool_store_averages_each_images_tokens(sae_stores):
    store = FeatureStore(sae_stores[0])
    pooled = pool_store(IdentitySAE(192), store, "patch", batch_size=1000)  # batches split images
    stored = store.read("patch")
    torch.testing.assert_close(pooled.raw, stored.features.float().mean(1))
    torch.testing.assert_close(pooled.codes, pooled.raw)
    torch.testing.assert_close(pooled.reconstruction, pooled.raw)
    assert torch.equal(pooled.labels, stored.labels)


def test_downstream_probe_on_real_stores(sae_stores):
    train, val = sae_stores
    identity = downstream_probe(IdentitySAE(192), train, val, tokens="patch", sparse_ks=(1, 5))
    assert identity["probe_top1_raw"] >= 0.2  # 10 classes: chance is 0.1
    assert identity["probe_top1_codes"] == identity["probe_top1_raw"]
    assert identity["accuracy_retained"] == pytest.approx(1.0)
    # k-sparse probing (logged by SAETraining with downstream: true): codes = raw features, so the same probes
    assert identity["sparse_probe_top1"] == identity["sparse_probe_raw_top1"]
    assert identity["sparse_probe_top5"] == identity["sparse_probe_raw_top5"] > 0.5
    assert "sparse_probe_top2" not in identity
    sae = TopKSAE(d_model=192, d_sae=768, k=16)
    sae.initialize(FeatureStore(train).read("patch").features.reshape(-1, 192)[:2048])
    result = downstream_probe(sae, train, val, tokens="mean")
    assert result["probe_top1_raw"] >= 0.2
    assert all(0 <= result[k] <= 1 for k in ("probe_top1_codes", "probe_top1_reconstruction"))
    assert result["accuracy_retained"] == pytest.approx(result["probe_top1_reconstruction"] / result["probe_top1_raw"])
    assert all(0.4 <= result[f"sparse_probe{kind}_top{k}"] <= 1 for kind in ("", "_raw") for k in (1, 2, 5, 10, 20))
    with pytest.raises(FeatureStoreError, match="d_model 192 but the SAE has d_model 64"):
        downstream_probe(IdentitySAE(64), train, val)


# ------------------------------------------------------------------------------- the training loop (SAETraining)
def _fit(train_store, root, module=None, callbacks=(), max_steps=4, **trainer_kwargs):
    """A short in-process ``fit`` of a small TopK SAE on a real store (1024-token batches, CPU)."""
    import lightning as L

    from mim.sae.data import FeatureStoreDataModule
    from mim.sae.module import SAETraining

    torch.manual_seed(0)
    module = module or SAETraining(TopKSAE(d_model=192, d_sae=256, k=8), lr=1e-3, warmup_steps=0, init_tokens=2048)
    dm = FeatureStoreDataModule(str(train_store), batch_size=1024)
    kwargs = {"logger": False, "enable_checkpointing": False, **trainer_kwargs}
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(root), callbacks=list(callbacks), **kwargs)
    trainer.fit(module, datamodule=dm)
    return module, trainer


def _clip_recorder():
    from mim.sae.module import SAETraining

    class ClipRecorder(SAETraining):
        """Records, right after Lightning's clipping (nothing but the optimizer runs after it), the global gradient
        norm and the largest decoder-gradient component parallel to its row."""

        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            grads = [p.grad for p in self.sae.parameters() if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            W, G = self.sae.W_dec.detach(), self.sae.W_dec.grad
            parallel = ((G * W).sum(1) / W.norm(dim=1)).abs().max() / G.norm()
            self.seen = [*getattr(self, "seen", []), (float(norm), float(parallel))]

    return ClipRecorder(TopKSAE(d_model=192, d_sae=256, k=8), lr=1e-3, warmup_steps=0, init_tokens=2048)


def test_gradient_clipping_applies_after_the_decoder_projection(sae_stores, tmp_path):
    """With gradient_clip_val the applied gradient has exactly the clip norm (so the parallel component was removed
    before the norm was measured, not after), no decoder component parallel to its row, and the rows stay
    unit-norm after every step."""
    free, _ = _fit(sae_stores[0], tmp_path / "free", module=_clip_recorder())
    assert min(norm for norm, _ in free.seen) > 0.05  # unclipped gradients are far above the clip value
    clip = 1e-3
    module, trainer = _fit(sae_stores[0], tmp_path / "clip", module=_clip_recorder(), gradient_clip_val=clip)
    assert trainer.global_step == 4 and len(module.seen) == 4
    for norm, parallel in module.seen:
        assert norm == pytest.approx(clip, rel=1e-5)  # projecting after the clip would leave it ~1e-3 short
        assert parallel < 1e-5
    row_norms = module.sae.W_dec.detach().norm(dim=1)
    torch.testing.assert_close(row_norms, torch.ones_like(row_norms), atol=1e-5, rtol=0)


def test_training_step_does_not_synchronise_with_the_host(sae_stores, tmp_path, monkeypatch):
    """No .item() / bool() / float() / int() / .tolist() / .cpu() / .numpy() from the training step, the decoder
    projection or the optimizer step of SAETraining (on a GPU each one stalls the pipeline); the finite-loss check
    synchronises at logging steps only."""
    import sys

    from mim.sae import module as module_file

    watched = {"training_step", "_record_nonfinite", "on_before_optimizer_step", "optimizer_step"}
    calls: list[tuple[str, str]] = []

    def spy(name, original):
        def wrapper(self, *args, **kwargs):
            frame = sys._getframe(1)
            if frame.f_code.co_filename == module_file.__file__:
                calls.append((name, frame.f_code.co_name))
            return original(self, *args, **kwargs)
        return wrapper

    for name in ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, spy(name, getattr(torch.Tensor, name)))
    _fit(sae_stores[0], tmp_path, max_steps=4, log_every_n_steps=2)
    monkeypatch.undo()
    assert [c for c in calls if c[1] in watched] == []
    checks = [c for c in calls if c[1] == "check_finite"]
    assert 2 <= len(checks) <= 3  # steps 2 and 4 (logging steps), perhaps the epoch end: the spy sees them


def test_nonfinite_loss_is_raised_with_its_step_before_a_checkpoint(sae_stores, tmp_path):
    """A NaN loss at step 2 is recorded on the device and raised at the next check: here the step-4 checkpoint,
    which is not written."""
    import lightning as L

    from mim.errors import UserError

    class Poison(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2:
                batch.features[0, 0] = float("nan")

    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_last=False)
    with pytest.raises(UserError, match=r"not finite at step 2 \(here nan; terms .*found at step 4"):
        _fit(sae_stores[0], tmp_path, callbacks=[Poison(), ckpt], max_steps=8, enable_checkpointing=True,
             log_every_n_steps=100)
    assert not list((tmp_path / "ckpt").glob("*.ckpt"))


def _half_store(src, dst, dtype):
    """A copy of a feature store with its features stored in ``dtype``."""
    import json

    from safetensors.torch import load_file, save_file

    from mim.features.store import METADATA, write_metadata

    dst.mkdir()
    meta = json.loads((src / METADATA).read_text())
    for shard in meta["shards"]:
        tensors = load_file(src / shard["file"])
        save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}, dst / shard["file"])
    write_metadata(dst, {**meta, "dtype": str(dtype).removeprefix("torch.")})
    return dst


def test_loader_keeps_the_store_dtype_and_casts_on_the_device(sae_stores, tmp_path, monkeypatch):
    """A float16 store: the DataLoader yields float16 batches (half the bytes to pin and copy); the data module's
    transfer hook casts to float32; training on it equals training on a float32 store of the same values."""
    import types

    from mim.sae.data import FeatureStoreDataModule

    half = _half_store(sae_stores[0], tmp_path / "fp16", torch.float16)
    rounded = _half_store(half, tmp_path / "fp32", torch.float32)  # the float16 values, stored as float32
    dm = FeatureStoreDataModule(str(half), batch_size=1024)
    dm.setup()
    loader = dm.train_dataloader()
    batch = next(iter(loader))
    assert batch.features.dtype == torch.float16 and not loader.pin_memory  # no CUDA trainer: no pinning
    moved = dm.on_after_batch_transfer(batch, 0)
    assert moved.features.dtype == torch.float32 and torch.equal(moved.features, batch.features.float())
    # pinned for a trainer on a CUDA device (decided from the trainer; nothing is copied here)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    dm.trainer = types.SimpleNamespace(strategy=types.SimpleNamespace(root_device=torch.device("cuda", 0)),
                                       global_rank=0, world_size=1, current_epoch=0)
    assert dm._pin() and FeatureStoreDataModule(str(half), pin_memory=False)._pin() is False
    monkeypatch.undo()

    losses = {}
    for name, store in (("fp16", half), ("fp32", rounded)):
        module, _ = _fit(store, tmp_path / name, max_steps=3, log_every_n_steps=1)
        losses[name] = (module.trainer.callback_metrics["train/loss"], module.sae.state_dict())
    assert torch.equal(losses["fp16"][0], losses["fp32"][0])
    for key, value in losses["fp16"][1].items():
        assert torch.equal(value, losses["fp32"][1][key]), key
