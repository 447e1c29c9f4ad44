"""CAE's latent contextual regressor and decoder (Chen et al. 2022, "Context Autoencoder for
Self-Supervised Representation Learning", arXiv 2202.03026, Sec. 3.1 "Architecture").

The regressor predicts the encoder representations of the masked patches from those of the visible
patches with cross-attention only, so the visible representations are never updated by it; the
decoder then maps the predicted representations (plus the masked positions) to the pretext target,
without seeing the visible patches. Layout follows the official code (``models/modeling_cae_helper.py``
of github.com/Atten4Vis/CAE: ``RegressorBlock``, ``VisionTransformerNeck``).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale, Mlp, build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from torch import nn

from mim.patches import gather_tokens

#: The official code's ``norm_layer``.
Norm = partial(nn.LayerNorm, eps=1e-6)


def sincos_table(grid_hw: tuple[int, int], dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embeddings ``(h*w, dim)`` float32, the same table the encoder's
    patch rows get (:func:`mim.backbones.vit.set_sincos_pos_embed`)."""
    return build_sincos2d_pos_embed(list(grid_hw), dim=dim)


class CrossAttention(nn.Module):
    """Multi-head attention of ``N_q`` queries over ``N_k`` keys/values, via
    ``F.scaled_dot_product_attention``.

    As the official ``CrossAttention``, queries and values get a bias (``qkv_bias``) and keys none (a
    key bias adds the same logit to every key of a query, so softmax cancels it).

    Args:
        dim: token width ``D``, divisible by ``num_heads``.
        num_heads: attention heads.
        qkv_bias: bias on the query and value projections.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} must be divisible by num_heads {num_heads}; fix one of them.")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``(B, N_q, D)``, ``(B, N_k, D)``, ``(B, N_k, D)`` -> ``(B, N_q, D)``."""
        heads = lambda x: x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(heads(self.q(q)), heads(self.k(k)), heads(self.v(v)))
        return self.proj(out.transpose(1, 2).flatten(2))


class RegressorBlock(nn.Module):
    """One cross-attention layer of the latent contextual regressor (official ``RegressorBlock``).

    With ``x`` the current mask-query states, ``z`` the visible representations and ``p`` sin-cos
    position embeddings::

        kv = [z, x]                                        # visible latents + the queries themselves
        x = x + ls1(attn(q=norm_q(x + p_m), k=norm_k(kv + [p_v, p_m]), v=norm_v(kv)))
        x = norm2(x)
        x = x + ls2(mlp(x))

    Positions enter queries and keys, not values (paper Sec. 3.1: the masked patches' positions are
    used to compute the attention weights; the official code also adds the visible ones to their
    keys). Keys/values are the visible representations together with the output of the previous
    layer (the mask queries at the first), as paper and code. The norm on the residual stream
    before the MLP is the official code's.

    Args:
        dim: width ``D`` (the encoder's).
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / ``dim``.
        init_values: LayerScale init (official 0.1 for ViT-B); ``None`` disables it.
        drop_path: stochastic-depth rate.
    """

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float = 4.0, init_values: float | None = 0.1, drop_path: float = 0.0
    ) -> None:
        super().__init__()
        self.norm_q, self.norm_k, self.norm_v, self.norm2 = Norm(dim), Norm(dim), Norm(dim), Norm(dim)
        self.attn = CrossAttention(dim, num_heads)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(
        self, x: torch.Tensor, visible: torch.Tensor, pos_masked: torch.Tensor, pos_visible: torch.Tensor
    ) -> torch.Tensor:
        """``x (B, N_m, D)``, ``visible (B, N_v, D)``, ``pos_masked (B, N_m, D)``,
        ``pos_visible (B, N_v, D)`` -> ``(B, N_m, D)``."""
        kv = torch.cat([visible, x], dim=1)
        pos_kv = torch.cat([pos_visible, pos_masked], dim=1)
        attn = self.attn(self.norm_q(x + pos_masked), self.norm_k(kv + pos_kv), self.norm_v(kv))
        x = x + self.drop_path(self.ls1(attn))
        x = self.norm2(x)
        return x + self.drop_path(self.ls2(self.mlp(x)))


class CAERegressor(nn.Module):
    """Latent contextual regressor ``H``: predict the masked patches' representations (Sec. 3.1).

    The queries start as one learned mask token shared by all masked patches; each layer is a
    :class:`RegressorBlock`; a final LayerNorm puts the output on the scale of the encoder's
    (normed) output, with which it is aligned.

    Args:
        grid_hw: ``(h, w)`` patch grid, ``L = h * w``.
        dim: width ``D`` of the encoder tokens (the regressor works at that width, as the official
            default ``decoder_embed_dim = embed_dim``).
        depth: cross-attention layers (paper / official: 4 for ViT-S, ViT-B and ViT-L).
        num_heads: attention heads.
        mlp_ratio, init_values, drop_path_rate: see :class:`RegressorBlock` (drop path rises
            linearly from 0 to ``drop_path_rate`` over the layers).
    """

    def __init__(
        self,
        grid_hw: tuple[int, int],
        dim: int,
        depth: int = 4,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        init_values: float | None = 0.1,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_table(grid_hw, dim), persistent=False)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(RegressorBlock(dim, num_heads, mlp_ratio, init_values, r) for r in rates)
        self.norm = Norm(dim)

    def forward(self, visible: torch.Tensor, ids_keep: torch.Tensor, ids_masked: torch.Tensor) -> torch.Tensor:
        """Predict the representations of the masked patches.

        Args:
            visible: ``(B, N_v, D)`` encoder output of the visible patches (prefix tokens removed), in
                the order of ``ids_keep``.
            ids_keep: ``(B, N_v)`` int64 visible positions (:func:`mim.patches.visible_ids`).
            ids_masked: ``(B, N_m)`` int64 masked positions, increasing in each row.

        Returns:
            ``(B, N_m, D)`` predicted representations, in the order of ``ids_masked``.
        """
        pos = self.pos_embed.to(visible.dtype).expand(visible.shape[0], -1, -1)
        pos_visible, pos_masked = gather_tokens(pos, ids_keep), gather_tokens(pos, ids_masked)
        x = self.mask_token.to(visible.dtype).expand(ids_masked.shape[0], ids_masked.shape[1], -1)
        for block in self.blocks:
            x = block(x, visible, pos_masked, pos_visible)
        return self.norm(x)


class CAEDecoder(nn.Module):
    """Decoder ``G``: self-attention over the predicted masked representations only, then a linear
    layer to the per-patch target (Sec. 3.1: its input is the regressor output plus the masked
    patches' position embeddings; it never sees the visible patches).

    Blocks are timm ``Block`` (pre-norm self-attention + MLP, LayerScale as the official
    ``decoder_layer_scale_init_value``), then LayerNorm and the linear head, as the official
    ``VisionTransformerNeck``. ``depth = 0`` leaves norm + linear head.

    Args:
        grid_hw: ``(h, w)`` patch grid.
        dim: width ``D``.
        out_dim: values predicted per patch (``p*p*3`` for pixels; the teacher's width for features).
        depth: self-attention blocks (paper / official: 4).
        num_heads, mlp_ratio, init_values, drop_path_rate: as :class:`CAERegressor`.
    """

    def __init__(
        self,
        grid_hw: tuple[int, int],
        dim: int,
        out_dim: int,
        depth: int = 4,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        init_values: float | None = 0.1,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.register_buffer("pos_embed", sincos_table(grid_hw, dim), persistent=False)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.Sequential(
            *[Block(dim, num_heads, mlp_ratio, qkv_bias=True, init_values=init_values, drop_path=r, norm_layer=Norm)
              for r in rates]
        )
        self.norm = Norm(dim)
        self.head = nn.Linear(dim, out_dim)

    def forward(self, latent: torch.Tensor, ids_masked: torch.Tensor) -> torch.Tensor:
        """``latent (B, N_m, D)`` (regressor output), ``ids_masked (B, N_m)`` -> ``(B, N_m, out_dim)``."""
        pos = gather_tokens(self.pos_embed.to(latent.dtype).expand(latent.shape[0], -1, -1), ids_masked)
        return self.head(self.norm(self.blocks(latent + pos)))
