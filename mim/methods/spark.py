"""SparK: Designing BERT for Convolutional Networks: Sparse and Hierarchical Masked Modeling
(Tian et al., ICLR 2023, arXiv 2301.03580).

The method in four steps, as the official ``pretrain/spark.py`` reads: mask the stride-32 grid
(exact count, ``mask_generator``), encode the visible sites sparsely
(:class:`mim.backbones.sparse.SparseEncoder`, backend ``masked`` or ``spconv``), densify + decode
with the light UNet (:class:`mim.decoders.spark.SparKDecoder`), and regress the per-patch
normalised pixels of the masked 32x32 patches (MSE).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from timm.optim import Lamb
from torch import nn

from mim.backbones.sparse import MASK_STRIDE, Backend, SparseEncoder, check_input, create_convnet
from mim.decoders.spark import DensifyNorm, SparKDecoder
from mim.errors import ConfigError
from mim.masking import MaskGenerator, RandomMask, mask_config
from mim.methods.base import PretrainModule
from mim.methods.mae import denormalize_patches, masked_mse, pixel_target
from mim.optim import lr_wd_annealing, weight_decay_groups
from mim.patches import mask_to_pixels, patchify, unpatchify


#: Name substrings without weight decay (official ``main.py``: ``get_param_groups(model, nowd_keys={'cls_token',
#: 'pos_embed', 'mask_token', 'gamma'})``, matched as substrings, so the decoder's ``mask_tokens.0`` too).
NO_DECAY_KEYS = ("cls_token", "pos_embed", "mask_token", "gamma")


def cosine_weight_decay(step: int, total_steps: int, start: float, end: float) -> float:
    """Weight decay at ``step``: half-cycle cosine from ``start`` to ``end`` over the whole run
    (official ``pretrain/utils/lr_control.py``, ``lr_wd_annealing``: 0.04 -> 0.2)."""
    progress = min(1.0, step / max(1, total_steps - 1))
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


class SparK(PretrainModule):
    """Sparse masked modeling of a timm ConvNet (ResNet, ConvNeXt).

    Args:
        backbone: timm ConvNet name with features at strides 4/8/16/32 (``resnet18``, ``resnet50``,
            ``convnext_atto``, ...).
        img_size: input side in pixels, a multiple of 32 and at least 64 (the mask lives on the
            stride-32 grid: 224 px -> 7x7 cells; CIFAR's 32 px images are upsampled to 64 px by the
            datamodule, giving 2x2 cells).
        backbone_kwargs: more ``timm.create_model`` kwargs (official: ``drop_path_rate`` 0.05 for
            ResNet-50, 0.2 for ConvNeXt-S).
        backend: ``"masked"`` (official dense simulation) or ``"spconv"`` (true sparse convolution,
            ResNets only; ``pip install 'mim-lightning[sparse]'``).
        mask_ratio: fraction of stride-32 cells masked, in (0, 1) (paper Sec. 4: 0.6).
        mask: mask-generator factory ``mask(mask_ratio)``; default uniform random, exact count.
        decoder_width: UNet width at stride 32, halved per upsampling (official: 768).
        densify_norm: ``"auto"`` (``"bn"`` when the backbone uses BatchNorm, the official choice for
            ResNets, else ``"ln"`` as for ConvNeXts), ``"bn"``, ``"ln"`` or ``"none"``.
        norm_pix_loss: regress per-patch normalised pixels (official: always on).
        optimizer: ``"lamb"`` (official, timm's LAMB) or ``"adamw"``.
        blr, lr: base / absolute learning rate, ``lr = blr * batch / 256`` (official: blr 2e-4).
        weight_decay, weight_decay_end: cosine weight-decay schedule over the run (official 0.04 ->
            0.2); ``weight_decay_end=None`` keeps it constant.
        betas: optimiser betas (official: (0.9, 0.95) for ResNets, (0.9, 0.999) for ConvNeXts).
        warmup_epochs: linear warmup length (official: 40 epochs).
        warmup_start_ratio: learning rate at step 0 as a fraction of the peak (official 0.005).
        min_lr: final learning rate of the cosine decay, reached at the last step; ``None`` (default)
            = 0.001x the peak, as the official schedule (``pretrain/utils/lr_control.py``,
            ``lr_wd_annealing``: ``0.005 -> 1`` linear warmup, then cosine ``1 -> 0.001``, see
            :func:`mim.optim.lr_wd_annealing`).
        clip_grad: max global gradient norm (official: 5.0); ``--trainer.gradient_clip_val``
            overrides it, ``None`` or 0 disables it.
        channels_last: keep the encoder's and decoder's 4-D weights and the input images in
            ``torch.channels_last`` (NHWC) memory format, a layout only: the same loss and gradients
            to float32 rounding (``tests/test_spark_speed.py``). Faster on CPU (oneDNN convolutions:
            with the sparse BN's fused sums, a ResNet-18 step 0.78-0.80x / 0.72-0.76x the official NCHW
            code's at 64 / 224 px on 2 idle CPU cores, ``tools/bench_spark.py --official``; at 64 px the
            per-tap weight gradient of :mod:`mim.backbones.tap_conv` takes another 5-10 % off); NHWC is
            cuDNN's preferred layout too (not measured here). The official code runs NCHW.

    Raises:
        ConfigError: unknown backbone or one without 4 feature scales, ``img_size`` not a multiple
            of 32 or below 64, ``mask_ratio`` outside (0, 1), spconv asked for but not installed or
            with a ConvNeXt, unknown ``optimizer`` / ``densify_norm``, ``decoder_width < 32``, negative
            ``clip_grad`` / ``weight_decay_end``, ``warmup_start_ratio`` outside [0, 1],
            ``backbone_kwargs`` the timm model does not take.

    Batches are ``(imgs, labels)`` with ``imgs: (B, 3, img_size, img_size) float32`` normalised.
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        img_size: int = 224,
        backbone_kwargs: dict[str, Any] | None = None,
        backend: Backend = "masked",
        mask_ratio: float = 0.6,
        mask: Callable[[float], MaskGenerator] = RandomMask,
        decoder_width: int = 768,
        densify_norm: DensifyNorm | Literal["auto"] = "auto",
        norm_pix_loss: bool = True,
        optimizer: Literal["lamb", "adamw"] = "lamb",
        blr: float = 2e-4,
        lr: float | None = None,
        weight_decay: float = 0.04,
        weight_decay_end: float | None = 0.2,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_epochs: float = 40.0,
        min_lr: float | None = None,
        clip_grad: float | None = 5.0,
        warmup_start_ratio: float = 0.005,
        channels_last: bool = True,
    ) -> None:
        super().__init__(blr, lr, weight_decay, betas, warmup_epochs, 0.0 if min_lr is None else min_lr)
        if not 0.0 <= warmup_start_ratio <= 1.0:
            raise ConfigError(
                f"warmup_start_ratio must lie in [0, 1], got {warmup_start_ratio}. "
                "Fix: e.g. --model.init_args.warmup_start_ratio 0.005 (official)."
            )
        self.final_lr, self.warmup_start_ratio = min_lr, float(warmup_start_ratio)
        if img_size % MASK_STRIDE or img_size < 2 * MASK_STRIDE:
            raise ConfigError(
                f"SparK needs img_size to be a multiple of {MASK_STRIDE} and at least {2 * MASK_STRIDE} "
                f"(the mask lives on the stride-{MASK_STRIDE} grid and needs 2+ cells), got {img_size}. "
                "Fix: --model.init_args.img_size 64 with --data.init_args.img_size 64 for CIFAR (32 px "
                "images upsampled 2x), 224 for ImageNet."
            )
        if optimizer not in ("lamb", "adamw"):
            raise ConfigError(f"optimizer must be 'lamb' or 'adamw', got {optimizer!r}.")
        if densify_norm not in ("auto", "bn", "ln", "none"):
            raise ConfigError(f"densify_norm must be 'auto', 'bn', 'ln' or 'none', got {densify_norm!r}.")
        if decoder_width < 2**5:
            raise ConfigError(
                f"decoder_width must be >= 32 (the UNet halves it 5 times, down to stride 1), got {decoder_width}. "
                "Fix: e.g. --model.init_args.decoder_width 256 (official: 768)."
            )
        if (clip_grad is not None and clip_grad < 0) or (weight_decay_end is not None and weight_decay_end < 0):
            raise ConfigError(
                f"clip_grad and weight_decay_end must be >= 0 or null, got {clip_grad} and {weight_decay_end}. "
                "Fix: e.g. --model.init_args.clip_grad 5.0 --model.init_args.weight_decay_end 0.2 (official)."
            )
        self.mask_generator = mask(mask_ratio)
        self.save_hyperparameters(ignore=["mask"])
        self.hparams["mask"] = mask_config(self.mask_generator)  # a config: --ckpt_path resumes
        self.img_size, self.norm_pix_loss = img_size, norm_pix_loss
        self.optimizer_name, self.weight_decay_end, self.clip_grad = optimizer, weight_decay_end, clip_grad
        self.grid_hw = (img_size // MASK_STRIDE, img_size // MASK_STRIDE)
        backbone_kwargs = dict(backbone_kwargs or {})
        try:
            convnet = create_convnet(backbone, **backbone_kwargs)
        except TypeError as err:  # a kwarg the timm model does not take
            raise ConfigError(
                f"timm's '{backbone}' does not take backbone_kwargs {backbone_kwargs}: {err}. "
                "Fix: remove them, or use ones its class takes (e.g. drop_path_rate)."
            ) from err
        self.sparse_encoder = SparseEncoder(convnet, backend)
        self.encoder_config = {"model_name": backbone, "model_kwargs": {"num_classes": 0, **backbone_kwargs}}
        if densify_norm == "auto":
            uses_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.encoder.modules())
            densify_norm = "bn" if uses_bn else "ln"
        self.decoder = SparKDecoder(self.sparse_encoder.channels, width=decoder_width, densify_norm=densify_norm)
        self.channels_last = bool(channels_last)
        if self.channels_last:  # conv weights (and the 4-D mask tokens) NHWC; .to(device) keeps the layout
            self.sparse_encoder.to(memory_format=torch.channels_last)
            self.decoder.to(memory_format=torch.channels_last)

    def setup(self, stage: str) -> None:
        """Refuse ``--trainer.sync_batchnorm true``: Lightning would turn the encoder's BN layers into
        ``SyncBatchNorm``, which never calls ``F.batch_norm``, so the sparse statistics (visible sites only)
        would silently become dense ones."""
        super().setup(stage)
        if getattr(self.trainer.strategy, "_layer_sync", None) is not None:
            raise ConfigError(
                "SparK does not take --trainer.sync_batchnorm true: it would make the encoder's sparse batch norm "
                "dense. SparK already reduces its BN statistics across ranks under DDP (the encoder's and densify "
                "norms' over the visible sites, the decoder's over all pixels). Fix: remove --trainer.sync_batchnorm."
            )

    @property
    def encoder(self) -> nn.Module:
        """The plain timm ConvNet (what online probes read and ``ExportEncoder`` saves)."""
        return self.sparse_encoder.model

    # -- the method ---------------------------------------------------------------------------
    def forward(
        self, imgs: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Masked reconstruction of ``imgs (B, 3, H, W)``.

        Args:
            imgs: normalised images, ``H = W = img_size``.
            mask: ``(B, L)`` bool, ``True`` = masked, row-major over the ``(H/32, W/32)`` grid;
                drawn from ``mask_generator`` when ``None``.

        Returns:
            ``(loss, pred (B, L, 32*32*3), mask (B, L))``: MSE over the masked patches of the
            (per-patch normalised) pixels, the predicted patches, the mask.

        Raises:
            ValueError: ``H`` or ``W`` not divisible by 32.
        """
        check_input(imgs)
        if self.channels_last:  # a layout change only; the values (and the loss) stay the same
            imgs = imgs.contiguous(memory_format=torch.channels_last)
        grid_hw = (imgs.shape[-2] // MASK_STRIDE, imgs.shape[-1] // MASK_STRIDE)
        if mask is None:
            mask = self.sample_mask(imgs.shape[0], grid_hw=grid_hw)
        active = ~mask.view(imgs.shape[0], 1, *grid_hw)
        features = self.sparse_encoder(imgs, active)
        pred = patchify(self.decoder(features, active), MASK_STRIDE)
        target = pixel_target(imgs, MASK_STRIDE, self.norm_pix_loss)
        return masked_mse(pred, target, mask), pred, mask

    # -- Lightning ----------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.check_finite(self(batch[0])[0], "train/loss (MSE on the masked patches)")
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)  # the mean over ranks
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(batch_idx)  # same masks every epoch
        imgs = batch[0]
        loss = self(imgs, self.sample_mask(imgs.shape[0], generator))[0]
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def weight_decay_groups(self) -> list[dict[str, Any]]:
        """``[no-decay, decay]`` groups as the official ``get_param_groups``: biases, 1-D parameters and
        names containing :data:`NO_DECAY_KEYS` (the decoder's 4-D ``mask_tokens``) undecayed. With LAMB the
        undecayed group also skips the trust ratio (timm's ``Lamb`` adapts only groups with weight decay,
        as the official ``TheSameAsTimmLAMB``)."""
        return weight_decay_groups(self.named_parameters(), self.weight_decay, NO_DECAY_KEYS)

    def lr_rule(self, lr: float) -> Callable[[int, int, int], float]:
        """The official per-step schedule, :func:`mim.optim.lr_wd_annealing` (``min_lr=None``: 0.001x)."""
        min_ratio = 0.001 if self.final_lr is None else (self.final_lr / lr if lr > 0 else 0.0)
        return functools.partial(lr_wd_annealing, start_ratio=self.warmup_start_ratio, min_ratio=min_ratio)

    def create_optimizer(self, groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
        """LAMB (official ``--opt lamb``; clipping is done by :meth:`configure_gradient_clipping`,
        so LAMB's own is off) or AdamW, over timm's decay / no-decay groups."""
        for group in groups:  # which groups follow the weight-decay schedule
            group["wd_scale"] = 1.0 if group["weight_decay"] > 0 else 0.0
        if self.optimizer_name == "lamb":
            return Lamb(groups, lr=lr, betas=self.betas, max_grad_norm=None)
        return torch.optim.AdamW(groups, lr=lr, betas=self.betas)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)  # the step's seeds
        if self.weight_decay_end is None:
            return
        total = max(1, int(self.trainer.estimated_stepping_batches))
        decay = cosine_weight_decay(self.global_step, total, self.weight_decay, self.weight_decay_end)
        optimizers = self.optimizers()
        for optimizer in optimizers if isinstance(optimizers, list) else [optimizers]:
            for group in optimizer.param_groups:
                group["weight_decay"] = decay * group.get("wd_scale", 0.0)
        self.log("train/weight_decay", decay)

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        value = gradient_clip_val if gradient_clip_val is not None else self.clip_grad
        if value:
            self.clip_gradients(optimizer, gradient_clip_val=value, gradient_clip_algorithm=gradient_clip_algorithm or "norm")

    @torch.no_grad()
    def reconstruct(self, imgs: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Masks and reconstructions for pictures, in the input's normalised pixel space (visible
        patches pasted from the input, masked ones de-normalised with the true patch statistics).

        Returns:
            ``{"mask": (B, 1, H, W) float 1 = masked, "reconstruction": (B, 3, H, W) float}``.
        """
        mask = self.sample_mask(imgs.shape[0], generator)
        _, pred, _ = self(imgs, mask)
        if self.norm_pix_loss:
            pred = denormalize_patches(pred, patchify(imgs, MASK_STRIDE))
        recon = unpatchify(pred.to(imgs.dtype), MASK_STRIDE, self.grid_hw)
        pixels = mask_to_pixels(mask, MASK_STRIDE, self.grid_hw).to(imgs.dtype)
        return {"mask": pixels, "reconstruction": recon * pixels + imgs * (1 - pixels)}


__all__ = ["NO_DECAY_KEYS", "SparK", "cosine_weight_decay"]
