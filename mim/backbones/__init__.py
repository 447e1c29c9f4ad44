"""Backbones: plain timm models plus the functions that run them on masked inputs."""

from mim.backbones.sparse import SparseEncoder, create_convnet
from mim.backbones.vit import create_vit, encode_visible, set_sincos_pos_embed

__all__ = ["SparseEncoder", "create_convnet", "create_vit", "encode_visible", "set_sincos_pos_embed"]
