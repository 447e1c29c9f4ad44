"""MAE: Masked Autoencoders Are Scalable Vision Learners (He et al. 2021, arXiv 2111.06377).

The method in four steps, each a method below, as the official ``models_mae.py`` reads:
mask (``mask_generator``), ``forward_encoder`` (visible patches only), ``forward_decoder``
(mask tokens + light Transformer), ``forward_loss`` (MSE on masked patches, per-patch
normalised pixels). ColorMAE is this module with a ``ColorNoiseMask``.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from timm.models.vision_transformer import VisionTransformer

from mim.backbones.vit import encode_visible, mae_init_
from mim.decoders.mae import MAEDecoder
from mim.errors import ConfigError
from mim.masking import MaskGenerator, RandomMask, mask_config
from mim.methods.base import PretrainModule
from mim.patches import mask_to_pixels, patchify, unpatchify, visible_ids


#: What ``backbone_kwargs`` may set: the arguments of timm's ``VisionTransformer`` (the method sets the rest).
VIT_KWARGS = frozenset(inspect.signature(VisionTransformer.__init__).parameters) - {
    "self", "img_size", "patch_size", "num_classes", "device", "dtype"
}


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0 and d <= 64)


def init_vit(
    module: PretrainModule, backbone: str, img_size: int, patch_size: int, backbone_kwargs: dict[str, Any] | None
) -> None:
    """``module.init_vit_encoder(...)`` with the mistakes timm reports only as a ``TypeError`` or an
    ``assert`` turned into :class:`ConfigError`: ``backbone_kwargs`` keys that ``VisionTransformer``
    does not take (:data:`VIT_KWARGS`), widths it cannot split into heads, ``depth < 1``, and a patch
    grid of fewer than 2 patches (nothing left to mask).

    Raises:
        ConfigError: those, and what :func:`mim.backbones.vit.create_vit` raises (unknown name, a
            ``patch_size`` that does not divide ``img_size``, a model that is not a ViT).
    """
    unknown = sorted(set(backbone_kwargs or {}) - VIT_KWARGS)
    if unknown:
        raise ConfigError(
            f"backbone_kwargs {unknown} are not arguments of timm's VisionTransformer. Fix: remove them, or use "
            "ones it takes (drop_path_rate, init_values, qkv_bias, qk_norm, reg_tokens, class_token, ...)."
        )
    try:
        module.init_vit_encoder(backbone, img_size, patch_size, backbone_kwargs)
    except (AssertionError, ZeroDivisionError) as err:
        raise ConfigError(
            f"timm cannot build '{backbone}' with backbone_kwargs {backbone_kwargs}: {err or type(err).__name__}. "
            "Fix: a num_heads that divides embed_dim, and depth / embed_dim >= 1."
        ) from err
    if len(module.encoder.blocks) < 1:
        raise ConfigError(
            f"backbone_kwargs {backbone_kwargs} give '{backbone}' no Transformer block. Fix: depth >= 1 (or drop it)."
        )
    h, w = module.grid_hw
    if h * w < 2:
        raise ConfigError(
            f"img_size {img_size} with patch_size {patch_size} gives a {h}x{w} patch grid: masking needs at least "
            f"2 patches. Fix: a smaller --model.init_args.patch_size (e.g. 4 for 32 px, 16 for 224 px)."
        )


def check_decoder_args(decoder_embed_dim: int, decoder_depth: int, decoder_num_heads: int, mlp_ratio: float) -> None:
    """Raise :class:`ConfigError` for an MAE decoder that cannot be built or cannot learn.

    ``decoder_depth >= 1`` (with no block the mask tokens never see the visible patches, so the
    masked-patch loss gives the encoder no gradient); ``decoder_num_heads >= 1`` dividing
    ``decoder_embed_dim``; ``decoder_embed_dim`` a positive multiple of 4 (its 2-D sin-cos position
    embedding splits the width in 4); ``mlp_ratio > 0``.
    """
    if decoder_depth < 1:
        raise ConfigError(
            f"decoder_depth must be >= 1, got {decoder_depth}: without a decoder block the mask tokens never see the "
            "visible patches and the encoder learns nothing. Fix: --model.init_args.decoder_depth 1 or more (MAE: 8)."
        )
    if decoder_embed_dim < 4 or decoder_embed_dim % 4:
        raise ConfigError(
            f"decoder_embed_dim must be a positive multiple of 4 (its 2-D sin-cos position embedding splits it in 4), "
            f"got {decoder_embed_dim}. Fix: e.g. --model.init_args.decoder_embed_dim 128 (MAE: 512)."
        )
    if decoder_num_heads < 1 or decoder_embed_dim % decoder_num_heads:
        raise ConfigError(
            f"decoder_embed_dim {decoder_embed_dim} is not divisible by decoder_num_heads {decoder_num_heads}. "
            f"Fix: --model.init_args.decoder_num_heads one of {_divisors(decoder_embed_dim)} (MAE: 16 heads of 32)."
        )
    if not mlp_ratio > 0:
        raise ConfigError(f"mlp_ratio must be > 0, got {mlp_ratio}. Fix: --model.init_args.mlp_ratio 4.0 (MAE's).")


def pixel_target(imgs: torch.Tensor, patch_size: int, norm_pix_loss: bool) -> torch.Tensor:
    """Regression target per patch: ``(B, 3, H, W)`` -> ``(B, L, p*p*3)``.

    With ``norm_pix_loss`` each patch is normalised by its own mean and variance (MAE Sec. 3,
    "Reconstruction target": "normalized pixel values of each masked patch"), ``eps = 1e-6``.
    """
    target = patchify(imgs, patch_size)
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6).sqrt()
    return target


def denormalize_patches(pred: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """Undo the per-patch normalisation of :func:`pixel_target` with the true patches' statistics.

    ``pred``, ``patches``: ``(B, N, p*p*3)``; returns ``pred * sqrt(var + 1e-6) + mean`` with the mean
    and variance of each true patch (as the official MAE visualisation does for ``norm_pix_loss``).
    """
    mean, var = patches.mean(dim=-1, keepdim=True), patches.var(dim=-1, keepdim=True)
    return pred * (var + 1.0e-6).sqrt() + mean


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over masked patches only (MAE Sec. 3: "we compute the loss only on
    masked patches"): per-patch MSE averaged over the ``True`` entries of ``mask (B, L)``."""
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)
    mask = mask.to(per_patch.dtype)
    return (per_patch * mask).sum() / mask.sum()


class MAE(PretrainModule):
    """Masked autoencoder on a timm ``VisionTransformer``.

    Args:
        backbone: timm ViT name, e.g. ``"vit_tiny_patch16_224"``.
        img_size: input side in pixels (32 for CIFAR), divisible by ``patch_size``.
        patch_size: patch side in pixels (4 for 32 px images gives an 8x8 grid).
        backbone_kwargs: more ``timm.create_model`` kwargs (e.g. ``drop_path_rate``).
        mask_ratio: fraction of patches masked, in (0, 1) (MAE: 0.75, Sec. 4 / Fig. 5).
        mask: mask-generator factory called as ``mask(mask_ratio)`` (a class from
            :mod:`mim.masking`, or a ``functools.partial`` of one); default uniform random masking.
        decoder_embed_dim, decoder_depth, decoder_num_heads: decoder size (MAE: 512, 8, 16).
        mlp_ratio: decoder MLP ratio.
        norm_pix_loss: regress per-patch normalised pixels (MAE Table 1d: better representations).
        blr, lr, weight_decay, betas, warmup_epochs, min_lr, decay_tokens: see :class:`PretrainModule`
            (MAE Appendix A.1: blr 1.5e-4, wd 0.05, betas (0.9, 0.95), 40 warmup epochs).

    Raises:
        ConfigError: unknown / non-ViT backbone or bad ``backbone_kwargs`` (:func:`init_vit`),
            ``img_size % patch_size != 0``, ``mask_ratio`` outside (0, 1), a decoder that cannot be
            built or learn (:func:`check_decoder_args`).

    Batches are ``(imgs, labels)`` with ``imgs: (B, 3, H, W) float32`` normalised; labels unused.
    """

    def __init__(
        self,
        backbone: str = "vit_tiny_patch16_224",
        img_size: int = 224,
        patch_size: int = 16,
        backbone_kwargs: dict[str, Any] | None = None,
        mask_ratio: float = 0.75,
        mask: Callable[[float], MaskGenerator] = RandomMask,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = True,
        blr: float = 1.5e-4,
        lr: float | None = None,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_epochs: float = 40.0,
        min_lr: float = 0.0,
        decay_tokens: bool = True,
    ) -> None:
        super().__init__(blr, lr, weight_decay, betas, warmup_epochs, min_lr, decay_tokens)
        check_decoder_args(decoder_embed_dim, decoder_depth, decoder_num_heads, mlp_ratio)
        self.mask_generator = mask(mask_ratio)
        self.save_hyperparameters(ignore=["mask"])
        self.hparams["mask"] = mask_config(self.mask_generator)  # a config: --ckpt_path resumes
        self.patch_size, self.norm_pix_loss = patch_size, norm_pix_loss
        init_vit(self, backbone, img_size, patch_size, backbone_kwargs)
        self.decoder = MAEDecoder(
            self.grid_hw,
            embed_dim=self.encoder.embed_dim,
            decoder_embed_dim=decoder_embed_dim,
            decoder_depth=decoder_depth,
            decoder_num_heads=decoder_num_heads,
            out_dim=patch_size * patch_size * self.encoder.patch_embed.proj.in_channels,
            num_prefix_tokens=self.encoder.num_prefix_tokens,
            mlp_ratio=mlp_ratio,
        )
        mae_init_(self)

    # -- the method ---------------------------------------------------------------------------
    def forward_encoder(self, imgs: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)``, ``(B, N_vis)`` -> ``(B, P + N_vis, D)`` latent of the visible patches."""
        return encode_visible(self.encoder, imgs, ids_keep)

    def forward_decoder(self, latent: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """``(B, P + N_vis, D)`` -> ``(B, L, p*p*3)`` pixel predictions for every patch."""
        return self.decoder(latent, ids_keep)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Scalar MSE on the masked patches (see :func:`pixel_target`, :func:`masked_mse`)."""
        return masked_mse(pred, pixel_target(imgs, self.patch_size, self.norm_pix_loss), mask)

    def forward(
        self, imgs: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns ``(loss, pred (B, L, p*p*3), mask (B, L) bool)``; draws a mask when none is given."""
        if mask is None:
            mask = self.sample_mask(imgs.shape[0])
        ids_keep = visible_ids(mask)
        pred = self.forward_decoder(self.forward_encoder(imgs, ids_keep), ids_keep)
        return self.forward_loss(imgs, pred, mask), pred, mask

    # -- Lightning ----------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.check_finite(self(batch[0])[0], "train/loss (MSE on the masked patches)")
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)  # the mean over ranks
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        # A fixed mask per batch index keeps the validation loss comparable across epochs.
        generator = torch.Generator().manual_seed(batch_idx)
        imgs = batch[0]
        loss = self(imgs, self.sample_mask(imgs.shape[0], generator))[0]
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        return loss

    @torch.no_grad()
    def reconstruct(self, imgs: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Masks and reconstructions for pictures, in the input's normalised pixel space.

        With ``norm_pix_loss`` the predicted patches are brought back to pixels with the mean and
        variance of the true patch (as the official visualisation does), and visible patches are
        pasted from the input (MAE Fig. 2).

        Returns:
            ``{"mask": (B, 1, H, W) float 1 = masked, "reconstruction": (B, 3, H, W) float}``.
        """
        mask = self.sample_mask(imgs.shape[0], generator)
        _, pred, _ = self(imgs, mask)
        if self.norm_pix_loss:
            pred = denormalize_patches(pred, patchify(imgs, self.patch_size))
        recon = unpatchify(pred.to(imgs.dtype), self.patch_size, self.grid_hw)
        pixels = mask_to_pixels(mask, self.patch_size, self.grid_hw).to(imgs.dtype)
        return {"mask": pixels, "reconstruction": recon * pixels + imgs * (1 - pixels)}
