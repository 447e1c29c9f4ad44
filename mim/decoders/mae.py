"""MAE's lightweight transformer decoder (He et al. 2021, arXiv 2111.06377, Sec. 3 "MAE decoder")."""

from __future__ import annotations

from functools import partial

import torch
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from torch import nn



class MAEDecoder(nn.Module):
    """Fill masked positions with a shared mask token, add positions, run Transformer blocks, predict pixels.

    "The input to the MAE decoder is the full set of tokens consisting of (i) encoded visible patches,
    and (ii) mask tokens ... We add positional embeddings to all tokens in this full set"; the last
    layer is "a linear projection whose number of output channels equals the number of pixel values
    in a patch" (MAE Sec. 3). Position embeddings are fixed 2-D sin-cos (zeros at prefix tokens).

    Args:
        grid_hw: ``(h, w)`` patch grid, ``L = h * w``.
        embed_dim: width ``D`` of the encoder tokens.
        decoder_embed_dim: decoder width (MAE default 512).
        decoder_depth: number of Transformer blocks (MAE default 8).
        decoder_num_heads: attention heads (MAE default 16).
        out_dim: values predicted per patch, ``p * p * C`` for pixels.
        num_prefix_tokens: prefix tokens (cls, registers) leading the encoder output.
        mlp_ratio: MLP hidden width / ``decoder_embed_dim``.
    """

    def __init__(
        self,
        grid_hw: tuple[int, int],
        embed_dim: int,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        out_dim: int = 768,
        num_prefix_tokens: int = 1,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        if decoder_embed_dim % decoder_num_heads:
            raise ValueError(
                f"decoder_embed_dim {decoder_embed_dim} must be divisible by decoder_num_heads "
                f"{decoder_num_heads}; fix one of them."
            )
        self.grid_hw = tuple(grid_hw)
        self.num_prefix_tokens = num_prefix_tokens
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        pos = torch.zeros(1, num_prefix_tokens + grid_hw[0] * grid_hw[1], decoder_embed_dim)
        pos[0, num_prefix_tokens:] = build_sincos2d_pos_embed(list(grid_hw), dim=decoder_embed_dim)
        self.register_buffer("decoder_pos_embed", pos, persistent=False)
        norm = partial(nn.LayerNorm, eps=1e-6)  # MAE's norm_layer
        self.decoder_blocks = nn.Sequential(
            *[
                Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = norm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, out_dim)

    def forward(self, latent: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Predict every patch.

        Args:
            latent: ``(B, P + N_vis, D)`` encoder output (prefix tokens, then visible tokens in
                increasing position order, as :func:`mim.backbones.encode_visible` returns).
            ids_keep: ``(B, N_vis)`` int64 positions of the visible tokens
                (:func:`mim.patches.visible_ids` of the mask).

        Returns:
            ``(B, L, out_dim)`` predictions for all ``L`` positions (the loss keeps the masked ones).
        """
        x = self.decoder_embed(latent)
        prefix, visible = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens :]
        length = self.grid_hw[0] * self.grid_hw[1]
        full = self.mask_token.to(x.dtype).expand(x.shape[0], length, -1)
        full = full.scatter(1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]), visible)
        x = torch.cat([prefix, full], dim=1) + self.decoder_pos_embed.to(x.dtype)
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.decoder_pred(x[:, self.num_prefix_tokens :])
