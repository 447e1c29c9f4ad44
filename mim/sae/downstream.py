"""Downstream check of an SAE: does a linear probe still classify from its codes and reconstructions?

Recipe (:func:`downstream_probe`):

1. Pool each image of a feature store (:func:`pool_store`): patch-token stores are read in store order
   one token per row and every image's tokens are averaged, for the raw features, the SAE codes
   (``d_sae`` dims) and the reconstructions; ``cls`` / ``mean`` stores have one row per image already.
2. Fit one linear classifier per representation on the train store (:func:`linear_probe_top1`): inputs
   standardised with the train mean / std per dimension; multinomial logistic regression with an L2
   penalty ``weight_decay / 2 * ||W||^2`` on the mean cross-entropy (bias not penalised), zero init,
   full-batch L-BFGS with strong-Wolfe line search. The problem is convex and the fit has no randomness,
   so the result is deterministic without a seed.
3. Report top-1 on the val store (torchmetrics ``MulticlassAccuracy``, micro) of the probes on the raw
   features, the codes and the reconstructions, and ``accuracy_retained = top1_reconstruction / top1_raw``.
4. k-sparse probing (:func:`sparse_probe`, SAEBench's ``sparse_probing``; Karvonen et al. 2025, arXiv
   2503.09532, after Gurnee et al. 2023): per class, a balanced one-vs-rest task; the ``k`` latents whose
   mean pooled activation differs most between the class and the rest (on the train store) feed a binary
   logistic probe on those ``k`` only; its accuracy on the val store's balanced task, averaged over classes,
   for ``k`` in :data:`SPARSE_PROBE_KS`, against the same probe on the ``k`` raw feature dimensions chosen the
   same way. ``python -m mim.sae.downstream`` prints the table.

The SAE-as-a-drop-in-replacement check follows Gao et al. 2024 (arXiv 2406.04093, Sec. 4.1, downstream
loss of the model fed the reconstruction) in spirit: on a frozen vision encoder without its downstream
layers, the linear-probe accuracy of the features stands in for the downstream loss.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from mim.errors import ConfigError
from mim.features.store import FeatureStore
from mim.sae.data import check_d_model

if TYPE_CHECKING:
    from mim.sae.variants import SparseAutoencoder


class PooledFeatures(NamedTuple):
    """Per-image rows of a store: ``raw`` (n, d_model), ``codes`` (n, d_sae), ``reconstruction``
    (n, d_model), all float32 in the SAE's units (raw feature units for ``raw`` / ``reconstruction``);
    ``labels`` (n,) int64 (``< 0``: unlabelled). Rows are in store order."""

    raw: Tensor
    codes: Tensor
    reconstruction: Tensor
    labels: Tensor


def _open(store: FeatureStore | str | os.PathLike) -> FeatureStore:
    return store if isinstance(store, FeatureStore) else FeatureStore(store)


@torch.no_grad()
def pool_store(
    sae: SparseAutoencoder, store: FeatureStore | str | os.PathLike, tokens: str = "patch", batch_size: int = 4096
) -> PooledFeatures:
    """Raw features, SAE codes and reconstructions of every image of ``store``, averaged over its tokens.

    Streams the store (``batches(..., shuffle=False)``, patch tokens flattened to one row per token) through
    ``sae.encode`` / ``sae.decode`` in eval mode on the SAE's device and dtype, and sums the rows of each
    image with ``index_add_`` (codes are added straight from their sparse form, never made dense per batch).
    Memory: ``n_images x (2 d_model + d_sae)`` float32 on the SAE's device.

    Raises:
        ConfigError: the store holds no image.
        FeatureStoreError: the store is unreadable, lacks ``tokens`` or has another ``d_model`` than the SAE.
    """
    store = _open(store)
    check_d_model(store, sae.d_model, fix="probe with stores extracted from the encoder and layer the SAE was trained on")
    n = len(store)
    if n == 0:
        raise ConfigError(f"Feature store {store.path} holds no image. Fix: extract a non-empty split.")
    param = next(sae.parameters())
    out = PooledFeatures(
        param.new_zeros(n, sae.d_model, dtype=torch.float32),
        param.new_zeros(n, sae.d_sae, dtype=torch.float32),
        param.new_zeros(n, sae.d_model, dtype=torch.float32),
        torch.full((n,), -1, dtype=torch.int64, device=param.device),
    )
    counts = param.new_zeros(n, dtype=torch.float32)
    images, last = 0, None  # images started so far; image index of the previous row
    was_training = sae.training
    sae.eval()
    try:
        for batch in store.batches(batch_size, tokens=tokens, shuffle=False, flatten=tokens == "patch"):
            x = batch.features.to(param.device, param.dtype)
            index = batch.indices.to(param.device)
            # an image's tokens are consecutive rows: a new image starts where the image index changes
            starts = torch.ones_like(index, dtype=torch.bool)
            starts[1:] = index[1:] != index[:-1]
            if last is not None:
                starts[0] = index[0] != last
            pos = images - 1 + starts.cumsum(0)
            images, last = int(pos[-1]) + 1, index[-1]
            code = sae.encode(x)
            out.raw.index_add_(0, pos, x.float())
            out.reconstruction.index_add_(0, pos, sae.decode(code).float())
            rows = pos.unsqueeze(1).expand_as(code.indices)
            out.codes.index_put_((rows, code.indices), code.values.float(), accumulate=True)
            counts.index_add_(0, pos, torch.ones_like(pos, dtype=torch.float32))
            out.labels[pos] = batch.labels.to(param.device)
    finally:
        sae.train(was_training)
    for pooled in out[:3]:
        pooled /= counts.unsqueeze(1)
    return out


def linear_probe_top1(
    train_x: Tensor,
    train_y: Tensor,
    val_x: Tensor,
    val_y: Tensor,
    num_classes: int,
    weight_decay: float = 1e-2,
    max_iter: int = 200,
) -> float:
    """Top-1 accuracy on ``val`` of a linear classifier fit on ``train`` (recipe: module docstring, step 2).

    Args:
        train_x, val_x: ``(n, D)`` float inputs (standardised here with the train statistics).
        train_y, val_y: ``(n,)`` int64 labels in ``[0, num_classes)``; rows labelled ``< 0`` are left out.
        num_classes: ``C``.
        weight_decay: L2 coefficient on the weights (per mean-loss unit).
        max_iter: L-BFGS iterations.

    Returns:
        Top-1 accuracy in [0, 1].

    Raises:
        ConfigError: no labelled train or val row.
    """
    train, val = train_y >= 0, val_y >= 0
    if not bool(train.any()) or not bool(val.any()):
        raise ConfigError("The linear probe needs labelled train and val images (labels >= 0). Fix: use labelled stores.")
    train_x, train_y, val_x, val_y = train_x[train].float(), train_y[train], val_x[val].float(), val_y[val]
    mean, std = train_x.mean(0), train_x.std(0)
    std = torch.where(std > 0, std, torch.ones_like(std))  # constant dims (e.g. dead latents) stay 0
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(head(train_x), train_y) + 0.5 * weight_decay * head.weight.square().sum()
        loss.backward()
        return loss

    # also when called from a Lightning validation hook (inference mode) or inside autocast (L-BFGS wants float32)
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(train_x.device.type, enabled=False):
        train_x, train_y = train_x.clone(), train_y.clone()  # normal tensors (inputs may be inference tensors)
        head = nn.Linear(train_x.shape[1], num_classes, device=train_x.device)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        optimizer = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")
        optimizer.step(closure)
    accuracy = MulticlassAccuracy(num_classes, average="micro").to(val_x.device)
    with torch.no_grad(), torch.autocast(val_x.device.type, enabled=False):
        return float(accuracy(head(val_x), val_y))


#: Probe sizes of SAEBench's k-sparse probing.
SPARSE_PROBE_KS = (1, 2, 5, 10, 20)


def balanced_tasks(labels: Tensor, num_classes: int, seed: int = 0) -> list[Tensor]:
    """Rows of one balanced one-vs-rest task per class, as SAEBench's ``prepare_probe_data`` draws them.

    For class ``c`` with ``n`` rows: ``ceil(n / (C - 1))`` random rows of every other class (all of them when it
    has fewer), of which ``n`` at random are the negatives (fewer when the other classes have fewer rows).
    Seeded per class (``seed + c``), so every representation probed with the same labels gets the same rows.

    Args:
        labels: ``(n,)`` int64; rows labelled ``< 0`` are never drawn.
        num_classes: ``C`` (>= 2).
        seed: base seed.

    Returns:
        ``C`` int64 tensors of row indices, positives first (empty for a class without rows).
    """
    tasks = []
    by_class = [torch.nonzero(labels == c).flatten().cpu() for c in range(num_classes)]
    for c in range(num_classes):
        positives = by_class[c]
        generator = torch.Generator().manual_seed(seed + c)
        per_class = math.ceil(len(positives) / max(num_classes - 1, 1))
        pool = [rows[torch.randperm(len(rows), generator=generator)[:per_class]]
                for other, rows in enumerate(by_class) if other != c]
        pool = torch.cat(pool) if pool else positives.new_empty(0)
        negatives = pool[torch.randperm(len(pool), generator=generator)[: len(positives)]]
        tasks.append(torch.cat([positives, negatives]).to(labels.device))
    return tasks


def top_k_mean_diff(x: Tensor, target: Tensor, k: int) -> Tensor:
    """The ``k`` columns of ``x`` with the largest ``|mean over positives - mean over negatives|``.

    SAEBench's ``get_top_k_mean_diff_mask`` (absolute difference: a latent or dimension that is lower on the
    class counts as well). Ties go to the smaller column (stable sort).

    Args:
        x: ``(n, D)`` float; target: ``(n,)`` bool or 0/1 (1: positive); k: ``1 <= k`` (clamped to ``D``).

    Returns:
        ``(min(k, D),)`` int64 column indices, largest difference first.
    """
    target = target.bool()
    diff = (x[target].double().mean(0) - x[~target].double().mean(0)).abs()
    return torch.sort(diff, descending=True, stable=True).indices[: min(k, x.shape[1])]


def fit_binary_logistic(x: Tensor, y: Tensor, mask: Tensor | None = None, C: float = 1.0,
                        max_iter: int = 100) -> Tensor:
    """L2-regularised binary logistic regressions, one per task, fit together by damped Newton steps.

    Minimises, per task ``t``, scikit-learn's ``LogisticRegression(penalty="l2", C=C)`` objective (what
    SAEBench's sparse probes fit): ``0.5 ||w_t||^2 + C sum_i m_ti log-loss(x_ti . w_t + b_t, y_ti)``, bias not
    penalised, on the raw (unstandardised) inputs; in float64 from zero, Newton steps with Armijo backtracking
    until every task's Newton decrement is below 1e-12 of its objective (strictly convex in ``w``):
    deterministic, and converged to float64 rounding for the few columns (``k <= 20``) of a sparse probe.

    Args:
        x: ``(T, n, D)`` inputs; y: ``(T, n)`` 0/1 targets; mask: ``(T, n)`` 0/1 row weights (padding rows 0;
            None: all 1).
        C: inverse regularisation strength (> 0).
        max_iter: Newton steps at most.

    Returns:
        ``(T, D + 1)`` float64: the weights, then the bias.
    """
    x = x.detach().double()
    tasks, n, dim = x.shape
    y = y.detach().double()
    mask = torch.ones_like(y) if mask is None else mask.detach().double()
    xb = torch.cat([x, x.new_ones(tasks, n, 1)], dim=2)
    reg = x.new_ones(dim + 1)
    reg[-1] = 0.0  # the bias is not penalised
    ridge = torch.diag(reg + 1e-12)

    def objective(theta: Tensor) -> Tensor:
        z = torch.bmm(xb, theta[:, :, None])[..., 0]
        return C * (mask * (F.softplus(z) - y * z)).sum(1) + 0.5 * (reg * theta.square()).sum(1)

    theta = x.new_zeros(tasks, dim + 1)
    value = objective(theta)
    for _ in range(max_iter):
        p = torch.sigmoid(torch.bmm(xb, theta[:, :, None])[..., 0])
        grad = C * torch.bmm(xb.transpose(1, 2), (mask * (p - y))[:, :, None])[..., 0] + reg * theta
        hess = C * torch.bmm(xb.transpose(1, 2) * (mask * p * (1 - p))[:, None, :], xb) + ridge
        step = torch.linalg.solve(hess, grad)
        decrement = (grad * step).sum(1)  # the squared Newton decrement: 2x the predicted objective decrease
        if bool((decrement <= 1e-12 * (1 + value.abs())).all()):
            break
        t = x.new_ones(tasks)
        for _ in range(40):  # Armijo backtracking, per task (with float64 rounding slack)
            trial = theta - t[:, None] * step
            trial_value = objective(trial)
            ok = trial_value <= value - 1e-4 * t * decrement + 1e-13 * value.abs()
            if bool(ok.all()):
                break
            t = torch.where(ok, t, t / 2)
        theta, value = trial, trial_value
    return theta


def binary_probe_accuracy(
    train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor, C: float = 1.0, max_iter: int = 100
) -> float:
    """Accuracy on ``val`` of the L2-regularised binary logistic regression of :func:`fit_binary_logistic`
    fit on ``train`` (a row is predicted positive when its logit is > 0).

    Args:
        train_x, val_x: ``(n, k)`` float; train_y, val_y: ``(n,)`` 0/1 or bool.
        C, max_iter: as :func:`fit_binary_logistic`.

    Returns:
        Accuracy in [0, 1] (NaN for an empty val set).
    """
    if len(val_y) == 0:
        return float("nan")
    theta = fit_binary_logistic(train_x[None], train_y[None], C=C, max_iter=max_iter)[0]
    logits = val_x.double() @ theta[:-1] + theta[-1]
    return float(((logits > 0) == val_y.bool()).double().mean())


def _padded(x: Tensor, labels: Tensor, tasks: list[Tensor], classes: list[int], cols: list[Tensor],
            k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The tasks' rows and first ``k`` selected columns as ``(T, n_max, k)`` inputs, targets and row mask."""
    n_max = max(len(tasks[c]) for c in classes)
    k = min(k, x.shape[1])
    out = x.new_zeros(len(classes), n_max, k, dtype=torch.float64)
    target = x.new_zeros(len(classes), n_max, dtype=torch.float64)
    mask = torch.zeros_like(target)
    for i, c in enumerate(classes):
        rows = tasks[c]
        out[i, : len(rows)] = x[rows[:, None], cols[i][None, :k]].double()
        target[i, : len(rows)] = (labels[rows] == c).double()
        mask[i, : len(rows)] = 1.0
    return out, target, mask


def sparse_probe(
    train_x: Tensor,
    train_labels: Tensor,
    val_x: Tensor,
    val_labels: Tensor,
    ks: Sequence[int] = SPARSE_PROBE_KS,
    num_classes: int | None = None,
    seed: int = 0,
    C: float = 1.0,
) -> dict[int, float]:
    """k-sparse probing accuracy (recipe: module docstring, step 4), averaged over the classes.

    Per class ``c``: the balanced task of :func:`balanced_tasks` on each split; on the train task, the ``k``
    columns of :func:`top_k_mean_diff`; the logistic probe of :func:`fit_binary_logistic` on those columns,
    fit on the train task, scored (accuracy, logit > 0) on the val task. Selection and fit never see the val
    rows. The classes' probes are fit together (one batched Newton solve per ``k``).

    Args:
        train_x, val_x: ``(n, D)`` per-image representations (e.g. mean-pooled SAE codes or raw features).
        train_labels, val_labels: ``(n,)`` int64 class labels (``< 0``: left out).
        ks: probe sizes (each >= 1; clamped to ``D``).
        num_classes: ``C``; default ``max label + 1`` over both splits.
        seed: seed of the negative draws.
        C: the probe's inverse L2 strength.

    Returns:
        ``{k: mean accuracy over the classes with rows in both splits}``.

    Raises:
        ConfigError: a ``k < 1``, fewer than 2 classes, or no class with rows in both splits.
    """
    if not ks or any(int(k) < 1 for k in ks):
        raise ConfigError(f"Sparse-probe sizes must be >= 1, got {list(ks)}. Fix: pass e.g. 1 2 5 10 20.")
    if num_classes is None:
        num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    if num_classes < 2:
        raise ConfigError("k-sparse probing needs at least 2 labelled classes. Fix: probe with labelled stores.")
    train_tasks = balanced_tasks(train_labels, num_classes, seed)
    val_tasks = balanced_tasks(val_labels, num_classes, seed)
    classes = [c for c in range(num_classes) if len(train_tasks[c]) and len(val_tasks[c])]
    if not classes:
        raise ConfigError("No class has images in both the train and the val store. Fix: probe with labelled stores.")
    k_max = max(int(k) for k in ks)
    cols = [top_k_mean_diff(train_x[train_tasks[c]], train_labels[train_tasks[c]] == c, k_max) for c in classes]
    result = {}
    for k in ks:
        tr_x, tr_y, tr_m = _padded(train_x, train_labels, train_tasks, classes, cols, int(k))
        va_x, va_y, va_m = _padded(val_x, val_labels, val_tasks, classes, cols, int(k))
        theta = fit_binary_logistic(tr_x, tr_y, tr_m, C=C)
        logits = torch.bmm(va_x, theta[:, :-1, None])[..., 0] + theta[:, -1:]
        correct = (((logits > 0).double() == va_y).double() * va_m).sum(1) / va_m.sum(1)
        result[int(k)] = float(correct.mean())
    return result


def downstream_probe(
    sae: SparseAutoencoder,
    train_store: FeatureStore | str | os.PathLike,
    val_store: FeatureStore | str | os.PathLike,
    tokens: str = "patch",
    batch_size: int = 4096,
    num_classes: int | None = None,
    weight_decay: float = 1e-2,
    max_iter: int = 200,
    sparse_ks: Sequence[int] = SPARSE_PROBE_KS,
) -> dict[str, float]:
    """Linear-probe top-1 on the raw features, the SAE codes and the reconstructions, and k-sparse probing of
    the codes against the raw features (module docstring, steps 1-4).

    Args:
        sae: the trained SAE.
        train_store, val_store: feature stores (or their folders) of the SAE's encoder and layer.
        tokens: ``"patch"`` (pooled per image), ``"cls"`` or ``"mean"``.
        batch_size: rows (tokens) per streamed batch.
        num_classes: classes; default ``max label + 1`` over both stores.
        weight_decay, max_iter: probe settings (:func:`linear_probe_top1`).
        sparse_ks: k-sparse probe sizes (:func:`sparse_probe`); empty: no sparse probing.

    Returns:
        ``probe_top1_raw``, ``probe_top1_codes``, ``probe_top1_reconstruction`` (accuracies in [0, 1]),
        ``accuracy_retained = probe_top1_reconstruction / probe_top1_raw`` (NaN when the raw probe scores 0;
        it can exceed 1 on small sets), and per ``k`` of ``sparse_ks`` ``sparse_probe_top{k}`` (SAE latents)
        and ``sparse_probe_raw_top{k}`` (raw dimensions), mean balanced one-vs-rest accuracies in [0, 1].

    Raises:
        ConfigError: an empty store, no labelled image.
        FeatureStoreError: an unreadable store, one without ``tokens`` or with another ``d_model``.
    """
    train = pool_store(sae, train_store, tokens, batch_size)
    val = pool_store(sae, val_store, tokens, batch_size)
    if num_classes is None:
        num_classes = int(max(train.labels.max(), val.labels.max())) + 1
    if num_classes < 1:
        raise ConfigError("The stores hold no labelled image. Fix: probe with labelled stores.")
    top1 = {
        f"probe_top1_{name}": linear_probe_top1(
            getattr(train, name), train.labels, getattr(val, name), val.labels, num_classes, weight_decay, max_iter
        )
        for name in ("raw", "codes", "reconstruction")
    }
    raw = top1["probe_top1_raw"]
    top1["accuracy_retained"] = top1["probe_top1_reconstruction"] / raw if raw > 0 else float("nan")
    if sparse_ks:
        for name, field in (("sparse_probe_top", "codes"), ("sparse_probe_raw_top", "raw")):
            accuracies = sparse_probe(getattr(train, field), train.labels, getattr(val, field), val.labels,
                                      sparse_ks, num_classes)
            top1.update({f"{name}{k}": value for k, value in accuracies.items()})
    return top1


def sparse_probe_table(results: dict[str, float], ks: Sequence[int] = SPARSE_PROBE_KS) -> str:
    """A markdown table ``k | SAE latents | raw dimensions`` of :func:`downstream_probe`'s sparse-probe results."""
    lines = ["| k | SAE latents | raw dimensions |", "|---:|---:|---:|"]
    for k in ks:
        lines.append(f"| {k} | {results[f'sparse_probe_top{k}']:.3f} | {results[f'sparse_probe_raw_top{k}']:.3f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """``python -m mim.sae.downstream --sae SAE --train-store DIR --val-store DIR``: print the downstream probe
    results and the k-sparse probing table of a saved SAE (:func:`mim.sae.load_sae`) on two feature stores."""
    from mim.sae.models import load_sae

    parser = argparse.ArgumentParser(prog="python -m mim.sae.downstream", description=main.__doc__)
    parser.add_argument("--sae", required=True, help="the SAE's .safetensors (its .json beside it)")
    parser.add_argument("--train-store", required=True, help="feature store of the train split (selection + fit)")
    parser.add_argument("--val-store", required=True, help="feature store of the val split (accuracy)")
    parser.add_argument("--tokens", default="patch", help="patch (mean-pooled per image), cls or mean")
    parser.add_argument("--ks", type=int, nargs="+", default=list(SPARSE_PROBE_KS), help="sparse-probe sizes")
    parser.add_argument("--batch-size", type=int, default=4096, help="tokens per encoded batch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    sae = load_sae(args.sae, map_location=args.device)
    results = downstream_probe(sae, args.train_store, args.val_store, tokens=args.tokens, batch_size=args.batch_size,
                               sparse_ks=args.ks)
    for name in ("probe_top1_raw", "probe_top1_codes", "probe_top1_reconstruction", "accuracy_retained"):
        print(f"{name}: {results[name]:.4f}")
    print(sparse_probe_table(results, args.ks))
    return results



__all__ = [
    "SPARSE_PROBE_KS",
    "PooledFeatures",
    "balanced_tasks",
    "binary_probe_accuracy",
    "downstream_probe",
    "fit_binary_logistic",
    "linear_probe_top1",
    "pool_store",
    "sparse_probe",
    "sparse_probe_table",
    "top_k_mean_diff",
]


if __name__ == "__main__":
    main()
