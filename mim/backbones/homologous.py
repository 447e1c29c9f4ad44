"""Homologous attention for timm ViT blocks (MixedAE, Chen et al. CVPR 2023, arXiv 2303.17152, Sec. 3).

In a mixed image every patch comes from one of ``1/r`` source images; "homologous" patches are the
ones from the same source. Homologous attention lets each query attend only to the ``K`` keys with
the highest attention scores (the paper's ``TopK`` sampling of the attention map,
``softmax(TopK(q k^T / sqrt(d))) v``), with ``K = r * N`` the number of patches each source owns, so
that a patch aggregates (ideally) only its own image's patches.

The timm model is not changed or patched: :func:`homologous_block_forward` calls a timm ``Block``'s
own sub-modules (``norm1``, ``attn.qkv``, ``attn.q_norm`` / ``k_norm``, ``attn.proj``, ``ls1``,
``drop_path1``, ``norm2``, ``mlp``, ``ls2``, ``drop_path2``) with the top-K rule in between, so the
same weights run timm's ordinary global attention when the encoder is fine-tuned or exported (the
paper's "replaceable" homologous attention: pretraining only).

Prefix tokens (cls, registers) belong to no source image: every query always attends to them, and
the top-K is taken over the ``N`` patch keys only (a choice; see :class:`mim.methods.mixedae.MixedAE`).
"""

from __future__ import annotations

import torch
from torch import nn

from mim.errors import ConfigError

#: Sub-modules of a timm pre-norm ``Block`` that :func:`homologous_block_forward` calls.
BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")


def check_homologous_block(block: nn.Module) -> None:
    """Raise :class:`ConfigError` unless ``block`` is a timm pre-norm ViT block with a plain attention.

    Blocks with another layout (post-norm ``ResPostBlock``, parallel blocks, rotary attention, ...)
    would be run wrongly by :func:`homologous_block_forward`, so they are refused up front.
    """
    missing = [name for name in BLOCK_PARTS if not hasattr(block, name)]
    attn = getattr(block, "attn", None)
    if attn is not None:
        missing += [f"attn.{n}" for n in ("qkv", "proj", "num_heads", "scale") if not hasattr(attn, n)]
    if missing:
        raise ConfigError(
            f"homologous attention needs timm pre-norm ViT blocks (timm.models.vision_transformer.Block), "
            f"but {type(block).__name__} lacks {', '.join(missing)}. "
            "Fix: use a plain ViT backbone (e.g. vit_tiny_patch16_224, vit_small_patch16_224)."
        )


def topk_key_mask(logits: torch.Tensor, k: int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Which keys each query keeps: its ``k`` highest-scoring patch keys plus every prefix key.

    Args:
        logits: ``(..., L_q, P + N)`` attention scores (any float dtype), ``P = num_prefix_tokens``.
        k: patch keys kept per query, ``1 <= k <= N``.
        num_prefix_tokens: leading prefix keys (cls, registers), always kept.

    Returns:
        Bool tensor of ``logits``' shape, ``True`` = attend; exactly ``P + k`` ``True`` per row
        (ties are broken by ``torch.topk``, so never more than ``k`` patch keys).
    """
    num_patches = logits.shape[-1] - num_prefix_tokens
    if not 1 <= k <= num_patches:
        raise ValueError(f"top-k must lie in [1, {num_patches}] (the patch keys), got {k}")
    patch_logits = logits[..., num_prefix_tokens:]
    keep_patch = torch.zeros_like(patch_logits, dtype=torch.bool)
    keep_patch.scatter_(-1, patch_logits.topk(k, dim=-1).indices, True)
    keep_prefix = keep_patch.new_ones(*logits.shape[:-1], num_prefix_tokens)
    return torch.cat([keep_prefix, keep_patch], dim=-1)


def homologous_attention(
    attn: nn.Module, x: torch.Tensor, k: int, num_prefix_tokens: int = 1, return_weights: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """timm ``Attention`` forward where each query keeps only its top-``k`` patch keys.

    ``HomoAtt(Q, K, V) = softmax(TopK(Q K^T / sqrt(d))) V`` (MixedAE Sec. 3, homologous attention):
    the scores outside each query's top-``k`` patch keys (per head) are set to ``-inf`` before the
    softmax; prefix keys are always kept. The top-k selection itself carries no gradient (it is an
    index); gradients flow through the kept scores, as with any masked attention.

    Args:
        attn: a timm ``vision_transformer.Attention`` (``qkv``, ``q_norm``, ``k_norm``, ``attn_drop``,
            ``norm``, ``proj``, ``proj_drop``, optional ``gate``), used as is.
        x: ``(B, P + N, C)`` tokens after the block's ``norm1``.
        k: patch keys kept per query (MixedAE: ``K = r * N``).
        num_prefix_tokens: ``P``.
        return_weights: also return the attention weights.

    Returns:
        ``(B, P + N, C)`` output in ``x``'s dtype; with ``return_weights`` also the weights
        ``(B, heads, P + N, P + N)`` float32 (after dropout), zero outside the kept keys.
    """
    batch, length, _ = x.shape
    heads = attn.num_heads
    head_dim = getattr(attn, "head_dim", None) or attn.qkv.out_features // (3 * heads)
    gate_layer = getattr(attn, "gate", None)
    gate = gate_layer(x).sigmoid() if gate_layer is not None else None
    qkv = attn.qkv(x).reshape(batch, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, key, v = qkv.unbind(0)
    q, key = attn.q_norm(q), attn.k_norm(key)
    logits = (q * attn.scale) @ key.transpose(-2, -1)  # (B, H, L, L)
    keep = topk_key_mask(logits.detach(), k, num_prefix_tokens)
    weights = logits.float().masked_fill(~keep, float("-inf")).softmax(dim=-1)
    weights = attn.attn_drop(weights)
    out = (weights.to(v.dtype) @ v).transpose(1, 2).reshape(batch, length, heads * head_dim)
    out = getattr(attn, "norm", nn.Identity())(out)
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    return (out, weights) if return_weights else out


def homologous_block_forward(block: nn.Module, x: torch.Tensor, k: int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """One timm ViT ``Block`` with homologous attention in place of its global self-attention.

    Same as ``block(x)`` (``x + drop_path1(ls1(attn(norm1(x))))``, then
    ``x + drop_path2(ls2(mlp(norm2(x))))``) except the attention keeps only each query's top-``k``
    patch keys (:func:`homologous_attention`). With ``k = N`` it equals ``block(x)``.

    Args:
        block: timm ``vision_transformer.Block`` (checked by :func:`check_homologous_block`).
        x: ``(B, P + N, C)`` tokens.
        k: patch keys kept per query.
        num_prefix_tokens: ``P``.

    Returns:
        ``(B, P + N, C)``.
    """
    attn_out = homologous_attention(block.attn, block.norm1(x), k, num_prefix_tokens)
    x = x + block.drop_path1(block.ls1(attn_out))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
