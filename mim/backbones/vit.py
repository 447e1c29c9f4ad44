"""timm ``VisionTransformer`` as an MAE-style encoder that sees only the visible patches.

The model stays a plain timm model (no subclass, no patching): :func:`encode_visible` runs its own
sub-modules (``patch_embed``, ``_pos_embed``, ``norm_pre``, ``blocks``, ``norm``) on the visible
tokens, so exported weights load back with ``timm.create_model``.
"""

from __future__ import annotations

import difflib
from typing import Any

import timm
import torch
from timm.layers import build_sincos2d_pos_embed
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mim.errors import ConfigError
from mim.patches import gather_tokens


def check_model_name(name: str, example: str = "vit_tiny_patch16_224", pattern: str = "vit_*") -> None:
    """Raise :class:`ConfigError` naming close matches when timm does not know ``name``; the fix
    suggests ``timm.list_models(pattern)`` and ``example``."""
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ConfigError(
        f"timm has no model named '{name}'.{hint} "
        f"Fix: pick a name from timm.list_models('{pattern}'), e.g. {example}."
    )


def create_vit(
    name: str, img_size: int, patch_size: int, **kwargs: Any
) -> VisionTransformer:
    """Build a randomly initialised timm ViT for masked image modeling.

    Args:
        name: timm model name of a ``VisionTransformer``, e.g. ``"vit_tiny_patch16_224"``.
        img_size: input side in pixels; must be divisible by ``patch_size``.
        patch_size: patch side in pixels (overrides the name's default, e.g. 4 for 32 px CIFAR).
        **kwargs: more ``timm.create_model`` arguments (``drop_path_rate``, ``global_pool``, ...).

    Returns:
        The timm model with ``num_classes=0`` (no head) and fixed 2-D sin-cos position embeddings
        (MAE, He et al. 2021, arXiv 2111.06377, Sec. 3 "MAE encoder": "we add positional
        embeddings (the sine-cosine version)"), frozen (``requires_grad=False``).

    Raises:
        ConfigError: unknown model name, ``img_size`` not divisible by ``patch_size``, or a model
            that is not a timm ``VisionTransformer`` (e.g. a ConvNet: use SparK for those).
    """
    check_model_name(name)
    if img_size <= 0 or patch_size <= 0 or img_size % patch_size:
        raise ConfigError(
            f"img_size {img_size} is not divisible by patch_size {patch_size}. "
            f"Fix: choose a patch_size that divides {img_size} (e.g. 4 for 32 px, 16 for 224 px)."
        )
    kwargs = {"num_classes": 0, **kwargs}
    try:
        model = timm.create_model(name, pretrained=False, img_size=img_size, patch_size=patch_size, **kwargs)
    except TypeError as err:  # a model family without img_size / patch_size, or a wrong keyword argument
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
        if isinstance(model, VisionTransformer):  # a ViT after all: the user's kwargs are what it refused
            raise ConfigError(
                f"timm's '{name}' does not take backbone_kwargs {kwargs}: {err}. Fix: remove them, or use ones "
                "timm's VisionTransformer takes (e.g. drop_path_rate, init_values)."
            ) from err
    if not isinstance(model, VisionTransformer):
        raise ConfigError(
            f"'{name}' builds a {type(model).__name__}, but this method needs a timm "
            "VisionTransformer (e.g. vit_tiny_patch16_224, vit_small_patch16_224). "
            "Fix: pick a ViT, or use SparK (mim.methods.SparK) for ConvNets."
        )
    if model.pos_embed is None:
        raise ConfigError(f"'{name}' has no absolute position embedding; MAE needs one (pick a plain ViT).")
    set_sincos_pos_embed(model)
    return model


def set_sincos_pos_embed(model: VisionTransformer) -> None:
    """Fill ``model.pos_embed`` with fixed 2-D sin-cos embeddings and freeze it.

    The patch rows get ``timm.layers.build_sincos2d_pos_embed`` of the patch grid (temperature
    10000, as MAE / MoCo v3); prefix-token rows (cls, registers), where the model has them, get zeros,
    as in the official MAE code.
    """
    grid = list(model.patch_embed.grid_size)
    dim = model.pos_embed.shape[-1]
    table = build_sincos2d_pos_embed(grid, dim=dim)
    with torch.no_grad():
        model.pos_embed.zero_()
        model.pos_embed[0, model.pos_embed.shape[1] - table.shape[0] :] = table
    model.pos_embed.requires_grad_(False)


def mae_init_(module: nn.Module) -> None:
    """MAE's weight initialisation (official ``models_mae.py``, ``initialize_weights``).

    Linear layers and the patch projection (as a flattened linear map): Xavier-uniform, zero bias;
    LayerNorm: weight 1, bias 0; ``cls_token`` / ``mask_token``: normal, std 0.02.
    """
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d) and name.endswith("patch_embed.proj"):
            nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    for name, p in module.named_parameters():
        if name.endswith(("cls_token", "mask_token")):
            nn.init.normal_(p, std=0.02)


def encode_visible(vit: VisionTransformer, imgs: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """Run a timm ViT on the visible patches only (MAE Sec. 3, "MAE encoder").

    Position embeddings are added to every patch before the masked ones are dropped, so each
    visible token keeps the embedding of its place; prefix tokens (cls, registers) are kept.

    Args:
        vit: a timm ``VisionTransformer``.
        imgs: ``(B, C, H, W)`` float, normalized, ``H, W`` = the model's ``img_size``.
        ids_keep: ``(B, N_vis)`` int64 positions of the visible patches, increasing in each row
            (:func:`mim.patches.visible_ids` of a ``(B, L)`` mask).

    Returns:
        ``(B, P + N_vis, D)``: the ``P = vit.num_prefix_tokens`` prefix tokens, then the visible
        tokens in increasing position order, after the final norm.
    """
    tokens = vit._pos_embed(vit.patch_embed(imgs))
    prefix_len = vit.num_prefix_tokens
    patches = gather_tokens(tokens[:, prefix_len:], ids_keep)
    x = torch.cat([tokens[:, :prefix_len], patches], dim=1)
    x = vit.norm_pre(x)
    if vit.grad_checkpointing and torch.is_grad_enabled():
        x = checkpoint_seq(vit.blocks, x)
    else:
        x = vit.blocks(x)
    return vit.norm(x)
