"""Batch normalisation whose training statistics span all DDP ranks, on any device (CPU/gloo included).

``torch.nn.SyncBatchNorm`` refuses CPU tensors; this one reduces the counts, moments and gradient sums with
:func:`mim.backbones.sparse.masked_batch_norm` (every site active), so it is exactly ``BatchNorm`` over the
batch of all ranks together. SparK's decoder uses it (the official code converts its decoder to
``SyncBatchNorm`` under DDP, keyu-tian/SparK ``pretrain/main.py``), and so does the online probe's head.
"""

from __future__ import annotations

import torch
from torch import nn

from mim.backbones.sparse import masked_batch_norm


def _distributed() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class SyncedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """``BatchNorm1d`` / ``BatchNorm2d`` (same arguments, same state dict) that, in training under an
    initialised process group of more than one rank, normalises with the statistics of all ranks' batches
    and updates the running statistics with them (unbiased variance, as ``nn.BatchNorm2d``). Outside
    DDP, and in eval mode, it is plain ``BatchNorm``.

    Input: ``(N, C)`` or ``(N, C, H, W)`` float (statistics in float32, output in the input's dtype).
    Every rank must call it the same number of times per step (it is a collective under DDP).
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in (2, 4):
            raise ValueError(f"SyncedBatchNorm expects (N, C) or (N, C, H, W) input, got {tuple(input.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.track_running_stats and _distributed()):
            return super().forward(x)
        self.num_batches_tracked.add_(1)
        x4 = x if x.dim() == 4 else x[:, :, None, None]
        sites = x4.new_ones(x4.shape[0], 1, *x4.shape[2:])
        out = masked_batch_norm(x4, sites, self.running_mean, self.running_var, self.weight, self.bias,
                                self.momentum, self.eps, sync=True).to(x.dtype)
        return out if x.dim() == 4 else out[:, :, 0, 0]

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """``module`` with every ``nn.BatchNorm1d/2d`` replaced by a :class:`SyncedBatchNorm` holding the same
        parameters and buffers (in place for children; returns the converted root)."""
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and not isinstance(module, cls):
            synced = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
            synced.load_state_dict(module.state_dict())
            synced.train(module.training)
            return synced
        for name, child in module.named_children():
            setattr(module, name, cls.convert(child))
        return module


__all__ = ["SyncedBatchNorm"]
