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

The SAE-as-a-drop-in-replacement check follows Gao et al. 2024 (arXiv 2406.04093, Sec. 4.1, downstream
loss of the model fed the reconstruction) in spirit: on a frozen vision encoder without its downstream
layers, the linear-probe accuracy of the features stands in for the downstream loss.
"""

from __future__ import annotations

import os
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


def downstream_probe(
    sae: SparseAutoencoder,
    train_store: FeatureStore | str | os.PathLike,
    val_store: FeatureStore | str | os.PathLike,
    tokens: str = "patch",
    batch_size: int = 4096,
    num_classes: int | None = None,
    weight_decay: float = 1e-2,
    max_iter: int = 200,
) -> dict[str, float]:
    """Linear-probe top-1 on the raw features, the SAE codes and the reconstructions (module docstring).

    Args:
        sae: the trained SAE.
        train_store, val_store: feature stores (or their folders) of the SAE's encoder and layer.
        tokens: ``"patch"`` (pooled per image), ``"cls"`` or ``"mean"``.
        batch_size: rows (tokens) per streamed batch.
        num_classes: classes; default ``max label + 1`` over both stores.
        weight_decay, max_iter: probe settings (:func:`linear_probe_top1`).

    Returns:
        ``probe_top1_raw``, ``probe_top1_codes``, ``probe_top1_reconstruction`` (accuracies in [0, 1]) and
        ``accuracy_retained = probe_top1_reconstruction / probe_top1_raw`` (NaN when the raw probe scores 0;
        it can exceed 1 on small sets).

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
    return top1


__all__ = ["PooledFeatures", "downstream_probe", "linear_probe_top1", "pool_store"]
