"""``ImageDataModule``: the one LightningDataModule of ``mim`` (``--data.*`` on the command line)."""

from __future__ import annotations

import logging
import os
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Subset, get_worker_info

from mim.errors import ConfigError
from mim.data.datasets import (
    DATASETS,
    NATIVE_SIZE,
    STATS,
    STL10_SPLITS,
    TransformedDataset,
    build_dataset,
    download_dataset,
    first_per_class,
    stratified_fraction,
    targets_of,
)
from mim.data.resumable import ResumableSampler, SampleRNG, batches_done
from mim.data.transforms import (
    CROP_MODES,
    IMAGENET_CROP_PCT,
    INTERPOLATIONS,
    TimmAutoAugment,
    eval_transform,
    train_transform,
)

log = logging.getLogger(__name__)

#: ``img_size`` when neither the user nor an adopted encoder preprocessing sets it.
DEFAULT_IMG_SIZE = 32


def default_num_workers() -> int:
    """``min(4, max(1, cpu_count - 1))``: leaves one core to the training loop (1 on a 2-core machine)."""
    return min(4, max(1, (os.cpu_count() or 1) - 1))


def _seed_worker(worker_id: int) -> None:
    """Give each DataLoader worker its own albumentations random stream.

    albumentations 2.x keeps its generators inside the pipeline, so forked workers would all start
    from the same state and apply the same crops and flips; reseed from the worker's torch seed.
    """
    info = get_worker_info()
    ds = info.dataset if info is not None else None
    while isinstance(ds, Subset):
        ds = ds.dataset
    if isinstance(ds, TransformedDataset) and hasattr(ds.transform, "set_random_seed"):
        ds.transform.set_random_seed(torch.initial_seed() % 2**32)


class _SeededItems(Dataset):
    """Items ``(index, seed)`` of a :class:`TransformedDataset`: the augmentation draws from a
    :class:`~mim.data.resumable.SampleRNG` reseeded to ``seed`` first, so an image's crop and flip do not
    depend on the worker or rank that decodes it."""

    def __init__(self, dataset: TransformedDataset) -> None:
        self.dataset = dataset
        self._rng = SampleRNG()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> tuple:
        index, seed = item
        rng = self._rng.reseed(seed)
        self.dataset.transform.set_random_state(rng.numpy, rng.python)
        return self.dataset[index]


def _unwrap(ds: Dataset) -> tuple[Dataset, list[int]]:
    """``(base dataset, its indices)`` of a dataset or a (nested) ``Subset``."""
    indices = list(range(len(ds)))  # type: ignore[arg-type]
    while isinstance(ds, Subset):
        indices = [ds.indices[i] for i in indices]
        ds = ds.dataset
    return ds, indices


class ImageDataModule(L.LightningDataModule):
    """Image classification data for masked-image-model pretraining and evaluation.

    Batches are ``(imgs, labels)`` (``(imgs, labels, indices)`` with ``return_index``): ``imgs``
    (B, 3, img_size, img_size) float32, normalized per channel as ``(pixel / 255 - mean) / std``;
    ``labels`` (B,) int64 class indices (-1 for unlabeled STL10 images). Train batches use ``train_transform`` (MAE augmentation, He et al. 2021, Sec. A.1)
    and drop the last incomplete batch; val / test use the val split (CIFAR's and STL10's test set,
    ImageFolder's ``val`` folder) with the deterministic ``eval_transform``; predict serves
    ``predict_split``.

    Args:
        dataset: one of ``cifar10``, ``cifar100``, ``stl10``, ``imagefolder``, ``litdata`` (LitData
            shards ``<root>/{train,val}`` written by ``tools/to_litdata.py``, local or ``s3://``;
            streamed by :mod:`mim.data.litdata`, whose ``meta.json`` supplies mean / std / native
            size when those are left unset; no subsets, ``seed`` is its shuffle seed).
        root: data root; None: the ``MIM_DATA`` environment variable, else ``./data``. Where each
            dataset is looked for under it: datasets/README.md.
        img_size: model input side in pixels; None: an adopted encoder's (see below), else 32.
        batch_size: images per batch (per device).
        num_workers: DataLoader worker processes; None: ``min(4, max(1, cpu_count - 1))``.
        limit_per_class: keep only the first N train images of each class (dataset order).
        val_limit_per_class: the same for the val split.
        fraction: keep a stratified random fraction in (0, 1] of the train split (seeded by ``seed``);
            cannot be combined with ``limit_per_class``.
        download: let ``prepare_data`` download cifar10 / cifar100 / stl10 with torchvision into
            ``root`` when they are not there (needs network).
        skip_bad_images: ImageFolder trees: decode every file at setup and drop unreadable ones
            (a warning names them) instead of failing with ``BadImageError`` mid-epoch.
        crop_scale: area range of the train random resized crop (MAE: (0.2, 1.0)).
        auto_augment: timm AutoAugment config of the train split, e.g. ``rand-m9-mstd0.5-inc1`` (RandAugment, as
            MAE / BEiT fine-tuning; :class:`~mim.data.transforms.TimmAutoAugment`); None: none.
        reprob: random-erasing probability of the train split (MAE fine-tuning: 0.25); 0: none.
        eval_crop_pct: center-crop fraction of the eval transform; None: an adopted encoder's, else 1.0
            when the native image size equals ``img_size`` (CIFAR at 32 px), else 0.875 (ImageNet convention).
        mean, std: per-channel RGB normalization in [0, 1] units; None: an adopted encoder's, else the
            dataset's (CIFAR-10 (0.4914, 0.4822, 0.4465) / (0.2470, 0.2435, 0.2616), CIFAR-100 (0.5071,
            0.4865, 0.4409) / (0.2673, 0.2564, 0.2762), STL10 and imagefolder ImageNet's).
        interpolation: resampling filter of every resize (``bicubic``, ``bilinear``, ``nearest``,
            ``area``, ``lanczos``); None: an adopted encoder's, else ``bicubic``.
        eval_crop_mode: ``center`` (resize the shorter side, center-crop) or ``squash`` (resize both
            sides, center-crop); None: an adopted encoder's when it is one of these, else ``center``.
        train_split: stl10 only: ``train`` (default), ``test``, ``unlabeled`` or ``train+unlabeled``.
        seed: seed of the ``fraction`` subset and, plus the run's ``seed_everything``, of the training order
            and of each image's augmentation (:mod:`mim.data.resumable`).
        train_augment: ``False`` gives the train split the deterministic eval transform (feature
            caching, extraction of train features).
        return_index: batches become ``(imgs, labels, indices)``, ``indices`` (B,) int64 positions of
            the images in their split (stable across subsets and workers).
        predict_split: the split ``predict_dataloader`` serves, ``"val"`` or ``"train"``.

    A pretrained encoder's own preprocessing (its timm ``pretrained_cfg``) fills the fields left None
    through :meth:`adopt_data_config` (the evaluation modules call it in their ``setup``);
    :attr:`preprocessing` gives the values in effect.

    Raises:
        mim.errors.ConfigError (a ValueError): invalid arguments (in ``__init__``).
        DatasetNotFoundError: in ``setup`` when the data is not found (message lists the paths
            looked at), or in ``prepare_data`` when a download fails.
        BadImageError: while iterating, for an unreadable file (unless ``skip_bad_images``).
    """

    def __init__(
        self,
        dataset: str = "cifar10",
        root: str | None = None,
        img_size: int | None = None,
        batch_size: int = 128,
        num_workers: int | None = None,
        limit_per_class: int | None = None,
        val_limit_per_class: int | None = None,
        fraction: float | None = None,
        download: bool = False,
        skip_bad_images: bool = False,
        crop_scale: tuple[float, float] = (0.2, 1.0),
        auto_augment: str | None = None,
        reprob: float = 0.0,
        eval_crop_pct: float | None = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        train_split: str | None = None,
        seed: int = 0,
        train_augment: bool = True,
        return_index: bool = False,
        predict_split: str = "val",
        interpolation: str | None = None,
        eval_crop_mode: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if dataset not in DATASETS:
            raise ConfigError(f"Unknown dataset {dataset!r}; valid: {', '.join(DATASETS)}")
        if img_size is not None and img_size < 1:
            raise ConfigError(f"img_size must be >= 1 or null (auto), got {img_size}")
        if interpolation is not None and interpolation not in INTERPOLATIONS:
            raise ConfigError(
                f"interpolation must be one of {', '.join(INTERPOLATIONS)} or null, got {interpolation!r}"
            )
        if eval_crop_mode is not None and eval_crop_mode not in CROP_MODES:
            raise ConfigError(
                f"eval_crop_mode must be one of {', '.join(CROP_MODES)} or null, got {eval_crop_mode!r}"
            )
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers is not None and num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0 or null (auto), got {num_workers}")
        for arg, value in (("limit_per_class", limit_per_class), ("val_limit_per_class", val_limit_per_class)):
            if value is not None and value < 1:
                raise ConfigError(f"{arg} must be >= 1 or null (all), got {value}")
        if fraction is not None and not 0.0 < fraction <= 1.0:
            raise ConfigError(f"fraction must be in (0, 1] or null (all), got {fraction}")
        if fraction is not None and limit_per_class is not None:
            raise ConfigError("Set either fraction or limit_per_class, not both")
        if len(crop_scale) != 2 or not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
            raise ConfigError(f"crop_scale must be (min, max) with 0 < min <= max <= 1, got {crop_scale}")
        if not 0.0 <= reprob <= 1.0:
            raise ConfigError(f"reprob (random erasing) must be in [0, 1], got {reprob}. Fix: e.g. 0.25, or 0 for none.")
        if auto_augment:
            try:
                TimmAutoAugment(auto_augment, 32, (0.5, 0.5, 0.5))
            except ValueError as err:
                raise ConfigError(f"{err}. Fix: set --data.init_args.auto_augment to such a string or null.") from err
        if eval_crop_pct is not None and not 0.0 < eval_crop_pct <= 1.0:
            raise ConfigError(f"eval_crop_pct must be in (0, 1] or null (auto), got {eval_crop_pct}")
        for arg, value in (("mean", mean), ("std", std)):
            if value is not None and len(value) != 3:
                raise ConfigError(f"{arg} must have 3 values (R, G, B), got {value}")
        if std is not None and min(std) <= 0:
            raise ConfigError(f"std values must be > 0, got {std}")
        if train_split is not None and (dataset != "stl10" or train_split not in STL10_SPLITS):
            raise ConfigError(
                f"train_split is for stl10 only, one of {', '.join(STL10_SPLITS)}; got {train_split!r} for {dataset!r}"
            )
        if predict_split not in ("train", "val"):
            raise ConfigError(f"predict_split must be 'train' or 'val', got {predict_split!r}")
        if download and dataset == "imagefolder":
            raise ConfigError("download is for cifar10, cifar100 and stl10; imagefolder data must be placed by hand")
        if dataset == "litdata":  # needs the litdata package (the [stream] extra)
            from mim.data.litdata import check_args

            check_args(dict(self.hparams))

        self.dataset = dataset
        self.root = root
        self.batch_size = batch_size
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.adopted: dict[str, Any] = {}  # preprocessing taken from an encoder (adopt_data_config)
        self._train_seed: int | None = None
        self._resolve_preprocessing()
        self.num_classes: int | None = None  # known after setup()
        self.skipped_images: list[str] = []  # files dropped by skip_bad_images
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.train_sampler: ResumableSampler | None = None
        self._resume: dict[str, int] | None = None  # sampler position from a checkpoint (load_state_dict)

    def _resolve_preprocessing(self) -> None:
        """Set ``img_size``, ``mean``, ``std``, ``interpolation``, ``eval_crop_pct``, ``eval_crop_mode``:
        the user's value, else the adopted one, else the default."""
        hp, adopted = self.hparams, self.adopted

        def pick(name: str, default: Any) -> Any:
            return hp.get(name) if hp.get(name) is not None else adopted.get(name, default)

        self.img_size = int(pick("img_size", DEFAULT_IMG_SIZE))
        self.mean = tuple(pick("mean", STATS[self.dataset][0]))
        self.std = tuple(pick("std", STATS[self.dataset][1]))
        self.interpolation = str(pick("interpolation", "bicubic"))
        self.eval_crop_mode = str(pick("eval_crop_mode", "center"))
        auto_crop = 1.0 if NATIVE_SIZE[self.dataset] == self.img_size else IMAGENET_CROP_PCT
        self.eval_crop_pct = float(pick("eval_crop_pct", auto_crop))

    def adopt_data_config(self, cfg: dict[str, Any]) -> None:
        """Take an encoder's preprocessing for every field the user left unset (None), then rebuild the
        transforms of the splits already set up. Call it before the dataloaders are built.

        Args:
            cfg: a timm data config (:func:`mim.eval.encoders.encoder_data_config`, the keys of
                ``timm.data.resolve_data_config``): ``input_size`` (C, H, W) with H == W, ``mean``, ``std``,
                ``interpolation``, ``crop_pct``, ``crop_mode`` (each optional). Fills ``img_size``, ``mean``,
                ``std``, ``interpolation``, ``eval_crop_pct`` and ``eval_crop_mode`` (a ``crop_mode`` other
                than ``center`` / ``squash`` is logged and replaced by ``center``).

        Raises:
            ConfigError: a non-square ``input_size`` while ``img_size`` is unset, or an interpolation these
                pipelines do not have.
        """
        adopted: dict[str, Any] = {}
        if cfg.get("input_size") is not None:
            height, width = (int(v) for v in cfg["input_size"][-2:])
            if height != width and self.hparams.get("img_size") is None:
                raise ConfigError(
                    f"the encoder takes {height}x{width} images but ImageDataModule makes square ones. "
                    "Fix: set --data.init_args.img_size (and an encoder img_size in model_kwargs to match)."
                )
            adopted["img_size"] = height
        for key, name in (("mean", "mean"), ("std", "std"), ("crop_pct", "eval_crop_pct")):
            if cfg.get(key) is not None:
                adopted[name] = tuple(float(v) for v in cfg[key]) if key != "crop_pct" else float(cfg[key])
        if cfg.get("interpolation") is not None:
            if cfg["interpolation"] not in INTERPOLATIONS:
                raise ConfigError(
                    f"the encoder's interpolation {cfg['interpolation']!r} is not one of {', '.join(INTERPOLATIONS)}. "
                    "Fix: set --data.init_args.interpolation."
                )
            adopted["interpolation"] = cfg["interpolation"]
        if cfg.get("crop_mode") is not None:
            if cfg["crop_mode"] in CROP_MODES:
                adopted["eval_crop_mode"] = cfg["crop_mode"]
            elif self.hparams.get("eval_crop_mode") is None:
                log.warning("The encoder's crop_mode %r is not supported; the eval transform crops the center.",
                            cfg["crop_mode"])
        self.adopted = {k: v for k, v in adopted.items() if self.hparams.get(k) is None}
        self._resolve_preprocessing()
        self._rebuild_transforms()

    @property
    def preprocessing(self) -> dict[str, Any]:
        """The preprocessing in effect (JSON-friendly): ``img_size`` (px), ``mean`` / ``std`` ([0, 1] units),
        ``interpolation``, ``eval_crop_pct``, ``eval_crop_mode``, and ``adopted``: the fields taken from an
        encoder's data config (:meth:`adopt_data_config`), the others being the user's or the defaults."""
        return {
            "img_size": self.img_size,
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in self.std],
            "interpolation": self.interpolation,
            "eval_crop_pct": self.eval_crop_pct,
            "eval_crop_mode": self.eval_crop_mode,
            "adopted": sorted(self.adopted),
        }

    def _eval_transform(self) -> Any:
        return eval_transform(self.img_size, self.mean, self.std, self.eval_crop_pct, self.interpolation,
                              self.eval_crop_mode)

    def _train_transform(self) -> Any:
        if not self.hparams.train_augment:
            return self._eval_transform()
        tf = train_transform(self.img_size, self.mean, self.std, scale=tuple(self.hparams.crop_scale),
                             interpolation=self.interpolation, auto_augment=self.hparams.auto_augment,
                             reprob=self.hparams.reprob)
        if self._train_seed is None:
            self._train_seed = int(torch.randint(2**31, ()))  # follows seed_everything in the main process
        tf.set_random_seed(self._train_seed)
        return tf

    def _rebuild_transforms(self) -> None:
        """Give the splits already set up the transforms of the current preprocessing fields."""
        for ds, make in ((self.train_set, self._train_transform), (self.val_set, self._eval_transform)):
            if ds is None:
                continue
            base, _ = _unwrap(ds)
            if isinstance(base, TransformedDataset):
                base.transform = make()
            elif hasattr(base, "image_transform"):  # LitData's ImageStreamingDataset
                base.image_transform = make()

    def prepare_data(self) -> None:
        """Download (only when ``download=True`` and the data is not already under root)."""
        if self.hparams.download:
            download_dataset(self.dataset, self.root)

    def setup(self, stage: str | None = None) -> None:
        """Find and open the splits: train for ``fit`` (or None), val for every stage.

        Raises:
            DatasetNotFoundError: the data is missing or its folder tree unusable.
        """
        hp = self.hparams
        wants_train = stage in (None, "fit") or (stage == "predict" and hp.predict_split == "train")
        if self.dataset == "litdata":  # streamed shards <root>/{train,val} (mim/data/litdata.py)
            from mim.data.litdata import setup_litdata

            setup_litdata(self, wants_train)  # may set mean / std / eval_crop_pct from the shards' meta.json
            if self.adopted or (self.interpolation, self.eval_crop_mode) != ("bicubic", "center"):
                self._resolve_adopted_litdata()
            return None
        if self.train_set is None and wants_train:
            raw = self._raw("train")
            targets = targets_of(raw)
            if hp.limit_per_class is not None:
                keep = first_per_class(targets, hp.limit_per_class)
            elif hp.fraction is not None and hp.fraction < 1.0:
                keep = stratified_fraction(targets, hp.fraction, hp.seed)
            else:
                keep = None
            ds = TransformedDataset(raw, self._train_transform(), return_index=hp.return_index)
            self.train_set = ds if keep is None else Subset(ds, keep)
        if self.val_set is None:
            raw = self._raw("val")
            ds = TransformedDataset(raw, self._eval_transform(), return_index=hp.return_index)
            limit = hp.val_limit_per_class
            self.val_set = ds if limit is None else Subset(ds, first_per_class(targets_of(raw), limit))

    def _resolve_adopted_litdata(self) -> None:
        """After ``setup_litdata``: adopted fields win over the shards' ``meta.json`` statistics (which only
        fill what the user left unset), and the transforms get the interpolation and crop mode."""
        for name in ("mean", "std", "eval_crop_pct"):
            if name in self.adopted:
                setattr(self, name, self.adopted[name])
        self._rebuild_transforms()

    def _raw(self, split: str) -> Dataset:
        hp = self.hparams
        raw = build_dataset(
            self.dataset, split, self.root, train_split=hp.train_split, skip_bad_images=hp.skip_bad_images
        )
        self.skipped_images += getattr(raw, "skipped", [])
        self.num_classes = len(raw.classes)  # type: ignore[attr-defined]
        return raw

    def _loader(self, ds: Dataset | None, train: bool, sampler: ResumableSampler | None = None) -> DataLoader:
        if ds is None:
            raise RuntimeError("ImageDataModule.setup() must run before asking for a dataloader")
        if self.dataset == "litdata":  # LitData's StreamingDataLoader: it shards ranks/workers and resumes
            from mim.data.litdata import streaming_loader

            return streaming_loader(ds, self.batch_size, self.num_workers, train)
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            shuffle=train and sampler is None,
            sampler=sampler,
            drop_last=train,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=_seed_worker,
        )

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _sampled_loader(self, ds: Dataset | None, train: bool) -> DataLoader:
        """A loader over ``ds`` drawn by a :class:`ResumableSampler` (exact resume, no DDP padding)."""
        if ds is None or self.dataset == "litdata":
            return self._loader(ds, train)
        base, indices = _unwrap(ds)
        rank, world = self._world()
        seeded = train and self.hparams.train_augment and isinstance(base, TransformedDataset)
        seed = self.hparams.seed + int(os.environ.get("PL_GLOBAL_SEED", 0))
        sampler = ResumableSampler(indices, self.batch_size, shuffle=train, drop_last=train, seed=seed, rank=rank,
                                   world_size=world, with_seeds=seeded)
        if train:
            self.train_sampler = sampler
            if self._resume:
                sampler.load_state_dict(self._resume)
                self._resume = None
        return self._loader(_SeededItems(base) if seeded else base, train, sampler)

    def train_dataloader(self) -> DataLoader:
        """Shuffled train batches ``(imgs, labels)``; the last incomplete global batch is dropped.

        Under DDP rank ``r`` gets the ``r``-th ``batch_size`` slice of each global batch
        (:class:`~mim.data.resumable.ResumableSampler`), so the images of one step over all ranks are those
        of one process with ``world_size`` times the batch; order and augmentation depend only on
        ``seed`` (+ the run's ``seed_everything``), the epoch and the image.
        """
        return self._sampled_loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        """Val split in order, eval transform, last batch kept; under DDP rank ``r`` takes images
        ``r, r + world_size, ...`` (no image repeated to even out the ranks)."""
        return self._sampled_loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        """Same as ``val_dataloader`` (the val split is the datasets' test set)."""
        return self.val_dataloader()

    def state_dict(self) -> dict[str, Any]:
        """The training sampler's position (``{"train_sampler": {"epoch", "batches"}}``) for the checkpoint."""
        if self.train_sampler is None or self.trainer is None or self.trainer.state.fn != "fit":
            return {}
        per_epoch = len(self.train_sampler) // self.batch_size
        return {"train_sampler": batches_done(self.trainer, per_epoch)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the training order where ``state_dict`` (from :meth:`state_dict`) left it."""
        self._resume = state_dict.get("train_sampler")

    def predict_dataloader(self) -> DataLoader:
        """The ``predict_split`` (default val) in dataset order, last batch kept (for extraction; with
        ``predict_split="train"`` the train images get the train pipeline unless ``train_augment=False``)."""
        return self._loader(self.train_set if self.hparams.predict_split == "train" else self.val_set, train=False)
