"""SparK's densifier and light UNet decoder (Tian et al., ICLR 2023, arXiv 2301.03580, Sec. 3.2).

"Densify": at each of the 4 scales the sparse encoder features get a sparse normalisation
(statistics over the visible sites), a learnable mask token per scale fills the masked sites, and a
projection maps them to the decoder width of that scale (1x1 at the coarsest, 3x3 elsewhere;
official ``pretrain/spark.py``). The decoder is a light UNet: upsampling blocks from stride 32 to 1,
widths halving, the densified map of each scale added before its block (official
``pretrain/decoder.py``: ``ConvTranspose2d(4, 2, 1)`` then two 3x3 convs with BN and ReLU6).

The (transposed) convolutions are :class:`mim.backbones.tap_conv.TapConv2d` / ``TapConvTranspose2d``: the
``nn`` layers with the same parameters, whose weight gradient on CPU maps of up to 4x4 sites is a few GEMMs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from timm.layers import LayerNorm2d, trunc_normal_
from torch import nn

from mim.backbones.sparse import MASK_STRIDE, active_sites, upsample_active
from mim.backbones.tap_conv import TapConv2d, TapConvTranspose2d
from mim.sync_batchnorm import SyncedBatchNorm

DensifyNorm = Literal["bn", "ln", "none"]


class UNetBlock(nn.Sequential):
    """2x upsampling: ``ConvTranspose2d(cin, cin, 4, 2, 1)``, conv3x3-BN-ReLU6, conv3x3-BN.

    ``(B, cin, h, w)`` -> ``(B, cout, 2h, 2w)``. The norms are :class:`mim.sync_batchnorm.SyncedBatchNorm`
    (statistics over all ranks under DDP, as the official ``SyncBatchNorm``); the ReLU6 is fused into the
    first one, and index 3 is an ``nn.Identity`` so that the state dict keeps the official block's layout.
    """

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            TapConvTranspose2d(cin, cin, kernel_size=4, stride=2, padding=1),
            TapConv2d(cin, cin, kernel_size=3, padding=1, bias=False),
            SyncedBatchNorm(cin, clamp=(0.0, 6.0)),  # BN, then ReLU6
            nn.Identity(),
            TapConv2d(cin, cout, kernel_size=3, padding=1, bias=False),
            SyncedBatchNorm(cout),
        )


class SparKDecoder(nn.Module):
    """Densify SparK's 4 sparse feature maps and decode them to pixels.

    Args:
        in_channels: encoder widths at strides 4, 8, 16, 32 (e.g. ResNet-18: 64, 128, 256, 512).
        width: decoder width at stride 32, halved at every 2x upsampling (official: 768).
        densify_norm: sparse norm before filling masked sites: ``"bn"`` (official for ResNets),
            ``"ln"`` (official for ConvNeXts) or ``"none"``.
        out_chans: output channels (3 = RGB).
        downsample_ratio: total stride of the encoder (32: five 2x blocks).

    ``forward(features, active)``: ``features`` = 4 maps ``(B, C_i, H/s, W/s)``, ``s`` = 4..32 (zero
    outside the active sites), ``active (B, 1, H/32, W/32)`` bool -> ``(B, out_chans, H, W)``.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        width: int = 768,
        densify_norm: DensifyNorm = "bn",
        out_chans: int = 3,
        downsample_ratio: int = MASK_STRIDE,
    ) -> None:
        super().__init__()
        if densify_norm not in ("bn", "ln", "none"):
            raise ValueError(f"densify_norm must be 'bn', 'ln' or 'none', got {densify_norm!r}.")
        num_blocks = downsample_ratio.bit_length() - 1
        if 1 << num_blocks != downsample_ratio or num_blocks < len(in_channels):
            raise ValueError(f"downsample_ratio must be a power of 2 >= 2**{len(in_channels)}, got {downsample_ratio}.")
        widths = [width // 2**i for i in range(num_blocks + 1)]
        if widths[-1] < 1:
            raise ValueError(f"decoder width {width} cannot be halved {num_blocks} times.")
        self.width = width
        coarse_first = list(reversed(in_channels))
        self.norms = nn.ModuleList(_densify_norm(densify_norm, c) for c in coarse_first)
        self.mask_tokens = nn.ParameterList(nn.Parameter(torch.zeros(1, c, 1, 1)) for c in coarse_first)
        self.projs = nn.ModuleList(
            nn.Identity() if i == 0 and c == widths[0]
            else TapConv2d(c, widths[i], 3 if i else 1, padding=1 if i else 0)  # 1x1 at the coarsest scale, else 3x3
            for i, c in enumerate(coarse_first)
        )
        self.blocks = nn.ModuleList(UNetBlock(cin, cout) for cin, cout in zip(widths[:-1], widths[1:]))
        self.head = nn.Conv2d(widths[-1], out_chans, kernel_size=1)
        self._init_weights()

    def _init_weights(self) -> None:
        # Official: mask tokens trunc_normal(0.02) in [-0.02, 0.02]; decoder convs trunc_normal(0.02),
        # transposed convs Kaiming (fan_out), norms 1 / 0; the densify projections keep PyTorch's init.
        for token in self.mask_tokens:
            trunc_normal_(token, std=0.02, a=-0.02, b=0.02)
        for module in [*self.blocks.modules(), self.head]:
            if isinstance(module, nn.Conv2d):
                trunc_normal_(module.weight, std=0.02)
            elif isinstance(module, nn.ConvTranspose2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def densify(self, features: Sequence[torch.Tensor], active: torch.Tensor) -> list[torch.Tensor]:
        """Sparse norm, mask tokens in the masked sites, projection; returns the maps coarse first."""
        out = []
        for i, feat in enumerate(reversed(features)):
            with active_sites(active):  # the norm's statistics use the visible sites only
                feat = self.norms[i](feat)
            visible = upsample_active(active, feat.shape[-2:])
            feat = torch.where(visible, feat, self.mask_tokens[i].to(feat.dtype))
            out.append(self.projs[i](feat))
        return out

    def forward(self, features: Sequence[torch.Tensor], active: torch.Tensor) -> torch.Tensor:
        dense = self.densify(features, active)
        x = dense[0]
        for i, block in enumerate(self.blocks):
            if 0 < i < len(dense):
                x = x + dense[i]
            x = block(x)
        return self.head(x)


def _densify_norm(kind: DensifyNorm, channels: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "ln":
        return LayerNorm2d(channels, eps=1e-6)
    return nn.Identity()


__all__ = ["DensifyNorm", "SparKDecoder", "UNetBlock"]
