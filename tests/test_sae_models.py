"""SAE variants and their kernels on real extracted features: ViT-Tiny/4 block-6 patch tokens of
CIFAR-10 images (the ``sae_stores`` fixture)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from sae_helpers import make_sae, train_sae

from mim.errors import ConfigError, UserError
from mim.sae import (
    MPSAE,
    VARIANTS,
    AbsTopKSAE,
    BatchTopKSAE,
    JumpReLUSAE,
    MatryoshkaSAE,
    ReLUSAE,
    SparseAutoencoder,
    TopAFASAE,
    TopKSAE,
    kernels,
    load_sae,
    save_sae,
)
from mim.sae.kernels import (
    LatentSort,
    attach_linear_grad_ragged,
    latent_order,
    ragged_decode,
    ragged_offsets,
    row_argmax,
    select_linear,
    sparse_decode,
    threshold_linear,
)
from mim.sae.variants.base import batch_variance, geometric_median

D, D_SAE, K = 192, 512, 16
VARIANT_KWARGS = {
    "TopKSAE": {"k": K},
    "AbsTopKSAE": {"k": K},
    "BatchTopKSAE": {"k": K},
    "MatryoshkaSAE": {"k": K, "prefixes": [64, 128, 256, 512]},
    "TopAFASAE": {"k_max": 64},
    "ReLUSAE": {"l1_coeff": 0.05},
    "JumpReLUSAE": {"l0_coeff": 0.05, "init_threshold": 0.1, "bandwidth": 0.05},
    "MPSAE": {"steps": 8},
}


def make(name: str, x: torch.Tensor, **overrides) -> SparseAutoencoder:
    return make_sae(name, x, D_SAE, VARIANT_KWARGS[name], **overrides)


def fvu(sae: SparseAutoencoder, x: torch.Tensor) -> float:
    with torch.no_grad():
        x_hat = sae(x).x_hat
    return float((x_hat - x).double().pow(2).sum() / (x - x.mean(0)).double().pow(2).sum())


@pytest.mark.parametrize("name", list(VARIANT_KWARGS))
def test_every_variant_learns_to_reconstruct_real_features(name, sae_tokens):
    x, val = sae_tokens
    sae = make(name, x)
    before = fvu(sae, val)
    train_sae(sae, x, steps=60)
    after = fvu(sae, val)
    assert after < 0.8 * before and after < 0.6, (before, after)
    if sae.unit_norm_decoder:
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE))
    code = sae.encode(val)
    assert code.values.shape == code.indices.shape and code.indices.max() < D_SAE


def test_normalisation_and_init(sae_tokens):
    x, _ = sae_tokens
    sae = make("TopKSAE", x)
    x_n = sae.normalize(x[:4096])
    assert x_n.norm(dim=1).mean().item() == pytest.approx(math.sqrt(D), rel=1e-4)
    median = geometric_median(x_n)
    torch.testing.assert_close(sae.b_dec.detach(), median)
    # the geometric median minimises the sum of distances: better than the mean and than a nudged median
    cost = lambda c: (x_n - c).norm(dim=1).sum()
    assert cost(median) < cost(x_n.mean(0)) and cost(median) < cost(median + 0.05 * torch.randn(D))
    fresh = TopKSAE(D, D_SAE, k=K)
    torch.testing.assert_close(fresh.W_enc, fresh.W_dec)  # encoder starts as the decoder's transpose
    # outputs are in the store's units: the scale is undone by decode
    with torch.no_grad():
        code = sae.encode(x[:8])
        torch.testing.assert_close(sae.decode(code) * sae.input_scale, sae.decode_n(code))


@pytest.mark.parametrize("name", ["TopKSAE", "AbsTopKSAE"])
def test_topk_l0_is_exactly_k(name, sae_tokens):
    x, val = sae_tokens
    sae = make(name, x)
    train_sae(sae, x, steps=20)
    code = sae.encode(val)
    assert (code.l0() == K).all()
    out = sae.loss(sae.normalize(val[:2048]))
    assert out.l0.item() == K
    if name == "AbsTopKSAE":
        assert (code.values < 0).any() and (code.values > 0).any()  # bidirectional, signs kept
        z = sae.pre_acts(sae.normalize(val[:64]))
        top = z.abs().topk(K).values
        torch.testing.assert_close(code.values[:64].abs().sort(1).values, top.sort(1).values.detach())
    else:
        assert (code.values >= 0).all()


def test_batchtopk_l0_is_k_on_average_in_training_and_threshold_at_inference(sae_tokens):
    x, val = sae_tokens
    sae = make("BatchTopKSAE", x)
    train_sae(sae, x, steps=40)
    sae.train()
    out = sae.loss(sae.normalize(val[:2048]))
    assert out.l0.item() == pytest.approx(K)  # k * B over the batch
    code = sae.batch_code(sae.normalize(val[:2048]))
    assert code.l0().min() < K < code.l0().max()  # per-token counts vary
    sae.eval()
    theta = float(sae.threshold)
    assert theta > 0
    code = sae.encode(val)
    z = sae.pre_acts(sae.normalize(val)).detach()
    assert torch.equal(code.l0(), (z > theta).sum(1))  # inference: the global threshold
    assert 0.3 * K < code.l0().float().mean() < 3 * K


def test_top_afa_picks_an_adaptive_number_of_latents(sae_tokens):
    x, val = sae_tokens
    sae = make("TopAFASAE", x)
    train_sae(sae, x, steps=40)
    code = sae.encode(val)
    l0 = code.l0()
    assert l0.min() >= 1 and l0.max() <= 64 and len(l0.unique()) > 5
    # the kept prefix's norm is the closest to ||x_n - b_dec|| among all prefixes of the sorted activations
    x_n = sae.normalize(val[:32])
    target = (x_n - sae.b_dec).norm(dim=1)
    z = F.relu(sae.pre_acts(x_n)).detach().topk(64).values
    best = ((z.pow(2).cumsum(1).sqrt() - target[:, None]).abs().argmin(1) + 1).clamp_max((z > 0).sum(1).clamp_min(1))
    assert torch.equal(l0[:32], best)


def test_jumprelu_threshold_learns_only_through_the_pseudo_derivative(sae_tokens):
    x, _ = sae_tokens
    sae = make("JumpReLUSAE", x, bandwidth=0.5)
    x_n = sae.normalize(x[:256])
    out = sae.loss(x_n)
    out.loss.backward()
    z = sae.pre_acts(x_n).detach()
    theta, eps = sae.log_threshold.exp().detach(), sae.bandwidth
    window = ((z - theta).abs() < eps / 2).float()
    x_hat = out.x_hat.detach()
    grad_f = 2 * (x_hat - x_n) @ sae.W_dec.detach().t() / len(x_n)  # d mse / d f
    # eq. 11 (through the reconstruction) + eq. 12 (through the L0 penalty), chained through theta = exp(log)
    d_theta = (grad_f * -(theta / eps) * window).sum(0) + sae.l0_coeff * (-(1 / eps) * window).sum(0) / len(x_n)
    torch.testing.assert_close(sae.log_threshold.grad, d_theta * theta, rtol=1e-3, atol=1e-5)
    assert (sae.log_threshold.grad[window.sum(0) == 0] == 0).all()
    # z gets no gradient from the L0 term: with the reconstruction switched off, W_enc receives none
    sae.zero_grad()
    z2 = sae.pre_acts(x_n)
    from mim.sae.variants.jumprelu import _Step

    _Step.apply(z2, sae.log_threshold.exp(), eps).sum().backward()
    assert sae.W_enc.grad is None or (sae.W_enc.grad == 0).all()
    assert sae.log_threshold.grad.abs().sum() > 0


def test_matryoshka_prefixes_each_reconstruct(sae_tokens):
    x, val = sae_tokens
    sae = make("MatryoshkaSAE", x)
    train_sae(sae, x, steps=60)
    with torch.no_grad():
        val_n = sae.normalize(val)
        x_hats = sae.prefix_reconstructions(sae.encode(val))
    fvus = [float((h - val_n).pow(2).sum() / (val_n - val_n.mean(0)).pow(2).sum()) for h in x_hats]
    assert all(f < 0.85 for f in fvus), fvus  # even the first 64 latents reconstruct on their own
    assert all(a >= b - 1e-6 for a, b in itertools.pairwise(fvus)), fvus  # more latents, better
    # the loss is the mean of the prefixes' FVUs (as Bussmann et al.'s code averages them)
    sae.train()
    out = sae.loss(sae.normalize(val[:1024]))
    prefix_terms = [v for k, v in out.terms.items() if k.startswith("fvu_prefix_")]
    assert len(prefix_terms) == 4 and out.terms["fvu"] == prefix_terms[-1]
    torch.testing.assert_close(out.loss, torch.stack(prefix_terms).mean() + sae.aux_coeff * out.terms["auxk"])


def test_matching_pursuit_error_falls_monotonically_with_steps(sae_tokens):
    x, val = sae_tokens
    sae = make("MPSAE", x)
    train_sae(sae, x, steps=30)
    errors = []
    with torch.no_grad():
        val_n = sae.normalize(val[:512])
        for steps in (1, 2, 4, 8, 16, 32, 64):
            code = sae.code(val_n, steps=steps)
            assert code.values.shape[1] == steps and (code.values >= 0).all()
            errors.append((sae.decode_n(code) - val_n).pow(2).sum(1))
    for fewer, more in itertools.pairwise(errors):
        assert (more <= fewer + 1e-4).all()  # per token, not only on average
    assert errors[-1].mean() < 0.7 * errors[0].mean()
    assert not hasattr(sae, "W_enc")  # tied: the decoder atoms are the encoder


def test_matching_pursuit_gram_updates_choose_the_atoms_recomputed_correlations_choose(sae_tokens):
    """The Gram-matrix update of the correlations (the default at this size) picks the atoms that recomputing
    ``r W_dec^T`` every step picks, on a trained SAE's real tokens, 64 steps deep, in blocks of rows, except at
    ties: two atoms whose correlations agree to rounding, where either pick is matching pursuit."""
    x, val = sae_tokens
    sae = make("MPSAE", x)
    train_sae(sae, x, steps=10)
    val_n = sae.normalize(val[:1500])
    assert sae.uses_gram() and not MPSAE(16, 2**15 + 1).uses_gram() and not MPSAE(16, 64, gram=False).uses_gram()
    with torch.no_grad():
        gram = sae.code(val_n, 64)
        sae.gram = False
        plain = sae.code(val_n, 64)
    assert gram.indices.shape == (1500, 64)
    differ = gram.indices != plain.indices
    rows = differ.any(1).nonzero().squeeze(1)
    assert len(rows) <= 0.005 * len(val_n)  # here 2 of 1500 tokens, from steps 5 and 61
    for row in rows:  # where they part, both picks have the same coefficient: a tie (to ~1e-7 on real data)
        step = differ[row].float().argmax()
        torch.testing.assert_close(gram.values[row, step], plain.values[row, step], rtol=1e-5, atol=1e-6)
    same = differ.any(1).logical_not()
    torch.testing.assert_close(sae.decode_n(gram)[same], sae.decode_n(plain)[same], rtol=0, atol=1e-4)


def test_sparse_kernels_equal_dense_autograd(sae_tokens):
    x, _ = sae_tokens
    sae = make("TopKSAE", x)
    x_n = sae.normalize(x[:300])
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    # sparse: select_linear + embedding_bag decode
    values, indices = select_linear(x_n, sae.W_enc, sae.b_enc, lambda z: z.topk(K).indices, center=sae.b_dec)
    sparse = sparse_decode(F.relu(values), indices, sae.W_dec) + sae.b_dec
    loss = sparse.pow(2).sum() + values.sum()
    grads_sparse = torch.autograd.grad(loss, params)
    # dense: plain autograd through the full pre-activations and a dense matmul decoder
    z = F.linear(x_n - sae.b_dec, sae.W_enc, sae.b_enc)
    top = z.topk(K)
    f = torch.zeros_like(z).scatter(1, top.indices, F.relu(top.values))
    dense = f @ sae.W_dec + sae.b_dec
    loss_dense = dense.pow(2).sum() + top.values.sum()
    grads_dense = torch.autograd.grad(loss_dense, params)
    assert torch.equal(indices.sort(1).values, top.indices.sort(1).values)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-4)
    for name, a, b in zip(["W_enc", "b_enc", "W_dec", "b_dec"], grads_sparse, grads_dense):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3, msg=name)


@pytest.mark.parametrize("name", ["TopKSAE", "ReLUSAE"])
def test_one_latent_sort_serves_both_backwards(name, sae_tokens, monkeypatch):
    """A TopK step (and ReLU's sparse step) sorts its code's ids once for the encoder's and the decoder's weight
    gradients; a LatentSort given other ids, or ids changed in place, sorts again."""
    x, _ = sae_tokens
    sae = make(name, x)
    x_n = sae.normalize(x[:300])
    if name == "ReLUSAE":
        with torch.no_grad():
            sae.b_enc.fill_(-0.3)  # a sparse code: the sparse step
        sae._support_width = 32  # under sparse_max_fraction * d_sae: the sparse step runs
    calls = []
    monkeypatch.setattr(kernels, "latent_order", lambda *a: calls.append(1) or latent_order(*a))
    sae.loss(x_n).loss.backward()
    assert len(calls) == 1 and sae.W_enc.grad is not None and sae.W_dec.grad is not None
    monkeypatch.undo()
    gen = torch.Generator().manual_seed(0)
    ids, other = torch.randint(0, 50, (20, 4), generator=gen), torch.randint(0, 50, (20, 4), generator=gen)
    sort = LatentSort()
    for a, e in zip(sort(ids, 50), latent_order(ids, 50)):
        assert torch.equal(a, e)
    for a, e in zip(sort(other, 50), latent_order(other, 50)):
        assert torch.equal(a, e)
    other[0, 0] = 49 - other[0, 0]
    for a, e in zip(sort(other, 50), latent_order(other, 50)):
        assert torch.equal(a, e)


def test_decode_and_attach_backwards_equal_dense_float64(sae_tokens):
    """The hand-written backwards (sorted-by-latent sums for both weight gradients, sampled dots for the
    values) against dense autograd in float64, on real tokens: a padded code with repeated ids and zero slots,
    and a ragged code with empty rows."""
    x, _ = sae_tokens
    x = x[:64].double()
    gen = torch.Generator().manual_seed(0)
    n, d_sae, s = len(x), 40, 6
    W = torch.randn(d_sae, x.shape[1], generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(d_sae, generator=gen, dtype=torch.float64, requires_grad=True)
    xg = x.clone().requires_grad_()
    up = torch.randn(n, x.shape[1], generator=gen, dtype=torch.float64)

    def dense_code(rows, ids, vals):  # the (n, d_sae) code, repeated ids adding up
        return torch.zeros(n, d_sae, dtype=torch.float64).index_put((rows, ids), vals, accumulate=True)

    # padded: ids repeat within rows (as matching pursuit makes), some slots hold 0
    ids = torch.randint(0, d_sae, (n, s), generator=gen)
    ids[:, 1] = ids[:, 0]
    vals = torch.randn(n, s, generator=gen, dtype=torch.float64).masked_fill(ids % 5 == 0, 0).requires_grad_()
    out = sparse_decode(vals, ids, W)
    ref = dense_code(torch.arange(n).repeat_interleave(s), ids.reshape(-1), vals.reshape(-1)) @ W
    got = torch.autograd.grad((out * up).sum(), (vals, W))
    want = torch.autograd.grad((ref * up).sum(), (vals, W))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)

    # ragged: rows 0..9 and every 7th row hold no entry; pre-activations attached, then decoded
    keep = torch.rand(n, d_sae, generator=gen) < 0.2
    keep[:10] = False
    keep[::7] = False
    rows, cols = keep.nonzero(as_tuple=True)
    offsets = ragged_offsets(rows, n)
    with torch.no_grad():
        z = F.linear(x, W, b)
    pre = attach_linear_grad_ragged(xg, W, b, z[rows, cols], cols, rows, offsets)
    out = ragged_decode(F.relu(pre), cols, offsets, W)
    zr = F.linear(xg, W, b)
    ref = dense_code(rows, cols, F.relu(zr[rows, cols])) @ W
    got = torch.autograd.grad((out * up).sum() + pre.sum(), (xg, W, b))
    want = torch.autograd.grad((ref * up).sum() + zr[rows, cols].sum(), (xg, W, b))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for name, a, e in zip(["x", "W", "b"], got, want):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12, msg=name)

    # with a centre (an SAE's b_dec): its gradient -(db) W without the input's, and -sum(dx) beside it
    c = torch.randn(x.shape[1], generator=gen, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        z = F.linear(x - c, W, b)
    for inp in (x, xg):
        pre = attach_linear_grad_ragged(inp, W, b, z[rows, cols], cols, rows, offsets, center=c)
        zr = F.linear(inp - c, W, b)
        wrt = (W, b, c) + ((xg,) if inp is xg else ())
        got = torch.autograd.grad((pre * pre.detach().cos()).sum(), wrt)
        want = torch.autograd.grad((zr[rows, cols] * zr[rows, cols].detach().cos()).sum(), wrt)
        for name, a, e in zip(["W", "b", "center", "x"], got, want):
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12, msg=name)


def test_select_linear_blocks_equal_one_pass(sae_tokens):
    """Blocks written into one reused buffer (and, under autocast, fresh bf16 blocks) select and return what one
    pass over all rows does, and the threshold pass finds the same entries."""
    x, _ = sae_tokens
    x = x[:200]
    gen = torch.Generator().manual_seed(1)
    W, b = torch.randn(96, x.shape[1], generator=gen), torch.randn(96, generator=gen)
    top = lambda z: z.topk(5, dim=1).indices  # noqa: E731
    whole = select_linear(x, W, b, top, chunk_rows=len(x))
    blocks = select_linear(x, W, b, top, chunk_rows=16)  # 13 blocks, the last one short
    for a, e in zip(blocks, whole):
        assert torch.equal(a, e)
    cut = float(F.linear(x, W, b).quantile(0.9))
    rows, ids, vals = threshold_linear(x, W, b, cut, chunk_rows=16)[:3]
    z = F.linear(x, W, b)
    want_rows, want_ids = (z >= cut).nonzero(as_tuple=True)
    assert torch.equal(rows, want_rows) and torch.equal(ids, want_ids) and torch.equal(vals, z[want_rows, want_ids])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values, _ = select_linear(x, W, b, top, chunk_rows=16)
    assert values.dtype == torch.bfloat16


def test_row_argmax_equals_argmax_with_ties_and_nans(sae_tokens):
    """The two-level argmax returns torch's first maximum: on real pre-activations, with the maximum repeated
    inside one block and across blocks, with NaNs and all -inf rows, and through the fallbacks (a width that is
    not a multiple of the block, non-contiguous rows)."""
    x, _ = sae_tokens
    gen = torch.Generator().manual_seed(3)
    z = x[:300] @ torch.randn(x.shape[1], 384, generator=gen)
    z[:40] = z[:40].round()  # many exact ties in and across the 64-wide blocks
    z[40, 200] = z[40, 7] = z[40, 5] = z[40].max() + 1  # first maximum in block 0, not the block's first entry
    z[41, 130] = z[41, 300] = z[41].max() + 1
    z[42, 250] = z[42, 100] = float("nan")
    z[43] = float("-inf")
    z[44, 383] = z[44].max() + 1  # the last entry
    for block in (64, 32, 128):
        got = row_argmax(z, block)
        assert torch.equal(got, z.argmax(1)), block
    assert row_argmax(z, 64)[40:45].tolist() == [5, 130, 100, 0, 383]
    assert torch.equal(row_argmax(z[:, :380]), z[:, :380].argmax(1))  # 380 is not a multiple of 64
    assert torch.equal(row_argmax(z.t().contiguous().t()), z.argmax(1))  # column-major rows


def test_auxk_is_zero_without_dead_latents_and_revives_them(sae_tokens):
    x, _ = sae_tokens
    sae = make("TopKSAE", x, dead_tokens=10_000)
    x_n = sae.normalize(x[:1024])
    out = sae.loss(x_n)
    assert not sae.dead_latents().any() and out.terms["auxk"].item() == 0.0
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::3] = True
    sae.tokens_since_fired[dead] = 10_000  # pretend these never fired
    out = sae.loss(x_n)
    assert out.terms["auxk"].item() > 0
    out.terms["auxk"].backward()
    moved = sae.W_dec.grad.abs().sum(1) > 0
    assert moved[dead].any() and not moved[~dead].any()  # AuxK trains only dead latents' atoms
    # firing bookkeeping: a latent that fires resets its counter
    sae.update_firing(out.fired, 1024)
    assert (sae.tokens_since_fired[out.fired > 0] == 0).all()
    assert (sae.tokens_since_fired[(out.fired == 0) & dead] == 11_024).all()


@pytest.mark.parametrize("name", list(VARIANT_KWARGS))
def test_save_and_load_give_identical_outputs(name, sae_tokens, tmp_path):
    x, val = sae_tokens
    sae = make(name, x)
    train_sae(sae, x, steps=3)
    path = save_sae(sae, tmp_path / "sae.safetensors")
    assert path.with_suffix(".json").is_file()
    loaded = load_sae(path.with_suffix(".json"))
    assert type(loaded) is type(sae) and loaded.init_args() == sae.init_args()
    with torch.no_grad():
        a, b = sae(val[:500]), loaded(val[:500])
    assert torch.equal(a.x_hat, b.x_hat) and torch.equal(a.code.values, b.code.values)
    assert torch.equal(loaded.input_scale, sae.input_scale) and bool(loaded.initialized)


def test_bad_configuration_gives_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"k must be in \[1, d_sae=64\], got 65"):
        TopKSAE(16, 64, k=65)
    with pytest.raises(ConfigError, match=r"k must be in \[1, d_sae=64\], got 0"):
        BatchTopKSAE(16, 64, k=0)
    with pytest.raises(ConfigError, match="d_sae must be positive"):
        TopKSAE(16, 0, k=1)
    with pytest.raises(ConfigError, match="prefixes must increase strictly and end at d_sae=64"):
        MatryoshkaSAE(16, 64, k=4, prefixes=[32, 16, 64])
    with pytest.raises(ConfigError, match="steps must be positive"):
        MPSAE(16, 64, steps=0)
    with pytest.raises(UserError, match=r"needs a \(n, 16\) sample"):
        TopKSAE(16, 64, k=4).initialize(torch.randn(10, 8))
    with pytest.raises(UserError, match="does not exist"):
        load_sae(tmp_path / "missing.safetensors")
    assert {ReLUSAE, JumpReLUSAE, AbsTopKSAE, TopAFASAE} <= set(VARIANTS.values())
    assert batch_variance(torch.ones(4, 3)).item() == 0.0


def test_decoder_constraint_removes_the_parallel_gradient_and_renormalises(sae_tokens):
    x, _ = sae_tokens
    sae = make("TopKSAE", x)
    sae.loss(sae.normalize(x[:1024])).loss.backward()
    before = sae.W_dec.grad.clone()
    sae.remove_parallel_grad_()
    along = (sae.W_dec.grad * sae.W_dec).sum(1)
    torch.testing.assert_close(along, torch.zeros_like(along), atol=1e-7, rtol=0)
    torch.testing.assert_close(before - sae.W_dec.grad, (before * sae.W_dec).sum(1, keepdim=True) * sae.W_dec)
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.normalize_decoder_()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE))
    relu = make("ReLUSAE", x)  # free decoder norms: left alone
    norms = relu.W_dec.norm(dim=1).clone()
    relu.normalize_decoder_()
    torch.testing.assert_close(relu.W_dec.norm(dim=1), norms)
