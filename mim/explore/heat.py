"""Every latent's top images and their heat-maps, in one pass over a latent cache's images.

:meth:`mim.sae.cache.LatentCache.top_images` answers one latent at a time (reading each of its top images);
a site needs all ``d_sae`` of them, so this reads every image once instead: the per-latent index
(:meth:`~mim.sae.cache.LatentCache.index`) names the ``(latent, image)`` pairs (each latent's first ``k`` images,
best first), and each image's active entries (:meth:`~mim.sae.cache.LatentCache.image_latents`) are matched to
the pairs of that image. The result equals ``top_images(j, k)`` for every ``j`` (tested), sparse: a heat-map
keeps only its tokens with ``a_j(t) != 0``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from mim.sae.cache import LatentCache, TokenLatents


class TopHeat(NamedTuple):
    """The top images of every latent with sparse heat-maps (P pairs, H heat entries).

    Attributes:
        starts: (d_sae + 1,) int64: latent ``j``'s pairs are ``starts[j]:starts[j + 1]``, best first.
        images: (P,) int64 store image indices.
        labels: (P,) int64 their labels.
        scores: (P,) float32 image scores ``max_t a_j(t)``.
        offsets: (P + 1,) int64: pair ``p``'s heat entries are ``offsets[p]:offsets[p + 1]``.
        tokens: (H,) int64 patch token of each entry (ascending within a pair, timm's row-major order).
        values: (H,) float32 ``a_j(t)`` there.
    """

    starts: np.ndarray
    images: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    offsets: np.ndarray
    tokens: np.ndarray
    values: np.ndarray


def top_heat(cache: LatentCache, k: int, on_image: Callable[[int, TokenLatents], None] | None = None) -> TopHeat:
    """Top ``k`` images and heat-maps of every latent (module docstring).

    Args:
        cache: the latent cache.
        k: images per latent (fewer for a latent positive on fewer images).
        on_image: called as ``on_image(image_index, token_latents)`` for every image, in image-index order (the
            pass reads them anyway: a caller can write per-image data at the same time).

    Returns:
        :class:`TopHeat`.
    """
    index = cache.index()
    d_sae = cache.d_sae
    first = np.asarray(index["offsets"], dtype=np.int64)
    counts = np.minimum(np.diff(first), k)
    starts = np.zeros(d_sae + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    latent_of = np.repeat(np.arange(d_sae, dtype=np.int64), counts)
    position = first[:-1][latent_of] + (np.arange(len(latent_of)) - starts[:-1][latent_of])
    images = np.asarray(index["images"][position], dtype=np.int64)
    scores = np.asarray(index["scores"][position], dtype=np.float32)
    held = cache.indices.numpy()
    labels = cache.labels.numpy()[np.searchsorted(held, images)] if len(images) else np.zeros(0, np.int64)
    by_image = np.lexsort((latent_of, images))  # pairs grouped by image, latents ascending
    image_sorted, latent_sorted = images[by_image], latent_of[by_image]
    lows, highs = np.searchsorted(image_sorted, held, "left"), np.searchsorted(image_sorted, held, "right")
    hit_pairs, hit_tokens, hit_values = [], [], []
    for row, image in enumerate(held.tolist()):
        found = cache.image_latents(image)
        if on_image is not None:
            on_image(image, found)
        lo, hi = int(lows[row]), int(highs[row])
        if lo == hi:
            continue
        wanted = latent_sorted[lo:hi]
        latents = found.latents.numpy()
        slot = np.minimum(np.searchsorted(wanted, latents), len(wanted) - 1)
        entries = np.flatnonzero(wanted[slot] == latents)
        hit_pairs.append(by_image[lo + slot[entries]])
        hit_tokens.append(np.searchsorted(found.offsets.numpy(), entries, side="right") - 1)
        hit_values.append(found.values.numpy()[entries])
    pairs = np.concatenate(hit_pairs) if hit_pairs else np.zeros(0, np.int64)
    tokens = np.concatenate(hit_tokens) if hit_tokens else np.zeros(0, np.int64)
    values = np.concatenate(hit_values) if hit_values else np.zeros(0, np.float32)
    order = np.lexsort((tokens, pairs))
    offsets = np.zeros(len(images) + 1, dtype=np.int64)
    np.cumsum(np.bincount(pairs, minlength=len(images)), out=offsets[1:])
    return TopHeat(starts, images, labels, scores, offsets, tokens[order].astype(np.int64),
                   values[order].astype(np.float32))


__all__ = ["TopHeat", "top_heat"]
