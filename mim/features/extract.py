"""Frozen-feature extraction with ``mim predict``: a LightningModule that runs a frozen
encoder up to a chosen block, and a ``BasePredictionWriter`` that writes its outputs into a feature store
(:mod:`mim.features.store`), after checking that the folder is writable and its disk has room.

``mim predict -c configs/extract/vit_tiny_cifar10.yaml --model.init_args.encoder runs/.../encoder.safetensors``
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from mim.errors import ConfigError
from mim.eval.encoders import load_encoder_from
from mim.export import OutputError, check_writable
from mim.features.store import (
    FORMAT_VERSION,
    TOKEN_KINDS,
    ShardWriter,
    check_existing,
    clear_store,
    write_metadata,
)

#: Output dtypes of the stored features.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: Datamodule hparams that do not change which images are extracted or how they look.
_NOT_DATA = ("dataset", "predict_split", "img_size", "root", "batch_size", "num_workers", "download", "return_index")


class FeatureExtractor(L.LightningModule):
    """A frozen timm encoder (eval mode, no gradients) whose ``predict_step`` returns token features.

    Block choice (``layer``): the encoder runs timm's ``forward_intermediates`` up to block ``layer`` only
    (``stop_early``). ViT: ``layer`` indexes ``encoder.blocks``; the final norm is applied only when
    ``layer`` is the last block, so the default equals ``forward_features`` (the representation probes
    and MAE read) while intermediate blocks give the raw residual stream (what SAE work usually reads;
    the final norm belongs to the last block's output). ConvNets: ``layer`` indexes
    ``encoder.feature_info`` (stem and stages); spatial positions of the stage map are the patch tokens,
    ``mean`` is global average pooling, and there is no ``cls``.

    Args:
        encoder: source for :func:`mim.eval.encoders.load_encoder_from` (``encoder.safetensors``, a mim
            ``.ckpt``, or ``"timm:<name>"`` for random init).
        model_kwargs: timm kwargs for ``"timm:"`` sources (e.g. ``{"img_size": 32, "patch_size": 4}``).
        layer: block (ViT) or stage (ConvNet) index; negative counts from the end (-1: last).
        tokens: any of ``"cls"`` (B, d), ``"mean"`` (B, d; mean of the patch tokens, prefix tokens
            excluded) and ``"patch"`` (B, L, d; L = h * w patch grid, prefix tokens excluded).
        dtype: stored dtype, ``float32``, ``float16`` or ``bfloat16`` (the encoder runs in the trainer's
            precision; features are cast after pooling).

    Raises:
        ConfigError: unknown token kind / dtype, ``layer`` out of range, ``cls`` for a model without a
            class token, a model without ``forward_intermediates``; in ``predict_step``, batches
            without image indices.
        EncoderLoadError: an unusable encoder file (from ``load_encoder_from``).
    """

    def __init__(
        self,
        encoder: str,
        model_kwargs: dict[str, Any] | None = None,
        layer: int = -1,
        tokens: Sequence[str] = ("cls", "mean"),
        dtype: str = "float32",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        unknown = [t for t in tokens if t not in TOKEN_KINDS]
        if unknown or not tokens:
            raise ConfigError(f"tokens must be a non-empty list of {list(TOKEN_KINDS)}, got {list(tokens)}.")
        if dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}.")
        model, self.encoder_info = load_encoder_from(encoder, model_kwargs)
        if not hasattr(model, "forward_intermediates") or not getattr(model, "feature_info", None):
            raise ConfigError(
                f"{self.encoder_info['model_name']} has no timm forward_intermediates / feature_info, so its "
                "blocks cannot be chosen. Fix: use a timm ViT or ConvNet that has them."
            )
        self.encoder = model.requires_grad_(False).eval()
        self.num_layers = len(model.feature_info)
        if not -self.num_layers <= layer < self.num_layers:
            raise ConfigError(
                f"layer {layer} is out of range for {self.encoder_info['model_name']}, which has {self.num_layers} "
                f"blocks/stages. Fix: use a layer in [{-self.num_layers}, {self.num_layers - 1}] (-1: last)."
            )
        self.layer = layer % self.num_layers
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
        if "cls" in tokens and self.num_prefix_tokens < 1:
            raise ConfigError(
                f"{self.encoder_info['model_name']} has no class token, so tokens cannot include 'cls'. "
                "Fix: use tokens [mean] or [mean, patch]."
            )
        self.tokens = [t for t in TOKEN_KINDS if t in tokens]  # canonical order: the same store for any order
        self.out_dtype = DTYPES[dtype]
        self.d_model = int(model.feature_info[self.layer]["num_chs"])
        self.patch_grid: tuple[int, int] | None = None  # known after the first batch

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Switch the module's mode; the frozen encoder always stays in eval mode."""
        super().train(mode)
        self.encoder.eval()
        return self

    @torch.no_grad()
    def forward(self, imgs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Token features of ``imgs`` (B, 3, H, W) at block ``layer``, in the encoder's dtype and device:
        ``{"cls": (B, d), "mean": (B, d), "patch": (B, L, d)}`` (the requested kinds). Sets ``patch_grid``."""
        extra = {"return_prefix_tokens": True} if self.num_prefix_tokens else {}
        out = self.encoder.forward_intermediates(
            imgs,
            indices=[self.layer],
            norm=self.layer == self.num_layers - 1,
            stop_early=True,
            intermediates_only=True,
            **extra,
        )[0]
        spatial, prefix = out if self.num_prefix_tokens else (out, None)  # (B, d, h, w), (B, P, d)
        self.patch_grid = (int(spatial.shape[-2]), int(spatial.shape[-1]))
        feats = {}
        if "cls" in self.tokens:
            feats["cls"] = prefix[:, 0]
        if "mean" in self.tokens:
            feats["mean"] = spatial.mean(dim=(2, 3))
        if "patch" in self.tokens:
            feats["patch"] = spatial.flatten(2).transpose(1, 2)
        return feats

    def predict_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """``(imgs, labels, indices)`` -> CPU tensors ``{token kind: features in dtype, "labels": (B,) int64,
        "indices": (B,) int64}``.

        Raises:
            ConfigError: the batch has no image indices (datamodule without ``return_index``).
        """
        if not isinstance(batch, (tuple, list)) or len(batch) < 3:
            raise ConfigError(
                "Feature extraction needs the image index of every row, but the batches are (imgs, labels). "
                "Fix: set --data.init_args.return_index true."
            )
        imgs, labels, indices = batch[:3]
        rows = {k: v.to(self.out_dtype).cpu() for k, v in self(imgs).items()}
        return {**rows, "labels": labels.long().cpu(), "indices": indices.long().cpu()}

    def tokens_per_image(self, img_size: int | None = None) -> int:
        """Feature vectors stored per image: 1 per ``cls`` / ``mean``, ``L`` for ``patch``. ``L`` is the
        patch grid once a batch ran, else ``ceil(img_size / reduction)^2`` with the layer's stride
        (timm ``feature_info``), else the ViT's own grid."""
        count = sum(1 for t in self.tokens if t != "patch")
        if "patch" in self.tokens:
            if self.patch_grid is not None:
                count += self.patch_grid[0] * self.patch_grid[1]
            elif img_size is not None:
                count += math.ceil(img_size / self.encoder.feature_info[self.layer]["reduction"]) ** 2
            else:
                grid = getattr(getattr(self.encoder, "patch_embed", None), "grid_size", (0, 0))
                count += int(grid[0]) * int(grid[1])
        return count

    def bytes_per_image(self, img_size: int | None = None) -> int:
        """Bytes one image takes in the store: ``tokens_per_image x d_model x itemsize`` of ``dtype``,
        plus its label and index (2 x int64)."""
        itemsize = torch.empty((), dtype=self.out_dtype).element_size()
        return self.tokens_per_image(img_size) * self.d_model * itemsize + 16

    def store_identity(self) -> dict[str, Any]:
        """The metadata fields of this extractor that a reused store must match (see ``IDENTITY_KEYS``)."""
        info = self.encoder_info
        return {
            "encoder": {k: info[k] for k in ("model_name", "model_kwargs", "weights_sha256")},
            "layer": self.layer,
            "tokens": self.tokens,
            "dtype": self.hparams.dtype,
        }

    def store_details(self) -> dict[str, Any]:
        """Informational / derived metadata: encoder source, block count, ``d_model``, ``patch_grid``."""
        return {
            "encoder_source": self.encoder_info["source"],
            "num_layers": self.num_layers,
            "d_model": self.d_model,
            "patch_grid": list(self.patch_grid) if self.patch_grid else None,
        }


def data_identity(trainer: L.Trainer) -> dict[str, Any]:
    """Metadata fields from the datamodule: ``dataset``, ``split`` (its ``predict_split``), ``img_size``,
    and ``data`` (the hparams that choose or transform the images, plus ``limit_predict_batches``).

    Raises:
        ConfigError: train features with random augmentation (``predict_split train`` with ``train_augment``).
    """
    dm = trainer.datamodule
    hp = dict(getattr(dm, "hparams", None) or {})
    if hp.get("predict_split") == "train" and hp.get("train_augment"):
        raise ConfigError(
            "Extracting the train split with train_augment true would store features of randomly augmented "
            "images. Fix: set --data.init_args.train_augment false."
        )
    data = {k: v for k, v in hp.items() if k not in _NOT_DATA and not k.startswith("_")}  # "_class_path" of the CLI
    data["limit_predict_batches"] = trainer.limit_predict_batches
    dataset = getattr(dm, "dataset", None)
    return {
        "dataset": dataset if isinstance(dataset, str) else None,
        "split": hp.get("predict_split"),
        "img_size": getattr(dm, "img_size", None),
        "data": data,
    }


def predict_images(trainer: L.Trainer) -> int | None:
    """How many images ``trainer.predict`` will see: the datamodule's predict split, cut by
    ``limit_predict_batches`` (per rank, as Lightning applies it); ``None`` without a datamodule."""
    dm = trainer.datamodule
    if dm is None:
        return None
    loader = dm.predict_dataloader()
    loader = loader[0] if isinstance(loader, (list, tuple)) else loader
    try:
        images, batches, batch_size = len(loader.dataset), len(loader), loader.batch_size or 1
    except TypeError:  # an iterable dataset without a length
        return None
    limit = trainer.limit_predict_batches
    if isinstance(limit, int):
        batches = min(batches, limit * trainer.world_size)
    elif limit is not None:
        batches = int(batches * limit)
    return min(images, batches * batch_size)


#: Free space kept on top of the store's estimate: 5 % plus this many bytes.
SPACE_MARGIN_BYTES = 64 * 2**20


def check_free_space(path: Path, need: int, detail: str) -> None:
    """Raise :class:`~mim.export.OutputError` unless the disk of ``path`` (its first existing parent) has
    ``need * 1.05 + 64 MiB`` bytes free; shards of an old store at ``path`` (about to be cleared) count
    as free. ``detail`` explains ``need`` in the message."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if path.is_dir():
        free += sum(f.stat().st_size for f in path.glob("rank*-*.safetensors"))
    wanted = int(need * 1.05) + SPACE_MARGIN_BYTES
    if free < wanted:
        raise OutputError(
            f"the feature store {path} needs about {need / 1e9:.2f} GB ({detail}) but its disk has "
            f"{free / 1e9:.2f} GB free (with a margin of 5 % + 64 MiB, {wanted / 1e9:.2f} GB are wanted). Fix: "
            "free space, put the store on a bigger disk (--trainer.callbacks.init_args.path DIR), store fewer "
            "tokens (--model.init_args.tokens [cls, mean]), half the bytes (--model.init_args.dtype bfloat16), "
            "or fewer images (--trainer.limit_predict_batches N)."
        )


def _all_gather_object(obj: Any, world_size: int) -> list[Any]:
    if world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


class FeatureStoreWriter(BasePredictionWriter):
    """Writes ``FeatureExtractor`` predictions into a feature store at ``path`` (one metadata, shards per rank).

    In ``setup`` it compares the store's metadata with this run's (:func:`mim.features.store.check_existing`):
    a complete store with the same settings is reused and the predict loop skipped
    (``trainer.limit_predict_batches = 0``, restored in ``teardown``; no encoder work); a store with
    other settings is refused unless ``overwrite``; an incomplete one (killed mid-write) is cleared by
    rank 0 and written anew. Every rank buffers its rows into shards of ``shard_size`` rows; after the
    loop, rank 0 gathers the shard lists (``torch.distributed.all_gather_object``) and writes
    ``metadata.json`` last.

    Args:
        path: store folder.
        shard_size: rows (images) per shard; each rank holds up to one shard in memory
            (patch tokens: ``shard_size * L * d * itemsize`` bytes).
        overwrite: replace a store with other settings (or a broken one) instead of refusing it.

    Attributes:
        reused: whether the last ``setup`` found a complete store to reuse.

    Raises:
        FeatureStoreMismatchError: in ``setup``, a complete store with other settings (fields named).
        OutputError: in ``setup``, before any encoding, an unwritable folder or a disk with less free space
            than the estimated store (:meth:`check_output`).
        ConfigError: ``shard_size < 1``; a module without ``store_identity`` / ``store_details``.
    """

    def __init__(self, path: str, shard_size: int = 65536, overwrite: bool = False) -> None:
        super().__init__(write_interval="batch")
        if shard_size < 1:
            raise ConfigError(f"shard_size must be >= 1 rows, got {shard_size}.")
        self.path, self.shard_size, self.overwrite = Path(path), shard_size, overwrite
        self.reused = False
        self._identity: dict[str, Any] | None = None
        self._writer: ShardWriter | None = None
        self._saved_limit: int | float | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "predict":
            return
        if not hasattr(pl_module, "store_identity") or not hasattr(pl_module, "store_details"):
            raise ConfigError(
                f"FeatureStoreWriter needs a model with store_identity() / store_details(), got "
                f"{type(pl_module).__name__}. Fix: use mim.features.FeatureExtractor as the model."
            )
        self._identity = {
            "format_version": FORMAT_VERSION,
            **pl_module.store_identity(),
            **data_identity(trainer),
            "shard_size": self.shard_size,
        }
        self.reused = check_existing(self.path, self._identity, self.overwrite)
        trainer.strategy.barrier("feature_store_checked")
        if self.reused:
            self._saved_limit = trainer.limit_predict_batches
            trainer.limit_predict_batches = 0
            rank_zero_info(f"Feature store {self.path} is complete with the same settings: reused, nothing extracted.")
            return
        self.check_output(trainer, pl_module)
        if trainer.is_global_zero:
            clear_store(self.path)
        trainer.strategy.barrier("feature_store_cleared")
        self._writer = ShardWriter(self.path, trainer.global_rank, self.shard_size, trainer.world_size > 1)

    def check_output(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Before any image is encoded: the store folder must be writable (created, a temporary file
        tried) and its disk must hold the estimated store (:func:`predict_images` x
        ``pl_module.bytes_per_image``, see :func:`check_free_space`). Every rank checks the same.

        Raises:
            OutputError: an unwritable folder, or too little free space (both sizes in GB).
        """
        fix = "pass a folder you can write: --trainer.callbacks.init_args.path DIR."
        check_writable(self.path, "the feature store folder", fix)
        images = predict_images(trainer)
        if images is None or not hasattr(pl_module, "bytes_per_image"):
            return
        img_size = getattr(trainer.datamodule, "img_size", None)
        detail = (
            f"{images} images x {pl_module.tokens_per_image(img_size)} tokens x d_model {pl_module.d_model} in "
            f"{pl_module.hparams.dtype}"
        )
        check_free_space(self.path, images * pl_module.bytes_per_image(img_size), detail)

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: dict[str, torch.Tensor],
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        assert self._writer is not None, "setup('predict') runs first"
        self._writer.add(prediction)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Flush the last shard of every rank, then (rank 0) write ``metadata.json``."""
        if self._writer is None or self._identity is None:  # reused store: nothing was written
            return
        details = pl_module.store_details()
        gathered = _all_gather_object((self._writer.close(), details["patch_grid"]), trainer.world_size)
        if trainer.is_global_zero:
            shards = [s for part, _ in gathered for s in part]
            grid = next((g for _, g in gathered if g is not None), None)
            count = sum(s["rows"] for s in shards)
            write_metadata(
                self.path,
                {
                    **self._identity,
                    **details,
                    "patch_grid": grid,
                    "count": count,
                    "world_size": trainer.world_size,
                    "order": "written" if trainer.world_size == 1 else "index",
                    "shards": shards,
                },
            )
            rank_zero_info(f"Wrote feature store {self.path}: {count} images in {len(shards)} shards.")
        trainer.strategy.barrier("feature_store_written")
        self._writer = None

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._saved_limit is not None:
            trainer.limit_predict_batches = self._saved_limit
            self._saved_limit = None


__all__ = [
    "DTYPES",
    "FeatureExtractor",
    "FeatureStoreWriter",
    "check_free_space",
    "data_identity",
    "predict_images",
]
