"""What SAE latents respond to: firing statistics, top-activating images, patch heatmaps and their pictures.

Computation (torch only) is separate from drawing (matplotlib, imported lazily: ``pip install
'mim-lightning[viz]'``). :func:`latent_activations` streams a feature store through an SAE once and keeps, per
latent, only small summaries, or reads them from a sparse latent cache (:mod:`mim.sae.cache`) without encoding;
:func:`write_gallery` draws them. ``tools/sae_gallery.py`` is the command line.

Definitions (``a_j(t)``: activation of latent ``j`` on token ``t``, its entry in the dense code
``SparseCode.to_dense``, 0 when inactive; a latent in several slots of a token's code, as matching pursuit makes,
has their sum):

- **firing frequency** of ``j``: the fraction of the store's tokens (patch tokens, or one cls / mean token per
  image) with ``a_j(t) != 0``. A latent that never fires on the store is *dead* here (whatever its training
  counter says).
- **image score** of ``j`` on an image: ``max_t a_j(t)`` over the image's tokens (its strongest token). Only
  images where ``j`` is positive on some token are ranked; AbsTopK's negative responses are not.
- **class mean** ``m_jc``: the mean of ``a_j(t)`` over all tokens of the images of class ``c`` (zeros included).
- **class selectivity** of ``j``: ``max_c m_jc / mean_c m_jc``, in ``[1, C]``: 1 for a latent that responds to
  every class alike, ``C`` for one that responds to a single class (0 for a latent with ``mean_c m_jc <= 0``).
- **heatmap** of ``j`` on an image: ``a_j(t)`` on the image's patch tokens, reshaped to the store's
  ``patch_grid`` ``(h, w)`` (timm's row-major token order).
"""

from __future__ import annotations

import csv
import html
import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mim.errors import ConfigError
from mim.export import atomic_write
from mim.features.store import FeatureStore, FeatureStoreError
from mim.sae.cache import LatentCache, merge_slots
from mim.sae.data import check_d_model
from mim.sae.variants import SparseAutoencoder

#: Latent selection modes of :func:`select_latents` (besides explicit ids).
SELECT_MODES = ("frequent", "selective")
#: Fewest active tokens for a latent to be eligible as ``"selective"`` (rarer ones are noise-selective).
MIN_COUNT = 100
#: Cap on the (images x d_sae) per-image score matrix built at once (elements).
_SCORE_ELEMENTS = 1 << 24
VIZ_HINT = "Fix: pip install 'mim-lightning[viz]' (matplotlib)."


@dataclass
class LatentActivations:
    """Per-latent summaries of one pass of a feature store through an SAE (all tensors on the CPU).

    Attributes:
        tokens: the token kind streamed (``"patch"``, ``"cls"`` or ``"mean"``).
        patch_grid: ``(h, w)`` of the patch tokens; None for cls / mean.
        token_count: tokens seen (images x ``h * w`` for patch stores, images otherwise).
        fired: (d_sae,) int64 tokens on which each latent is active.
        top_values: (d_sae, n_top) float32 image scores of each latent's top images, descending; ``-inf`` in
            unused slots (fewer images where the latent is positive).
        top_images: (d_sae, n_top) int64 image indices in the store's split (``FeatureBatch.indices``); -1 unused.
        top_labels: (d_sae, n_top) int64 labels of those images; -1 unused.
        class_mean: (d_sae, num_classes) float64 mean activation per token of each class.
        class_tokens: (num_classes,) int64 tokens of each class.
        latents: (n_selected,) int64 the selected latent ids.
        maps: (n_selected, n_top, h, w) float32 heatmaps of the selected latents on their top images
            (zeros in unused slots); None for cls / mean stores.
    """

    tokens: str
    patch_grid: tuple[int, int] | None
    token_count: int
    fired: torch.Tensor
    top_values: torch.Tensor
    top_images: torch.Tensor
    top_labels: torch.Tensor
    class_mean: torch.Tensor
    class_tokens: torch.Tensor
    latents: torch.Tensor
    maps: torch.Tensor | None

    @property
    def d_sae(self) -> int:
        return int(self.fired.numel())

    @property
    def frequency(self) -> torch.Tensor:
        """(d_sae,) float64 firing frequency (fraction of tokens active)."""
        return self.fired.double() / max(self.token_count, 1)

    @property
    def dead(self) -> torch.Tensor:
        """(d_sae,) bool: latents that never fired on the store."""
        return self.fired == 0


# ------------------------------------------------------------------------------------------------- computation
def class_selectivity(class_mean: torch.Tensor) -> torch.Tensor:
    """``max_c m_jc / mean_c m_jc`` per latent (module docstring) from ``class_mean`` (d_sae, C); 0 where the
    mean over classes is not positive. Returns (d_sae,) float64."""
    class_mean = class_mean.double()
    mean = class_mean.mean(1)
    ratio = class_mean.amax(1) / mean.clamp_min(torch.finfo(torch.float64).tiny)
    return torch.where(mean > 0, ratio, torch.zeros_like(ratio))


def select_latents(
    how: str | Sequence[int],
    fired: torch.Tensor,
    class_mean: torch.Tensor,
    n_latents: int = 16,
    min_count: int = MIN_COUNT,
) -> torch.Tensor:
    """Latents to draw.

    Args:
        how: explicit latent ids (kept in the given order, repeats dropped); ``"frequent"``: the ``n_latents``
            with the most active tokens (highest firing frequency); ``"selective"``: the ``n_latents`` of highest
            :func:`class_selectivity` among latents active on at least ``min_count`` tokens. Ties go to the
            smaller id; latents that never fire are never chosen by a mode.
        fired: (d_sae,) active-token counts.
        class_mean: (d_sae, C) mean activation per class.

    Returns:
        (n,) int64 latent ids, ``n <= n_latents`` for the modes.

    Raises:
        ConfigError: an unknown mode, ids outside ``[0, d_sae)``, no ids, or ``n_latents < 1``.
    """
    d_sae = fired.numel()
    if isinstance(how, str):
        if how not in SELECT_MODES:
            raise ConfigError(f"Unknown latent selection {how!r}. Fix: use one of {SELECT_MODES} or latent ids.")
        if n_latents < 1:
            raise ConfigError(f"n_latents must be >= 1, got {n_latents}. Fix: ask for at least one latent.")
        if how == "frequent":
            score, eligible = fired.double(), fired > 0
        else:
            score, eligible = class_selectivity(class_mean), (fired >= max(min_count, 1)) & (fired > 0)
        score = torch.where(eligible, score, torch.full_like(score, -math.inf))
        order = torch.sort(score, descending=True, stable=True).indices
        return order[eligible[order]][:n_latents].long()
    ids = list(dict.fromkeys(int(i) for i in how))
    bad = [i for i in ids if not 0 <= i < d_sae]
    if not ids or bad:
        raise ConfigError(
            f"Latent ids must be in [0, {d_sae}) and at least one is needed, got {list(how)}. "
            f"Fix: pass ids between 0 and {d_sae - 1}."
        )
    return torch.tensor(ids, dtype=torch.long)


def _merge_top(
    top: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    scores: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Running top-``n_top`` per latent merged with a chunk: ``scores`` (m, d_sae), ``images`` / ``labels`` (m,)."""
    values, ids, labs = top
    d_sae = values.shape[0]
    values = torch.cat([values, scores.t()], 1)
    ids = torch.cat([ids, images.expand(d_sae, -1)], 1)
    labs = torch.cat([labs, labels.expand(d_sae, -1)], 1)
    keep = values.topk(top[0].shape[1], dim=1).indices
    return values.gather(1, keep), ids.gather(1, keep), labs.gather(1, keep)


@torch.inference_mode()
def _stream(
    sae: SparseAutoencoder, store: FeatureStore, tokens: str, batch_size: int, n_top: int, num_classes: int
) -> dict[str, Any]:
    """One unshuffled pass: firing counts, running top images per latent and class sums."""
    device, d_sae = sae.W_dec.device, sae.d_sae
    grid = store.metadata.get("patch_grid") if tokens == "patch" else None
    per_image = int(grid[0]) * int(grid[1]) if grid else 1
    fired = torch.zeros(d_sae, dtype=torch.long, device=device)
    top = (
        torch.full((d_sae, n_top), -math.inf, device=device),
        torch.full((d_sae, n_top), -1, dtype=torch.long, device=device),
        torch.full((d_sae, n_top), -1, dtype=torch.long, device=device),
    )
    class_sum = torch.zeros(num_classes * d_sae, dtype=torch.float64, device=device)
    class_tokens = torch.zeros(num_classes, dtype=torch.long, device=device)
    chunk = max(1, _SCORE_ELEMENTS // d_sae)  # images per score matrix
    for batch in store.batches(max(1, batch_size // per_image), tokens=tokens, shuffle=False, check_finite=True):
        n = len(batch.indices)
        code = sae.encode(batch.features.reshape(n * per_image, -1).to(device))
        if not sae.distinct_ids:  # a latent in several slots of a token: one activation, their sum (to_dense)
            code = merge_slots(code, d_sae)
        values, latent = code.values.float(), code.indices
        labels, images = batch.labels.to(device), batch.indices.to(device)
        fired += code.fired(d_sae)
        # class sums: one flat (class, latent) bin per active slot, tokens of unlabeled images (-1) left out
        token_labels = labels.repeat_interleave(per_image)
        if len(labels) and int(labels.max()) >= class_tokens.numel():
            grow = int(labels.max()) + 1 - class_tokens.numel()
            class_sum = torch.cat([class_sum, class_sum.new_zeros(grow * d_sae)])
            class_tokens = torch.cat([class_tokens, class_tokens.new_zeros(grow)])
        labelled = token_labels >= 0
        flat = (token_labels[:, None] * d_sae + latent)[labelled]
        class_sum.index_add_(0, flat.reshape(-1), values[labelled].double().reshape(-1))
        class_tokens += torch.bincount(labels[labels >= 0], minlength=class_tokens.numel()) * per_image
        # per-image max of the positive activations (scatter over (image, latent) bins), merged chunk by chunk
        positive = values.masked_fill(values <= 0, -math.inf)
        row_image = torch.arange(n * per_image, device=device) // per_image
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            rows = slice(start * per_image, stop * per_image)
            bins = (row_image[rows, None] - start) * d_sae + latent[rows]
            scores = torch.full(((stop - start) * d_sae,), -math.inf, device=device)
            scores.scatter_reduce_(0, bins.reshape(-1), positive[rows].reshape(-1), "amax")
            top = _merge_top(top, scores.view(stop - start, d_sae), images[start:stop], labels[start:stop])
    unused = torch.isinf(top[0])
    num = class_tokens.numel()
    return {
        "grid": (int(grid[0]), int(grid[1])) if grid else None,
        "token_count": len(store) * per_image,
        "fired": fired.cpu(),
        "top_values": top[0].cpu(),
        "top_images": top[1].masked_fill(unused, -1).cpu(),
        "top_labels": top[2].masked_fill(unused, -1).cpu(),
        "class_mean": (class_sum.view(num, d_sae).t() / class_tokens.clamp_min(1)).cpu(),
        "class_tokens": class_tokens.cpu(),
    }


def _from_cache(cache: LatentCache, n_top: int, num_classes: int) -> dict[str, Any]:
    """What :func:`_stream` computes, read from a latent cache's per-latent index and statistics."""
    import numpy as np

    stats, index = cache.stats(), cache.index()
    offsets = torch.from_numpy(np.array(index["offsets"]))
    slot = torch.arange(n_top)
    used = slot < offsets.diff()[:, None]  # (d_sae, n_top)
    pos = (offsets[:-1, None] + slot).masked_fill(~used, 0).numpy()
    if len(index["images"]):
        images = torch.from_numpy(np.asarray(index["images"][pos], dtype=np.int64))
        values = torch.from_numpy(np.asarray(index["scores"][pos], dtype=np.float32))
    else:
        images, values = torch.zeros(pos.shape, dtype=torch.long), torch.zeros(pos.shape)
    rows = torch.searchsorted(cache.indices, images).clamp_max(max(len(cache) - 1, 0))
    labels = cache.labels[rows] if len(cache) else torch.zeros_like(images)
    num = max(num_classes, stats.class_tokens.numel())
    class_sum = torch.zeros(cache.d_sae, num, dtype=torch.float64)
    class_sum[:, : stats.class_sum.shape[1]] = stats.class_sum
    class_tokens = torch.zeros(num, dtype=torch.long)
    class_tokens[: stats.class_tokens.numel()] = stats.class_tokens
    return {
        "grid": cache.patch_grid,
        "token_count": stats.token_count,
        "fired": stats.fired,
        "top_values": values.masked_fill(~used, -math.inf),
        "top_images": images.masked_fill(~used, -1),
        "top_labels": labels.masked_fill(~used, -1),
        "class_mean": class_sum / class_tokens.clamp_min(1),
        "class_tokens": class_tokens,
    }


def cache_maps(cache: LatentCache, latents: torch.Tensor, top_images: torch.Tensor) -> torch.Tensor:
    """:func:`activation_maps` read from a latent cache: (n, n_top, h, w) float32, zeros where unused."""
    h, w = cache.patch_grid
    maps = torch.zeros(*top_images.shape, h, w)
    for pos, latent in enumerate(latents.tolist()):
        used = top_images[pos] >= 0
        maps[pos, used] = cache.activation_map(latent, top_images[pos][used])
    return maps


@torch.inference_mode()
def activation_maps(
    sae: SparseAutoencoder,
    store: FeatureStore,
    latents: torch.Tensor,
    top_images: torch.Tensor,
    batch_size: int = 4096,
) -> torch.Tensor:
    """Patch heatmaps of ``latents`` on their top images, encoding only the rows of those images.

    Args:
        latents: (n,) int64 latent ids.
        top_images: (n, n_top) int64 image indices (in the split) per latent; -1 unused.

    Returns:
        (n, n_top, h, w) float32: ``a_j(t)`` on the image's patch tokens (module docstring); zeros where unused.

    Raises:
        FeatureStoreError: the store has no patch tokens.
    """
    if "patch" not in store.tokens:
        raise FeatureStoreError(f"Feature store {store.path} has no patch tokens, so no heatmaps. Fix: use a store "
                                "extracted with patch tokens.")
    device = sae.W_dec.device
    h, w = (int(s) for s in store.metadata["patch_grid"])
    latents, top_images = latents.to(device), top_images.to(device)
    maps = torch.zeros(*top_images.shape, h * w, device=device)
    needed = top_images[top_images >= 0].unique()
    for batch in store.batches(max(1, batch_size // (h * w)), tokens="patch", shuffle=False):
        indices = batch.indices.to(device)
        keep = torch.isin(indices, needed)
        if not bool(keep.any()):
            continue
        x = batch.features.to(device)[keep]
        code = sae.encode(x.reshape(-1, x.shape[-1]))
        acts = (code.values.float()[..., None] * (code.indices[..., None] == latents)).sum(1)  # (m * L, n)
        acts = acts.view(len(x), h * w, len(latents))
        latent_pos, slot, image = (top_images[..., None] == indices[keep]).nonzero(as_tuple=True)
        maps[latent_pos, slot] = acts[image, :, latent_pos]
    return maps.view(*top_images.shape, h, w).cpu()


def latent_activations(
    sae: SparseAutoencoder | None,
    store: FeatureStore | str | os.PathLike,
    tokens: str = "patch",
    batch_size: int = 4096,
    n_top: int = 16,
    latents: str | Sequence[int] = "frequent",
    n_latents: int = 16,
    min_count: int = MIN_COUNT,
    num_classes: int = 0,
    cache: LatentCache | str | os.PathLike | None = None,
) -> LatentActivations:
    """Stream ``store`` (unshuffled, ``batch_size`` tokens per encode) through ``sae`` in eval mode on its device,
    and summarise every latent (definitions in the module docstring); then pick latents with
    :func:`select_latents` and, for patch tokens, compute their heatmaps with :func:`activation_maps`.

    With a latent ``cache`` (:class:`mim.sae.cache.LatentCache` of this SAE and store, ``mim predict`` with
    ``LatentCacheWriter``) nothing is encoded: the summaries come from its per-latent index and statistics and the
    heatmaps from its per-token codes (:func:`cache_maps`), the same numbers as the streaming pass (class means
    up to float64 summation order); ``sae`` may then be None (given, it is checked against the cache).

    Memory: ``d_sae x (3 n_top + num_classes)`` numbers plus one batch; never ``tokens x d_sae``.

    Args:
        tokens: ``"patch"``, ``"cls"`` or ``"mean"``.
        n_top: top images kept per latent.
        latents, n_latents, min_count: the selection (see :func:`select_latents`).
        num_classes: width of ``class_mean`` at least (classes absent from the store get zeros).

    Raises:
        ConfigError: ``batch_size`` or ``n_top`` below 1, a bad selection, no ``sae`` and no ``cache``.
        FeatureStoreError: another ``d_model`` than the SAE's, an empty store, missing ``tokens``, NaN / Inf
            features (the shard and row are named).
        LatentCacheError: a cache of another SAE, store or token kind, or an unreadable one.
    """
    store = store if isinstance(store, FeatureStore) else FeatureStore(store)
    if batch_size < 1 or n_top < 1:
        raise ConfigError(f"batch_size and n_top must be >= 1, got {batch_size}, {n_top}. Fix: pass positive values.")
    if cache is not None:
        cache = cache if isinstance(cache, LatentCache) else LatentCache(cache)
        cache.check_source(sae, store, tokens)
        stats = _from_cache(cache, n_top, num_classes)
        chosen = select_latents(latents, stats["fired"], stats["class_mean"], n_latents, min_count)
        maps = cache_maps(cache, chosen, stats["top_images"][chosen]) if stats["grid"] is not None else None
        return LatentActivations(tokens=tokens, patch_grid=stats["grid"], token_count=stats["token_count"],
                                 fired=stats["fired"], top_values=stats["top_values"], top_images=stats["top_images"],
                                 top_labels=stats["top_labels"], class_mean=stats["class_mean"],
                                 class_tokens=stats["class_tokens"], latents=chosen, maps=maps)
    if sae is None:
        raise ConfigError("latent_activations needs an SAE or a latent cache. Fix: pass sae or cache.")
    check_d_model(store, sae.d_model)
    if len(store) == 0:
        raise FeatureStoreError(f"Feature store {store.path} holds no image. Fix: extract a non-empty split.")
    was_training = sae.training
    sae.eval()
    try:
        stats = _stream(sae, store, tokens, batch_size, n_top, num_classes)
        chosen = select_latents(latents, stats["fired"], stats["class_mean"], n_latents, min_count)
        maps = (
            activation_maps(sae, store, chosen, stats["top_images"][chosen], batch_size)
            if stats["grid"] is not None
            else None
        )
    finally:
        sae.train(was_training)
    return LatentActivations(
        tokens=tokens,
        patch_grid=stats["grid"],
        token_count=stats["token_count"],
        fired=stats["fired"],
        top_values=stats["top_values"],
        top_images=stats["top_images"],
        top_labels=stats["top_labels"],
        class_mean=stats["class_mean"],
        class_tokens=stats["class_tokens"],
        latents=chosen,
        maps=maps,
    )


# ------------------------------------------------------------------------------------------------------ images
def store_dataset(metadata: Mapping[str, Any], root: str | os.PathLike | None) -> torch.utils.data.Dataset:
    """The split a store was extracted from, with the store's deterministic eval pipeline (resize, centre crop at
    ``img_size``) but not normalised: items ``(image (3, img_size, img_size) float32 in [0, 1], label, index)``,
    ``index`` being the store's image index. ``.dataset.classes`` holds the class names.

    Raises:
        FeatureStoreError: the metadata does not name a built-in dataset and split.
        DatasetNotFoundError: the data is not under ``root``.
    """
    from mim.data import ImageDataModule, build_dataset, eval_transform
    from mim.data.datasets import TransformedDataset

    data = metadata.get("data") or {}
    if metadata.get("dataset") is None or metadata.get("split") not in ("train", "val"):
        raise FeatureStoreError(
            f"The store's metadata names dataset {metadata.get('dataset')!r}, split {metadata.get('split')!r}; "
            "images can only be shown for stores extracted from mim's ImageDataModule. Fix: draw from such a store."
        )
    # the datamodule resolves the crop fraction as the extraction did; mean 0 / std 1 gives pixel / 255
    dm = ImageDataModule(
        dataset=metadata["dataset"], root=None if root is None else str(root), img_size=int(metadata["img_size"]),
        num_workers=0, eval_crop_pct=data.get("eval_crop_pct"), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
        train_split=data.get("train_split"),
    )
    raw = build_dataset(dm.dataset, metadata["split"], dm.root, train_split=data.get("train_split"),
                        skip_bad_images=bool(data.get("skip_bad_images", False)))
    transform = eval_transform(dm.img_size, dm.mean, dm.std, dm.eval_crop_pct)
    return TransformedDataset(raw, transform, return_index=True)


def load_images(dataset: torch.utils.data.Dataset, indices: Sequence[int], labels: Sequence[int]) -> torch.Tensor:
    """Images ``indices`` of :func:`store_dataset` as (n, 3, H, W) float32 in [0, 1].

    Raises:
        FeatureStoreError: an image's label differs from the store's (the data under the root is not the data the
            store was extracted from).
    """
    out = []
    for index, label in zip(indices, labels):
        image, found, _ = dataset[int(index)]
        if int(label) >= 0 and found != int(label):
            raise FeatureStoreError(
                f"Image {index} of the dataset has label {found} but the store says {int(label)}. Fix: pass the data "
                "root the store was extracted from (--data-root)."
            )
        out.append(image)
    return torch.stack(out) if out else torch.zeros(0, 3, 1, 1)


# ----------------------------------------------------------------------------------------------------- drawing
def _figure_class() -> Any:
    """matplotlib's ``Figure`` (drawn with the Agg canvas, no pyplot state), or a ConfigError naming the extra."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ConfigError(f"Drawing SAE galleries needs matplotlib. {VIZ_HINT}") from err
    return Figure


def _save(fig: Any, path: Path) -> Path:
    """Render ``fig`` with matplotlib's Agg canvas and write it atomically as PNG."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=fig.dpi)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))
    return path


def draw_latent(
    path: Path,
    latent: int,
    frequency: float,
    scores: torch.Tensor,
    labels: Sequence[str],
    images: torch.Tensor,
    maps: torch.Tensor | None = None,
    alpha: float = 0.5,
) -> Path:
    """A grid of a latent's top images (score and class under each), with its heatmaps over them.

    Args:
        scores: (n,) image scores (max activation), ``labels`` n class names, ``images`` (n, 3, H, W) in [0, 1].
        maps: (n, h, w) heatmaps or None (cls / mean stores): drawn over the image (stretched to its size,
            nearest-neighbour so each patch stays a square) with one colour scale ``[0, max]`` for the latent;
            patches where the latent is inactive stay transparent.
    """
    Figure = _figure_class()
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    n = len(images)
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    fig = Figure(figsize=(1.7 * cols + (0.8 if maps is not None else 0), 1.8 * rows + 0.5), dpi=100,
                 layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    vmax = float(maps.max()) if maps is not None and maps.numel() and float(maps.max()) > 0 else 1.0
    top = float(scores.max()) if n else 0.0
    fig.suptitle(f"latent {latent}  freq {frequency:.2e}  max act {top:.3g}", fontsize=9)
    heat = ScalarMappable(Normalize(0.0, vmax), "inferno")
    for i, ax in enumerate(axes):
        ax.set_axis_off()
        if i >= n:
            continue
        height, width = images.shape[-2:]
        ax.imshow(images[i].permute(1, 2, 0).clamp(0, 1).numpy(), extent=(0, width, height, 0))
        if maps is not None:
            ax.imshow(maps[i].numpy(), cmap=heat.cmap, norm=heat.norm, alpha=alpha * (maps[i] > 0).float().numpy(),
                      extent=(0, width, height, 0), interpolation="nearest")
        ax.set_title(f"{labels[i]} {float(scores[i]):.2f}", fontsize=7)
    if maps is not None:
        fig.colorbar(heat, ax=list(axes), shrink=0.6, label="activation")
    return _save(fig, path)


def draw_frequency_histogram(path: Path, frequency: torch.Tensor, bins: int = 50) -> Path:
    """Histogram of the firing frequencies of the latents that fire, on a log10 x-axis; the title counts the
    dead ones (frequency 0, not drawable on a log axis)."""
    import numpy as np

    Figure = _figure_class()
    alive = frequency[frequency > 0].double().numpy()
    fig = Figure(figsize=(6, 3.5), dpi=100, layout="constrained")
    ax = fig.subplots()
    if len(alive):
        low, high = np.log10(alive.min()), np.log10(alive.max())
        ax.hist(alive, bins=np.logspace(low - 0.05, high + 0.05, bins + 1))
    ax.set_xscale("log")
    ax.set_xlabel("firing frequency (fraction of tokens)")
    ax.set_ylabel("latents")
    dead = int((frequency == 0).sum())
    ax.set_title(f"{len(alive)} latents fire; {dead} of {frequency.numel()} never fire (dead, not shown)", fontsize=9)
    return _save(fig, path)


def draw_class_table(path: Path, class_mean: torch.Tensor, latents: torch.Tensor, class_names: Sequence[str]) -> Path:
    """Heatmap of the mean activation per class (columns) of the selected latents (rows), values written in."""
    import numpy as np

    Figure = _figure_class()
    table = class_mean[latents].float().numpy()
    fig = Figure(figsize=(1.0 + 0.6 * len(class_names), 0.8 + 0.3 * len(latents)), dpi=100, layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(table, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(class_names)), class_names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(latents)), [str(int(j)) for j in latents], fontsize=7)
    ax.set_ylabel("latent")
    threshold = table.max() / 2 if table.size else 0
    for (r, c), value in np.ndenumerate(table):
        ax.text(c, r, f"{value:.2g}", ha="center", va="center", fontsize=5,
                color="black" if value > threshold else "white")
    fig.colorbar(image, ax=ax, label="mean activation per token")
    return _save(fig, path)


def write_class_csv(path: Path, fired: torch.Tensor, frequency: torch.Tensor, class_mean: torch.Tensor,
                    class_names: Sequence[str]) -> Path:
    """CSV, one row per latent: ``latent, frequency, fired, selectivity, top_class`` and its class means
    (``class_mean`` (d_sae, C), ``class_names`` C names; ``top_class`` empty for latents that never fire)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["latent", "frequency", "fired", "selectivity", "top_class", *class_names])
    selectivity = class_selectivity(class_mean)
    for j in range(len(fired)):
        top = class_names[int(class_mean[j].argmax())] if int(fired[j]) and len(class_names) else ""
        writer.writerow([j, f"{float(frequency[j]):.6g}", int(fired[j]), f"{float(selectivity[j]):.4f}", top,
                         *(f"{float(v):.6g}" for v in class_mean[j])])
    atomic_write(path, lambda tmp: Path(tmp).write_text(buffer.getvalue()))
    return path


def write_index(path: Path, rows: Sequence[Mapping[str, Any]], figures: Sequence[Path], title: str,
                links: Sequence[Path] = ()) -> Path:
    """``index.html`` (relative links, so the folder can be moved): the overview ``figures``, ``links`` to other
    files, then a table (latent, frequency, top class, max activation) with each latent's PNG embedded and linked.
    ``rows``: dicts with those keys and ``png``."""
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title></head><body>",
             f"<h1>{esc(title)}</h1>"]
    parts += [f"<p><a href='{esc(f.name)}'><img src='{esc(f.name)}' style='max-width:100%'></a></p>" for f in figures]
    parts += [f"<p><a href='{esc(f.name)}'>{esc(f.name)}</a></p>" for f in links]
    parts.append("<table border='1' cellpadding='4'><tr><th>latent</th><th>frequency</th><th>top class</th>"
                 "<th>max activation</th><th>top images</th></tr>")
    for row in rows:
        png = esc(row["png"].name)
        parts.append(f"<tr><td>{row['latent']}</td><td>{row['frequency']:.3e}</td><td>{esc(row['top_class'])}</td>"
                     f"<td>{row['max_activation']:.3g}</td><td><a href='{png}'><img src='{png}' width='360'></a></td>"
                     "</tr>")
    parts.append("</table></body></html>\n")
    text = "\n".join(parts)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def write_gallery(acts: LatentActivations, dataset: torch.utils.data.Dataset, out: str | os.PathLike,
                  title: str = "SAE latents") -> list[Path]:
    """Draw everything for ``acts`` into ``out`` (created): ``latent_XXXXX.png`` per selected latent,
    ``frequency_histogram.png``, ``class_activations.png`` (selected latents) and ``.csv`` (all latents), and
    ``index.html`` last. ``dataset``: :func:`store_dataset` of the store. Returns the paths written.

    Raises:
        ConfigError: matplotlib is missing (before anything is computed or written).
        FeatureStoreError: the dataset's labels disagree with the store's (see :func:`load_images`).
    """
    _figure_class()  # fail before any work when matplotlib is missing
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = [str(c) for c in dataset.dataset.classes]
    class_mean = acts.class_mean
    if class_mean.shape[1] < len(names):  # classes absent from the store
        class_mean = torch.cat([class_mean, class_mean.new_zeros(acts.d_sae, len(names) - class_mean.shape[1])], 1)
    names += [str(c) for c in range(len(names), class_mean.shape[1])]
    frequency = acts.frequency
    rows, written = [], []
    for pos, latent in enumerate(acts.latents.tolist()):
        used = acts.top_images[latent] >= 0
        scores, labels = acts.top_values[latent][used], acts.top_labels[latent][used]
        images = load_images(dataset, acts.top_images[latent][used].tolist(), labels.tolist())
        maps = acts.maps[pos][used] if acts.maps is not None else None
        png = draw_latent(out / f"latent_{latent:05d}.png", latent, float(frequency[latent]), scores,
                          [names[c] if c >= 0 else "?" for c in labels.tolist()], images, maps)
        fires = bool(acts.fired[latent]) and len(names) > 0
        rows.append({"latent": latent, "frequency": float(frequency[latent]), "png": png,
                     "top_class": names[int(class_mean[latent].argmax())] if fires else "-",
                     "max_activation": float(scores[0]) if len(scores) else 0.0})
        written.append(png)
    figures = [draw_frequency_histogram(out / "frequency_histogram.png", frequency),
               draw_class_table(out / "class_activations.png", class_mean, acts.latents, names)]
    table = write_class_csv(out / "class_activations.csv", acts.fired, frequency, class_mean, names)
    index = write_index(out / "index.html", rows, figures, title, links=[table])
    return [*written, *figures, table, index]


__all__ = [
    "MIN_COUNT",
    "SELECT_MODES",
    "LatentActivations",
    "activation_maps",
    "cache_maps",
    "class_selectivity",
    "draw_class_table",
    "draw_frequency_histogram",
    "draw_latent",
    "latent_activations",
    "load_images",
    "select_latents",
    "store_dataset",
    "write_class_csv",
    "write_gallery",
    "write_index",
]
