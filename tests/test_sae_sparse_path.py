"""Every SAE variant's sparse training step equals its dense formulation (loss and every parameter gradient), on
real extracted features (ViT-Tiny/4 block-6 patch tokens of CIFAR-10, the ``sae_stores`` fixture), with dead
latents (AuxK, pre-activation loss) and through each exact fallback.

The reference functions below are the variants' dense formulas as they were before the sparse steps existed:
plain autograd through the full (N, d_sae) pre-activations and a dense decoder matmul."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from mim.errors import ConfigError
from mim.features import FeatureStore
from mim.sae import VARIANTS, BatchTopKSAE, JumpReLUSAE, MatryoshkaSAE, ReLUSAE
from mim.sae.variants import base
from mim.sae.variants.base import batch_variance
from mim.sae.variants.jumprelu import _DenseJumpReLU
from mim.sae.variants.relu import _DenseReLUL1

D, D_SAE, K, N = 192, 512, 16, 512


# ------------------------------------------------------------------------------------- dense references
class _RefJumpReLU(torch.autograd.Function):
    """``z * H(z - theta)`` with eq. 11's pseudo-derivative (Rajamanoharan et al. 2024), dense."""

    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta)

    @staticmethod
    def backward(ctx, grad):
        z, theta = ctx.saved_tensors
        window = (((z - theta) / ctx.eps).abs() < 0.5).to(z.dtype)
        return grad * (z > theta), (grad * -(theta / ctx.eps) * window).sum(0), None


class _RefStep(torch.autograd.Function):
    """``H(z - theta)`` with eq. 12's pseudo-derivative, dense."""

    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        z, theta = ctx.saved_tensors
        window = (((z - theta) / ctx.eps).abs() < 0.5).to(z.dtype)
        return None, (grad * -(1.0 / ctx.eps) * window).sum(0), None


def _dense_z(sae, x_n):
    return F.linear(x_n - sae.b_dec, sae.W_enc, sae.b_enc)


def _mse(x_n, x_hat):
    return (x_hat - x_n).pow(2).sum(-1).mean()


def _ref_auxk(sae, x_n, x_hat, score, z, activate):
    """AuxK: the top min(k_aux, n_dead) dead latents by ``score`` reconstruct the detached residual."""
    dead = sae.dead_latents()
    if not dead.any():
        return torch.zeros(())
    top = score[:, dead].topk(min(sae.k_aux, int(dead.sum())), dim=1).indices
    f = torch.zeros(len(z), int(dead.sum())).scatter(1, top, activate(z[:, dead].gather(1, top)))
    residual = (x_n - x_hat).detach()
    return _mse(residual, f @ sae.W_dec[dead]) / batch_variance(residual).clamp_min(1e-12)


def ref_topk(sae, x_n):
    z = _dense_z(sae, x_n)
    absolute = type(sae).__name__ == "AbsTopKSAE"
    score = z.abs() if absolute else z
    activate = (lambda v: v) if absolute else F.relu
    top = score.topk(sae.k, dim=1).indices
    f = torch.zeros_like(z).scatter(1, top, activate(z.gather(1, top)))
    x_hat = f @ sae.W_dec + sae.b_dec
    fvu = _mse(x_n, x_hat) / batch_variance(x_n)
    return fvu + sae.aux_coeff * _ref_auxk(sae, x_n, x_hat, score, z, activate)


def ref_batchtopk(sae, x_n):
    z = _dense_z(sae, x_n)
    f = F.relu(z)
    flat = f.detach().flatten().topk(min(sae.k * len(f), f.numel())).indices
    keep = torch.zeros(f.numel(), dtype=torch.bool).index_fill_(0, flat, True).view_as(f) & (f > 0)
    f = f * keep
    if isinstance(sae, MatryoshkaSAE):
        x_hats = [(f * (torch.arange(sae.d_sae) < m)) @ sae.W_dec + sae.b_dec for m in sae.prefixes]
        loss = torch.stack([_mse(x_n, h) / batch_variance(x_n) for h in x_hats]).mean()
        x_hat = x_hats[-1]
    else:
        x_hat = f @ sae.W_dec + sae.b_dec
        loss = _mse(x_n, x_hat) / batch_variance(x_n)
    loss = loss + sae.aux_coeff * _ref_auxk(sae, x_n, x_hat, z, z, F.relu)
    return loss, f.detach()


def _ref_pre_act(sae, z, threshold):
    """SAELens' ``calculate_pre_act_loss`` (without its coefficient), dense."""
    dead = sae.dead_latents()
    return (F.relu(threshold - z) * dead * sae.W_dec.norm(dim=1)).sum(-1).mean()


def _warm(step, warmup):
    return min(1.0, (step + 1) / warmup) if warmup else 1.0


def ref_relu(sae, x_n):
    z = _dense_z(sae, x_n)
    f = F.relu(z)
    x_hat = f @ sae.W_dec + sae.b_dec
    l1 = (f * sae.W_dec.norm(dim=1)).sum(-1).mean()
    loss = _mse(x_n, x_hat) + _warm(int(sae.step), sae.l1_warmup_steps) * sae.l1_coeff * l1
    return loss + sae.pre_act_coeff * _ref_pre_act(sae, z, 0.0)


def ref_jumprelu(sae, x_n):
    z = _dense_z(sae, x_n)
    theta, eps = sae.log_threshold.exp(), sae.bandwidth
    f = _RefJumpReLU.apply(z, theta, eps)
    support = z.detach() > theta.detach() - eps / 2  # the code holds the window below theta (eq. 11)
    x_hat = (f * support) @ sae.W_dec + sae.b_dec
    l0 = _RefStep.apply(z, theta, eps).sum(-1).mean()
    loss = _mse(x_n, x_hat) + _warm(int(sae.step), sae.l0_warmup_steps) * sae.l0_coeff * l0
    return loss + sae.pre_act_coeff * _ref_pre_act(sae, z, theta)


def ref_mp(sae, x_n):
    residual = x_n - sae.b_dec
    f = torch.zeros(len(x_n), sae.d_sae)
    for _ in range(sae.steps):
        correlation = residual @ sae.W_dec.t()  # autograd through every correlation
        index = correlation.detach().argmax(dim=1, keepdim=True)
        value = F.relu(correlation.gather(1, index))
        residual = residual - value * sae.W_dec[index.squeeze(1)]
        f = f.scatter_add(1, index, value)
    x_hat = f @ sae.W_dec + sae.b_dec
    return _mse(x_n, x_hat) / batch_variance(x_n)


def ref_topafa(sae, x_n):
    z = _dense_z(sae, x_n)
    values, top = F.relu(z).topk(sae.k, dim=1)  # sorted descending
    values = z.gather(1, top).relu()
    target = (x_n - sae.b_dec).detach().norm(dim=1, keepdim=True)
    count = (values.detach().pow(2).cumsum(1).sqrt() - target).abs().argmin(dim=1, keepdim=True)
    values = values * (torch.arange(sae.k) <= count)
    f = torch.zeros_like(z).scatter(1, top, values)
    x_hat = f @ sae.W_dec + sae.b_dec
    fvu = _mse(x_n, x_hat) / batch_variance(x_n)
    afa = (values.norm(dim=1) - (x_n - sae.b_dec).norm(dim=1)).pow(2).mean()
    return fvu + sae.afa_coeff * afa + sae.aux_coeff * _ref_auxk(sae, x_n, x_hat, z, z, F.relu)


REFERENCES = {"TopKSAE": ref_topk, "AbsTopKSAE": ref_topk, "BatchTopKSAE": lambda s, x: ref_batchtopk(s, x)[0],
              "MatryoshkaSAE": lambda s, x: ref_batchtopk(s, x)[0], "ReLUSAE": ref_relu,
              "JumpReLUSAE": ref_jumprelu, "MPSAE": ref_mp, "TopAFASAE": ref_topafa}
KWARGS = {"TopKSAE": {"k": K}, "AbsTopKSAE": {"k": K}, "BatchTopKSAE": {"k": K},
          "MatryoshkaSAE": {"k": K, "prefixes": [64, 128, 512]}, "TopAFASAE": {"k_max": 32},
          "ReLUSAE": {"l1_coeff": 0.05, "l1_warmup_steps": 10, "pre_act_coeff": 0.1},
          "JumpReLUSAE": {"l0_coeff": 0.05, "init_threshold": 0.5, "bandwidth": 0.05, "l0_warmup_steps": 10,
                          "pre_act_coeff": 0.1},
          "MPSAE": {"steps": 6}}


# ------------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def x_n_raw(sae_stores) -> torch.Tensor:
    """(N, 192) real patch tokens of the training store."""
    return FeatureStore(sae_stores[0]).read("patch").features.reshape(-1, D)[: 4 * N]


def make(name, x, dead=False, **overrides):
    torch.manual_seed(0)
    sae = VARIANTS[name](D, D_SAE, dead_tokens=1000, **{**KWARGS[name], **overrides})
    sae.initialize(x)
    if dead:  # a third of the latents have not fired for dead_tokens tokens
        sae.tokens_since_fired[::3] = 1000
    return sae


def assert_step_equals_reference(sae, x_n, reference=None):
    """The module's loss and every parameter gradient equal the dense reference's (to 1e-5)."""
    ref_sae = copy.deepcopy(sae)
    reference = reference or REFERENCES[type(sae).__name__]
    loss_ref = reference(ref_sae, x_n)
    loss_ref.backward()
    sae.zero_grad()
    out = sae.loss(x_n)
    out.loss.backward()
    torch.testing.assert_close(out.loss, loss_ref, rtol=1e-5, atol=1e-6)
    for (name, p), (_, q) in zip(sae.named_parameters(), ref_sae.named_parameters()):
        scale = max(float(q.grad.abs().max()), 1e-12)
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5 * scale, msg=lambda m, n=name: f"{n}: {m}")
    return out


# -------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name,dead", [("TopKSAE", False), ("TopKSAE", True), ("AbsTopKSAE", True),
                                       ("TopAFASAE", True), ("MPSAE", False)])
def test_ranking_variants_equal_their_dense_step(name, dead, x_n_raw):
    sae = make(name, x_n_raw, dead=dead)
    x_n = sae.normalize(x_n_raw[:N])
    out = assert_step_equals_reference(sae, x_n)
    if dead and name != "MPSAE":
        assert out.terms["auxk"] > 0


def test_auxk_without_a_host_read_is_exact(x_n_raw):
    """The accelerator path (AuxK candidates every step, weighted by the dead mask): exact, 0 without dead
    latents, and equal to the CPU path's value with them."""
    for name, dead in (("BatchTopKSAE", True), ("TopKSAE", False)):
        sae = make(name, x_n_raw, dead=dead)
        sae.step_dead_latents = sae.dead_latents  # what an accelerator runs
        out = assert_step_equals_reference(sae, sae.normalize(x_n_raw[:N]))
        assert (out.terms["auxk"] > 0) == dead


@pytest.mark.parametrize("name,factor,fallback", [("BatchTopKSAE", 16.0, False), ("BatchTopKSAE", 1.0, True),
                                                  ("MatryoshkaSAE", 1.0, True)])
def test_batch_topk_sparse_step_and_its_fallback_equal_the_dense_step(name, factor, fallback, x_n_raw):
    """Candidates of 16 k per row hold every winner of the global top k*N; with 1 k per row some rows hold more
    winners than k (the check fires and the exact fallback redoes the search). With dead latents (AuxK in the same
    pass); the threshold estimate is the smallest kept activation, as before."""
    sae = make(name, x_n_raw, dead=True, candidate_factor=factor, candidate_search="rows")
    sae.train()
    x_n = sae.normalize(x_n_raw[:N])
    out = assert_step_equals_reference(sae, x_n)
    assert sae.last_search == "rows" and sae.last_fallback is fallback
    assert out.l0.item() == pytest.approx(K) and out.terms["auxk"] > 0
    f_ref = ref_batchtopk(copy.deepcopy(sae), x_n)[1]
    assert sae.threshold.item() == f_ref[f_ref > 0].min().item()  # first update: the batch minimum itself
    assert torch.equal(out.fired, (f_ref > 0).sum(0))


@pytest.mark.parametrize("name", ["BatchTopKSAE", "MatryoshkaSAE"])
def test_batch_topk_threshold_search_equals_the_dense_step(name, x_n_raw):
    """The CPU default: the first step has no cut yet (per-row search); the next batch's pool ``z >= 0.9 cut``
    gives the exact step; a cut estimate too high for the batch (a pool short of k*N) falls back to the per-row
    search, one too low only widens the pool; after a resume the averaged ``threshold`` seeds tau."""
    sae = make(name, x_n_raw, dead=True, candidate_factor=1.0)
    sae.train()
    first, second = (sae.normalize(x_n_raw[i * N : (i + 1) * N]) for i in (0, 1))
    assert_step_equals_reference(sae, first)
    assert sae.last_search == "rows" and sae.last_fallback  # candidates of 1 k per row: its fallback too
    f_ref = ref_batchtopk(copy.deepcopy(sae), first)[1]
    assert sae._cut.item() == f_ref[f_ref > 0].min().item()  # the batch's cut: its smallest kept activation
    f_ref = ref_batchtopk(copy.deepcopy(sae), second)[1]
    cut = f_ref[f_ref > 0].min()  # (this small batch's cut is not within 10 % of the first's)
    for estimate, search in ((cut, "threshold"), (cut * 3, "rows"), (cut / 3, "threshold")):
        sae._cut = estimate
        out = assert_step_equals_reference(sae, second)
        assert sae.last_search == search and sae.last_fallback is (search == "rows")  # 1 k per row
        assert out.l0.item() == pytest.approx(K) and out.terms["auxk"] > 0
    sae._cut = None  # a resumed module: the threshold buffer (the first batch's minimum) is the estimate
    assert sae.threshold > 0
    assert_step_equals_reference(sae, first)
    assert sae.last_search == "threshold"
    rows = make(name, x_n_raw, candidate_search="rows")
    rows._cut = cut
    rows.loss(second)
    assert rows.last_search == "rows"


@pytest.mark.parametrize("search", ["rows", "compact"])
@pytest.mark.parametrize("name", ["ReLUSAE", "JumpReLUSAE"])
def test_threshold_variants_dense_sparse_and_fallback_steps_equal_the_dense_step(name, search, x_n_raw):
    """Three steps on one batch: dense (no width known yet), sparse (a crafted negative encoder bias makes the
    code sparse: few entries per row in the support), and the per-row fallback (candidates forced too few; the
    block compaction has none and needs no width). With dead latents (the pre-activation loss) and the coefficient
    warm-up part-way."""
    sae = make(name, x_n_raw, dead=True, sparse_max_fraction=0.5, support_search=search)
    with torch.no_grad():  # most pre-activations below the support: 4-17 entries per row on average
        sae.b_enc.fill_(-0.3 if name == "ReLUSAE" else -1.5)
    sae.train()
    sae.step.fill_(3)  # inside the 10-step warm-up
    x_n = sae.normalize(x_n_raw[:N])
    assert sae.sparse_width() is None
    out = assert_step_equals_reference(sae, x_n)  # dense
    width = sae.sparse_width()
    assert width is not None and width <= D_SAE / 2
    assert out.terms["pre_act"] > 0 and int(sae.step) == 4
    sae._support_width = 200  # more candidates than any row's support (at most 85 entries here)
    assert_step_equals_reference(sae, x_n)  # sparse
    assert not sae.last_fallback
    sae._support_width = 2  # rows with more than 2 support entries are found and recomputed in full
    assert_step_equals_reference(sae, x_n)
    assert sae.last_fallback is (search == "rows")


@pytest.mark.parametrize("name", ["ReLUSAE", "JumpReLUSAE"])
def test_fused_dense_steps_equal_autograd(name, x_n_raw, monkeypatch):
    """The dense step's fused Function (``_DenseReLUL1`` / ``_DenseJumpReLU``) against the dense reference: at
    JumpReLU bandwidth 0.5 (thousands of entries in eq. 11/12's window), with the warm-up part-way; the support
    count the next step's width follows, the firing counts and l0 equal; the input's own gradient (features that
    require grad: ``dz W_enc``) equal too; under autocast the dense step is plain autograd instead. The backward's
    row blocks are set to 200 rows, so the 512 tokens take three blocks, the last one short."""
    fused = _DenseReLUL1 if name == "ReLUSAE" else _DenseJumpReLU
    monkeypatch.setattr(base, "DENSE_BACKWARD_ROWS", 200)
    calls = []
    original = fused.forward
    monkeypatch.setattr(fused, "forward", staticmethod(lambda ctx, *a: calls.append(original(ctx, *a)) or calls[-1]))
    extra = {"bandwidth": 0.5} if name == "JumpReLUSAE" else {}
    sae = make(name, x_n_raw, dead=False, pre_act_coeff=0.0, **extra)
    sae.train()
    sae.step.fill_(3)
    x_n = sae.normalize(x_n_raw[:N])
    z = _dense_z(sae, x_n).detach()
    theta = sae.log_threshold.exp().detach() if name == "JumpReLUSAE" else torch.zeros(D_SAE)
    if name == "JumpReLUSAE":
        assert (((z - theta) / 0.5).abs() < 0.5).sum() > 1000
    out = assert_step_equals_reference(sae, x_n)
    assert len(calls) == 1  # the fused Function ran
    support = (z > theta - (0.25 if name == "JumpReLUSAE" else 0.0)).sum().item()
    if name == "JumpReLUSAE":  # its own output, exactly (the width below saturates at d_sae when dense)
        assert calls[0][3].item() == support
    assert sae._support_width == min(D_SAE, math.ceil(3 * support / N) + 16)
    assert torch.equal(out.fired, (z > theta).sum(0))
    assert out.l0.item() == pytest.approx((z > theta).sum(1).float().mean().item())
    x_a, x_b = x_n.clone().requires_grad_(), x_n.clone().requires_grad_()
    sae.loss(x_a).loss.backward()
    REFERENCES[name](copy.deepcopy(sae), x_b).backward()
    # a sum of d_sae products with cancellations, summed in another order: float32 rounding to ~3e-5 of the largest
    torch.testing.assert_close(x_a.grad, x_b.grad, rtol=1e-4, atol=1e-4 * float(x_b.grad.abs().max()))
    calls.clear()
    sae._support_width = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sae.loss(x_n).loss.backward()
    assert calls == []


def test_jumprelu_sparse_step_holds_the_pseudo_derivative_windows(x_n_raw):
    """At a wide bandwidth many entries sit in eq. 11/12's window below theta: they are in the support, and the
    thresholds' gradients still equal the dense ones."""
    sae = make("JumpReLUSAE", x_n_raw, dead=False, sparse_max_fraction=1.0, bandwidth=0.5, pre_act_coeff=0.0)
    x_n = sae.normalize(x_n_raw[:N])
    sae._support_width = D_SAE // 2
    assert_step_equals_reference(sae, x_n)
    z = _dense_z(sae, x_n).detach()
    theta = sae.log_threshold.exp().detach()
    assert ((z - theta).abs() < 0.25).any(1).all() and not sae.last_fallback


def test_pre_act_loss_trains_only_dead_latents(x_n_raw):
    for name in ("ReLUSAE", "JumpReLUSAE"):
        sae = make(name, x_n_raw, dead=True, l1_coeff=1e-9) if name == "ReLUSAE" else \
            make(name, x_n_raw, dead=True, l0_coeff=1e-9)
        x_n = sae.normalize(x_n_raw[:N])
        out = sae.loss(x_n)
        sae.zero_grad()
        out.terms["pre_act"].backward()
        moved = sae.W_enc.grad.abs().sum(1) > 0
        dead = sae.dead_latents()
        assert moved[dead].any() and not moved[~dead].any()
        assert (sae.b_enc.grad[dead] <= 0).all()  # gradient descent raises the dead latents' pre-activations


def test_old_jumprelu_weights_without_a_step_counter_load(x_n_raw):
    sae = make("JumpReLUSAE", x_n_raw)
    state = {k: v for k, v in sae.state_dict().items() if k != "step"}
    fresh = JumpReLUSAE(D, D_SAE, **KWARGS["JumpReLUSAE"])
    fresh.load_state_dict(state)
    assert int(fresh.step) == 0 and torch.equal(fresh.log_threshold, sae.log_threshold)


def test_bad_new_arguments_give_one_clear_error():
    with pytest.raises(ConfigError, match=r"candidate_factor must be >= 1.*got 0\.5"):
        BatchTopKSAE(16, 64, k=4, candidate_factor=0.5)
    with pytest.raises(ConfigError, match="candidate_factor"):
        MatryoshkaSAE(16, 64, k=4, prefixes=[32, 64], candidate_factor=math.nan)
    with pytest.raises(ConfigError, match=r"candidate_search must be one of .*got 'topk'"):
        BatchTopKSAE(16, 64, k=4, candidate_search="topk")
    with pytest.raises(ConfigError, match="l0_warmup_steps must be >= 0"):
        JumpReLUSAE(16, 64, l0_warmup_steps=-1)
    with pytest.raises(ConfigError, match="pre_act_coeff must be >= 0"):
        ReLUSAE(16, 64, pre_act_coeff=-1.0)
    with pytest.raises(ConfigError, match=r"sparse_max_fraction must lie in \(0, 1\]"):
        JumpReLUSAE(16, 64, sparse_max_fraction=0.0)
    for cls in (ReLUSAE, JumpReLUSAE):
        with pytest.raises(ConfigError, match=r"support_search must be one of .*got 'topk'"):
            cls(16, 64, support_search="topk")
