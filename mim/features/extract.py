"""Frozen-feature extraction with ``mim predict``: a LightningModule that runs a frozen
encoder once up to the deepest chosen block and returns the tokens of every chosen block, and a
``BasePredictionWriter`` that writes them into one feature store per block (:mod:`mim.features.store`),
after checking that the folders are writable and their disk has room for all of them.

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
from mim.eval.encoders import adopt_preprocessing, load_encoder_from
from mim.export import OutputError, check_writable
from mim.features.store import (
    FORMAT_VERSION,
    HIGH_NORM,
    TOKEN_KINDS,
    ShardWriter,
    as_json,
    check_existing,
    clear_store,
    layer_folder,
    write_metadata,
)

#: Output dtypes of the stored features.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: Datamodule hparams that do not change which images are extracted or how they look.
_NOT_DATA = ("dataset", "predict_split", "img_size", "root", "batch_size", "num_workers", "download", "return_index")


class FeatureExtractor(L.LightningModule):
    """A frozen timm encoder (eval mode, no gradients) whose ``predict_step`` returns token features of one or
    several blocks, all from one forward pass.

    Blocks (``layers``): one timm ``forward_intermediates(indices=layers, stop_early=True,
    intermediates_only=...)`` call runs the encoder up to the deepest requested block only. ViT: a layer
    indexes ``encoder.blocks``; the last block's tokens are the model's final features (after the final norm,
    exactly ``forward_features``: the representation probes and MAE read), every other block gives the raw
    residual stream (what SAE work usually reads; the final norm belongs to the last block's output).
    ConvNets: a layer indexes ``encoder.feature_info`` (stem and stages); the spatial positions of the stage
    map are the patch tokens, ``mean`` is global average pooling, and there is no ``cls``.

    Token layout (from the model: ``num_prefix_tokens``, ``num_reg_tokens``): a ViT's sequence is
    ``[cls, registers..., patches...]``. ``cls`` is the class token (B, d); ``register`` the R register tokens
    (B, R, d) of a model with registers (DINOv2 reg4: 1 cls + 4 registers; Darcet et al. 2024, "Vision
    Transformers Need Registers", arXiv 2309.16588); ``patch`` (B, L, d) and ``mean`` (B, d) use the patch
    tokens only (prefix tokens excluded). ``pooled`` (B, d) is the model's own pooled pre-logits output,
    ``encoder.forward_head(final_features, pre_logits=True)`` (cls token + ``fc_norm``, average pool, or the
    attention pool of a model without a class token such as SigLIP); it is stored with the last block only.

    High-norm filter (``high_norm_factor`` = f): per layer and per image, a patch token whose L2 norm exceeds
    ``f x`` the median L2 norm of that image's patch tokens at that layer (``torch.median``: the lower middle
    value for an even count) is flagged: the high-norm artefact tokens of large ViTs (Darcet et al. 2024,
    Sec. 2, a few % of the tokens, separated there by a fixed norm cutoff for one model; a factor of the median
    carries over across models and layers). The median is taken per image, not per batch, so the flags do not
    depend on the batch size or the DDP split. The store keeps every token and
    adds a ``high_norm`` (B, L) bool tensor next to ``patch``; its metadata counts the flagged tokens
    (``high_norm_tokens``). The SAE data module leaves flagged tokens out of training
    (:class:`mim.sae.data.FeatureStoreDataModule` ``skip_high_norm``); ``mean`` still averages all of them.

    Args:
        encoder: source for :func:`mim.eval.encoders.load_encoder_from` (``encoder.safetensors``, a mim
            ``.ckpt``, ``"pretrained:<name>.<tag>"`` for timm's public weights, or ``"timm:<name>"`` for random
            init).
        model_kwargs: timm kwargs for ``"timm:"`` / ``"pretrained:"`` sources (e.g. ``{"img_size": 32,
            "patch_size": 4}``).
        layers: one block (ViT) or stage (ConvNet) index, or a list of them (extracted in one pass, one store
            per layer); negative counts from the end (-1: last). Sorted, duplicates dropped.
        tokens: any of ``"cls"`` (B, d), ``"register"`` (B, R, d), ``"pooled"`` (B, d), ``"mean"`` (B, d) and
            ``"patch"`` (B, L, d; L = h * w patch grid or stage map).
        dtype: stored dtype, ``float32``, ``float16`` or ``bfloat16`` (the encoder runs in the trainer's
            precision; features are cast after pooling; readers upcast, see :mod:`mim.features.store`).
        high_norm_factor: flag patch tokens above this factor x the image's median patch-token norm (> 1,
            e.g. 4); None: no filter.
        pretrained_file: a local ``.safetensors`` weights file for a ``"pretrained:<name>"`` source (offline;
            see :func:`mim.eval.encoders.load_encoder_from`).

    Preprocessing: a ``"pretrained:"`` encoder brings its own (timm ``pretrained_cfg``: size, mean / std,
    interpolation, crop); :meth:`adopt_preprocessing` hands it to the datamodule for every field the user left
    unset, before any image is read, and each store's metadata records the datamodule's effective
    ``preprocessing`` (part of the store's identity: other preprocessing, other features).

    Raises:
        ConfigError: unknown token kind / dtype, a layer out of range, ``cls`` for a model without a class
            token (fix: ``pooled``), ``register`` for a model without registers, ``pooled`` without the last
            block among the layers, a layer left with no token kind, ``high_norm_factor <= 1`` or without
            ``patch``, a model without ``forward_intermediates``; in ``predict_step``, batches without image
            indices.
        EncoderLoadError: an unusable encoder file (from ``load_encoder_from``).
    """

    def __init__(
        self,
        encoder: str,
        model_kwargs: dict[str, Any] | None = None,
        layers: int | list[int] = -1,
        tokens: Sequence[str] = ("cls", "mean"),
        dtype: str = "float32",
        high_norm_factor: float | None = None,
        pretrained_file: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        unknown = [t for t in tokens if t not in TOKEN_KINDS]
        if unknown or not tokens:
            raise ConfigError(f"tokens must be a non-empty list of {list(TOKEN_KINDS)}, got {list(tokens)}.")
        if dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}.")
        if high_norm_factor is not None and (high_norm_factor <= 1 or "patch" not in tokens):
            raise ConfigError(
                f"high_norm_factor {high_norm_factor} with tokens {list(tokens)}: the filter flags patch tokens above "
                "factor x their image's median norm, so it needs a factor > 1 and patch tokens. Fix: set "
                "--model.init_args.high_norm_factor 4.0 and include patch in --model.init_args.tokens."
            )
        model, self.encoder_info = load_encoder_from(encoder, model_kwargs, pretrained_file=pretrained_file)
        name = self.encoder_info["model_name"]
        if not hasattr(model, "forward_intermediates") or not getattr(model, "feature_info", None):
            raise ConfigError(
                f"{name} has no timm forward_intermediates / feature_info, so its "
                "blocks cannot be chosen. Fix: use a timm ViT or ConvNet that has them."
            )
        self.encoder = model.requires_grad_(False).eval()
        self.num_layers = len(model.feature_info)
        requested = [layers] if isinstance(layers, int) else list(layers)
        bad = [layer for layer in requested if not -self.num_layers <= layer < self.num_layers]
        if bad or not requested:
            raise ConfigError(
                f"layers {bad or requested} out of range for {name}, which has {self.num_layers} blocks/stages. "
                f"Fix: use layers in [{-self.num_layers}, {self.num_layers - 1}] (-1: last)."
            )
        self.layers = sorted({layer % self.num_layers for layer in requested})
        self.last_layer = self.num_layers - 1
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
        self.num_registers = int(getattr(model, "num_reg_tokens", 0) or 0)
        self.has_cls = self.num_prefix_tokens - self.num_registers >= 1  # cls (and e.g. distillation) tokens first
        self._check_layout(tokens, name)
        self.tokens = [t for t in TOKEN_KINDS if t in tokens]  # canonical order: the same store for any order
        #: token kinds stored per layer: ``pooled`` only with the last block
        self.layer_tokens = {
            layer: [t for t in self.tokens if t != "pooled" or layer == self.last_layer] for layer in self.layers
        }
        empty = [layer for layer, kinds in self.layer_tokens.items() if not kinds]
        if empty:
            raise ConfigError(
                f"tokens {self.tokens} with layers {self.layers}: layers {empty} would store nothing (pooled is the "
                "model's output, stored with the last block only). Fix: add mean or patch to --model.init_args.tokens."
            )
        self.out_dtype = DTYPES[dtype]
        self.high_norm_factor = None if high_norm_factor is None else float(high_norm_factor)
        #: feature width per layer
        self.d_models = {layer: int(model.feature_info[layer]["num_chs"]) for layer in self.layers}
        #: patch grid (h, w) per layer, known after the first batch
        self.patch_grids: dict[int, tuple[int, int]] = {}
        self._adopted_for: int | None = None  # id of the trainer whose datamodule got the preprocessing

    def adopt_preprocessing(self, trainer: L.Trainer | None) -> None:
        """Hand a ``"pretrained:"`` encoder's preprocessing to ``trainer.datamodule``
        (:func:`mim.eval.encoders.adopt_preprocessing`), once per trainer. :class:`FeatureStoreWriter` calls it
        in its ``setup`` (Lightning sets callbacks up before the module), so the store's size estimate and
        metadata see the adopted image size; :meth:`setup` calls it for runs without the writer."""
        if trainer is None or self._adopted_for == id(trainer):
            return
        adopt_preprocessing(trainer, self.encoder_info)
        self._adopted_for = id(trainer)

    def setup(self, stage: str) -> None:
        """Adopt a pretrained encoder's preprocessing (:meth:`adopt_preprocessing`) before the loaders exist."""
        self.adopt_preprocessing(self._trainer)

    def _check_layout(self, tokens: Sequence[str], name: str) -> None:
        """Refuse token kinds the model's layout does not have (see the class docstring)."""
        if "cls" in tokens and not self.has_cls:
            raise ConfigError(
                f"{name} has no class token, so tokens cannot include 'cls'. Fix: use tokens [pooled] (the model's "
                "own pooled output, e.g. the attention pool of SigLIP or a ConvNet's global pool; needs the last "
                "block in layers), or tokens [mean] or [mean, patch]."
            )
        if "register" in tokens and not self.num_registers:
            raise ConfigError(
                f"{name} has no register tokens, so tokens cannot include 'register'. Fix: drop register, or use a "
                "model with registers (e.g. vit_small_patch14_reg4_dinov2)."
            )
        if "pooled" in tokens:
            if self.last_layer not in self.layers:
                raise ConfigError(
                    f"tokens include 'pooled' (the model's pooled output after its last block) but layers "
                    f"{self.layers} do not include the last block {self.last_layer}. Fix: add -1 to "
                    "--model.init_args.layers, or drop pooled."
                )
            width = int(getattr(self.encoder, "head_hidden_size", self.encoder.num_features))
            last = int(self.encoder.feature_info[-1]["num_chs"])
            if width != last:
                raise ConfigError(
                    f"{name}'s pooled output has width {width}, its last block {last}; a store holds one width. "
                    "Fix: extract pooled in a run of its own or drop it."
                )

    @property
    def d_model(self) -> int:
        """Feature width of the extracted layers (they must share it; else see ``d_models``).

        Raises:
            ValueError: the layers have different widths (ConvNet stages).
        """
        widths = set(self.d_models.values())
        if len(widths) != 1:
            raise ValueError(f"layers {self.layers} have widths {self.d_models}; read d_models[layer].")
        return widths.pop()

    @property
    def patch_grid(self) -> tuple[int, int] | None:
        """Patch grid ``(h, w)`` shared by the layers once a batch ran (None before, or when they differ)."""
        grids = {self.patch_grids.get(layer) for layer in self.layers}
        return grids.pop() if len(grids) == 1 else None

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Switch the module's mode; the frozen encoder always stays in eval mode."""
        super().train(mode)
        self.encoder.eval()
        return self

    def _final_tokens(
        self, final: torch.Tensor, spatial: torch.Tensor, prefix: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The last block's ``(spatial (B, d, h, w), prefix (B, P, d))`` from the model's final features
        (``forward_features``: the final norm applied): a ViT's ``(B, P + h*w, d)`` sequence is split, a
        ConvNet's map of the same shape taken as is; any other form keeps the intermediate."""
        h, w = spatial.shape[-2:]
        if final.dim() == 3 and final.shape[1] == self.num_prefix_tokens + h * w:
            patches = final[:, self.num_prefix_tokens :]
            spatial = patches.reshape(len(final), h, w, -1).permute(0, 3, 1, 2)
            return spatial, final[:, : self.num_prefix_tokens] if self.num_prefix_tokens else None
        if final.shape == spatial.shape:
            return final, prefix
        return spatial, prefix

    @torch.no_grad()
    def forward(self, imgs: torch.Tensor) -> dict[int, dict[str, torch.Tensor]]:
        """Token features of ``imgs`` (B, 3, H, W) at every layer, in the encoder's dtype and device:
        ``{layer: {"cls": (B, d), "register": (B, R, d), "pooled": (B, d), "mean": (B, d), "patch": (B, L, d),
        "high_norm": (B, L) bool}}`` (the kinds stored with that layer; ``high_norm`` with the filter only).
        Sets ``patch_grids``."""
        need_final = self.last_layer in self.layers
        extra = {"return_prefix_tokens": True} if self.num_prefix_tokens else {}
        out = self.encoder.forward_intermediates(
            imgs, indices=self.layers, norm=False, stop_early=True, intermediates_only=not need_final, **extra
        )
        final, intermediates = out if need_final else (None, out)
        feats: dict[int, dict[str, torch.Tensor]] = {}
        for layer, inter in zip(self.layers, intermediates, strict=True):
            spatial, prefix = inter if self.num_prefix_tokens else (inter, None)  # (B, d, h, w), (B, P, d)
            if layer == self.last_layer:
                spatial, prefix = self._final_tokens(final, spatial, prefix)
            self.patch_grids[layer] = (int(spatial.shape[-2]), int(spatial.shape[-1]))
            patches = spatial.flatten(2).transpose(1, 2)  # (B, L, d)
            kinds = self.layer_tokens[layer]
            row: dict[str, torch.Tensor] = {}
            if "cls" in kinds:
                row["cls"] = prefix[:, 0]
            if "register" in kinds:
                row["register"] = prefix[:, self.num_prefix_tokens - self.num_registers :]
            if "pooled" in kinds:
                row["pooled"] = self.encoder.forward_head(final, pre_logits=True)
            if "mean" in kinds:
                row["mean"] = patches.mean(dim=1)
            if "patch" in kinds:
                row["patch"] = patches
            if self.high_norm_factor is not None:
                row[HIGH_NORM] = high_norm_tokens(patches, self.high_norm_factor)
            feats[layer] = row
        return feats

    def predict_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> dict[str, Any]:
        """``(imgs, labels, indices)`` -> CPU tensors ``{"labels": (B,) int64, "indices": (B,) int64,
        "layers": {layer: {token kind: features in dtype, "high_norm": (B, L) bool}}}``.

        Raises:
            ConfigError: the batch has no image indices (datamodule without ``return_index``).
        """
        if not isinstance(batch, (tuple, list)) or len(batch) < 3:
            raise ConfigError(
                "Feature extraction needs the image index of every row, but the batches are (imgs, labels). "
                "Fix: set --data.init_args.return_index true."
            )
        imgs, labels, indices = batch[:3]
        layers = {
            layer: {k: (v if k == HIGH_NORM else v.to(self.out_dtype)).cpu() for k, v in row.items()}
            for layer, row in self(imgs).items()
        }
        return {"labels": labels.long().cpu(), "indices": indices.long().cpu(), "layers": layers}

    def tokens_per_image(self, img_size: int | None = None, layer: int | None = None) -> int:
        """Feature vectors stored per image for ``layer`` (None: all layers together): 1 per ``cls`` /
        ``pooled`` / ``mean``, R for ``register``, ``L`` for ``patch``. ``L`` is the patch grid once a batch
        ran, else ``ceil(img_size / reduction)^2`` with the layer's stride (timm ``feature_info``), else the
        ViT's own grid."""
        if layer is None:
            return sum(self.tokens_per_image(img_size, layer) for layer in self.layers)
        kinds = self.layer_tokens[layer]
        count = sum(1 for t in kinds if t in ("cls", "pooled", "mean"))
        count += self.num_registers if "register" in kinds else 0
        return count + (self._grid_tokens(img_size, layer) if "patch" in kinds else 0)

    def _grid_tokens(self, img_size: int | None, layer: int) -> int:
        if layer in self.patch_grids:
            return self.patch_grids[layer][0] * self.patch_grids[layer][1]
        if img_size is not None:
            return math.ceil(img_size / self.encoder.feature_info[layer]["reduction"]) ** 2
        grid = getattr(getattr(self.encoder, "patch_embed", None), "grid_size", (0, 0))
        return int(grid[0]) * int(grid[1])

    def bytes_per_image(self, img_size: int | None = None, layer: int | None = None) -> int:
        """Bytes one image takes in the store of ``layer`` (None: in all layers' stores together):
        ``tokens_per_image x d_model x itemsize`` of ``dtype``, plus its label and index (2 x int64) and, with
        the high-norm filter, one byte per patch token."""
        if layer is None:
            return sum(self.bytes_per_image(img_size, layer) for layer in self.layers)
        itemsize = torch.empty((), dtype=self.out_dtype).element_size()
        flags = self._grid_tokens(img_size, layer) if self.high_norm_factor is not None else 0
        return self.tokens_per_image(img_size, layer) * self.d_models[layer] * itemsize + 16 + flags

    def store_identity(self, layer: int) -> dict[str, Any]:
        """The metadata fields of ``layer``'s store that a reused store must match (see ``IDENTITY_KEYS``)."""
        info = self.encoder_info
        return {
            "encoder": {k: info[k] for k in ("model_name", "model_kwargs", "weights_sha256")},
            "layer": layer,
            "tokens": self.layer_tokens[layer],
            "dtype": self.hparams.dtype,
            "high_norm_factor": self.high_norm_factor,
        }

    def store_details(self, layer: int) -> dict[str, Any]:
        """Informational / derived metadata of ``layer``'s store: encoder source (and ``pretrained_file``), block
        count, ``norm`` (the features are the model's final ones, final norm applied: the last block), the
        layers extracted together, ``d_model``, ``patch_grid``, ``num_registers``."""
        grid = self.patch_grids.get(layer)
        return {
            "encoder_source": self.encoder_info["source"],
            "pretrained_file": self.encoder_info.get("pretrained_file"),
            "num_layers": self.num_layers,
            "norm": layer == self.last_layer,
            "layers": self.layers,
            "d_model": self.d_models[layer],
            "patch_grid": list(grid) if grid else None,
            "num_registers": self.num_registers if "register" in self.layer_tokens[layer] else 0,
        }


def high_norm_tokens(patches: torch.Tensor, factor: float) -> torch.Tensor:
    """Flag high-norm artefact tokens (Darcet et al. 2024, arXiv 2309.16588, Sec. 2).

    Args:
        patches: (B, L, d) patch tokens of one layer.
        factor: a token is flagged when its L2 norm exceeds ``factor x`` the median L2 norm of its image's
            patch tokens (``torch.median`` over the L tokens: the lower middle value for even L).

    Returns:
        (B, L) bool, ``True`` = flagged. With ``factor > 1`` at most half of an image's tokens are flagged.
    """
    norms = patches.float().norm(dim=-1)  # (B, L)
    return norms > factor * norms.median(dim=1, keepdim=True).values


def data_identity(trainer: L.Trainer) -> dict[str, Any]:
    """Metadata fields from the datamodule: ``dataset``, ``split`` (its ``predict_split``), ``img_size``,
    ``data`` (the hparams that choose or transform the images, plus ``limit_predict_batches``), and
    ``preprocessing`` (the datamodule's effective resize / crop / mean / std, its ``preprocessing`` property;
    ``None`` for a datamodule without one).

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
    preprocessing = getattr(dm, "preprocessing", None)
    return {
        "dataset": dataset if isinstance(dataset, str) else None,
        "split": hp.get("predict_split"),
        "img_size": getattr(dm, "img_size", None),
        "data": data,
        "preprocessing": as_json(preprocessing) if preprocessing is not None else None,
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


def check_free_space(path: Path, need: int, detail: str, old_stores: Sequence[Path] | None = None) -> None:
    """Raise :class:`~mim.export.OutputError` unless the disk of ``path`` (its first existing parent) has
    ``need * 1.05 + 64 MiB`` bytes free; shards of the old stores at ``old_stores`` (default ``[path]``;
    about to be cleared) count as free. ``detail`` explains ``need`` in the message."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    for store in [path] if old_stores is None else old_stores:
        if store.is_dir():
            free += sum(f.stat().st_size for f in store.glob("rank*-*.safetensors"))
    wanted = int(need * 1.05) + SPACE_MARGIN_BYTES
    if free < wanted:
        raise OutputError(
            f"the feature store {path} needs about {need / 1e9:.2f} GB ({detail}) but its disk has "
            f"{free / 1e9:.2f} GB free (with a margin of 5 % + 64 MiB, {wanted / 1e9:.2f} GB are wanted). Fix: "
            "free space, put the store on a bigger disk (--trainer.callbacks.init_args.path DIR), store fewer "
            "tokens (--model.init_args.tokens [cls, mean]), half the bytes (--model.init_args.dtype bfloat16), "
            "or fewer images (--trainer.limit_predict_batches N)."
        )


def all_gather_object(obj: Any, world_size: int) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (``torch.distributed.all_gather_object``); ``[obj]`` without a
    process group. Every rank must call it."""
    if world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


class FeatureStoreWriter(BasePredictionWriter):
    """Writes ``FeatureExtractor`` predictions into feature stores: one store per extracted layer, at ``path``
    for a single layer, else at ``<path>/layer_<L>/`` (:func:`mim.features.store.layer_folder`); each is a
    complete store (one metadata, shards per rank) that :class:`~mim.features.FeatureStore` reads alone.

    In ``setup`` it compares every layer's store with this run's metadata
    (:func:`mim.features.store.check_existing`): a complete store with the same settings is reused (not
    written again); when all are, the predict loop is skipped (``trainer.limit_predict_batches = 0``, restored
    in ``teardown``; no encoder work). A store with other settings is refused unless ``overwrite``; an
    incomplete one (killed mid-write) is cleared by rank 0 and written anew. Before any image is encoded, the
    disk must hold every store to be written (:meth:`check_output`). Every rank buffers its rows into shards
    of ``shard_size`` rows per layer; after the loop, rank 0 gathers the shard lists
    (``torch.distributed.all_gather_object``) and writes each store's ``metadata.json`` last.

    Args:
        path: store folder (the parent of the per-layer folders when several layers are extracted).
        shard_size: rows (images) per shard; each rank holds up to one shard per layer in memory
            (patch tokens: ``shard_size * L * d * itemsize`` bytes per layer).
        overwrite: replace a store with other settings (or a broken one) instead of refusing it.

    Attributes:
        reused: whether the last ``setup`` found every layer's store complete (nothing extracted).
        store_paths: ``{layer: store folder}`` of the last ``setup``.

    Raises:
        FeatureStoreMismatchError: in ``setup``, a complete store with other settings (fields named).
        OutputError: in ``setup``, before any encoding, an unwritable folder or a disk with less free space
            than the estimated stores (:meth:`check_output`).
        ConfigError: ``shard_size < 1``; a module without ``store_identity`` / ``store_details``.
    """

    def __init__(self, path: str, shard_size: int = 65536, overwrite: bool = False) -> None:
        super().__init__(write_interval="batch")
        if shard_size < 1:
            raise ConfigError(f"shard_size must be >= 1 rows, got {shard_size}.")
        self.path, self.shard_size, self.overwrite = Path(path), shard_size, overwrite
        self.reused = False
        self.store_paths: dict[int, Path] = {}
        self._identities: dict[int, dict[str, Any]] = {}
        self._writers: dict[int, ShardWriter] = {}
        self._flagged: dict[int, int] = {}
        self._saved_limit: int | float | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "predict":
            return
        if not all(hasattr(pl_module, a) for a in ("store_identity", "store_details", "layers")):
            raise ConfigError(
                f"FeatureStoreWriter needs a model with layers, store_identity() and store_details(), got "
                f"{type(pl_module).__name__}. Fix: use mim.features.FeatureExtractor as the model."
            )
        if hasattr(pl_module, "adopt_preprocessing"):  # before the data identity and the size estimate
            pl_module.adopt_preprocessing(trainer)
        layers = list(pl_module.layers)
        self.store_paths = {layer: layer_folder(self.path, layer, len(layers) > 1) for layer in layers}
        data = data_identity(trainer)
        self._identities = {
            layer: {"format_version": FORMAT_VERSION, **pl_module.store_identity(layer), **data,
                    "shard_size": self.shard_size}
            for layer in layers
        }
        reused = {layer: check_existing(self.store_paths[layer], self._identities[layer], self.overwrite)
                  for layer in layers}
        trainer.strategy.barrier("feature_store_checked")
        todo = [layer for layer in layers if not reused[layer]]
        self.reused = not todo
        self._writers, self._flagged = {}, {}
        if self.reused:
            self._saved_limit = trainer.limit_predict_batches
            trainer.limit_predict_batches = 0
            where = ", ".join(str(p) for p in self.store_paths.values())
            rank_zero_info(f"Feature store(s) {where} complete with the same settings: reused, nothing extracted.")
            return
        for layer in layers:
            if reused[layer]:
                rank_zero_info(f"Feature store {self.store_paths[layer]} is complete with the same settings: reused.")
        self.check_output(trainer, pl_module, todo)
        if trainer.is_global_zero:
            for layer in todo:
                clear_store(self.store_paths[layer])
        trainer.strategy.barrier("feature_store_cleared")
        for layer in todo:
            self._writers[layer] = ShardWriter(
                self.store_paths[layer], trainer.global_rank, self.shard_size, trainer.world_size > 1
            )
            self._flagged[layer] = 0

    def check_output(self, trainer: L.Trainer, pl_module: L.LightningModule, layers: Sequence[int] | None = None) -> None:
        """Before any image is encoded: every store folder to write must be writable (created, a temporary
        file tried) and the disk must hold all of them together (:func:`predict_images` x
        ``pl_module.bytes_per_image`` summed over ``layers``, default all; see :func:`check_free_space`).
        Every rank checks the same.

        Raises:
            OutputError: an unwritable folder, or too little free space (both sizes in GB).
        """
        layers = list(self.store_paths) if layers is None else list(layers)
        fix = "pass a folder you can write: --trainer.callbacks.init_args.path DIR."
        for layer in layers:
            check_writable(self.store_paths[layer], "the feature store folder", fix)
        images = predict_images(trainer)
        if images is None or not hasattr(pl_module, "bytes_per_image"):
            return
        img_size = getattr(trainer.datamodule, "img_size", None)
        need = sum(images * pl_module.bytes_per_image(img_size, layer) for layer in layers)
        widths = sorted({pl_module.d_models[layer] for layer in layers})
        detail = (
            f"{images} images x {sum(pl_module.tokens_per_image(img_size, layer) for layer in layers)} tokens x "
            f"d_model {widths[0] if len(widths) == 1 else widths} in {pl_module.hparams.dtype}"
            + (f", {len(layers)} layers together" if len(layers) > 1 else "")
        )
        check_free_space(self.path, need, detail, [self.store_paths[layer] for layer in layers])

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: dict[str, Any],
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        assert self._identities, "setup('predict') runs first"
        shared = {"labels": prediction["labels"], "indices": prediction["indices"]}
        for layer, writer in self._writers.items():
            rows = prediction["layers"][layer]
            if HIGH_NORM in rows:
                self._flagged[layer] += int(rows[HIGH_NORM].sum())
            writer.add({**rows, **shared})

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Flush the last shard of every rank and layer, then (rank 0) write each store's ``metadata.json``."""
        if not self._writers:  # every store reused: nothing was written
            return
        mine = {
            layer: (writer.close(), pl_module.store_details(layer)["patch_grid"], self._flagged[layer])
            for layer, writer in self._writers.items()
        }
        gathered = all_gather_object(mine, trainer.world_size)
        if trainer.is_global_zero:
            for layer in self._writers:
                parts = [rank[layer] for rank in gathered]
                shards = [s for part, _, _ in parts for s in part]
                grid = next((g for _, g, _ in parts if g is not None), None)
                count = sum(s["rows"] for s in shards)
                flagged = sum(f for _, _, f in parts) if self._identities[layer]["high_norm_factor"] else None
                write_metadata(
                    self.store_paths[layer],
                    {
                        **self._identities[layer],
                        **pl_module.store_details(layer),
                        "patch_grid": grid,
                        "count": count,
                        "high_norm_tokens": flagged,
                        "world_size": trainer.world_size,
                        "order": "written" if trainer.world_size == 1 else "index",
                        "shards": shards,
                    },
                )
                note = f", {flagged} high-norm patch tokens flagged" if flagged is not None else ""
                rank_zero_info(
                    f"Wrote feature store {self.store_paths[layer]}: {count} images in {len(shards)} shards{note}."
                )
        trainer.strategy.barrier("feature_store_written")
        self._writers = {}

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """A failed or interrupted run: every rank's in-flight shard is finished and its writer stopped before the
        error propagates (:meth:`~mim.features.store.ShardWriter.abort`); no ``metadata.json`` is written, so the
        store reads as incomplete and the next run starts it again."""
        for writer in self._writers.values():
            writer.abort()
        self._writers = {}

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
    "high_norm_tokens",
    "predict_images",
]
