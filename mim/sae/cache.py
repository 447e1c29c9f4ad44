"""The sparse latent cache: an SAE's codes of every token of a feature store, on disk, for fast look-ups.

``mim predict`` with :class:`mim.sae.encode.SAEEncoder` (model), :class:`mim.sae.encode.StoreImagesDataModule`
(data) and :class:`LatentCacheWriter` (callback) encodes a feature store once and writes, per token, the latents
that are active there with their values. :class:`LatentCache` reads it memory-mapped: the top images of a latent
(with their per-token activations, the heat-map), an image's or a token's active latents, and per-latent
statistics, each without touching the rest of the cache.

Layout of a cache folder::

    metadata.json               written LAST, atomically: its presence means "complete"
    rank0-00000.safetensors     CSR shards of ``shard_size`` images (a rank's last one smaller)
    rank1-00000.safetensors     under DDP every rank writes its own shards
    latent_index.safetensors    sidecar, built once from the shards (at the end of ``mim predict``, or on first
                                use): the per-latent (CSC) image index and the per-latent statistics

A shard of ``n`` images with ``T`` tokens each (``T = h * w`` patch tokens, ``R`` register tokens, or 1 for
cls / pooled / mean tokens) holds ``E`` entries (one per active latent of a token), in token order (image-major,
timm's row-major patch order), each token's entries sorted by latent id:

- ``latents`` (E,) int16 when ``d_sae <= 32767``, else int32: latent ids;
- ``values`` (E,) float32 (or float16: ``values_dtype``): activations, never 0;
- ``offsets`` (n * T + 1,) int64: token ``t`` of the shard owns entries ``offsets[t]:offsets[t + 1]``, so
  image ``i``'s entries are ``offsets[i * T]:offsets[(i + 1) * T]`` (the per-image offsets are every
  ``T``-th token offset);
- ``indices`` (n,) int64: the image index in the store's split (``FeatureBatch.indices``); ``labels`` (n,) int64.

Definitions (as :mod:`mim.sae.viz`): the activation ``a_j(t)`` of latent ``j`` on token ``t`` is the dense code's
entry (``SparseCode.to_dense``): a latent that holds several slots of one token's code (matching pursuit,
:class:`~mim.sae.variants.MPSAE`, can pick an atom again) gets the **sum** of its slots, stored once. An image's
**score** for ``j`` is ``max_t a_j(t)`` over its tokens; only images with a positive score are ranked.

Under DDP each rank encodes an interleaved part of the store (batches ``r, r + W, ...``) in increasing image
order; rank 0 gathers the shard lists and writes ``metadata.json``. The reader orders images by image index,
so a DDP cache reads exactly like a 1-process cache.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from safetensors.torch import save_file

from mim.errors import ConfigError, UserError
from mim.export import atomic_write, check_writable, read_format_json, write_format_json
from mim.features.extract import all_gather_object
from mim.features.store import as_json, shard_name
from mim.sae.variants import SparseCode

FORMAT = "mim-latent-cache"
FORMAT_VERSION = 1
METADATA = "metadata.json"
INDEX = "latent_index.safetensors"
#: Value dtypes a cache can store.
VALUE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
#: Bins of the per-latent activation histograms (linear, over ``(0, max_j]``).
HIST_BINS = 32
#: Elements of the (images x d_sae) score buffer used while building the index.
_SCORE_ELEMENTS = 1 << 24
OVERWRITE_HINT = (
    "Fix: write the cache into another folder (--trainer.callbacks.init_args.path DIR), or replace it with "
    "--trainer.callbacks.init_args.overwrite true."
)


class LatentCacheError(UserError, ValueError):
    """A latent cache that cannot be read (incomplete, a missing or truncated shard, another format) or that does
    not belong to the SAE / store it is used with."""


# ----------------------------------------------------------------------------------------------------- codes
def coalesce(code: SparseCode, d_sae: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A padded code in CSR form: each row's active latents once, sorted by id, repeated slots summed.

    Args:
        code: (N, s) padded code (:class:`~mim.sae.variants.SparseCode`); slots with value 0 are inactive.
        d_sae: number of latents.

    Returns:
        ``(counts (N,) int64, latents (E,) int64, values (E,) float32)``: row ``r`` owns the next ``counts[r]``
        entries; entries whose summed value is 0 are dropped. ``to_dense`` of the result equals
        ``code.to_dense(d_sae)``.
    """
    n, s = code.values.shape
    values = code.values.float()
    if n == 0 or s == 0:
        empty = torch.zeros(0, dtype=torch.long, device=values.device)
        return torch.zeros(n, dtype=torch.long, device=values.device), empty, values.new_zeros(0)
    ids = code.indices.masked_fill(values == 0, d_sae)  # inactive slots sort last and are dropped
    ids, order = ids.sort(dim=1, stable=True)
    values = values.gather(1, order)
    keys = (torch.arange(n, device=ids.device)[:, None] * (d_sae + 1) + ids).reshape(-1)  # ascending
    unique, inverse = torch.unique_consecutive(keys, return_inverse=True)
    summed = values.new_zeros(len(unique)).index_add_(0, inverse, values.reshape(-1))
    rows, latents = unique // (d_sae + 1), unique % (d_sae + 1)
    keep = (latents < d_sae) & (summed != 0)
    counts = torch.bincount(rows[keep], minlength=n)
    return counts, latents[keep], summed[keep]


def merge_slots(code: SparseCode, d_sae: int) -> SparseCode:
    """The same code with every latent in at most one slot per row (repeated slots summed, as ``to_dense``
    does); width and dtype kept, unused slots hold value 0. A no-op in effect for codes with distinct ids."""
    counts, latents, values = coalesce(code, d_sae)
    rows = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
    starts = torch.cumsum(counts, 0) - counts
    slots = torch.arange(len(latents), device=counts.device) - starts[rows]
    out_values = torch.zeros_like(code.values)
    out_ids = torch.zeros_like(code.indices)
    out_values[rows, slots] = values.to(out_values.dtype)
    out_ids[rows, slots] = latents
    return SparseCode(out_values, out_ids)


def id_dtype(d_sae: int) -> torch.dtype:
    """int16 when every id fits (``d_sae <= 32767``), else int32."""
    return torch.int16 if d_sae <= torch.iinfo(torch.int16).max else torch.int32


# ---------------------------------------------------------------------------------------------------- writing
def read_metadata(folder: str | os.PathLike) -> dict[str, Any] | None:
    """``metadata.json`` of a cache folder, or None when there is none (absent or incomplete cache).

    Raises:
        LatentCacheError: the file is not JSON, not a latent cache's, or of another format version.
    """
    return read_format_json(Path(folder) / METADATA, FORMAT, FORMAT_VERSION, LatentCacheError, "latent cache", (
        OVERWRITE_HINT,
        "Fix: pass a latent cache folder.",
        "Fix: re-run mim predict with this version (overwrite true).",
    ))


def write_metadata(folder: str | os.PathLike, metadata: Mapping[str, Any]) -> Path:
    """Write ``metadata.json`` atomically (only once every shard is complete); returns its path."""
    return write_format_json(Path(folder) / METADATA, FORMAT, FORMAT_VERSION, dict(metadata))


def clear_cache(folder: str | os.PathLike) -> None:
    """Remove a cache's files from ``folder`` (metadata first), temporary files of a killed run included."""
    folder = Path(folder)
    (folder / METADATA).unlink(missing_ok=True)
    for pattern in ("rank*-*.safetensors", INDEX, ".*.tmp"):
        for path in folder.glob(pattern):
            path.unlink(missing_ok=True)


class CacheShardWriter:
    """Buffers one rank's CSR rows and writes them as shards of ``shard_size`` images (atomically).

    Args:
        folder: cache folder (created).
        rank: global rank (names the shards).
        shard_size: images per shard.
        tokens_per_image: ``T``.
        d_sae: number of latents (chooses the id dtype).
        values_dtype: ``"float32"`` or ``"float16"``.
    """

    def __init__(self, folder: str | os.PathLike, rank: int, shard_size: int, tokens_per_image: int, d_sae: int,
                 values_dtype: str = "float32") -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.rank, self.shard_size, self.tokens_per_image = rank, shard_size, tokens_per_image
        self.id_dtype, self.value_dtype = id_dtype(d_sae), VALUE_DTYPES[values_dtype]
        self.shards: list[dict[str, Any]] = []
        self._pending: list[dict[str, torch.Tensor]] = []
        self._images = 0

    def add(self, rows: Mapping[str, torch.Tensor]) -> None:
        """Buffer a batch: ``counts`` (B * T,), ``latents`` (E,), ``values`` (E,), ``indices`` (B,), ``labels``
        (B,) (what :meth:`mim.sae.encode.SAEEncoder.predict_step` returns); writes every full shard.

        Raises:
            LatentCacheError: ``counts`` that are not ``T`` per image or do not add up to the entries; a value
                that does not fit float16 in a float16 cache.
        """
        n, T = len(rows["indices"]), self.tokens_per_image
        if len(rows["counts"]) != n * T or int(rows["counts"].sum()) != len(rows["latents"]):
            raise LatentCacheError(
                f"A batch of {n} images has {len(rows['counts'])} token counts (expected {n * T}) summing to "
                f"{int(rows['counts'].sum())} for {len(rows['latents'])} entries."
            )
        if self.value_dtype == torch.float16 and len(rows["values"]):
            peak = float(rows["values"].abs().max())
            if not peak <= torch.finfo(torch.float16).max:
                raise LatentCacheError(
                    f"An activation of {peak:.4g} does not fit float16 (largest 65504). Fix: write the cache with "
                    "--trainer.callbacks.init_args.values_dtype float32."
                )
        self._pending.append({k: v.detach().cpu() for k, v in rows.items()})
        self._images += n
        while self._images >= self.shard_size:
            self._write(self.shard_size)

    def _write(self, n: int) -> None:
        rows = {k: torch.cat([p[k] for p in self._pending]) for k in self._pending[0]}
        tokens = n * self.tokens_per_image
        offsets = torch.zeros(tokens + 1, dtype=torch.long)
        torch.cumsum(rows["counts"][:tokens], 0, out=offsets[1:])
        entries = int(offsets[-1])
        shard = {
            "latents": rows["latents"][:entries].to(self.id_dtype).contiguous(),
            "values": rows["values"][:entries].to(self.value_dtype).contiguous(),
            "offsets": offsets,
            "indices": rows["indices"][:n].long().contiguous(),
            "labels": rows["labels"][:n].long().contiguous(),
        }
        name = shard_name(self.rank, len(self.shards))
        atomic_write(self.folder / name, lambda tmp: save_file(shard, tmp, metadata={"format": FORMAT}))
        self.shards.append({"file": name, "images": n, "entries": entries, "rank": self.rank})
        self._images -= n
        rest = {"counts": rows["counts"][tokens:], "latents": rows["latents"][entries:],
                "values": rows["values"][entries:], "indices": rows["indices"][n:], "labels": rows["labels"][n:]}
        self._pending = [{k: v.clone() for k, v in rest.items()}] if self._images else []

    def close(self) -> list[dict[str, Any]]:
        """Write the last (smaller) shard; returns this rank's shards ``[{"file", "images", "entries", "rank"}]``."""
        if self._images:
            self._write(self._images)
        return list(self.shards)


class LatentCacheWriter(BasePredictionWriter):
    """Writes :class:`~mim.sae.encode.SAEEncoder` predictions into a latent cache at ``path`` (module docstring).

    In ``setup`` a complete cache of the same SAE (weights hash), store and options is reused (the predict loop
    is skipped); one with other settings is refused unless ``overwrite``; an incomplete one (killed mid-write) is
    cleared by rank 0. Each rank writes its own shards; after the loop rank 0 gathers the shard lists, writes
    ``metadata.json`` last and, with ``build_index``, the per-latent index (:meth:`LatentCache.build_index`).

    Args:
        path: cache folder.
        shard_size: images per shard (each rank buffers up to one shard: ``shard_size x T x k`` entries).
        values_dtype: ``"float32"`` (the SAE's values exactly) or ``"float16"`` (a third fewer bytes with int16
            ids; relative error <= 2^-11; an activation above 65504 stops the run with a LatentCacheError).
        overwrite: replace a cache with other settings instead of refusing it.
        build_index: build the per-latent index and statistics right after the shards (else on first use).

    Raises:
        ConfigError: ``shard_size < 1``, an unknown ``values_dtype``; in ``setup``, a model without an ``sae``
            or a datamodule without a ``store`` (use ``SAEEncoder`` and ``StoreImagesDataModule``).
        LatentCacheError: in ``setup``, a complete cache with other settings (fields named).
        OutputError: in ``setup``, an unwritable folder.
    """

    def __init__(self, path: str, shard_size: int = 4096, values_dtype: str = "float32", overwrite: bool = False,
                 build_index: bool = True) -> None:
        super().__init__(write_interval="batch")
        if shard_size < 1:
            raise ConfigError(f"shard_size must be >= 1 images, got {shard_size}. Fix: set a positive shard_size.")
        if values_dtype not in VALUE_DTYPES:
            raise ConfigError(f"values_dtype must be one of {list(VALUE_DTYPES)}, got {values_dtype!r}. "
                              "Fix: set --trainer.callbacks.init_args.values_dtype float32.")
        self.path, self.shard_size, self.values_dtype = Path(path), shard_size, values_dtype
        self.overwrite, self.build_index = overwrite, build_index
        self.reused = False
        self._identity: dict[str, Any] | None = None
        self._details: dict[str, Any] = {}
        self._writer: CacheShardWriter | None = None
        self._saved_limit: int | float | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "predict":
            return
        store = getattr(trainer.datamodule, "store", None)
        if not hasattr(pl_module, "sae_identity") or store is None:
            raise ConfigError(
                "LatentCacheWriter needs model mim.sae.encode.SAEEncoder and data "
                f"mim.sae.encode.StoreImagesDataModule, got {type(pl_module).__name__} and {type(trainer.datamodule).__name__}. Fix: use those classes."
            )
        tokens = trainer.datamodule.tokens
        grid = store.metadata.get("patch_grid") if tokens == "patch" else None
        per_image = store.tokens_per_image(tokens)  # h * w patch tokens, R register tokens, else 1
        self._identity = {
            "format_version": FORMAT_VERSION,
            "sae": pl_module.sae_identity(),
            "store": trainer.datamodule.store_identity(),
            "tokens": tokens,
            "values_dtype": self.values_dtype,
            "limit_predict_batches": trainer.limit_predict_batches,
        }
        self._details = {
            "sae_file": str(getattr(pl_module, "sae_file", "")),
            "d_sae": pl_module.sae.d_sae,
            "tokens_per_image": per_image,
            "patch_grid": list(grid) if grid else None,
            "id_dtype": str(id_dtype(pl_module.sae.d_sae)).replace("torch.", ""),
        }
        self.reused = self._check_existing()
        trainer.strategy.barrier("latent_cache_checked")
        if self.reused:
            self._saved_limit = trainer.limit_predict_batches
            trainer.limit_predict_batches = 0
            rank_zero_info(f"Latent cache {self.path} is complete with the same settings: reused, nothing encoded.")
            return
        check_writable(self.path, "the latent cache folder", "pass a folder you can write: "
                       "--trainer.callbacks.init_args.path DIR.")
        if trainer.is_global_zero:
            clear_cache(self.path)
        trainer.strategy.barrier("latent_cache_cleared")
        self._writer = CacheShardWriter(self.path, trainer.global_rank, self.shard_size,
                                        self._details["tokens_per_image"], self._details["d_sae"], self.values_dtype)

    def _check_existing(self) -> bool:
        """Whether a complete cache with this identity is there (reuse it); raises on other settings."""
        try:
            stored = read_metadata(self.path)
            if stored is None:
                return False
            old = as_json({k: stored.get(k) for k in self._identity})
            new = as_json(self._identity)
            diffs = [k for k in new if old.get(k) != new[k]]
            if diffs:
                raise LatentCacheError(
                    f"Latent cache {self.path} was written with other settings ({', '.join(diffs)} differ). "
                    f"{OVERWRITE_HINT}"
                )
            LatentCache(self.path)  # every shard present and complete
            return True
        except LatentCacheError:
            if self.overwrite:
                return False
            raise

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any,
                           batch_indices: Sequence[int] | None, batch: Any, batch_idx: int,
                           dataloader_idx: int = 0) -> None:
        assert self._writer is not None, "setup('predict') runs first"
        self._writer.add(prediction)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Flush every rank's last shard; rank 0 writes ``metadata.json`` (and the index); all ranks wait."""
        if self._writer is None or self._identity is None:
            return
        gathered = all_gather_object(self._writer.close(), trainer.world_size)
        if trainer.is_global_zero:
            shards = [s for part in gathered for s in part]
            count = sum(s["images"] for s in shards)
            write_metadata(self.path, {
                **self._identity, **self._details, "count": count, "entries": sum(s["entries"] for s in shards),
                "world_size": trainer.world_size, "shards": shards,
            })
            rank_zero_info(f"Wrote latent cache {self.path}: {count} images in {len(shards)} shards.")
            if self.build_index:
                LatentCache(self.path).build_index()
        trainer.strategy.barrier("latent_cache_written")
        self._writer = None

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._saved_limit is not None:
            trainer.limit_predict_batches = self._saved_limit
            self._saved_limit = None


# ---------------------------------------------------------------------------------------------------- reading
_NP_DTYPES = {"I16": np.int16, "I32": np.int32, "I64": np.int64, "F16": np.float16, "F32": np.float32,
              "F64": np.float64, "U8": np.uint8, "BOOL": np.bool_}


def mmap_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Memory-map every tensor of a safetensors file as a read-only numpy array (no copy, no read until used).

    Returns:
        ``(arrays, metadata)``: the tensors by name and the file's ``__metadata__`` strings.

    Raises:
        LatentCacheError: a file that is not safetensors, or shorter than its header says (truncated).
    """
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if length <= 0 or 8 + length > size:
                raise ValueError(f"header of {length} bytes in a file of {size}")
            header = json.loads(f.read(length))
    except (OSError, ValueError) as err:
        raise LatentCacheError(f"Latent cache file {path} is not a readable safetensors file ({err}). "
                               f"{OVERWRITE_HINT}") from err
    meta = header.pop("__metadata__", None) or {}
    end = max((int(t["data_offsets"][1]) for t in header.values()), default=0)
    if 8 + length + end > size:
        raise LatentCacheError(
            f"Latent cache file {path} is truncated: {size} bytes, its header needs {8 + length + end}. "
            "Fix: re-run mim predict into this folder with --trainer.callbacks.init_args.overwrite true."
        )
    arrays = {}
    for name, info in header.items():
        dtype = np.dtype(_NP_DTYPES[info["dtype"]])
        start, stop = (int(o) for o in info["data_offsets"])
        shape = tuple(int(s) for s in info["shape"])
        if stop == start:
            arrays[name] = np.zeros(shape, dtype)
        else:
            arrays[name] = np.memmap(path, dtype=dtype, mode="r", offset=8 + length + start, shape=shape)
    return arrays, meta


class TopImages(NamedTuple):
    """A latent's top images, best first (``k' <= k``: only images with a positive score).

    Attributes:
        images: (k',) int64 image indices in the store's split.
        labels: (k',) int64 their labels (-1: none).
        scores: (k',) float32 image scores ``max_t a_j(t)``.
        maps: (k', h, w) float32 per-token activations ``a_j(t)`` (patch caches, timm's row-major order), or
            (k', T) for other token kinds (T = R register tokens, 1 for cls / pooled / mean); None when not asked
            for.
    """

    images: torch.Tensor
    labels: torch.Tensor
    scores: torch.Tensor
    maps: torch.Tensor | None


class TokenLatents(NamedTuple):
    """The active latents of an image's tokens (CSR): token ``t`` has ``latents[offsets[t]:offsets[t+1]]``
    (int64, ascending) with ``values`` (float32) there; ``offsets`` (T + 1,) int64."""

    offsets: torch.Tensor
    latents: torch.Tensor
    values: torch.Tensor


class LatentStats(NamedTuple):
    """Per-latent statistics over the whole cache (all tensors on the CPU).

    Attributes:
        token_count: tokens in the cache (images x T).
        fired: (d_sae,) int64 tokens on which the latent is active (``a_j(t) != 0``).
        image_count: (d_sae,) int64 images with a positive score (the length of the latent's image index).
        total: (d_sae,) float64 sum of ``a_j(t)`` over all tokens.
        max: (d_sae,) float32 largest positive ``a_j(t)`` (0 for a latent that is never positive).
        class_fired: (d_sae, C) int64 active tokens per class.
        class_sum: (d_sae, C) float64 sum of ``a_j(t)`` per class.
        class_tokens: (C,) int64 tokens per class (C = largest label + 1; unlabelled images left out).
        hist: (d_sae, HIST_BINS) int64 counts of the positive activations in ``HIST_BINS`` equal bins over
            ``(0, max_j]`` (bin ``b`` holds ``b/B < a / max_j <= (b+1)/B``).
    """

    token_count: int
    fired: torch.Tensor
    image_count: torch.Tensor
    total: torch.Tensor
    max: torch.Tensor
    class_fired: torch.Tensor
    class_sum: torch.Tensor
    class_tokens: torch.Tensor
    hist: torch.Tensor

    @property
    def frequency(self) -> torch.Tensor:
        """(d_sae,) float64 fraction of tokens on which the latent is active."""
        return self.fired.double() / max(self.token_count, 1)

    @property
    def mean_active(self) -> torch.Tensor:
        """(d_sae,) float64 mean activation over the tokens where the latent is active (0 if never)."""
        return self.total / self.fired.clamp_min(1).double()

    @property
    def class_mean(self) -> torch.Tensor:
        """(d_sae, C) float64 mean ``a_j(t)`` over all tokens of each class (zeros included), as
        :attr:`mim.sae.viz.LatentActivations.class_mean`."""
        return self.class_sum / self.class_tokens.clamp_min(1).double()


_STATS_KEYS = ("fired", "image_count", "total", "max", "class_fired", "class_sum", "class_tokens", "hist")


class LatentCache:
    """Read a latent cache (module docstring) through memory maps; opening reads only headers and image lists.

    Args:
        path: the cache folder.

    Attributes:
        metadata: the parsed ``metadata.json``.
        d_sae: the SAE's number of latents.
        tokens: the store's token kind (``patch``, ``cls``, ...).
        tokens_per_image: ``T``, tokens cached per image.
        patch_grid: ``(h, w)`` for patch tokens, else None.
        indices: (n,) int64 image indices held, ascending.
        labels: (n,) int64 their labels.

    Raises:
        LatentCacheError: no folder; no ``metadata.json`` (``mim predict`` unfinished or killed); a listed shard
            missing, truncated or with other sizes than the metadata lists (the first such shard is named).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise LatentCacheError(f"Latent cache {self.path} does not exist. Fix: write it with mim predict "
                                   "(configs/sae/latent_cache_vit_tiny_cifar10.yaml).")
        meta = read_metadata(self.path)
        if meta is None:
            raise LatentCacheError(
                f"Latent cache {self.path} is incomplete: it has no {METADATA} (mim predict did not finish). Fix: "
                "re-run mim predict; it starts the cache over."
            )
        self.metadata = meta
        self.d_sae, self.tokens = int(meta["d_sae"]), str(meta["tokens"])
        self.tokens_per_image = int(meta["tokens_per_image"])
        self.patch_grid = tuple(meta["patch_grid"]) if meta.get("patch_grid") else None
        self._shards = []
        for shard in meta["shards"]:
            file = self.path / shard["file"]
            if not file.is_file():
                raise LatentCacheError(f"Latent cache {self.path} is missing shard {shard['file']}. Fix: restore it, "
                                       "or re-run mim predict with --trainer.callbacks.init_args.overwrite true.")
            arrays, _ = mmap_safetensors(file)
            sizes = {k: len(arrays[k]) if k in arrays else -1 for k in ("latents", "values", "offsets", "indices")}
            expected = {"latents": shard["entries"], "values": shard["entries"],
                        "offsets": shard["images"] * self.tokens_per_image + 1, "indices": shard["images"]}
            if sizes != expected or int(arrays["offsets"][-1]) != shard["entries"]:
                raise LatentCacheError(
                    f"Latent cache shard {file} has sizes {sizes}; metadata.json lists {expected}. Fix: re-run mim "
                    "predict with --trainer.callbacks.init_args.overwrite true."
                )
            self._shards.append(arrays)
        parts = [s["indices"] for s in self._shards]
        all_indices = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        shard_of = np.repeat(np.arange(len(parts)), [len(p) for p in parts])
        local = np.concatenate([np.arange(len(p)) for p in parts]) if parts else np.zeros(0, np.int64)
        order = np.argsort(all_indices, kind="stable")
        self.indices = torch.from_numpy(np.ascontiguousarray(all_indices[order]))
        self.labels = torch.from_numpy(np.concatenate([s["labels"] for s in self._shards])[order]
                                       if parts else np.zeros(0, np.int64))
        self._row_shard, self._row_local = shard_of[order], local[order]
        self._identity_rows = bool(np.array_equal(all_indices[order], np.arange(len(order))))
        self._index: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        """Number of images."""
        return len(self.indices)

    def check_source(self, sae: Any = None, store: Any = None, tokens: str | None = None) -> None:
        """Check that the cache was written from this SAE (same ``weights_sha256``), this feature store (same
        image count and identity fields) and token kind; None skips a check.

        Raises:
            LatentCacheError: the first mismatch, named, with the fix.
        """
        from mim.eval.encoders import weights_sha256
        from mim.features.store import IDENTITY_KEYS, as_json

        fix = "Fix: pass the cache written from this SAE and store, or write one (mim predict with LatentCacheWriter)."
        if tokens is not None and tokens != self.tokens:
            raise LatentCacheError(f"Latent cache {self.path} holds {self.tokens} tokens, not {tokens!r}. {fix}")
        if sae is not None:
            if int(sae.d_sae) != self.d_sae or weights_sha256(sae) != self.metadata["sae"].get("weights_sha256"):
                raise LatentCacheError(f"Latent cache {self.path} was written with another SAE "
                                       f"({self.metadata.get('sae_file')}, d_sae {self.d_sae}). {fix}")
        if store is not None:
            written = self.metadata["store"]
            diffs = [k for k in IDENTITY_KEYS if as_json(store.metadata.get(k)) != as_json(written.get(k))]
            diffs += ["count"] if len(store) != written.get("count") else []
            if diffs:
                raise LatentCacheError(f"Latent cache {self.path} was written from another feature store than "
                                       f"{store.path} ({', '.join(diffs)} differ). {fix}")

    # -- per image -------------------------------------------------------------------------------------------
    def _locate(self, image: int) -> tuple[dict[str, np.ndarray], int]:
        """The shard arrays and local row of image index ``image``."""
        if self._identity_rows and 0 <= image < len(self):
            row = image
        else:
            row = int(np.searchsorted(self.indices.numpy(), image))
            if row >= len(self) or int(self.indices[row]) != image:
                raise LatentCacheError(f"Image {image} is not in latent cache {self.path} ({len(self)} images). "
                                       "Fix: pass an image index of the store the cache was written from.")
        return self._shards[self._row_shard[row]], int(self._row_local[row])

    def image_latents(self, image: int) -> TokenLatents:
        """The active latents of every token of image index ``image`` (CSR over its T tokens).

        Raises:
            LatentCacheError: an image the cache does not hold.
        """
        shard, row = self._locate(int(image))
        T = self.tokens_per_image
        offsets = np.asarray(shard["offsets"][row * T : (row + 1) * T + 1], dtype=np.int64)
        start, stop = int(offsets[0]), int(offsets[-1])
        return TokenLatents(
            torch.from_numpy(offsets - start),
            torch.from_numpy(shard["latents"][start:stop].astype(np.int64)),
            torch.from_numpy(shard["values"][start:stop].astype(np.float32)),
        )

    def token_latents(self, image: int, token: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(latents (m,) int64 ascending, values (m,) float32)`` active on token ``token`` of image ``image``.

        Raises:
            LatentCacheError: an image the cache does not hold, or a token outside ``[0, T)``.
        """
        if not 0 <= token < self.tokens_per_image:
            raise LatentCacheError(f"Token {token} is outside [0, {self.tokens_per_image}) for this cache.")
        shard, row = self._locate(int(image))
        t = row * self.tokens_per_image + int(token)
        start, stop = int(shard["offsets"][t]), int(shard["offsets"][t + 1])
        return (torch.from_numpy(shard["latents"][start:stop].astype(np.int64)),
                torch.from_numpy(shard["values"][start:stop].astype(np.float32)))

    def dense(self, image: int) -> torch.Tensor:
        """(T, d_sae) float32 dense activations of an image (for checks and small uses)."""
        offsets, latents, values = self.image_latents(image)
        rows = torch.repeat_interleave(torch.arange(self.tokens_per_image), offsets.diff())
        out = torch.zeros(self.tokens_per_image, self.d_sae)
        out[rows, latents] = values
        return out

    def activation_map(self, latent: int, images: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """``a_j(t)`` of latent ``latent`` on every token of each image: (n, h, w) for patch caches, else (n, T)
        float32."""
        T = self.tokens_per_image
        maps = np.zeros((len(images), T), np.float32)
        for i, image in enumerate(images.tolist() if isinstance(images, torch.Tensor) else images):
            shard, row = self._locate(int(image))
            offsets = shard["offsets"][row * T : (row + 1) * T + 1]
            start, stop = int(offsets[0]), int(offsets[-1])
            hit = np.flatnonzero(shard["latents"][start:stop] == latent)
            if len(hit):
                token = np.searchsorted(offsets, start + hit, side="right") - 1
                maps[i, token] = shard["values"][start + hit]
        out = torch.from_numpy(maps)
        return out.view(len(maps), *self.patch_grid) if self.patch_grid else out

    # -- per latent ------------------------------------------------------------------------------------------
    def top_images(self, latent: int, k: int = 32, maps: bool = True) -> TopImages:
        """The ``k`` images with the highest score for ``latent`` (ties: smaller image index first), from the
        per-latent index (built on first use: :meth:`build_index`), with their per-token activations.

        Raises:
            LatentCacheError: a latent outside ``[0, d_sae)`` or ``k < 1``.
        """
        if not 0 <= latent < self.d_sae or k < 1:
            raise LatentCacheError(f"Need a latent in [0, {self.d_sae}) and k >= 1, got latent {latent}, k {k}.")
        index = self.index()
        start = int(index["offsets"][latent])
        stop = min(int(index["offsets"][latent + 1]), start + k)
        images = torch.from_numpy(np.array(index["images"][start:stop], dtype=np.int64))
        scores = torch.from_numpy(np.array(index["scores"][start:stop], dtype=np.float32))
        if self._identity_rows:
            labels = self.labels[images]
        else:
            labels = self.labels[torch.searchsorted(self.indices, images)]
        return TopImages(images, labels, scores, self.activation_map(latent, images) if maps else None)

    def stats(self) -> LatentStats:
        """Per-latent statistics (:class:`LatentStats`), from the index sidecar (built on first use)."""
        index = self.index()
        values = {k: torch.from_numpy(np.array(index[k])) for k in _STATS_KEYS}
        return LatentStats(len(self) * self.tokens_per_image, **values)

    def frequency(self) -> torch.Tensor:
        """(d_sae,) float64 firing frequency: the fraction of the cache's tokens on which each latent is active."""
        return self.stats().frequency

    # -- index -----------------------------------------------------------------------------------------------
    def _cache_key(self) -> str:
        return hashlib.sha256((self.path / METADATA).read_bytes()).hexdigest()

    def index(self) -> dict[str, np.ndarray]:
        """The per-latent index and statistics (memory-mapped arrays): ``offsets`` (d_sae + 1,) int64, latent
        ``j``'s images ``images[offsets[j]:offsets[j+1]]`` (image indices, int32 when they fit, else int64) with
        ``scores`` (the cache's ``values_dtype``),
        best first, plus the :class:`LatentStats` arrays. Read from ``latent_index.safetensors`` when it
        belongs to this cache, else built (:meth:`build_index`)."""
        if self._index is None:
            file = self.path / INDEX
            if file.is_file():
                try:
                    arrays, meta = mmap_safetensors(file)
                    if meta.get("cache") == self._cache_key():
                        self._index = arrays
                except LatentCacheError:
                    pass  # a broken sidecar is rebuilt
            if self._index is None:
                self.build_index()
        assert self._index is not None
        return self._index

    def build_index(self) -> Path | None:
        """Build the per-latent index and statistics in two passes over the shards and write them to
        ``latent_index.safetensors`` (atomically; kept in memory if the folder is read-only).

        Cost: one (images x d_sae) float32 buffer of at most 2^24 elements, plus the (latent, image) pairs with a
        positive score (at most the number of entries) sorted once.

        Returns:
            the sidecar's path, or None when it could not be written.
        """
        d, T = self.d_sae, self.tokens_per_image
        fired = torch.zeros(d, dtype=torch.long)
        total = torch.zeros(d, dtype=torch.float64)
        vmax = torch.zeros(d, dtype=torch.float32)
        labels_all = self.labels
        classes = int(labels_all.max()) + 1 if len(labels_all) and int(labels_all.max()) >= 0 else 0
        class_fired = torch.zeros(classes * d, dtype=torch.long)
        class_sum = torch.zeros(classes * d, dtype=torch.float64)
        class_tokens = torch.bincount(labels_all[labels_all >= 0], minlength=classes) * T
        pair_latents, pair_images, pair_scores = [], [], []
        chunk = max(1, _SCORE_ELEMENTS // d)
        for shard in self._shards:
            latents = torch.from_numpy(shard["latents"].astype(np.int64))
            values = torch.from_numpy(shard["values"].astype(np.float32))
            counts = torch.from_numpy(np.diff(shard["offsets"]))
            image_of = torch.repeat_interleave(torch.arange(len(counts)) // T, counts)
            labels = torch.from_numpy(np.array(shard["labels"]))
            fired += torch.bincount(latents, minlength=d)
            total += torch.bincount(latents, weights=values.double(), minlength=d)
            vmax = torch.maximum(vmax, torch.zeros(d).scatter_reduce_(0, latents, values, "amax"))
            entry_labels = labels[image_of]
            labelled = entry_labels >= 0
            flat = entry_labels[labelled] * d + latents[labelled]
            class_fired += torch.bincount(flat, minlength=classes * d)
            class_sum += torch.bincount(flat, weights=values[labelled].double(), minlength=classes * d)
            # per-image scores: max over the image's tokens, chunk by chunk of images
            n, offsets = len(labels), torch.from_numpy(np.array(shard["offsets"]))
            image_indices = torch.from_numpy(np.array(shard["indices"]))
            for begin in range(0, n, chunk):
                end = min(n, begin + chunk)
                lo, hi = int(offsets[begin * T]), int(offsets[end * T])
                scores = torch.full(((end - begin) * d,), -math.inf)
                bins = (image_of[lo:hi] - begin) * d + latents[lo:hi]
                scores.scatter_reduce_(0, bins, values[lo:hi], "amax")
                hit = (scores > 0).nonzero().squeeze(1)
                pair_images.append(image_indices[begin + hit // d])
                pair_latents.append(hit % d)
                pair_scores.append(scores[hit])
        hist = torch.zeros(d * HIST_BINS, dtype=torch.long)
        for shard in self._shards:  # second pass: histograms relative to each latent's max
            latents = torch.from_numpy(shard["latents"].astype(np.int64))
            values = torch.from_numpy(shard["values"].astype(np.float32))
            positive = values > 0
            latents, values = latents[positive], values[positive]
            bins = (values / vmax[latents] * HIST_BINS).ceil().long().clamp(1, HIST_BINS) - 1
            hist += torch.bincount(latents * HIST_BINS + bins, minlength=d * HIST_BINS)
        images = torch.cat(pair_images) if pair_images else torch.zeros(0, dtype=torch.long)
        latents = torch.cat(pair_latents) if pair_latents else torch.zeros(0, dtype=torch.long)
        scores = torch.cat(pair_scores) if pair_scores else torch.zeros(0)
        if len(images) > 1 and bool((images[1:] < images[:-1]).any()):  # DDP shards: image order first
            order = torch.sort(images, stable=True).indices
            images, latents, scores = images[order], latents[order], scores[order]
        # one stable sort: latent ascending, score descending (positive float32 bits order like the floats)
        key = (latents << 32) | (0x7FFFFFFF - scores.view(torch.int32).long())
        order = torch.sort(key, stable=True).indices
        per_latent = torch.bincount(latents, minlength=d)
        offsets = torch.zeros(d + 1, dtype=torch.long)
        torch.cumsum(per_latent, 0, out=offsets[1:])
        small = not len(images) or (int(images.min()) >= 0 and int(images.max()) <= torch.iinfo(torch.int32).max)
        images = images[order].to(torch.int32 if small else torch.long).contiguous()
        tensors = {
            "offsets": offsets, "images": images,
            "scores": scores[order].to(VALUE_DTYPES[self.metadata.get("values_dtype", "float32")]).contiguous(),
            "fired": fired, "image_count": per_latent, "total": total, "max": vmax,
            "class_fired": class_fired.view(classes, d).t().contiguous(),
            "class_sum": class_sum.view(classes, d).t().contiguous(),
            "class_tokens": class_tokens, "hist": hist.view(d, HIST_BINS),
        }
        self._index = {k: v.numpy() for k, v in tensors.items()}
        file = self.path / INDEX
        try:
            atomic_write(file, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT,
                                                                            "cache": self._cache_key()}))
        except OSError:
            return None
        return file
