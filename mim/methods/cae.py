"""CAE: Context Autoencoder for Self-Supervised Representation Learning (Chen et al. 2022,
arXiv 2202.03026).

The method in five steps, each a method below, as the official ``models/modeling_cae.py``
(github.com/Atten4Vis/CAE) reads: mask (block-wise, ``mask_generator``), ``forward_encoder``
(visible patches only), ``regressor`` (cross-attention from mask queries to the visible
representations, :class:`~mim.decoders.cae.CAERegressor`), ``alignment_target`` (the same encoder,
no gradient, on the masked patches) and ``decoder`` (masked representations only -> target).
Loss (Sec. 3.2): ``loss_rec + align_weight * loss_align``; the alignment loss is a mean squared error, the
reconstruction loss depends on ``target``:

- ``"dalle"`` (the paper's): cross-entropy over DALL-E's 8,192 dVAE codes at the masked patches. The tokenizer
  (:class:`mim.methods.dalle.DalleEncoder`, weights from a user-converted safetensors file) sees a second view
  of the same crop at half the side (112 px for 224 px: one code per 16 px patch), ``map_pixels`` applied, as
  BEiT's ``DataAugmentationForBEiT`` that CAE's ``run_pretraining.py`` uses; loss as the official
  ``engine_for_pretraining.py`` (``CrossEntropyLoss`` over the masked positions' codes).
- ``"pixel"``: per-patch normalised pixels, MSE.
- ``"teacher"``: a frozen timm model's features, MSE.

Where this differs from the official code: the tokenizer's view is made here from the (normalised) crop by
un-normalising it and resizing with antialiased bicubic interpolation (official: Lanczos, by PIL, in the data
pipeline); the regressor works at the encoder's width (the official projection for ``decoder_embed_dim !=
embed_dim`` is unused by its scripts).

Alignment target as official, not a deviation: the official ``alignment_encoder`` is a copy of the encoder
at init and, after every forward, ``alignment_parameter_update`` assigns ``param_alignment.data =
param_encoder.data``, so from then on the two share their storage and the optimiser's in-place updates
reach both: the target always comes from the current encoder weights (no lag, no momentum), without
gradient. Here the same module is simply run twice.

Initialisation as official (``models/modeling_cae.py`` and ``modeling_cae_helper.py``): linear layers
Xavier-uniform with zero bias, LayerNorm 1 / 0; the patch embedding's convolution, the cls token and the
mask token ``trunc_normal(std=0.02)`` cut at +-0.02 (the helper's ``trunc_normal_(t, std)`` passes
``a=-std, b=std``), conv bias 0. The encoder is initialised before the regressor, decoder, teacher or tokenizer
is built, so its initial weights depend on the seed and the backbone only: runs that differ in the head share
their random-init encoder (and its ``lr 0`` baseline).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Literal, NamedTuple

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from timm.layers import trunc_normal_
from torch import nn

from mim.backbones.vit import check_model_name, encode_visible, mae_init_
from mim.decoders.cae import CAEDecoder, CAERegressor
from mim.errors import ConfigError
from mim.masking import BlockMask, MaskGenerator, mask_config
from mim.methods.base import PretrainModule
from mim.methods.dalle import DALLE_STRIDE, DalleEncoder, load_dalle_encoder, map_pixels
from mim.methods.mae import denormalize_patches, init_vit, pixel_target
from mim.patches import gather_tokens, mask_to_pixels, patchify, unpatchify, visible_ids


class CAEOutput(NamedTuple):
    """What :meth:`CAE.forward` returns (``out[0]`` is the loss, as for MAE)."""

    loss: torch.Tensor  #: scalar, ``loss_rec + align_weight * loss_align``
    loss_rec: torch.Tensor  #: scalar reconstruction loss on the masked patches (MSE, or CE for ``dalle``)
    loss_align: torch.Tensor  #: scalar alignment MSE (unweighted)
    pred: torch.Tensor  #: ``(B, N_m, out_dim)`` decoder output at the masked positions
    latent_pred: torch.Tensor  #: ``(B, N_m, D)`` regressor output
    latent_target: torch.Tensor  #: ``(B, N_m, D)`` encoder output on the masked patches, no grad
    mask: torch.Tensor  #: ``(B, L)`` bool, True = masked


def create_teacher(
    name: str, weights: str | None, kwargs: dict[str, Any], img_size: int, grid_hw: tuple[int, int]
) -> tuple[nn.Module, int]:
    """A frozen timm teacher in eval mode and the width ``C`` of its features.

    ``timm.create_model(name, pretrained=False, num_classes=0, **kwargs)``, with ``weights`` (a
    safetensors ``state_dict``, e.g. an exported ``encoder.safetensors``) loaded when given; keys the
    model lacks (a classifier head) are ignored. One forward of a blank ``img_size`` image checks
    that :func:`teacher_features` works before training starts.

    Raises:
        ConfigError: unknown name or kwargs, missing file, weights that leave parameters unset, or a
            model that fails on ``img_size``-px images.
    """
    check_model_name(name)
    try:
        teacher = timm.create_model(name, pretrained=False, **{"num_classes": 0, **kwargs})
    except TypeError as err:
        raise ConfigError(f"teacher '{name}' does not take teacher_kwargs {kwargs}: {err}") from err
    if weights is not None:
        if not Path(weights).is_file():
            raise ConfigError(f"teacher_weights {weights} does not exist. Fix: give a .safetensors file.")
        missing = teacher.load_state_dict(load_file(weights), strict=False).missing_keys
        if missing:
            raise ConfigError(f"teacher_weights {weights} lacks {len(missing)} weights of '{name}': {missing[:3]}...")
    teacher.requires_grad_(False).eval()
    try:
        with torch.no_grad():
            width = teacher_features(teacher, torch.zeros(1, 3, img_size, img_size), grid_hw).shape[-1]
    except Exception as err:
        raise ConfigError(
            f"teacher '{name}' fails on {img_size} px images ({err}). Fix: pass e.g. "
            f"--model.teacher_kwargs '{{img_size: {img_size}}}' or '{{dynamic_img_size: true}}'."
        ) from err
    return teacher, width


def teacher_features(teacher: nn.Module, imgs: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """The teacher's last feature map on ``grid_hw``: ``(B, 3, H, W)`` -> ``(B, h*w, C)``.

    ViT-like token outputs ``(B, P + N_t, C)`` lose their ``P`` prefix tokens and are laid out on
    ``teacher.patch_embed.grid_size`` (a square grid when ``N_t`` differs, e.g. with
    ``dynamic_img_size``); conv maps (NCHW, or NHWC where ``output_fmt`` says so) are taken as is; a
    grid other than ``grid_hw`` is average-pooled (or repeated) onto it.
    """
    feats = teacher.forward_features(imgs)
    if feats.ndim == 3:
        feats = feats[:, getattr(teacher, "num_prefix_tokens", 0) :]
        grid = tuple(teacher.patch_embed.grid_size)
        if grid[0] * grid[1] != feats.shape[1]:
            side = math.isqrt(feats.shape[1])
            grid = (side, feats.shape[1] // side)
        feats = feats.transpose(1, 2).unflatten(2, grid)
    elif getattr(teacher, "output_fmt", "NCHW") == "NHWC":
        feats = feats.permute(0, 3, 1, 2)
    if tuple(feats.shape[-2:]) != tuple(grid_hw):
        feats = F.adaptive_avg_pool2d(feats, grid_hw)
    return feats.flatten(2).transpose(1, 2)


def cae_init_embeddings_(encoder: nn.Module | None = None, mask_token: torch.Tensor | None = None,
                         std: float = 0.02) -> None:
    """CAE's init of the patch embedding, the cls token and the mask token (official
    ``modeling_cae_helper.py``: ``trunc_normal_(t, std=0.02)`` with ``a=-std, b=std``, i.e. a normal of std
    0.02 cut at +-0.02; conv bias 0). ``encoder``: a timm ``VisionTransformer``; ``mask_token``: any shape;
    either may be ``None`` (left alone)."""
    with torch.no_grad():
        if encoder is not None:
            proj = encoder.patch_embed.proj
            trunc_normal_(proj.weight, std=std, a=-std, b=std)
            if proj.bias is not None:
                proj.bias.zero_()
        for token in (getattr(encoder, "cls_token", None), mask_token):
            if token is not None:
                trunc_normal_(token, std=std, a=-std, b=std)


class CAE(PretrainModule):
    """Context autoencoder on a timm ``VisionTransformer``.

    Args:
        backbone, img_size, patch_size, backbone_kwargs: the encoder, as :class:`~mim.methods.MAE`
            (official ViT-B recipe: ``backbone_kwargs={"init_values": 0.1, "drop_path_rate": 0.1}``).
        embed_init: the patch embedding's and cls token's initialisation. ``"cae"`` (official
            ``modeling_cae_helper.py``): normal of std 0.02 cut at +-0.02, whatever the patch size; at patch 4
            (48 inputs per patch, not ViT-B/16's 768) the patch content then enters the first block 4x weaker
            next to the sin-cos position table than at ViT-B/16. ``"mae"`` (official MAE ``models_mae.py``):
            Xavier-uniform on the flattened projection, which scales with the fan-in, and cls token normal 0.02.
            The rest of the encoder is Xavier-uniform either way (both official codes).
        mask_ratio: fraction of patches masked, in (0, 1) (paper's pretraining settings and official
            scripts: 98 of 196 patches, 0.5).
        mask: mask-generator factory called as ``mask(mask_ratio)``; default BEiT-style block-wise
            masking (``BlockMask``), as the paper.
        regressor_depth: cross-attention layers of the regressor (4: the official
            ``run_pretraining.py`` default, used for ViT-S, and its ViT-B and ViT-L scripts).
        decoder_depth: self-attention layers of the decoder (4, as ``regressor_depth``); 0 allowed
            (CAE v2's ViT-Tiny script uses 0).
        num_heads: heads of regressor and decoder; default the encoder's (official: 12 for ViT-B).
        mlp_ratio: MLP ratio of regressor and decoder.
        init_values: LayerScale init of regressor and decoder (official
            ``decoder_layer_scale_init_value`` 0.1; 1e-5 for ViT-L); ``None`` disables it.
        drop_path_rate: stochastic depth of regressor and decoder (official: the encoder's, 0.1).
        align_weight: weight of the alignment loss, ``>= 0`` (paper Sec. 3.2 / official: 2).
        norm_pix_loss: pixel target = per-patch normalised pixels (as MAE); ignored by the other targets.
        target: reconstruction target, ``"pixel"``, ``"teacher"`` (needs ``teacher``) or ``"dalle"`` (needs
            ``dalle_weights``; the paper's); ``None`` = ``"teacher"`` when ``teacher`` is set, else ``"pixel"``.
        dalle_weights: safetensors file of DALL-E's dVAE encoder (converted once from the public
            ``encoder.pkl``, see :func:`mim.methods.dalle.load_dalle_encoder`), for ``target="dalle"``.
        pixel_mean, pixel_std: the per-channel statistics the images were normalised with, to recover
            ``[0, 1]`` pixels for the tokenizer (``target="dalle"``); default ImageNet's, replaced in
            :meth:`setup` by the datamodule's ``mean`` / ``std`` when it has them.
        teacher: timm model name whose frozen features at the masked patches replace pixels as the
            target (a stand-in for the paper's DALL-E tokens, which cannot be loaded offline). Its
            last feature map, pooled onto the patch grid and LayerNorm-ed per token (no affine), is
            regressed by the decoder's linear head with MSE. It sees the images as normalised by
            the data module. ``None``: pixel target.
        teacher_weights: safetensors ``state_dict`` for the teacher (e.g. an exported
            ``encoder.safetensors``); ``None`` keeps it randomly initialised.
        teacher_kwargs: more ``timm.create_model`` arguments of the teacher, e.g.
            ``{"img_size": 32, "patch_size": 4}`` (a ViT must accept ``img_size``-px inputs).
        blr, lr, weight_decay, betas, warmup_epochs, min_lr, decay_tokens: see :class:`PretrainModule`; defaults
            from the official ViT-B 800-epoch script (lr 1.5e-3 at batch 2048 = blr 1.875e-4, AdamW
            default betas, wd 0.05, 20 warmup epochs, min lr 1e-5; it also clips grads at 3.0).

    Raises:
        ConfigError: bad encoder / mask ratio (as MAE), unknown ``embed_init``, ``align_weight < 0``,
            ``regressor_depth < 1``, ``decoder_depth < 0``, ``num_heads`` not dividing the width, ``mlp_ratio <= 0``,
            ``drop_path_rate`` outside [0, 1), unknown teacher, missing or incomplete ``teacher_weights``, or a
            teacher that fails on ``img_size``-px images; an unknown ``target``, ``target="teacher"`` without a
            teacher (or a teacher with another target), ``target="dalle"`` without ``dalle_weights`` (or the
            weights with another target), a missing or unfitting ``dalle_weights`` file.

    Batches are ``(imgs, labels)`` with ``imgs: (B, 3, H, W) float32`` normalised; labels unused.
    """

    def __init__(
        self,
        backbone: str = "vit_tiny_patch16_224",
        img_size: int = 224,
        patch_size: int = 16,
        backbone_kwargs: dict[str, Any] | None = None,
        embed_init: Literal["cae", "mae"] = "cae",
        mask_ratio: float = 0.5,
        mask: Callable[[float], MaskGenerator] = BlockMask,
        regressor_depth: int = 4,
        decoder_depth: int = 4,
        num_heads: int | None = None,
        mlp_ratio: float = 4.0,
        init_values: float | None = 0.1,
        drop_path_rate: float = 0.0,
        align_weight: float = 2.0,
        norm_pix_loss: bool = True,
        teacher: str | None = None,
        teacher_weights: str | None = None,
        teacher_kwargs: dict[str, Any] | None = None,
        target: Literal["pixel", "teacher", "dalle"] | None = None,
        dalle_weights: str | None = None,
        pixel_mean: tuple[float, float, float] = (0.485, 0.456, 0.406),
        pixel_std: tuple[float, float, float] = (0.229, 0.224, 0.225),
        blr: float = 1.875e-4,
        lr: float | None = None,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_epochs: float = 20.0,
        min_lr: float = 1.0e-5,
        decay_tokens: bool = True,
    ) -> None:
        super().__init__(blr, lr, weight_decay, betas, warmup_epochs, min_lr, decay_tokens)
        if embed_init not in ("cae", "mae"):
            raise ConfigError(
                f"embed_init must be 'cae' or 'mae', got {embed_init!r}. "
                "Fix: --model.init_args.embed_init cae (the paper's) or mae."
            )
        if align_weight < 0:
            raise ConfigError(f"align_weight must be >= 0, got {align_weight}. Fix: e.g. 2 (the paper's).")
        if regressor_depth < 1 or decoder_depth < 0:
            raise ConfigError(
                f"need regressor_depth >= 1, decoder_depth >= 0; got {regressor_depth}, {decoder_depth}. "
                "Fix: e.g. --model.init_args.regressor_depth 4 --model.init_args.decoder_depth 4 (the paper's)."
            )
        if teacher is None and teacher_weights is not None:
            raise ConfigError("teacher_weights is set but teacher is not. Fix: name its timm model in teacher.")
        target = target or ("teacher" if teacher is not None else "pixel")
        if target not in ("pixel", "teacher", "dalle"):
            raise ConfigError(f"target must be 'pixel', 'teacher' or 'dalle', got {target!r}.")
        if (target == "teacher") != (teacher is not None):
            raise ConfigError(
                f"target {target!r} with teacher={teacher!r}: a teacher is used by, and only by, target 'teacher'. "
                "Fix: set both --model.init_args.target teacher and --model.init_args.teacher <timm name>, or neither."
            )
        if (target == "dalle") != (dalle_weights is not None):
            raise ConfigError(
                f"target {target!r} with dalle_weights={dalle_weights!r}: the dVAE weights are used by, and only by, "
                "target 'dalle'. Fix: --model.init_args.target dalle --model.init_args.dalle_weights <file.safetensors>."
            )
        self.target_kind = target
        if not mlp_ratio > 0 or not 0 <= drop_path_rate < 1:
            raise ConfigError(
                f"need mlp_ratio > 0 and drop_path_rate in [0, 1), got {mlp_ratio} and {drop_path_rate}. "
                "Fix: e.g. --model.init_args.mlp_ratio 4.0 --model.init_args.drop_path_rate 0.1 (the paper's)."
            )
        self.mask_generator = mask(mask_ratio)
        self.save_hyperparameters(ignore=["mask"])
        self.hparams["mask"] = mask_config(self.mask_generator)  # a config: --ckpt_path resumes
        self.patch_size, self.norm_pix_loss, self.align_weight = patch_size, norm_pix_loss, align_weight
        init_vit(self, backbone, img_size, patch_size, backbone_kwargs)
        # The encoder's initial weights are drawn before any other part is built, so they depend on the seed and
        # the backbone only: head ablations (depths, targets, teacher) share one random-init encoder.
        mae_init_(self.encoder)  # as the official code, which re-initialises linear layers Xavier-uniform
        if embed_init == "cae":
            cae_init_embeddings_(self.encoder)
        dim = self.encoder.embed_dim
        heads = num_heads or self.encoder.blocks[0].attn.num_heads
        if heads < 1 or dim % heads:
            raise ConfigError(
                f"encoder width {dim} is not divisible by num_heads {heads}. "
                f"Fix: --model.init_args.num_heads one of {', '.join(str(d) for d in range(1, 65) if dim % d == 0)}."
            )
        out_dim = patch_size * patch_size * self.encoder.patch_embed.proj.in_channels
        self.teacher = None
        if teacher is not None:
            self.teacher, out_dim = create_teacher(
                teacher, teacher_weights, dict(teacher_kwargs or {}), img_size, self.grid_hw
            )
        self.tokenizer: DalleEncoder | None = None
        if target == "dalle":
            self.tokenizer = load_dalle_encoder(str(dalle_weights))
            out_dim = self.tokenizer.vocab_size
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        args = (heads, mlp_ratio, init_values, drop_path_rate)
        self.regressor = CAERegressor(self.grid_hw, dim, regressor_depth, *args)
        self.decoder = CAEDecoder(self.grid_hw, dim, out_dim, decoder_depth, *args)
        for part in (self.regressor, self.decoder):  # not the teacher: its weights stay
            mae_init_(part)
        cae_init_embeddings_(mask_token=self.regressor.mask_token)

    def train(self, mode: bool = True) -> "CAE":
        """As ``nn.Module.train``, but the teacher and the tokenizer always stay in eval mode."""
        super().train(mode)
        for frozen in (self.teacher, getattr(self, "tokenizer", None)):
            if frozen is not None:
                frozen.eval()
        return self

    def setup(self, stage: str) -> None:
        """The base checks, then take the datamodule's normalisation statistics (for the tokenizer's view)."""
        super().setup(stage)
        datamodule = self.trainer.datamodule if self._trainer else None
        mean, std = getattr(datamodule, "mean", None), getattr(datamodule, "std", None)
        if mean is not None and std is not None and len(mean) == 3 and len(std) == 3:
            self.pixel_mean.copy_(torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
            self.pixel_std.copy_(torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    @torch.no_grad()
    def tokenizer_view(self, imgs: torch.Tensor) -> torch.Tensor:
        """The tokenizer's second view of the same crop: ``(B, 3, H, W)`` normalised -> ``(B, 3, 8 h, 8 w)`` in
        ``[0.1, 0.9]`` (``(h, w)`` the patch grid: 112 px for 224 px at patch 16), i.e. un-normalised, clamped
        to ``[0, 1]``, resized (bicubic, antialiased) and :func:`~mim.methods.dalle.map_pixels`-ed."""
        pixels = (imgs.float() * self.pixel_std + self.pixel_mean).clamp(0.0, 1.0)
        size = (self.grid_hw[0] * DALLE_STRIDE, self.grid_hw[1] * DALLE_STRIDE)
        if tuple(pixels.shape[-2:]) != size:
            pixels = F.interpolate(pixels, size=size, mode="bicubic", antialias=True, align_corners=False)
        return map_pixels(pixels.clamp(0.0, 1.0))

    @torch.no_grad()
    def target_tokens(self, imgs: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` int64 dVAE codes of every patch (``target="dalle"``), row-major over the patch grid."""
        return self.tokenizer.tokens(self.tokenizer_view(imgs))

    # -- the method ---------------------------------------------------------------------------
    def forward_encoder(self, imgs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)``, ``(B, N)`` -> ``(B, N, D)``: the encoder on the patches at ``ids`` (with
        their position embeddings and the cls token), prefix tokens dropped from the output."""
        return encode_visible(self.encoder, imgs, ids)[:, self.encoder.num_prefix_tokens :]

    @torch.no_grad()
    def alignment_target(self, imgs: torch.Tensor, ids_masked: torch.Tensor) -> torch.Tensor:
        """``(B, N_m, D)``: the same encoder (shared weights, as the official code with
        ``base_momentum = 0``) run on the masked patches without gradient (Sec. 3.2: the target
        representations do not update the encoder)."""
        return self.forward_encoder(imgs, ids_masked)

    @torch.no_grad()
    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        """Regression target of every patch, ``(B, L, out_dim)``: pixels, or teacher features (not for
        ``target="dalle"``, whose targets are :meth:`target_tokens`)."""
        if self.teacher is None:
            return pixel_target(imgs, self.patch_size, self.norm_pix_loss)
        feats = teacher_features(self.teacher, imgs, self.grid_hw)
        return F.layer_norm(feats.float(), feats.shape[-1:])

    def forward(self, imgs: torch.Tensor, mask: torch.Tensor | None = None) -> CAEOutput:
        """Losses and predictions for ``imgs (B, 3, H, W)``; draws a mask when none is given."""
        if mask is None:
            mask = self.sample_mask(imgs.shape[0])
        ids_keep, ids_masked = visible_ids(mask), visible_ids(~mask)
        latent_pred = self.regressor(self.forward_encoder(imgs, ids_keep), ids_keep, ids_masked)
        pred = self.decoder(latent_pred, ids_masked)
        latent_target = self.alignment_target(imgs, ids_masked)
        if self.tokenizer is not None:  # CE over the codes of the masked patches (official engine_for_pretraining.py)
            labels = torch.gather(self.target_tokens(imgs), 1, ids_masked)
            loss_rec = F.cross_entropy(pred.float().flatten(0, 1), labels.flatten())
        else:
            loss_rec = F.mse_loss(pred.float(), gather_tokens(self.target(imgs), ids_masked).float())
        loss_align = F.mse_loss(latent_pred.float(), latent_target.float())
        loss = loss_rec + self.align_weight * loss_align
        return CAEOutput(loss, loss_rec, loss_align, pred, latent_pred, latent_target, mask)

    # -- Lightning ----------------------------------------------------------------------------
    def _log(self, stage: str, out: CAEOutput) -> None:
        self.log(f"{stage}/loss", out.loss, prog_bar=True, sync_dist=True)  # the mean over ranks
        self.log(f"{stage}/loss_rec", out.loss_rec, sync_dist=stage == "val")
        self.log(f"{stage}/loss_align", out.loss_align, sync_dist=stage == "val")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        out = self(batch[0])
        self._log("train", out)
        return self.check_finite(
            out.loss, "train/loss", {"train/loss_rec": out.loss_rec, "train/loss_align": out.loss_align}
        )

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        # A fixed mask per batch index keeps the validation loss comparable across epochs.
        imgs = batch[0]
        out = self(imgs, self.sample_mask(imgs.shape[0], torch.Generator().manual_seed(batch_idx)))
        self._log("val", out)
        return out.loss

    @torch.no_grad()
    def reconstruct(self, imgs: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Masks and reconstructions for pictures, in the input's normalised pixel space.

        Pixel target: predicted patches (brought back from per-patch normalisation with the true
        patch's mean and variance, as MAE's visualisation) at the masked positions, input pixels at
        the visible ones. Teacher and dVAE targets: nothing is predicted in pixel space, so the masked
        patches are 0 (the data mean) and the picture shows only the mask.

        Returns:
            ``{"mask": (B, 1, H, W) float 1 = masked, "reconstruction": (B, 3, H, W) float}``.
        """
        mask = self.sample_mask(imgs.shape[0], generator)
        ids_masked = visible_ids(~mask)
        patches = patchify(imgs, self.patch_size)
        fill = torch.zeros_like(gather_tokens(patches, ids_masked))
        if self.target_kind == "pixel":
            fill = self(imgs, mask).pred.to(imgs.dtype)
            if self.norm_pix_loss:
                true = gather_tokens(patches, ids_masked)
                fill = denormalize_patches(fill, true)
        patches = patches.scatter(1, ids_masked.unsqueeze(-1).expand_as(fill), fill)
        pixels = mask_to_pixels(mask, self.patch_size, self.grid_hw).to(imgs.dtype)
        return {"mask": pixels, "reconstruction": unpatchify(patches, self.patch_size, self.grid_hw)}
