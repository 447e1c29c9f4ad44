"""k-sparse probing (SAEBench's sparse_probing) of SAE latents against raw feature dimensions, on per-image
mean-pooled features of the real feature stores (the ``sae_stores`` fixture: 200 train / 100 val CIFAR-10 images)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mim.errors import ConfigError
from mim.features.store import FeatureStore
from mim.sae.downstream import (
    SPARSE_PROBE_KS,
    balanced_tasks,
    binary_probe_accuracy,
    fit_binary_logistic,
    sparse_probe,
    sparse_probe_table,
    top_k_mean_diff,
)


@pytest.fixture(scope="module")
def pooled(sae_stores) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image mean-pooled raw patch features (n, 192) and labels of the train and val stores."""
    out = []
    for path in sae_stores:
        stored = FeatureStore(path).read("patch")
        out += [stored.features.float().mean(1), stored.labels]
    return tuple(out)


def test_balanced_tasks_follow_saebench():
    """Per class: every positive, then as many negatives drawn from the other classes (ceil(n / (C - 1)) per class
    first), seeded; unlabelled rows never drawn."""
    labels = torch.tensor([0] * 6 + [1] * 4 + [2] * 3 + [-1] * 5)
    tasks = balanced_tasks(labels, 3, seed=0)
    for c, rows in enumerate(tasks):
        n = int((labels == c).sum())
        assert torch.equal(rows[:n], torch.nonzero(labels == c).flatten())
        negatives = rows[n:]
        assert len(negatives) == min(n, sum(min(int((labels == o).sum()), -(-n // 2)) for o in range(3) if o != c))
        assert bool((labels[negatives] != c).all() and (labels[negatives] >= 0).all())
        assert len(set(negatives.tolist())) == len(negatives)
    assert all(torch.equal(a, b) for a, b in zip(tasks, balanced_tasks(labels, 3, seed=0)))  # deterministic
    # class 0 (6 rows): 3 of class 1 and 3 of class 2 are drawn, 6 kept; class 2 (3 rows): 2 + 2 drawn, 3 kept
    assert len(tasks[0]) == 12 and len(tasks[2]) == 6


def test_top_k_mean_diff_ranks_by_absolute_difference():
    x = torch.tensor([[1.0, 0.0, 5.0, 0.2], [1.0, 0.0, 5.0, 0.2], [0.0, 3.0, 5.0, 0.1], [0.0, 3.0, 5.0, 0.1]])
    target = torch.tensor([1, 1, 0, 0])
    # differences pos - neg: +1, -3, 0, +0.1 -> by |.|: column 1 (lower on the class counts), then 0, then 3
    assert top_k_mean_diff(x, target, 3).tolist() == [1, 0, 3]
    assert top_k_mean_diff(x, target, 10).tolist() == [1, 0, 3, 2]  # clamped to D


def test_logistic_probe_minimises_the_sklearn_objective(pooled):
    """At the fit, the gradient of 0.5 ||w||^2 + C sum log-loss is ~0 (a converged L2 logistic regression as
    scikit-learn's LogisticRegression(C=1) would return), on real pooled features, for several tasks at once."""
    train_x, train_y = pooled[0], pooled[1]
    tasks = balanced_tasks(train_y, 10)
    cols = [top_k_mean_diff(train_x[t], train_y[t] == c, 5) for c, t in enumerate(tasks[:3])]
    x = torch.stack([train_x[t][:, k] for t, k in zip(tasks[:3], cols)]).double()
    y = torch.stack([(train_y[t] == c).double() for c, t in enumerate(tasks[:3])])
    for C in (1.0, 0.01):
        theta = fit_binary_logistic(x, y, C=C).requires_grad_(True)
        z = torch.bmm(x, theta[:, :-1, None])[..., 0] + theta[:, -1:]
        objective = C * F.binary_cross_entropy_with_logits(z, y, reduction="sum") + 0.5 * theta[:, :-1].square().sum()
        (grad,) = torch.autograd.grad(objective, theta)
        assert float(grad.abs().max()) < 1e-6 * float(objective.detach())
    # one task alone gives the same solution as in the batch
    single = fit_binary_logistic(x[1:2], y[1:2])
    torch.testing.assert_close(single[0], fit_binary_logistic(x, y)[1], atol=1e-8, rtol=1e-8)


def test_sparse_probe_finds_a_planted_class_latent_and_never_fits_on_val(pooled):
    """Codes = pooled raw features plus, per class, one latent that is 1 on that class only: the 1-sparse probe
    of the codes picks it (accuracy 1), the raw dimensions do much worse. Selection and fit use the train split:
    with the val labels permuted the same probes score near chance."""
    train_x, train_y, val_x, val_y = pooled
    planted = [torch.cat([x, F.one_hot(y, 10).float()], 1) for x, y in ((train_x, train_y), (val_x, val_y))]
    codes = sparse_probe(planted[0], train_y, planted[1], val_y, ks=(1, 2))
    raw = sparse_probe(train_x, train_y, val_x, val_y, ks=(1, 2))
    assert codes[1] == 1.0 and codes[2] == 1.0
    assert 0.5 < raw[1] < 0.9  # a real but weak one-dimension probe on random-init ViT features
    shuffled = val_y[torch.randperm(len(val_y), generator=torch.Generator().manual_seed(0))]
    assert sparse_probe(planted[0], train_y, planted[1], shuffled, ks=(1,))[1] < 0.7
    # the same rows for every representation: the accuracy of identical inputs is identical
    assert sparse_probe(train_x, train_y, val_x, val_y, ks=(1,)) == {1: raw[1]}
    # accuracy of a single probe, by hand: positives first in each task, prediction logit > 0
    assert binary_probe_accuracy(torch.tensor([[0.0], [1.0]] * 5), torch.tensor([0, 1] * 5),
                                 torch.tensor([[0.1], [0.9], [0.8]]), torch.tensor([0, 1, 0])) == pytest.approx(2 / 3)


def test_sparse_probe_table_and_bad_input(pooled):
    results = {f"sparse_probe_top{k}": 0.5 + k / 100 for k in SPARSE_PROBE_KS}
    results.update({f"sparse_probe_raw_top{k}": 0.6 for k in SPARSE_PROBE_KS})
    table = sparse_probe_table(results).splitlines()
    assert table[0] == "| k | SAE latents | raw dimensions |" and table[2] == "| 1 | 0.510 | 0.600 |"
    assert len(table) == 2 + len(SPARSE_PROBE_KS)
    train_x, train_y, val_x, val_y = pooled
    with pytest.raises(ConfigError, match=r"must be >= 1.*Fix"):
        sparse_probe(train_x, train_y, val_x, val_y, ks=(0, 5))
    with pytest.raises(ConfigError, match="at least 2 labelled classes"):
        sparse_probe(train_x, torch.zeros_like(train_y), val_x, torch.zeros_like(val_y))
