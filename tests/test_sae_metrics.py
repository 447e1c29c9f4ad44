"""SAE metrics (FVU, explained variance, L0, dead / dense latents, cosine, relative bias, coherence) and the
downstream linear-probe check, on real feature stores (the ``sae_stores`` fixture)."""

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
    LatentFiring,
    MeanCosineSimilarity,
    MeanL0,
    RelativeReconstructionBias,
    decoder_coherence,
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
                                                "cosine_similarity", "relative_reconstruction_bias")}
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
    identity = downstream_probe(IdentitySAE(192), train, val, tokens="patch")
    assert identity["probe_top1_raw"] >= 0.2  # 10 classes: chance is 0.1
    assert identity["probe_top1_codes"] == identity["probe_top1_raw"]
    assert identity["accuracy_retained"] == pytest.approx(1.0)
    sae = TopKSAE(d_model=192, d_sae=768, k=16)
    sae.initialize(FeatureStore(train).read("patch").features.reshape(-1, 192)[:2048])
    result = downstream_probe(sae, train, val, tokens="mean")
    assert result["probe_top1_raw"] >= 0.2
    assert all(0 <= result[k] <= 1 for k in ("probe_top1_codes", "probe_top1_reconstruction"))
    assert result["accuracy_retained"] == pytest.approx(result["probe_top1_reconstruction"] / result["probe_top1_raw"])
    with pytest.raises(FeatureStoreError, match="d_model 192 but the SAE has d_model 64"):
        downstream_probe(IdentitySAE(64), train, val)
