"""Encode a feature store with a trained SAE under ``mim predict``: the model and the data of the latent cache.

:class:`StoreImagesDataModule` reads a feature store image by image (all tokens of an image together, in image
order); :class:`SAEEncoder` encodes each batch with a saved SAE and returns its code in CSR form, which
:class:`mim.sae.cache.LatentCacheWriter` writes into a latent cache::

    mim predict -c configs/sae/latent_cache_vit_tiny_cifar10.yaml \\
        --model.init_args.sae runs/sae/.../sae.safetensors --data.init_args.store runs/features/vit_tiny_cifar10_val
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from mim.errors import ConfigError
from mim.eval.encoders import weights_sha256
from mim.features.store import IDENTITY_KEYS, TOKEN_KINDS, FeatureBatch, FeatureStore, FeatureStoreError
from mim.sae.cache import coalesce
from mim.sae.data import check_d_model
from mim.sae.models import load_sae

# Lightning cannot know the sample indices of an IterableDataset's batches; the batches carry their image indices.
warnings.filterwarnings("ignore", message="Couldn't infer the batch indices fetched from your dataloader")


class StoreImages(IterableDataset):
    """One rank's batches of whole images of a store, in image order: ``FeatureBatch`` with ``features``
    (B, T, d) float32 for patch (or register) tokens, (B, d) for one token per image, ``labels`` and ``indices``
    (B,) int64. Every token is kept (also those a high-norm filter flagged).

    Rank ``r`` of ``W`` takes the store's batches ``r, r + W, ...`` (every image once over all ranks; each rank's
    image indices increase). ``len()`` is this rank's batch count.
    """

    def __init__(self, store: FeatureStore, tokens: str, batch_size: int, check_finite: bool = True,
                 rank: int = 0, world_size: int = 1) -> None:
        self.store, self.tokens, self.batch_size, self.check_finite = store, tokens, batch_size, check_finite
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        batches = -(-len(self.store) // self.batch_size)
        return len(range(self.rank, batches, self.world_size))

    def __iter__(self) -> Iterator[FeatureBatch]:
        stream = self.store.batches(self.batch_size, self.tokens, shuffle=False, check_finite=self.check_finite,
                                    offset=self.rank, stride=self.world_size)
        for batch in stream:
            yield FeatureBatch(batch.features.to(torch.float32, copy=True), batch.labels.clone(), batch.indices.clone())


class StoreImagesDataModule(L.LightningDataModule):
    """A feature store's images for ``mim predict`` (all tokens of an image in one row, image order).

    Unlike :class:`mim.sae.data.FeatureStoreDataModule` (token rows, shuffled, for training), a row here is one
    image, so a prediction can keep an image's tokens together (what a latent cache stores).

    Args:
        store: feature store folder.
        tokens: a token kind of the store (:data:`mim.features.store.TOKEN_KINDS`): ``"patch"`` / ``"register"``
            give rows (T, d), ``"cls"`` / ``"pooled"`` / ``"mean"`` rows (d,).
        batch_size: images per batch.
        check_finite: raise :class:`FeatureStoreError` naming the shard and row of NaN / Inf features.

    Attributes (after :meth:`setup`): ``store`` (the open :class:`FeatureStore`).

    Raises:
        ConfigError: (at construction) an unknown token kind or ``batch_size < 1``.
        FeatureStoreError: (in :meth:`setup`) an unreadable store, or one without ``tokens``.
    """

    def __init__(self, store: str, tokens: str = "patch", batch_size: int = 64, check_finite: bool = True) -> None:
        super().__init__()
        if tokens not in TOKEN_KINDS:
            raise ConfigError(f"tokens must be one of {list(TOKEN_KINDS)}, got {tokens!r}. "
                              "Fix: set --data.init_args.tokens.")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}. Fix: set --data.init_args.batch_size.")
        self.save_hyperparameters()
        self.store_path, self.tokens, self.batch_size, self.check_finite = store, tokens, batch_size, check_finite
        self.store: FeatureStore | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.store is None:
            store = FeatureStore(self.store_path)
            if self.tokens not in store.tokens:
                raise FeatureStoreError(
                    f"Feature store {store.path} holds {store.tokens} tokens, not {self.tokens!r}. Fix: set "
                    "--data.init_args.tokens to one of those."
                )
            self.store = store

    def store_identity(self) -> dict[str, Any]:
        """What names the store's content: its path, image count and identity fields (encoder, layer, data...)."""
        assert self.store is not None, "setup runs first"
        meta = self.store.metadata
        return {"path": str(self.store.path), "count": len(self.store), **{k: meta.get(k) for k in IDENTITY_KEYS}}

    def predict_dataloader(self) -> DataLoader:
        self.setup()
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        dataset = StoreImages(self.store, self.tokens, self.batch_size, self.check_finite, rank, world)
        return DataLoader(dataset, batch_size=None, num_workers=0)


class SAEEncoder(L.LightningModule):
    """Encode feature-store images with a saved SAE (``mim predict``); each prediction is the batch's code in
    CSR form (:func:`mim.sae.cache.coalesce`: per token its active latents once, sorted, repeated matching-pursuit
    slots summed).

    Args:
        sae: a saved SAE (``.safetensors`` or ``.json`` of :func:`mim.sae.save_sae`).

    Raises:
        UserError: an SAE file that cannot be loaded (:func:`mim.sae.load_sae`); in ``setup``, a store whose
            ``d_model`` differs from the SAE's (``FeatureStoreError``).
    """

    def __init__(self, sae: str) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.sae_file = Path(sae).with_suffix(".safetensors")
        self.sae = load_sae(sae).eval()
        self._sha256: str | None = None

    def setup(self, stage: str) -> None:
        """Check the SAE's ``d_model`` against the datamodule's store (set up before the module by Lightning)."""
        store = getattr(self.trainer.datamodule, "store", None) if self._trainer is not None else None
        if store is not None:
            check_d_model(store, self.sae.d_model, f"the SAE {self.sae_file}",
                          fix="use the store of the encoder and layer the SAE was trained on (--data.init_args.store)")

    def sae_identity(self) -> dict[str, Any]:
        """What names the SAE: its class, constructor arguments and ``weights_sha256`` (the hash of its state dict,
        :func:`mim.eval.encoders.weights_sha256`: the same weights under another path are the same SAE)."""
        if self._sha256 is None:
            self._sha256 = weights_sha256(self.sae)
        return {"class": type(self.sae).__name__, "init_args": self.sae.init_args(), "weights_sha256": self._sha256}

    @torch.inference_mode()
    def predict_step(self, batch: FeatureBatch, batch_idx: int) -> dict[str, torch.Tensor]:
        """``FeatureBatch`` of B images (features (B, T, d) or (B, d)) -> CPU tensors ``counts`` (B * T,) int64
        active latents per token, ``latents`` (E,) int64, ``values`` (E,) float32 (token-major, ids ascending),
        ``indices`` and ``labels`` (B,) int64."""
        features, labels, indices = batch
        x = features.reshape(-1, features.shape[-1])
        counts, latents, values = coalesce(self.sae.encode(x), self.sae.d_sae)
        return {"counts": counts.cpu(), "latents": latents.cpu(), "values": values.float().cpu(),
                "indices": indices.long().cpu(), "labels": labels.long().cpu()}


__all__ = ["SAEEncoder", "StoreImages", "StoreImagesDataModule"]
