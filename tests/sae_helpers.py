"""Helpers of the SAE variant tests: a seeded, initialised SAE and the training step of
:class:`mim.sae.module.SAETraining` without Lightning (the tokens come from conftest's ``sae_tokens``)."""

from __future__ import annotations

import torch

from mim.sae import VARIANTS, SparseAutoencoder

D = 192  # d_model of the ``sae_stores`` features


def make_sae(name: str, x: torch.Tensor, d_sae: int, kwargs: dict, **overrides) -> SparseAutoencoder:
    """``VARIANTS[name](D, d_sae, **kwargs, **overrides)`` seeded with 0, initialised on ``x[:4096]``."""
    torch.manual_seed(0)
    sae = VARIANTS[name](D, d_sae, **{**kwargs, **overrides})
    sae.initialize(x[:4096])
    return sae


def train_sae(sae: SparseAutoencoder, x: torch.Tensor, steps: int, lr: float = 2e-3, batch: int = 1024) -> None:
    """The step of :class:`mim.sae.module.SAETraining` (loss, parallel-gradient removal, Adam, decoder
    constraint, firing bookkeeping) on ``steps`` random batches of ``x``; leaves ``sae`` in eval mode."""
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(0)
    sae.train()
    for _ in range(steps):
        rows = torch.randint(len(x), (batch,), generator=generator)
        out = sae.loss(sae.normalize(x[rows]))
        optimizer.zero_grad()
        out.loss.backward()
        sae.remove_parallel_grad_()
        optimizer.step()
        sae.normalize_decoder_()
        sae.update_firing(out.fired, batch)
    sae.eval()
