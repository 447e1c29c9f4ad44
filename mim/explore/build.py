"""Build the explorer site (:mod:`mim.explore`) from an SAE, a feature store and its sparse latent cache.

Definitions follow :mod:`mim.sae.viz` and :mod:`mim.sae.cache` (``a_j(t)``: activation of latent ``j`` on patch
token ``t``; an image's score for ``j`` is ``max_t a_j(t)``):

- **frequency**: fraction of the store's patch tokens with ``a_j(t) != 0``; **dead**: never active on the store;
  **dense**: frequency above ``dense`` (default 0.1);
- **mean activation**: mean of ``a_j(t)`` over the tokens where it is active; **max**: largest ``a_j(t)``;
- **top class** and **class selectivity** (``max_c m_jc / mean_c m_jc``, :func:`mim.sae.viz.class_selectivity`)
  from the per-class mean activations ``m_jc`` (all tokens of class ``c``, zeros included);
- **top images**: the ``k`` images with the highest score, with their heat-maps ``a_j(t)`` on the patch grid;
- **histogram**: ``a_j(t) > 0`` in 32 equal bins over ``(0, max_j]`` (:data:`mim.sae.cache.HIST_BINS`);
- **nearest latents**: by decoder cosine (:func:`mim.explore.neighbours.nearest_atoms`).

The site is written into ``<out>.tmp-*`` beside ``out`` and renamed onto it only when complete, so a failed
build never leaves a half site (an older site at ``out`` is replaced only then).
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mim.errors import UserError
from mim.explore.heat import TopHeat, top_heat
from mim.explore.neighbours import nearest_atoms
from mim.explore.shards import id_kind, pack, rounded, write_data
from mim.explore.thumbs import thumb_size, write_sheets
from mim.export import check_writable
from mim.features.store import FeatureStore, as_json
from mim.sae.cache import LatentCache, TokenLatents
from mim.sae.data import check_d_model
from mim.sae.models import load_sae
from mim.sae.viz import class_selectivity, store_dataset

STATIC = Path(__file__).parent / "static"
#: The page and its code, copied into every site.
STATIC_FILES = ("index.html", "explore.js", "explore.css")
#: Flag bits of the latent table.
DEAD, DENSE = 1, 2
#: Largest finite float16 (heat values are clamped to it before packing).
_F16_MAX = float(np.finfo(np.float16).max)


class ExploreError(UserError, ValueError):
    """An explorer build that cannot run as asked (an output folder that is not a site, a store without patch
    tokens, bad options); the message names the cause and the fix."""


@dataclass
class SiteSummary:
    """What :func:`build_site` wrote.

    Attributes:
        path: the site folder.
        latents: number of latents (``d_sae``).
        images: number of images.
        seconds: wall time per stage (``cache``, ``table``, ``neighbours``, ``latents``, ``images``, ``thumbs``)
            and ``total``.
        bytes: size of the site on disk.
    """

    path: Path
    latents: int
    images: int
    seconds: dict[str, float] = field(default_factory=dict)
    bytes: int = 0


def _is_site(folder: Path) -> bool:
    return (folder / "data" / "meta.js").is_file() and (folder / "explore.js").is_file()


def check_output(out: Path) -> None:
    """Refuse an ``out`` that exists and is neither empty nor an explorer site; check its parent is writable.

    Raises:
        ExploreError: ``out`` is a file, or a folder with other content.
        OutputError: the parent folder cannot be written.
    """
    if out.exists() and not (out.is_dir() and (_is_site(out) or not any(out.iterdir()))):
        raise ExploreError(f"--out {out} exists and is not an explorer site (it would be replaced). Fix: pass a new "
                           "or empty folder, or an earlier mim-explore site.")
    check_writable(out.parent, "the explorer's parent folder", "pass an --out folder whose parent you can write.")


def encode_cache(sae_file: str | os.PathLike, store: str | os.PathLike, folder: str | os.PathLike,
                 batch_size: int = 64) -> LatentCache:
    """Write the latent cache of ``store`` encoded by ``sae_file`` into ``folder`` (what ``mim predict -c
    configs/sae/latent_cache_vit_tiny_cifar10.yaml`` runs: :class:`~mim.sae.encode.SAEEncoder`,
    :class:`~mim.sae.encode.StoreImagesDataModule`, :class:`~mim.sae.cache.LatentCacheWriter`, in this process;
    a complete cache of the same SAE and store there is reused) and open it.

    Raises:
        LatentCacheError: a cache of another SAE or store in ``folder``.
    """
    import lightning as L

    from mim.sae.cache import LatentCacheWriter
    from mim.sae.encode import SAEEncoder, StoreImagesDataModule

    lightning_log = logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    lightning_log.setLevel(logging.WARNING)  # the build reports its own stages; no device banner or tips
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec")  # Lightning internals, not the user's concern
            writer = LatentCacheWriter(str(folder))
            trainer = L.Trainer(accelerator="auto", devices=1, logger=False, enable_progress_bar=False,
                                enable_model_summary=False, enable_checkpointing=False, callbacks=[writer],
                                default_root_dir=str(folder))
            trainer.predict(SAEEncoder(str(sae_file)),
                            datamodule=StoreImagesDataModule(str(store), "patch", batch_size), return_predictions=False)
    finally:
        lightning_log.setLevel(level)
    return LatentCache(folder)


def latent_table(cache: LatentCache, num_classes: int, dense: float) -> dict[str, Any]:
    """The columns of the latent table (lists of length ``d_sae``): ``freq``, ``mean``, ``max``, ``images``,
    ``top`` (class id, -1 for a dead latent), ``sel`` (class selectivity), ``flags`` (:data:`DEAD` | :data:`DENSE`),
    plus ``class_mean`` (d_sae, C) float64 for the latent pages."""
    stats = cache.stats()
    class_mean, class_fired = stats.class_mean, stats.class_fired
    pad = num_classes - class_mean.shape[1]
    if pad > 0:  # classes absent from the store
        class_mean = torch.cat([class_mean, class_mean.new_zeros(len(class_mean), pad)], 1)
        class_fired = torch.cat([class_fired, class_fired.new_zeros(len(class_fired), pad)], 1)
    fired = stats.fired > 0
    top = torch.where(fired, class_mean.argmax(1), torch.full_like(stats.fired, -1)) if num_classes else \
        torch.full_like(stats.fired, -1)
    freq = stats.frequency
    flags = torch.where(fired, 0, DEAD) | torch.where(freq > dense, DENSE, 0)
    return {
        "freq": rounded(freq), "mean": rounded(stats.mean_active), "max": rounded(stats.max),
        "images": stats.image_count.tolist(), "top": top.tolist(), "sel": rounded(class_selectivity(class_mean)),
        "flags": flags.tolist(), "class_mean": class_mean, "class_fired": class_fired, "hist": stats.hist,
    }


def latent_record(heat: TopHeat, latent: int, table: dict[str, Any], near: torch.Tensor, cosine: torch.Tensor,
                  token_kind: str) -> dict[str, Any]:
    """One latent's page data: top images (store indices), their scores and labels, sparse heat-maps (``ho``
    offsets per image into ``ht`` tokens / ``hv`` float16 values), histogram, class means / active tokens per
    class, nearest latents ``nn`` with cosines ``nc``."""
    lo, hi = int(heat.starts[latent]), int(heat.starts[latent + 1])
    offsets = heat.offsets[lo:hi + 1]
    entries = slice(int(offsets[0]), int(offsets[-1]))
    return {
        "id": latent, "images": heat.images[lo:hi].tolist(), "labels": heat.labels[lo:hi].tolist(),
        "scores": rounded(heat.scores[lo:hi]), "ho": (offsets - offsets[0]).tolist(),
        "ht": pack(heat.tokens[entries], token_kind),
        "hv": pack(np.clip(heat.values[entries], -_F16_MAX, _F16_MAX), "f16"),
        "hist": table["hist"][latent].tolist(), "cm": rounded(table["class_mean"][latent]),
        "cf": table["class_fired"][latent].tolist(), "nn": near[latent].tolist(), "nc": rounded(cosine[latent], 3),
    }


def image_record(found: TokenLatents, latent_kind: str) -> dict[str, str]:
    """One image's token data: ``o`` (T + 1,) int32 offsets, ``l`` latent ids, ``v`` float16 values (CSR, as
    :meth:`LatentCache.image_latents` returns them)."""
    offsets, latents, values = found
    return {"o": pack(offsets, "i32"), "l": pack(latents, latent_kind),
            "v": pack(values.clamp(-_F16_MAX, _F16_MAX), "f16")}


def copy_static(folder: Path) -> None:
    """Copy the page, script and style (:data:`STATIC_FILES`) into the site ``folder``."""
    for name in STATIC_FILES:
        shutil.copyfile(STATIC / name, folder / name)


def publish(tmp: Path, out: Path) -> None:
    """Rename the finished site ``tmp`` onto ``out`` (an older site there is moved aside first, then removed)."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f"{out.name}.old-", dir=out.parent))
        os.replace(out, old / "site")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


class Stopwatch:
    """Wall time per stage: ``lap(stage, what)`` stores the seconds since the previous lap and reports a line."""

    def __init__(self, log: Callable[[str], None] | None = None) -> None:
        self.log, self.seconds = log, {}
        self.started = self.clock = time.perf_counter()

    def lap(self, stage: str, what: str) -> None:
        now = time.perf_counter()
        self.seconds[stage], self.clock = now - self.clock, now
        if self.log is not None:
            self.log(f"{stage}: {what} ({self.seconds[stage]:.1f} s)")

    def total(self) -> float:
        self.seconds["total"] = time.perf_counter() - self.started
        return self.seconds["total"]


def write_site(folder: str | os.PathLike, cache: LatentCache, W_dec: torch.Tensor, dataset: Any, names: list[str],
               img_size: int, info: dict[str, Any], k: int = 32, neighbours: int = 8, dense: float = 0.1,
               thumb: int = 96, latents_per_shard: int = 64, images_per_shard: int = 64,
               watch: Stopwatch | None = None) -> None:
    """Write a complete site into ``folder`` (data, thumbnails, page; ``data/meta.js`` last) from an open cache.

    Args:
        folder: an empty folder.
        cache: the latent cache (patch tokens).
        W_dec: (d_sae, d_model) the SAE's decoder (nearest latents).
        dataset: the store's images (:func:`mim.sae.viz.store_dataset`: items ``(image (3, H, W) in [0, 1], label,
            index)``).
        names: class names (padded with numbers for labels beyond them).
        img_size: the images' side in pixels (thumbnails are at most ``thumb``).
        info: extra fields of ``meta`` (``title``, ``sae``, ``store``).
        k, neighbours, dense, thumb, latents_per_shard, images_per_shard: as :func:`build_site`.
        watch: records the time of each stage.
    """
    folder, watch = Path(folder), watch or Stopwatch()
    d_sae, count = cache.d_sae, len(cache)
    num_classes = max(len(names), int(cache.labels.max()) + 1 if count else 0)
    names = names + [str(c) for c in range(len(names), num_classes)]
    table = latent_table(cache, num_classes, dense)
    write_data(folder, "latents", {key: table[key] for key in ("freq", "mean", "max", "images", "top", "sel", "flags")})
    watch.lap("table", f"{d_sae} latents")
    near, cosine = nearest_atoms(W_dec, neighbours)
    watch.lap("neighbours", f"{near.shape[1]} per latent by decoder cosine")
    T = cache.tokens_per_image
    token_kind, latent_kind = ("u8" if T <= 255 else "i32"), id_kind(d_sae)
    pending: list[dict[str, str]] = []
    written = [0]  # image shards written

    def add_image(image: int, found: TokenLatents) -> None:  # image pages, written during the pass
        pending.append(image_record(found, latent_kind))
        if len(pending) == images_per_shard:
            write_data(folder, f"image/{written[0]:05d}", pending)
            written[0] += 1
            pending.clear()

    heat = top_heat(cache, k, on_image=add_image)
    if pending:
        write_data(folder, f"image/{written[0]:05d}", pending)
    watch.lap("images", f"{count} image pages; top {k} images of every latent with heat-maps")
    for start in range(0, d_sae, latents_per_shard):
        records = [latent_record(heat, j, table, near, cosine, token_kind)
                   for j in range(start, min(d_sae, start + latents_per_shard))]
        write_data(folder, f"latent/{start // latents_per_shard:05d}", records)
    watch.lap("latents", f"{d_sae} latent pages")
    indices, labels = cache.indices.tolist(), cache.labels.tolist()
    sheets = write_sheets(folder, dataset, indices, labels, thumb_size(img_size, thumb))
    watch.lap("thumbs", f"{sheets['sheets']} sprite sheets of {sheets['size']} px thumbnails")
    copy_static(folder)
    watch.total()
    meta = {
        **info, "d_sae": d_sae, "k": k, "tokens_per_image": T, "grid": list(cache.patch_grid), "classes": names,
        "indices": indices, "labels": labels, "dense": dense, "latents_per_shard": latents_per_shard,
        "images_per_shard": images_per_shard, "token_kind": token_kind, "latent_kind": latent_kind,
        "thumbs": sheets, "hist_bins": int(table["hist"].shape[1]),
        "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": {key: round(value, 2) for key, value in watch.seconds.items()},
    }
    write_data(folder, "meta", meta)  # last: the marker of a complete site (check_output)


def build_site(sae: str | os.PathLike, store: str | os.PathLike, out: str | os.PathLike,
               cache: str | os.PathLike | None = None, cache_out: str | os.PathLike | None = None,
               data_root: str | os.PathLike | None = None, k: int = 32, neighbours: int = 8, dense: float = 0.1,
               thumb: int = 96, latents_per_shard: int = 64, images_per_shard: int = 64, batch_size: int = 64,
               log: Callable[[str], None] | None = None) -> SiteSummary:
    """Write the explorer site of ``sae`` on ``store`` into ``out`` (module docstring).

    Args:
        sae: a saved SAE (``sae.safetensors`` / ``.json`` of :func:`mim.sae.save_sae`).
        store: the feature store (patch tokens) to explore, typically the validation split.
        out: the site folder (created, or an earlier site replaced once the new one is complete).
        cache: a latent cache of this SAE and store (``mim predict -c configs/sae/latent_cache_*.yaml``); None:
            encode the store here (:func:`encode_cache`).
        cache_out: where that cache is written (kept, and reused by a later build); None: a temporary folder.
        data_root: data root of the store's dataset (None: ``$MIM_DATA``, else ``./data``).
        k: top images per latent.
        neighbours: nearest latents per latent.
        dense: frequency above which a latent is flagged dense.
        thumb: largest thumbnail side in pixels (smaller images keep their size).
        latents_per_shard, images_per_shard: latents / images per data file.
        batch_size: images per batch when encoding the store.
        log: called with one line per stage (None: silent).

    Returns:
        :class:`SiteSummary`.

    Raises:
        ExploreError: bad options, a store without patch tokens, an ``out`` that is not a site.
        UserError: a missing or unreadable SAE (:func:`mim.sae.load_sae`), store (``FeatureStoreError``, also for
            an SAE and a store of different ``d_model``), cache (``LatentCacheError``, also for a cache of another
            SAE or store), dataset (``DatasetNotFoundError``) or an unwritable output (``OutputError``).
    """
    if k < 1 or neighbours < 0 or thumb < 8 or latents_per_shard < 1 or images_per_shard < 1 or not 0 < dense <= 1:
        raise ExploreError(f"Need k >= 1, neighbours >= 0, thumb >= 8, shard sizes >= 1 and 0 < dense <= 1; got k {k}, "
                           f"neighbours {neighbours}, thumb {thumb}, shards {latents_per_shard}/{images_per_shard}, "
                           f"dense {dense}. Fix: pass valid values.")
    watch = Stopwatch(log)
    out = Path(out).absolute()
    check_output(out)
    model = load_sae(sae).eval()
    features = FeatureStore(store)
    if "patch" not in features.tokens or not features.metadata.get("patch_grid"):
        raise ExploreError(f"Feature store {features.path} holds {features.tokens} tokens; the explorer shows patch "
                           "tokens on their images. Fix: pass a store extracted with patch tokens.")
    check_d_model(features, model.d_model, f"the SAE {sae}",
                  fix="pass the store of the encoder and layer the SAE was trained on (--store)")
    dataset = store_dataset(features.metadata, data_root)  # a wrong data root fails before any work
    meta = features.metadata
    info = {
        "title": f"{type(model).__name__} {model.d_sae} latents on {meta.get('encoder_source') or ''} layer "
                 f"{meta.get('layer')} ({meta.get('split')})",
        "sae": {"file": str(Path(sae).absolute()), "class": type(model).__name__, "init_args": model.init_args()},
        "store": {"path": str(features.path), "count": len(features),
                  **as_json({key: meta.get(key) for key in ("encoder_source", "layer", "split", "dataset",
                                                              "img_size")})},
    }
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        if cache is not None:
            latent_cache = LatentCache(cache)
            latent_cache.check_source(model, features, "patch")
            latent_cache.index()
            watch.lap("cache", f"read {latent_cache.path}")
        else:
            folder = Path(cache_out) if cache_out is not None else tmp / ".cache"
            latent_cache = encode_cache(sae, features.path, folder, batch_size)
            latent_cache.index()
            watch.lap("cache", f"encoded {len(latent_cache)} images into {folder}")
        site = tmp / "site"
        site.mkdir()
        write_site(site, latent_cache, model.W_dec, dataset, [str(c) for c in dataset.dataset.classes],
                   int(meta["img_size"]), info, k=k, neighbours=neighbours, dense=dense, thumb=thumb,
                   latents_per_shard=latents_per_shard, images_per_shard=images_per_shard, watch=watch)
        size = sum(p.stat().st_size for p in site.rglob("*") if p.is_file())
        publish(site, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the in-process cache (unless cache_out), or a failed build
    if log is not None:
        log(f"wrote {out} ({size / 1e6:.1f} MB) in {watch.seconds['total']:.1f} s")
    return SiteSummary(out, latent_cache.d_sae, len(latent_cache), dict(watch.seconds), size)


__all__ = ["DEAD", "DENSE", "ExploreError", "SiteSummary", "Stopwatch", "build_site", "check_output", "encode_cache",
           "image_record", "latent_record", "latent_table", "write_site"]
