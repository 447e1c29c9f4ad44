"""Nearest latents by decoder cosine similarity, in blocks (never the full d_sae x d_sae matrix).

Two latents whose decoder rows (atoms, ``SparseAutoencoder.W_dec`` rows) point the same way write the same
direction into the feature space; the explorer links each latent to its ``n`` nearest atoms by cosine
``<d_i, d_j> / (|d_i| |d_j|)`` (as Bricken et al. 2023, "Towards Monosemanticity", feature splitting, and
:func:`mim.sae.metrics.decoder_coherence`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Elements of one (block x d_sae) similarity block (64 MB of float32).
BLOCK_ELEMENTS = 1 << 24


def nearest_atoms(W_dec: torch.Tensor, n: int = 8, block_elements: int = BLOCK_ELEMENTS
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``n`` atoms nearest to each atom by cosine similarity (itself excluded), most similar first.

    Args:
        W_dec: (d_sae, d_model) decoder, one atom per row; a zero row has cosine 0 with every atom.
        n: neighbours per atom (at most ``d_sae - 1``).
        block_elements: size of one similarity block (rows x d_sae), bounding the memory.

    Returns:
        ``(ids (d_sae, n') int64, cosine (d_sae, n') float32)`` with ``n' = min(n, d_sae - 1)``; ties: smaller id
        first.
    """
    atoms = F.normalize(W_dec.detach().float(), dim=1)
    d_sae = len(atoms)
    n = max(0, min(n, d_sae - 1))
    ids = torch.zeros(d_sae, n, dtype=torch.long)
    cosine = torch.zeros(d_sae, n, dtype=torch.float32)
    if n == 0:
        return ids, cosine
    rows = max(1, block_elements // d_sae)
    for start in range(0, d_sae, rows):
        stop = min(d_sae, start + rows)
        sims = atoms[start:stop] @ atoms.T
        sims[torch.arange(stop - start), torch.arange(start, stop)] = -float("inf")
        # stable ties: sort the top n + a margin by (-value, id)
        values, found = sims.topk(min(d_sae, n + 8), dim=1)
        order = torch.argsort(found, dim=1)
        values, found = values.gather(1, order), found.gather(1, order)
        order = torch.sort(-values, dim=1, stable=True).indices[:, :n]
        ids[start:stop] = found.gather(1, order).cpu()
        cosine[start:stop] = values.gather(1, order).cpu()
    return ids, cosine


__all__ = ["BLOCK_ELEMENTS", "nearest_atoms"]
