"""Feature Choice, Mutual Choice, MSAE and Archetypal SAEs on real extracted features (ViT-Tiny/4 block-6 patch
tokens of CIFAR-10, the ``sae_stores`` fixture): each one's defining property, that it learns, its save/load
round trip, and the readable error of each bad configuration."""

from __future__ import annotations

import itertools

import pytest
import torch
from sae_helpers import make_sae, train_sae

from mim.errors import ConfigError, UserError
from mim.sae import (
    MSAE,
    ArchetypalSAE,
    FeatureChoiceSAE,
    MutualChoiceSAE,
    SparseAutoencoder,
    load_sae,
    save_sae,
)
from mim.sae.variants.base import batch_variance, squared_error

D, D_SAE, K, N = 192, 512, 16, 1024
KWARGS = {
    "FeatureChoiceSAE": {"k": K},
    "MutualChoiceSAE": {"k": K},
    "MSAE": {"ks": [4, 8, 16, 32]},
    "ArchetypalSAE": {"k": K, "delta": 0.05},
}


def make(name: str, x: torch.Tensor, **overrides) -> SparseAutoencoder:
    return make_sae(name, x, D_SAE, KWARGS[name], **overrides)
SAE_KEY = "--model.init_args.sae.init_args."


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return float((x_hat - x).double().pow(2).sum() / (x - x.mean(0)).double().pow(2).sum())


@pytest.fixture(scope="module")
def trained(sae_tokens) -> dict[str, tuple[SparseAutoencoder, float]]:
    """Each new variant after 40 training steps, with its validation FVU before training."""
    x, val = sae_tokens
    out = {}
    for name in KWARGS:
        sae = make(name, x)
        with torch.no_grad():
            before = fvu(val, sae(val).x_hat)
        train_sae(sae, x, steps=40, lr=1e-3 if name == "ArchetypalSAE" else 2e-3)  # 2e-3: a loss spike at step 40
        out[name] = (sae, before)
    return out


@pytest.mark.parametrize("name", list(KWARGS))
def test_each_new_variant_learns_and_round_trips(name, trained, sae_tokens, tmp_path):
    _, val = sae_tokens
    sae, before = trained[name]
    with torch.no_grad():
        out = sae(val)
    after = fvu(val, out.x_hat)
    assert after < 0.6 * before and after < 0.45, (before, after)
    assert K / 2 <= out.code.l0().float().mean() <= 2.5 * K  # inference keeps about the training budget

    path = save_sae(sae, tmp_path / "sae.safetensors")
    loaded = load_sae(path.with_suffix(".json"))
    assert type(loaded) is type(sae) and loaded.init_args() == sae.init_args()
    with torch.no_grad():
        a, b = sae(val[:500]), loaded(val[:500])
    assert torch.equal(a.x_hat, b.x_hat) and torch.equal(a.code.values, b.code.values)


# ------------------------------------------------------------------------------------------ feature / mutual choice
def test_feature_choice_gives_each_latent_its_capacity_and_tokens_a_variable_count(trained, sae_tokens):
    sae, _ = trained["FeatureChoiceSAE"]
    x_n = sae.normalize(sae_tokens[1][:N])
    with torch.no_grad():
        code = sae.batch_code(x_n)
        z = sae.pre_acts(x_n)
    m = sae.capacities(N)
    assert m.sum() == K * N and (m >= K * N // D_SAE).all() and (m <= K * N // D_SAE + 1).all()
    fired = code.fired(D_SAE)
    positive = (z > 0).sum(0)
    assert torch.equal(fired, torch.minimum(m, positive))  # exactly the capacity, fewer only where z <= 0
    dense = code.to_dense(D_SAE)
    for j in range(0, D_SAE, 37):  # each latent kept its best tokens
        kept = dense[:, j] > 0
        if kept.any() and (~kept).any():
            assert z[kept, j].min() >= z[~kept, j].max()
    counts = code.l0().float()
    assert counts.mean() == pytest.approx(fired.sum().item() / N) and counts.std() > 1 and counts.min() < K < counts.max()


def test_feature_choice_zipf_capacities_and_a_budget_the_batch_cannot_cover():
    sae = FeatureChoiceSAE(16, 64, k=4, zipf_exponent=0.8)
    m = sae.capacities(256)
    assert m.sum() == 4 * 256 and m[0] == m.max() and m[0] > 3 * m[-1]
    with pytest.raises(ConfigError) as err:
        FeatureChoiceSAE(16, 64, k=32, zipf_exponent=1.0)  # latent 0 would be owed 6.8 x the batch
    message = str(err.value)
    assert message.startswith("SAE zipf_exponent must give capacities that cover the batch") and "Fix: " in message
    assert message.endswith(f"({SAE_KEY}zipf_exponent).")


def test_mutual_choice_keeps_exactly_k_times_n_entries_the_batch_top(trained, sae_tokens):
    sae, _ = trained["MutualChoiceSAE"]
    x_n = sae.normalize(sae_tokens[1][:N])
    with torch.no_grad():
        code = sae.batch_code(x_n)
        z = sae.pre_acts(x_n)
    assert (z > 0).sum() > K * N
    active = code.values != 0
    assert int(active.sum()) == K * N
    dense = code.to_dense(D_SAE)
    assert z[dense > 0].min() >= z[dense == 0].max()  # the global top k * N of the token x latent matrix
    counts = code.l0()
    assert counts.float().std() > 1 and counts.max() > 2 * K


@pytest.mark.parametrize("name", ["FeatureChoiceSAE", "MutualChoiceSAE"])
def test_choice_loss_and_gradients_equal_a_dense_reference(name, sae_tokens):
    x, _ = sae_tokens
    """Two steps: the first has no cut estimates (Mutual Choice: the per-row search; Feature Choice: every latent's
    whole column), the second searches from the first's cuts (a pool ``z >= 0.9 cut``; Feature Choice: a few
    latents whose pool falls short of their capacity take their whole column)."""
    sae = make(name, x, underused_fraction=0.0)
    x_n = sae.normalize(x[:N])
    x_n2 = sae.normalize(x[N : 2 * N])
    for step, batch in enumerate((x_n, x_n2)):
        sae.zero_grad()
        sae.loss(batch).loss.backward()
        if name == "MutualChoiceSAE":
            assert sae.last_search == ("rows", "threshold")[step]
        else:
            assert sae.last_full_latents == D_SAE if step == 0 else 0 < sae.last_full_latents < D_SAE / 2
        sparse = {n: p.grad.clone() for n, p in sae.named_parameters()}
        sae.zero_grad()
        z = sae.pre_acts(batch)
        keep = sae.keep(z.detach()) & (z.detach() > 0)
        x_hat = (torch.relu(z) * keep) @ sae.W_dec + sae.b_dec
        (squared_error(batch, x_hat) / batch_variance(batch)).backward()
        for n, p in sae.named_parameters():
            torch.testing.assert_close(sparse[n], p.grad, rtol=1e-5, atol=1e-5 * float(p.grad.abs().max()))


def test_choice_inference_is_per_token_topk_until_trained_then_a_threshold(sae_tokens):
    x, val = sae_tokens
    for name in ("FeatureChoiceSAE", "MutualChoiceSAE"):
        sae = make(name, x)
        assert (sae.encode(val[:256]).l0() == K).all()  # no threshold yet: TopK per token
        train_sae(sae, x, steps=2)
        code = sae.encode(val[:256])
        assert code.l0().float().std() > 0  # a threshold: variable count per token
    assert sae.threshold.item() > 0 and int(sae.threshold_updates) == 2


def test_under_used_latents_join_the_auxiliary_loss(sae_tokens):
    x, _ = sae_tokens
    sae = make("MutualChoiceSAE", x)
    sae.train()
    assert sae.loss(sae.normalize(x[:N])).terms["auxk"] == 0  # nothing dead or under-used yet
    sae.firing_rate[:10] = 0.0  # ten latents that have not fired lately
    out = sae.loss(sae.normalize(x[:N]))
    assert out.terms["aux_latents"] == 10 and out.terms["auxk"] > 0


# ---------------------------------------------------------------------------------------------------------- MSAE
def test_msae_loss_is_the_weighted_mean_of_prefix_losses_and_prefixes_nest(trained, sae_tokens):
    x, val = sae_tokens
    for weighting, weights in (("uniform", [0.25] * 4), ("reverse", [0.4, 0.3, 0.2, 0.1])):
        sae = make("MSAE", x, weighting=weighting)
        assert sae.prefix_weights() == pytest.approx(weights)
        x_n = sae.normalize(x[:N])
        out = sae.loss(x_n)
        assert out.terms["auxk"] == 0 and out.l0 == 32
        expected = sum(w * out.terms[f"fvu_k{k}"] for w, k in zip(weights, sae.ks))
        torch.testing.assert_close(out.loss, expected)
        # prefix i is the top-k_i of one sorted code: its own TopK code gives the same reconstruction
        x_hat_8 = sae.decode_n(sae.code_k(x_n, 8))
        torch.testing.assert_close(out.terms["fvu_k8"], squared_error(x_n, x_hat_8) / batch_variance(x_n))

    sae, _ = trained["MSAE"]
    with torch.no_grad():
        fvus = [fvu(val, sae.decode(sae.encode_k(val, k))) for k in sae.ks]
    assert all(b < a for a, b in itertools.pairwise(fvus)), fvus  # more active latents, less unexplained variance
    assert fvus[-1] < 0.5 * fvus[0]
    assert (sae.encode(val[:64]).l0() <= 32).all()


# ----------------------------------------------------------------------------------------------------- archetypal
def test_archetypal_atoms_stay_within_delta_of_the_hull_of_the_candidates(trained, sae_tokens):
    sae, _ = trained["ArchetypalSAE"]
    A, C, relax = sae.mixing.detach(), sae.archetypes, sae.relaxation.detach()
    assert C.shape == (D_SAE, D) and C.abs().sum() > 0
    assert (A >= 0).all()
    torch.testing.assert_close(A.sum(1), torch.ones(D_SAE))
    norms = (sae.W_dec.detach() - A @ C).norm(dim=1)
    torch.testing.assert_close(norms, relax.norm(dim=1))
    assert norms.max() <= sae.delta * (1 + 1e-5) and norms.max() > 0.5 * sae.delta  # the relaxation is used
    assert (A.max(1).values < 1).float().mean() > 0.2  # atoms moved off their initial data point (unused ones cannot)

    fresh = make("ArchetypalSAE", sae_tokens[0])
    assert "W_dec" not in dict(fresh.named_parameters()) and fresh.W_dec.shape == (D_SAE, D)  # computed, not free
    ids = fresh.mixing.argmax(1)
    torch.testing.assert_close(fresh.W_dec, fresh.archetypes[ids])  # each atom starts at one candidate


def test_archetypal_candidates_need_enough_sample_tokens(sae_tokens):
    x, _ = sae_tokens
    sae = ArchetypalSAE(D, 64, k=4, n_candidates=600)
    with pytest.raises(UserError, match=r"at least n_candidates=600 sample tokens.*got 500\. Fix: lower "
                                        r"--model\.init_args\.sae\.init_args\.n_candidates"):
        sae.initialize(x[:500])
    sae.initialize(x[:600])  # enough: ``sample`` candidates are distinct tokens
    assert torch.isfinite(sae.W_dec).all()


def test_archetypal_projection_after_the_optimizer_step():
    """``normalize_decoder_`` maps ``A`` to ReLU(A) with unit row sums (a row with no positive entry to uniform) and
    clips each relaxation row to norm ``delta``, leaving shorter rows alone."""
    sae = ArchetypalSAE(8, 6, k=2, n_candidates=5, delta=0.1)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        sae.mixing.copy_(torch.randn(6, 5, generator=gen))
        sae.mixing[2] = -torch.rand(5, generator=gen)  # nothing positive left after the ReLU
        sae.mixing[4] = 0.0
        sae.relaxation.copy_(torch.randn(6, 8, generator=gen))
        sae.relaxation[1] *= 0.01 / sae.relaxation[1].norm()  # inside the ball: kept as it is
    want = sae.mixing.detach().clamp_min(0)
    want = want / want.sum(1, keepdim=True)
    want[2] = want[4] = 0.2
    short = sae.relaxation.detach()[1].clone()
    sae.normalize_decoder_()
    torch.testing.assert_close(sae.mixing.detach(), want, rtol=0, atol=1e-7)
    norms = sae.relaxation.detach().norm(dim=1)
    torch.testing.assert_close(norms[[0, 2, 3, 4, 5]], torch.full((5,), 0.1))
    assert torch.equal(sae.relaxation.detach()[1], short)


# ------------------------------------------------------------------------------------------------------ bad input
BAD = [
    (lambda: MSAE(16, 64, ks=[8, 4, 16]), "ks", "increase strictly within [1, d_sae=64]"),
    (lambda: MSAE(16, 64, ks=[8, 128]), "ks", "got [8, 128]"),
    (lambda: MSAE(16, 64, ks=[]), "ks", "got []"),
    (lambda: MSAE(16, 64, ks=[4, 8], inference_k=16), "inference_k", "be in [1, k_max=8]"),
    (lambda: MSAE(16, 64, weighting="linear"), "weighting", "be one of ['uniform', 'reverse']"),
    (lambda: FeatureChoiceSAE(16, 64, k=65), "k", "be in [1, d_sae=64]"),
    (lambda: FeatureChoiceSAE(16, 64, k=4, zipf_exponent=-1.0), "zipf_exponent", "be >= 0"),
    (lambda: MutualChoiceSAE(16, 64, k=4, underused_fraction=1.0), "underused_fraction", "lie in [0, 1)"),
    (lambda: MutualChoiceSAE(16, 64, k=4, threshold_beta=1.0), "threshold_beta", "lie in [0, 1)"),
    (lambda: MutualChoiceSAE(16, 64, k=4, candidate_search="dense"), "candidate_search", "be one of"),
    (lambda: ArchetypalSAE(16, 64, k=4, n_candidates=0), "n_candidates", "be positive"),
    (lambda: ArchetypalSAE(16, 64, k=4, delta=-0.1), "delta", "be >= 0"),
    (lambda: ArchetypalSAE(16, 64, k=4, candidates="random"), "candidates", "be one of ['kmeans', 'sample']"),
]


@pytest.mark.parametrize(("build", "name", "fragment"), BAD, ids=[f"{i}-{c[1]}" for i, c in enumerate(BAD)])
def test_bad_configuration_is_one_readable_error_at_construction(build, name, fragment):
    with pytest.raises(ConfigError) as err:
        build()
    message = str(err.value)
    assert message.startswith(f"SAE {name} must") and fragment in message and "Fix: " in message, message
    assert message.endswith(f"({SAE_KEY}{name}).")
