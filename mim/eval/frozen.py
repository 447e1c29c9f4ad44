"""A frozen encoder as a LightningModule base: what the linear probe and the offline kNN share."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from mim.errors import ConfigError
from mim.eval.encoders import adopt_preprocessing, load_encoder_from
from mim.eval.features import Pool, pooled_features


class FrozenEncoderModule(L.LightningModule):
    """A frozen timm encoder that gives one pooled feature vector per image.

    The encoder never trains: ``requires_grad_(False)``, always in eval mode (also while Lightning
    trains the module: BatchNorm statistics stay put, drop path stays off), features computed
    without gradients (:func:`mim.eval.features.pooled_features`).

    A ``"pretrained:"`` encoder brings its preprocessing: :meth:`setup` hands it to the datamodule
    (:func:`mim.eval.encoders.adopt_preprocessing`) for the fields the user left unset.

    Args:
        encoder: what :func:`mim.eval.encoders.load_encoder_from` reads: ``<run>/encoder.safetensors``,
            a ``mim`` ``.ckpt``, ``"pretrained:<name>.<tag>"`` (timm's public weights) or ``"timm:<name>"``
            (random init, the baseline).
        model_kwargs: ``timm.create_model`` kwargs for ``"timm:"`` / ``"pretrained:"`` sources
            (``{img_size: 32, patch_size: 4}``).
        pool: ``"cls"`` token or ``"mean"`` of the patch tokens; ConvNets are always global-average-pooled.
        pretrained_file: a local ``.safetensors`` file with the weights of a ``"pretrained:"`` encoder
            (offline use; nothing is downloaded).

    Raises:
        ConfigError: an unknown ``pool``, or ``pool="cls"`` on a ViT without class token.
        EncoderLoadError, FileNotFoundError: from ``load_encoder_from``.
    """

    def __init__(
        self,
        encoder: str,
        model_kwargs: dict[str, Any] | None = None,
        pool: Pool = "cls",
        pretrained_file: str | None = None,
    ) -> None:
        super().__init__()
        if pool not in ("cls", "mean"):
            raise ConfigError(f"pool must be 'cls' or 'mean', got {pool!r}.")
        self.encoder, self.encoder_info = load_encoder_from(encoder, model_kwargs, pretrained_file)
        self.encoder.requires_grad_(False).eval()
        if pool == "cls" and getattr(self.encoder, "num_prefix_tokens", None) == 0:
            raise ConfigError(
                f"pool='cls' needs a class token, but {self.encoder_info['model_name']} has none. "
                "Fix: --model.init_args.pool mean."
            )
        self.pool: Pool = pool
        self._check_labels = True

    def setup(self, stage: str) -> None:
        """Hand a ``"pretrained:"`` encoder's preprocessing to the datamodule (before its dataloaders exist:
        Lightning runs ``datamodule.setup``, then this, then builds the loaders)."""
        adopt_preprocessing(self._trainer, self.encoder_info)

    def train(self, mode: bool = True) -> FrozenEncoderModule:
        """Set train mode on everything but the encoder, which stays in eval mode."""
        super().train(mode)
        self.encoder.eval()
        return self

    def features(self, imgs: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` normalised images -> ``(B, D)`` float32 frozen pooled features."""
        return pooled_features(self.encoder, imgs, self.pool)

    def resolve_num_classes(self, num_classes: int | None) -> int:
        """The number of classes, checked against ``trainer.datamodule.num_classes`` and the encoder's
        input size against the datamodule's ``img_size``.

        Raises:
            ConfigError: no number known, a head / data class count mismatch, or an image size mismatch.
        """
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        data_classes = getattr(datamodule, "num_classes", None)
        name = type(self).__name__
        if num_classes is None and data_classes is None:
            raise ConfigError(
                f"{name} needs num_classes and the data gives none. Fix: --model.init_args.num_classes N."
            )
        if num_classes is not None and data_classes is not None and num_classes != data_classes:
            raise ConfigError(
                f"{name} has num_classes={num_classes} but the dataset has {data_classes} classes. Fix: set "
                f"--model.init_args.num_classes {data_classes} (or leave it null to take it from the data)."
            )
        self._check_labels = data_classes is None  # else every label is known to be in range
        model_size = getattr(getattr(self.encoder, "patch_embed", None), "img_size", None)
        data_size = getattr(datamodule, "img_size", None)
        fixed_size = model_size is not None and not getattr(self.encoder, "dynamic_img_size", False)
        if fixed_size and data_size is not None and tuple(model_size) != (data_size, data_size):
            raise ConfigError(
                f"the data gives {data_size} px images but the encoder takes {tuple(model_size)}. "
                f"Fix: --data.init_args.img_size {model_size[0]} (or an encoder built for {data_size} px)."
            )
        return int(num_classes if num_classes is not None else data_classes)

    def data_option(self, name: str, default: Any = None) -> Any:
        """The datamodule's init argument ``name`` (from its ``hparams``), else ``default``."""
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        return (getattr(datamodule, "hparams", None) or {}).get(name, default)

    def check_labels(self, labels: torch.Tensor, num_classes: int) -> None:
        """Raise ``ConfigError`` when a label is ``>= num_classes`` (only when the datamodule did not
        say how many classes it has; otherwise nothing is checked, to avoid a device sync per step)."""
        if self._check_labels and labels.numel() and int(labels.max()) >= num_classes:
            raise ConfigError(
                f"the data has a label {int(labels.max())} but {type(self).__name__} has num_classes={num_classes}. "
                f"Fix: set --model.init_args.num_classes to the dataset's number of classes."
            )


__all__ = ["FrozenEncoderModule"]
