"""The feature store: frozen encoder features on disk, for probes and sparse autoencoders.

Layout of a store folder::

    metadata.json                 written LAST, atomically: its presence means "complete"
    rank0-00000.safetensors       shards of exactly ``shard_size`` rows (a rank's last one smaller)
    rank0-00001.safetensors
    rank1-00000.safetensors       under DDP every rank writes its own shards

Every shard holds one tensor per token kind, all of the store's ``dtype``: ``cls`` (n, d), ``register``
(n, R, d) (the R register tokens of a ViT with registers, Darcet et al. 2024, arXiv 2309.16588),
``pooled`` (n, d) (the model's own pooled pre-logits output), ``mean`` (n, d) (mean of the patch tokens) and
``patch`` (n, L, d) (L = h x w positions of the patch grid or of a ConvNet stage map), plus ``labels`` (n,)
int64 and ``indices`` (n,) int64, the image's index in its split. A store extracted with a high-norm filter
also holds ``high_norm`` (n, L) bool: the patch tokens flagged as high-norm artefacts (see
:class:`mim.features.FeatureExtractor`); ``metadata.json`` counts them (``high_norm_tokens``). Shards are
written to a temporary name in the folder and renamed (``os.replace``).

One store holds one layer. An extraction of several layers writes one complete store per layer into
``<path>/layer_<L>/`` (:func:`layer_folder`); with one layer the store is ``<path>`` itself.

Dtype: the store keeps the dtype it was written in (float32, float16 or bfloat16); :meth:`FeatureStore.read`
and :meth:`FeatureStore.batches` return it as stored (half the bytes to move for a 16-bit store) unless
asked for another ``dtype``; the SAE data module (:mod:`mim.sae.data`) converts every batch to float32.

Row order: a 1-process store reads back in the order it was written (``"order": "written"``). A DDP
store's ranks each hold an interleaved part of the dataset (Lightning's distributed sampler gives rank
``r`` positions ``r, r + W, ...``), so the reader merges the rank streams by image index
(``"order": "index"``; the writer checks that each rank's indices increase). For ``ImageDataModule``
both orders are the dataset order, so a DDP store reads back exactly like a 1-process store.

Reading is memory-mapped (``safetensors.safe_open``): only the shards being read are loaded.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mim.errors import UserError
from mim.export import atomic_write, read_format_json, write_format_json

FORMAT = "mim-feature-store"
FORMAT_VERSION = 1
METADATA = "metadata.json"
#: Token kinds a store can hold, in their canonical order.
TOKEN_KINDS = ("cls", "register", "pooled", "mean", "patch")
#: Token kinds with several tokens per image, (n, T, d): ``flatten`` makes one row per token.
MULTI_TOKEN_KINDS = ("register", "patch")
#: Shard tensor of the per-token high-norm flags, (n, L) bool, next to ``patch``.
HIGH_NORM = "high_norm"
#: Metadata fields that must match for a store to be reused: everything except what the run itself
#: produces (``count``, ``shards``, ``world_size``, ``order``) or what follows from these fields
#: (``d_model``, ``patch_grid``, ``num_layers``), and the informational ``encoder_source`` (the same
#: weights under another path are the same encoder: ``encoder.weights_sha256`` decides). ``preprocessing``
#: (the datamodule's effective resize / crop / normalisation) and ``high_norm_factor`` change the stored
#: features, so they count.
IDENTITY_KEYS = (
    "format_version", "encoder", "layer", "tokens", "dtype", "img_size", "dataset", "split", "data", "shard_size",
    "high_norm_factor", "preprocessing",
)
#: Identity fields that stores written by an older mim lack: compared only when the store has them (before
#: encoders could bring their preprocessing, ``img_size`` and ``data`` fixed it; no high-norm filter existed).
LATER_IDENTITY_KEYS = ("high_norm_factor", "preprocessing")
OVERWRITE_HINT = (
    "Fix: extract into another folder (--trainer.callbacks.init_args.path DIR), or replace this store with "
    "overwrite=True (--trainer.callbacks.init_args.overwrite true)."
)


class FeatureStoreError(UserError, ValueError):
    """A feature store that cannot be read: incomplete (no ``metadata.json``), a missing or truncated
    shard, or another format."""


class FeatureStoreMismatchError(FeatureStoreError):
    """A complete store at the target path was written with other settings (the message names the fields)."""


class FeatureBatch(NamedTuple):
    """Rows of a store: ``features`` (n, d) or (n, L, d) in the store's dtype, ``labels`` (n,) int64,
    ``indices`` (n,) int64 (image index in the split). Flattened patch batches repeat labels and indices
    once per token."""

    features: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor


def layer_folder(path: str | os.PathLike, layer: int, several: bool) -> Path:
    """The store folder of ``layer`` in an extraction into ``path``: ``<path>/layer_<layer>`` when the run
    extracts ``several`` layers, else ``path`` itself."""
    return Path(path) / f"layer_{layer}" if several else Path(path)


def shard_name(rank: int, number: int) -> str:
    """File name of shard ``number`` of ``rank``: ``rank{rank}-{number:05d}.safetensors``."""
    return f"rank{rank}-{number:05d}.safetensors"


def read_metadata(folder: str | os.PathLike) -> dict[str, Any] | None:
    """``metadata.json`` of ``folder`` as a dict, or ``None`` when there is none (absent or incomplete store).

    Raises:
        FeatureStoreError: the file is not JSON or not a feature store's metadata.
    """
    return read_format_json(Path(folder) / METADATA, FORMAT, FORMAT_VERSION, FeatureStoreError, "feature store", (
        "Fix: re-run the extraction with overwrite=True.",
        "Fix: use another folder.",
        "Fix: re-extract with this version of mim (overwrite=True).",
    ))


def as_json(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), so fresh and stored metadata compare equal."""
    return json.loads(json.dumps(value, default=str))


def identity_diff(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """The :data:`IDENTITY_KEYS` fields (one level of nesting) that differ, as ``"field: store X, this run Y"``
    (:data:`LATER_IDENTITY_KEYS` only when the stored metadata has them)."""
    diffs = []
    for key in IDENTITY_KEYS:
        if key in LATER_IDENTITY_KEYS and key not in stored:
            continue
        old, new = as_json(stored.get(key)), as_json(wanted.get(key))
        if isinstance(old, dict) and isinstance(new, dict):
            diffs += [
                f"{key}.{k}: store {old.get(k)!r}, this run {new.get(k)!r}"
                for k in sorted(set(old) | set(new))
                if old.get(k) != new.get(k)
            ]
        elif old != new:
            diffs.append(f"{key}: store {old!r}, this run {new!r}")
    return diffs


def check_existing(folder: str | os.PathLike, identity: Mapping[str, Any], overwrite: bool = False) -> bool:
    """Whether ``folder`` already holds a complete, readable store with this ``identity`` (then reuse it).

    Read-only. A folder without ``metadata.json`` (absent, or killed mid-write) gives ``False``.

    Raises:
        FeatureStoreMismatchError: a complete store with other settings (fields named), unless ``overwrite``.
        FeatureStoreError: a store with this identity but a missing / truncated shard, unless ``overwrite``.
    """
    try:
        stored = read_metadata(folder)
        if stored is None:
            return False
        diffs = identity_diff(stored, identity)
        if diffs:
            raise FeatureStoreMismatchError(
                f"Feature store {folder} was written with other settings ({'; '.join(diffs)}). {OVERWRITE_HINT}"
            )
        FeatureStore(folder)  # every shard present with its row count
        return True
    except FeatureStoreError:
        if overwrite:
            return False
        raise


def clear_store(folder: str | os.PathLike) -> None:
    """Remove a store's files from ``folder`` (metadata first, so the store is never complete while its
    shards go), including temporary files of a killed run. Other files are left alone."""
    folder = Path(folder)
    (folder / METADATA).unlink(missing_ok=True)
    for pattern in ("rank*-*.safetensors", f".{METADATA}.*.tmp", ".rank*-*.safetensors.*.tmp"):
        for path in folder.glob(pattern):
            path.unlink(missing_ok=True)


def write_metadata(folder: str | os.PathLike, metadata: Mapping[str, Any]) -> Path:
    """Write ``metadata.json`` atomically (call it only when every shard is complete); returns its path."""
    return write_format_json(Path(folder) / METADATA, FORMAT, FORMAT_VERSION, dict(metadata))


def _cat(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


class ShardWriter:
    """Buffers one rank's rows and writes them as shards of exactly ``shard_size`` rows.

    Shard files are written by one background thread (atomically: temporary name, then rename), so the disk
    write of one shard overlaps the encoding of the next batches; at most two shards are in memory. An error
    of a write is raised by the next :meth:`add` or by :meth:`close`, which waits for every write.

    Args:
        folder: the store folder (created).
        rank: this process's global rank (names the shards).
        shard_size: rows per shard (>= 1).
        require_ascending: check that image indices strictly increase across :meth:`add` calls (needed
            by the index-ordered read of a DDP store).
    """

    def __init__(self, folder: str | os.PathLike, rank: int, shard_size: int, require_ascending: bool = False) -> None:
        if shard_size < 1:
            raise FeatureStoreError(f"shard_size must be >= 1, got {shard_size}. Fix: set a positive shard_size.")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.rank, self.shard_size, self.require_ascending = rank, shard_size, require_ascending
        self.shards: list[dict[str, Any]] = []
        self._pending: list[dict[str, torch.Tensor]] = []
        self._rows = 0
        self._last_index: int | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mim-shard-writer")
        self._writing: Future | None = None

    def add(self, rows: Mapping[str, torch.Tensor]) -> None:
        """Buffer ``rows`` (``labels``, ``indices`` and token tensors, all with the same first dim) and write
        every full shard.

        Raises:
            FeatureStoreError: ``labels`` / ``indices`` missing, or (with ``require_ascending``) indices
                that do not increase.
        """
        if "labels" not in rows or "indices" not in rows:
            raise FeatureStoreError(
                "Feature rows need 'labels' and 'indices'. Fix: set --data.init_args.return_index true."
            )
        indices = rows["indices"]
        if self.require_ascending and len(indices):
            first_ok = self._last_index is None or int(indices[0]) > self._last_index
            if not first_ok or bool((indices[1:] <= indices[:-1]).any()):
                raise FeatureStoreError(
                    "DDP extraction needs every rank's images in increasing index order (the store is read back "
                    "merged by index). Fix: use a predict dataloader without shuffling, or extract on 1 device."
                )
            self._last_index = int(indices[-1])
        self._pending.append({k: v.detach().to("cpu") for k, v in rows.items()})
        self._rows += len(indices)
        while self._rows >= self.shard_size:
            self._write(self.shard_size)

    def _wait(self) -> None:
        """Wait for the shard being written (re-raising its error)."""
        if self._writing is not None:
            writing, self._writing = self._writing, None
            writing.result()

    def _write(self, n: int) -> None:
        rows = _cat(self._pending)
        shard = {k: v[:n].contiguous() for k, v in rows.items()}
        rest = {k: v[n:].clone() for k, v in rows.items()}
        name = shard_name(self.rank, len(self.shards))
        self._wait()  # one shard in flight: memory stays bounded, errors surface at the next shard
        self._writing = self._pool.submit(
            atomic_write, self.folder / name, lambda tmp: save_file(shard, tmp, metadata={"format": "pt"})
        )
        self.shards.append({"file": name, "rows": n, "rank": self.rank})
        self._rows -= n
        self._pending = [rest] if self._rows else []

    def abort(self) -> None:
        """After a failed run: wait for the shard being written (its own error, if any, is dropped in favour of
        the run's) and stop the writer thread, so the folder holds whole shards only and nothing is written into
        it afterwards. Rows still buffered are not written; without ``metadata.json`` the store stays incomplete."""
        with contextlib.suppress(Exception):  # the run's own error is the one to report
            self._wait()
        self._pool.shutdown(wait=True)
        self._pending, self._rows = [], 0

    def close(self) -> list[dict[str, Any]]:
        """Write the last (smaller) shard and wait for every write; returns this rank's shards
        ``[{"file", "rows", "rank"}, ...]``.

        Raises:
            OSError: a shard could not be written (disk full, folder removed).
        """
        try:
            if self._rows:
                self._write(self._rows)
            self._wait()
        finally:
            self._pool.shutdown(wait=True)
        return list(self.shards)


def _flatten(batch: FeatureBatch, keep: torch.Tensor | None = None) -> FeatureBatch:
    """``(n, T, d)`` rows -> ``(n * T, d)`` token rows, labels and indices repeated per token; with ``keep``
    ((n, T) bool) only the kept tokens, in the same order."""
    n, tokens = batch.features.shape[:2]
    flat = FeatureBatch(
        batch.features.reshape(n * tokens, -1),
        batch.labels.repeat_interleave(tokens),
        batch.indices.repeat_interleave(tokens),
    )
    if keep is None or bool(keep.all()):
        return flat
    return _take(flat, keep.reshape(-1).nonzero().squeeze(1))


def _concat(parts: list[FeatureBatch]) -> FeatureBatch:
    return parts[0] if len(parts) == 1 else FeatureBatch(*(torch.cat(p) for p in zip(*parts)))


def _take(batch: FeatureBatch, rows: slice | torch.Tensor) -> FeatureBatch:
    return FeatureBatch(*(t[rows] for t in batch))


def _rebatch(chunks: Iterable[FeatureBatch], batch_size: int, drop_last: bool) -> Iterator[FeatureBatch]:
    """Cut a stream of row chunks into batches of ``batch_size`` rows (the last one smaller unless ``drop_last``).

    Batches inside a chunk are views of it; only a batch spanning chunks is copied."""
    pending: list[FeatureBatch] = []  # rows carried over, fewer than batch_size
    count = 0
    for chunk in chunks:
        n, start = len(chunk.labels), 0
        if pending:
            need = batch_size - count
            if n < need:
                pending.append(chunk)
                count += n
                continue
            yield _concat([*pending, _take(chunk, slice(0, need))])
            start, pending, count = need, [], 0
        while n - start >= batch_size:
            yield _take(chunk, slice(start, start + batch_size))
            start += batch_size
        if start < n:
            pending, count = [_take(chunk, slice(start, None))], n - start
    if pending and not drop_last:
        yield _concat(pending)


def _select(
    pieces: Iterable[tuple[FeatureBatch, torch.Tensor | None]], batch_size: int, offset: int, stride: int, stop: float
) -> Iterator[FeatureBatch]:
    """The stream's rows at positions ``p < stop`` whose batch ``b = p // batch_size`` is ``offset + j * stride``.

    ``pieces`` are ``(rows, order)`` pairs: the stream goes on with ``rows[order]`` (``order`` None: ``rows``
    as they are). Only the kept rows are gathered, so a part of the stream costs a part of the copying."""
    start = 0
    for rows, order in pieces:
        n = len(rows.labels)
        if stride == 1 and offset * batch_size <= start and start + n <= stop:
            yield rows if order is None else _take(rows, order)
        else:
            positions = torch.arange(start, min(start + n, stop))
            batch = positions // batch_size
            keep = ((batch % stride == offset % stride) & (batch >= offset)).nonzero().squeeze(1)
            if len(keep):
                yield _take(rows, keep if order is None else order[keep])
        start += n
        if start >= stop:
            return


class FeatureStore:
    """Read a complete feature store (see the module docstring for the layout and row order).

    Args:
        path: the store folder.

    Attributes:
        metadata: the parsed ``metadata.json``.

    Raises:
        FeatureStoreError: no folder; no ``metadata.json`` (extraction unfinished or killed mid-write); a
            listed shard missing, truncated or with another row count (the first such shard is named).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise FeatureStoreError(f"Feature store {self.path} does not exist. Fix: run the extraction (mim predict).")
        meta = read_metadata(self.path)
        if meta is None:
            raise FeatureStoreError(
                f"Feature store {self.path} is incomplete: it has no {METADATA} (the extraction did not finish, "
                "e.g. it was killed mid-write). Fix: re-run the extraction; it starts the store over."
            )
        self.metadata = meta
        if sum(s["rows"] for s in meta["shards"]) != meta["count"]:
            raise FeatureStoreError(
                f"{self.path / METADATA} lists shards of {sum(s['rows'] for s in meta['shards'])} rows in all but a "
                f"count of {meta['count']}. Fix: re-extract with overwrite=True."
            )
        for shard in meta["shards"]:
            file = self.path / shard["file"]
            if not file.is_file():
                missing = sum(not (self.path / s["file"]).is_file() for s in meta["shards"])
                raise FeatureStoreError(
                    f"Feature store {self.path} is missing shard {shard['file']} ({missing} of {len(meta['shards'])} "
                    "listed shards missing). Fix: restore the file, or re-extract with overwrite=True."
                )
            try:
                with safe_open(file, framework="pt") as f:
                    rows = f.get_slice("labels").get_shape()[0]
                    kinds = set(f.keys())
            except (SafetensorError, OSError) as err:
                raise FeatureStoreError(
                    f"Feature store shard {file} is not readable ({err}). Fix: re-extract with overwrite=True."
                ) from err
            if rows != shard["rows"] or not set(meta["tokens"]) <= kinds:
                raise FeatureStoreError(
                    f"Feature store shard {file} has {rows} rows and tensors {sorted(kinds)}; metadata.json lists "
                    f"{shard['rows']} rows of {meta['tokens']}. Fix: re-extract with overwrite=True."
                )

    def __len__(self) -> int:
        """Number of images (rows) in the store."""
        return int(self.metadata["count"])

    @property
    def d_model(self) -> int:
        """Feature width ``d``."""
        return int(self.metadata["d_model"])

    @property
    def tokens(self) -> list[str]:
        """Token kinds the store holds (subset of :data:`TOKEN_KINDS`)."""
        return list(self.metadata["tokens"])

    @property
    def high_norm_tokens(self) -> int | None:
        """Patch tokens flagged by the extraction's high-norm filter (all images), or ``None`` when the store
        was extracted without it."""
        count = self.metadata.get("high_norm_tokens")
        return None if count is None else int(count)

    def tokens_per_image(self, tokens: str) -> int:
        """Tokens of kind ``tokens`` per image: ``h x w`` for patch, ``R`` for register, 1 otherwise."""
        if tokens == "patch":
            grid = self.metadata.get("patch_grid") or (0, 0)
            return int(grid[0]) * int(grid[1])
        if tokens == "register":
            return int(self.metadata.get("num_registers") or 0)
        return 1

    def read_high_norm(self) -> torch.Tensor:
        """The high-norm flags of every patch token, (N, L) bool in store order (``True``: flagged).

        Raises:
            FeatureStoreError: a store extracted without the high-norm filter.
        """
        if self.high_norm_tokens is None:
            raise FeatureStoreError(
                f"Feature store {self.path} was extracted without the high-norm filter, so it has no flags. Fix: "
                "re-extract with --model.init_args.high_norm_factor (e.g. 4.0)."
            )
        parts = list(self._ordered_chunks(HIGH_NORM))
        if not parts:
            return torch.zeros(0, self.tokens_per_image("patch"), dtype=torch.bool)
        return _concat(parts).features

    def _check_tokens(self, tokens: str) -> None:
        if tokens not in self.metadata["tokens"]:
            raise FeatureStoreError(
                f"Feature store {self.path} holds {self.metadata['tokens']} tokens, not {tokens!r}. "
                "Fix: ask for one of those, or re-extract with --model.init_args.tokens including it."
            )

    def _load(
        self, shard: Mapping[str, Any], tokens: str, check_finite: bool = False, flatten: bool = False,
        skip_high_norm: bool = False,
    ) -> FeatureBatch:
        """One shard's rows of ``tokens``; with ``flatten`` one row per token, without the flagged high-norm
        patch tokens when ``skip_high_norm`` (and the store has flags)."""
        with safe_open(self.path / shard["file"], framework="pt") as f:
            batch = FeatureBatch(f.get_tensor(tokens), f.get_tensor("labels"), f.get_tensor("indices"))
            flagged = f.get_tensor(HIGH_NORM) if skip_high_norm and HIGH_NORM in set(f.keys()) else None
        if check_finite and not bool(torch.isfinite(batch.features).all()):  # one pass; locate only on failure
            raise self._non_finite_error(shard["file"], batch)
        return _flatten(batch, None if flagged is None else ~flagged) if flatten else batch

    def _non_finite_error(self, file: str, batch: FeatureBatch) -> FeatureStoreError:
        """The error for a shard with NaN / Inf features, naming the first bad row (and patch token)."""
        bad = ~torch.isfinite(batch.features)
        bad_rows = bad.flatten(1).any(1).nonzero().squeeze(1)
        row = int(bad_rows[0])
        where = f"image index {int(batch.indices[row])}"
        if batch.features.dim() == 3:
            where += f", patch token {int(bad[row].any(-1).nonzero()[0])}"
        kind = "NaN" if bool(batch.features[row].isnan().any()) else "infinite"
        more = f" ({len(bad_rows)} of its {len(bad)} rows do)" if len(bad_rows) > 1 else ""
        return FeatureStoreError(
            f"Feature store {self.path}: shard {file} row {row} ({where}) holds {kind} features{more}. Fix: "
            "re-extract the store (overwrite=True) after fixing the encoder: a NaN usually means the encoder "
            "diverged or its weights hold NaN; an Inf an overflow of float16 / bfloat16 activations (extract with "
            "--trainer.precision 32-true and --model.init_args.dtype float32)."
        )

    def _ordered_chunks(
        self, tokens: str, check_finite: bool = False, flatten: bool = False, skip_high_norm: bool = False
    ) -> Iterator[FeatureBatch]:
        """Shards in store order, one loaded at a time per rank; a DDP store's rank streams merged by index
        (flattened rows repeat an image's index, so the merge sorts stably: an image's tokens keep their order)."""
        ranks = sorted({s["rank"] for s in self.metadata["shards"]})
        streams = [iter([s for s in self.metadata["shards"] if s["rank"] == r]) for r in ranks]
        load = partial(self._load, tokens=tokens, check_finite=check_finite, flatten=flatten,
                       skip_high_norm=skip_high_norm)
        if len(streams) == 1:
            yield from (load(s) for s in streams[0])
            return
        heads: dict[int, FeatureBatch] = {}
        while True:
            for r, stream in enumerate(streams):  # refill each exhausted buffer from its rank's next shard
                while r not in heads and stream is not None:
                    shard = next(stream, None)
                    if shard is None:
                        streams[r] = stream = None
                    elif shard["rows"]:
                        heads[r] = load(shard)
            if not heads:
                return
            # rows up to the smallest "last index" of the buffers: no later shard can hold a smaller index
            bound = min(int(b.indices[-1]) for b in heads.values())
            parts = []
            for r, b in list(heads.items()):
                cut = int(torch.searchsorted(b.indices, bound, right=True))
                parts.append(_take(b, slice(0, cut)))
                if cut == len(b.indices):
                    del heads[r]
                else:
                    heads[r] = _take(b, slice(cut, None))
            rows = _concat(parts)
            yield _take(rows, torch.argsort(rows.indices, stable=True))

    def read(self, tokens: str = "cls", check_finite: bool = False, dtype: torch.dtype | None = None) -> FeatureBatch:
        """The whole store for one token kind, in store order (for small stores and tests: loads everything).

        Args:
            tokens: one of :data:`TOKEN_KINDS` the store holds.
            check_finite: check every loaded shard for NaN / Inf features (one ``isfinite`` pass per shard).
            dtype: convert the features to this dtype (e.g. ``torch.float32`` for a 16-bit store); None: as stored.

        Returns:
            ``features`` (N, d) for cls / pooled / mean, (N, R, d) for register, (N, L, d) for patch, in the
            store's dtype (or ``dtype``); ``labels``, ``indices`` (N,) int64. Flagged high-norm tokens are
            included (see :meth:`read_high_norm`).

        Raises:
            FeatureStoreError: a token kind the store lacks; with ``check_finite``, NaN / Inf features (the
                message names the shard file, the row in it, the image index and, for patch tokens, the token).
        """
        self._check_tokens(tokens)
        parts = list(self._ordered_chunks(tokens, check_finite))
        if not parts:  # a store of 0 images
            per_image = self.tokens_per_image(tokens)
            shape = (0, per_image, self.d_model) if tokens in MULTI_TOKEN_KINDS else (0, self.d_model)
            empty = torch.empty(0, dtype=torch.long)
            features = torch.empty(shape, dtype=dtype or getattr(torch, self.metadata["dtype"]))
            return FeatureBatch(features, empty, empty.clone())
        batch = _concat(parts)
        return batch if dtype is None else batch._replace(features=batch.features.to(dtype))

    def batches(
        self,
        batch_size: int,
        tokens: str = "patch",
        shuffle: bool = True,
        seed: int = 0,
        buffer_shards: int = 4,
        flatten: bool = False,
        drop_last: bool = False,
        check_finite: bool = False,
        offset: int = 0,
        stride: int = 1,
        max_batches: int | None = None,
        skip_high_norm: bool = False,
        dtype: torch.dtype | None = None,
    ) -> Iterator[FeatureBatch]:
        """Stream batches without loading the whole store.

        With ``shuffle``, the shard order is permuted, then ``buffer_shards`` shards at a time are loaded
        and their rows permuted (a shuffle buffer; at most ``buffer_shards`` shards plus one batch are in
        memory). Without it, rows come in store order. Every row comes exactly once per call.

        Args:
            batch_size: rows per batch; with ``flatten``, tokens per batch.
            tokens: one of :data:`TOKEN_KINDS` the store holds.
            shuffle: shuffle as above; ``seed`` seeds it (pass the epoch for a new order each epoch).
            buffer_shards: shards per shuffle buffer (>= 1).
            flatten: patch (or register) tokens as one row per token, ``(batch_size, d)`` (what an SAE trains
                on), labels and indices repeated per token.
            drop_last: drop the last incomplete batch.
            check_finite: check every loaded shard for NaN / Inf features (one ``isfinite`` pass per shard).
            offset, stride, max_batches: yield only batches ``offset, offset + stride, ...`` among the first
                ``max_batches`` (None: all) of the stream, i.e. ``itertools.islice(stream, offset, max_batches,
                stride)``, but gathering only the rows of those batches (one part of a stream split across DDP
                ranks or dataloader workers).
            skip_high_norm: with ``flatten`` and patch tokens of a store extracted with the high-norm filter,
                leave out the flagged tokens (the stream then has ``count x L - high_norm_tokens`` rows).
            dtype: convert the features to this dtype (e.g. ``torch.float32``); None: the store's dtype.

        Yields:
            :class:`FeatureBatch` (features, labels, indices); tensors may be views of a shared buffer.

        Raises:
            FeatureStoreError: a token kind the store lacks, ``flatten`` without patch / register tokens, a non-positive
                ``batch_size`` / ``buffer_shards`` / ``stride``, ``offset < 0``; with
                ``check_finite``, NaN / Inf features (when their shard is loaded; see :meth:`read`).
        """
        self._check_tokens(tokens)
        if batch_size < 1 or buffer_shards < 1:
            raise FeatureStoreError(f"batch_size and buffer_shards must be >= 1, got {batch_size}, {buffer_shards}.")
        if offset < 0 or stride < 1:
            raise FeatureStoreError(f"Need offset >= 0 and stride >= 1, got offset {offset}, stride {stride}.")
        if flatten and tokens not in MULTI_TOKEN_KINDS:
            raise FeatureStoreError(
                f"flatten=True is for patch tokens (or register tokens), not {tokens!r}. Fix: drop flatten."
            )
        skip = skip_high_norm and flatten and tokens == "patch"
        pieces: Iterable[tuple[FeatureBatch, torch.Tensor | None]]
        if shuffle:
            pieces = self._shuffled_chunks(tokens, seed, buffer_shards, flatten, check_finite, skip)
        else:
            pieces = ((c, None) for c in self._ordered_chunks(tokens, check_finite, flatten, skip))
        stop = batch_size * max_batches if max_batches is not None else float("inf")
        stream = _rebatch(_select(pieces, batch_size, offset, stride, stop), batch_size, drop_last)
        return stream if dtype is None else (b._replace(features=b.features.to(dtype)) for b in stream)

    def _shuffled_chunks(
        self, tokens: str, seed: int, buffer_shards: int, flatten: bool, check_finite: bool, skip_high_norm: bool
    ) -> Iterator[tuple[FeatureBatch, torch.Tensor]]:
        """``(buffer, row permutation)`` per shuffle buffer; the permutation is applied by :func:`_select`."""
        generator = torch.Generator().manual_seed(seed)
        shards = self.metadata["shards"]
        order = torch.randperm(len(shards), generator=generator).tolist()
        for start in range(0, len(order), buffer_shards):
            buffer = _concat([
                self._load(shards[i], tokens, check_finite, flatten, skip_high_norm)
                for i in order[start : start + buffer_shards]
            ])
            yield buffer, torch.randperm(len(buffer.labels), generator=generator)


__all__ = [
    "HIGH_NORM",
    "IDENTITY_KEYS",
    "MULTI_TOKEN_KINDS",
    "TOKEN_KINDS",
    "FeatureBatch",
    "FeatureStore",
    "FeatureStoreError",
    "FeatureStoreMismatchError",
    "ShardWriter",
    "check_existing",
    "clear_store",
    "layer_folder",
    "read_metadata",
    "shard_name",
    "write_metadata",
]
