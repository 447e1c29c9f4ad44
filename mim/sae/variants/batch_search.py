"""The exact global top ``k * N`` of a batch's pre-activations without the (N, d_sae) matrix: the training code of
BatchTopK, Matryoshka and Mutual Choice SAEs."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from mim.sae.kernels import Selector, select_entries, threshold_linear
from mim.sae.variants.base import _check, host_ints

#: The searches of :class:`BatchSearch`.
SEARCHES = ("auto", "threshold", "rows")


class BatchSearch:
    """Mixin of the variants whose training code keeps the ``k * N`` largest entries of ``ReLU(z)`` over a batch of
    ``N`` tokens (:class:`~mim.sae.variants.BatchTopKSAE`, :class:`~mim.sae.variants.MatryoshkaSAE`,
    :class:`~mim.sae.variants.MutualChoiceSAE`). Both searches are exact (the same entries as a dense
    ``ReLU(z).flatten().topk(k * N)``, up to ties) and compute ``z`` in float32, 1024 rows at a time:

    - ``threshold`` (the default on CPU): the encoder pass (:func:`~mim.sae.kernels.threshold_linear`) keeps every
      pre-activation ``z >= tau``, with ``tau = (1 - cut_margin)`` times the previous batch's cut (after a resume,
      the variant's ``threshold`` estimate, the average of past cuts), and the top ``k * N`` of that pool is
      taken. When the pool holds at least ``k * N`` entries the true cut is ``>= tau``, so every winner is in it;
      otherwise the step runs the per-row search instead. On real MAE features (ViT-Tiny block-6 patch tokens,
      k 32, d_sae 3072, lr 2e-4) the cut moves by less than 1 % per step, the pool held 1.44-1.64 ``k * N``
      entries and answered 99 of the first 100 steps (the first has no cut yet). PyTorch's CPU ``topk`` is slow
      once ``k > d_sae / 64`` (the per-row search's ``m = 128`` at this size) and the comparison costs a fifth
      of it: 75.9 against 139.6 ms per BatchTopK step there.
    - ``rows`` (the default elsewhere: an accelerator's ``topk`` has no such cliff and this search reads one
      count to the host per step, the threshold search one per block): the encoder pass
      (:func:`~mim.sae.kernels.select_linear`) keeps each row's ``m = ceil(candidate_factor * k)`` largest
      pre-activations; the global top ``k * N`` of their ReLU is taken, at cut ``t``. A row's other entries are
      at most its ``m``-th candidate, so the selection equals the dense one unless some row's ``m``-th candidate
      is positive and ``>= t`` (checked exactly, every step). Those rows (the fallback) are recomputed in full and
      join the pool with all their entries, and the top ``k * N`` is taken again: the other rows' entries outside
      their candidates are below ``t``, at most the true cut, so the pool holds every winner.

    A selection of the same blocks (AuxK's candidates) can ride along. Diagnostics, not saved: ``last_search``
    (``"threshold"`` / ``"rows"``) and ``last_fallback`` (the per-row search needed its fallback).
    """

    k: int
    d_sae: int
    threshold: torch.Tensor
    #: ``tau`` of the threshold search is ``(1 - cut_margin)`` times the previous batch's cut
    cut_margin = 0.1

    def init_search(self, candidate_factor: float, candidate_search: Literal["auto", "threshold", "rows"]) -> None:
        """Check and set the search's arguments.

        Args:
            candidate_factor: candidates per row of the per-row search, as a multiple of ``k`` (>= 1; a larger
                factor makes its fallback rarer and the common step slower; it never changes the result).
            candidate_search: ``"auto"`` (``"threshold"`` on CPU, ``"rows"`` elsewhere), ``"threshold"`` or
                ``"rows"``.

        Raises:
            ConfigError: ``candidate_factor < 1`` (or NaN), another ``candidate_search``.
        """
        _check(candidate_factor >= 1, "candidate_factor", candidate_factor, "be >= 1 (candidates per row / k)",
               "set candidate_factor to e.g. 4")
        _check(candidate_search in SEARCHES, "candidate_search", candidate_search, f"be one of {SEARCHES}",
               'set candidate_search to "auto" (the faster search for the device)')
        self.candidate_factor, self.candidate_search = candidate_factor, candidate_search
        self.last_search, self.last_fallback = "rows", False
        self._cut: torch.Tensor | None = None  # the last batch's cut (not saved)

    @torch.no_grad()
    def batch_entries(self, x_n: torch.Tensor, aux: Selector | None = None) -> tuple[torch.Tensor, ...]:
        """The batch's top ``k * N`` entries of ``ReLU(z)`` (only positive ones), without autograd.

        Args:
            x_n: (N, d_model) normalised inputs.
            aux: an optional row-wise selection run on the same blocks of ``z`` (AuxK's candidates).

        Returns:
            ``rows`` (nnz,) int64 ascending, ``ids`` (nnz,) int64, ``z`` (nnz,) float32 of the kept entries, and
            ``aux``'s values (N, s) float32 and ids (N, s) int64 (``(N, 0)`` without ``aux``).
        """
        threshold = self._uses_threshold_search(x_n)
        entries = self._threshold_entries(x_n, aux) if threshold else None
        self.last_search, self.last_fallback = ("rows" if entries is None else "threshold"), False
        if entries is None:
            entries = self._row_entries(x_n, aux)
        if threshold:
            self._cut = entries[2].amin() if entries[2].numel() else None
        return entries

    def _uses_threshold_search(self, x_n: torch.Tensor) -> bool:
        return self.candidate_search == "threshold" or (self.candidate_search == "auto" and x_n.device.type == "cpu")

    def _threshold_entries(self, x_n: torch.Tensor, aux: Selector | None) -> tuple[torch.Tensor, ...] | None:
        """The threshold search, or ``None`` when it cannot answer exactly (no cut estimate yet, or fewer than
        ``k * N`` entries at or above ``tau``)."""
        cut = self._cut
        if cut is None or cut.device != x_n.device:
            cut = self.threshold if float(self.threshold) > 0 else None  # after a resume: the averaged cut
        if cut is None or not float(cut) > 0:
            return None
        kn = self.k * len(x_n)
        with self.encoder_args(x_n, True) as (x, W, b, c):
            rows, ids, z, values, indices = threshold_linear(x, W, b, cut.float() * (1 - self.cut_margin), aux,
                                                             center=c)
        if len(z) < kn:  # the cut fell below tau: a winner may be outside the pool
            return None
        keep = torch.zeros(len(z), dtype=torch.bool, device=z.device)
        keep = keep.index_fill_(0, z.topk(kn, sorted=False).indices, True).nonzero().squeeze(1)  # in row order
        return rows[keep], ids[keep], z[keep], values, indices

    def _row_entries(self, x_n: torch.Tensor, aux: Selector | None) -> tuple[torch.Tensor, ...]:
        """The per-row search with its exact fallback."""
        kn = self.k * len(x_n)
        m = min(self.d_sae, math.ceil(self.candidate_factor * self.k))

        def select(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            top = z.topk(m, dim=1, sorted=False)
            if aux is None:
                return top.values, top.indices
            aux_values, aux_ids = select_entries(z, aux)
            return torch.cat([top.values, aux_values], dim=1), torch.cat([top.indices, aux_ids], dim=1)

        values, indices = self.select_pre_acts(x_n, select, fp32=True)
        f = F.relu(values[:, :m])
        top = f.flatten().topk(min(kn, f.numel()), sorted=False)
        cut = top.values.min() if top.values.numel() else f.new_tensor(math.inf)
        keep = torch.zeros(f.numel(), dtype=torch.bool, device=f.device).index_fill_(0, top.indices, True)
        keep = keep.view_as(f) & (f > 0)
        last = f.min(1).values  # each row's m-th candidate bounds its other entries
        over = (last > 0) & (last >= cut) if m < self.d_sae else torch.zeros_like(last, dtype=torch.bool)
        n_over, nnz = host_ints(over.sum(), keep.sum())
        self.last_fallback = n_over > 0
        if not n_over:
            rows, slots = torch.nonzero_static(keep, size=nnz).unbind(1)
            ids, z = indices[rows, slots], values[rows, slots]
        else:  # rows that may hold more winners than m: their whole rows join the pool, the cut is redone
            rows_o = torch.nonzero_static(over, size=n_over).squeeze(1)
            z_o = self.pre_acts(x_n[rows_o], True)
            pool = torch.cat([f.masked_fill(over[:, None], 0).flatten(), F.relu(z_o).flatten()])
            top = pool.topk(min(kn, pool.numel()), sorted=False)
            chosen = top.indices[top.values > 0]  # the fallback's own sync
            first = chosen < f.numel()
            pos, pos_o = chosen[first], chosen[~first] - f.numel()
            rows = torch.cat([pos // m, rows_o[pos_o // self.d_sae]])
            ids = torch.cat([indices[:, :m].flatten()[pos], pos_o % self.d_sae])
            z = torch.cat([values[:, :m].flatten()[pos], z_o.flatten()[pos_o]])
            order = rows.argsort(stable=True)
            rows, ids, z = rows[order], ids[order], z[order]
        return rows, ids, z, values[:, m:], indices[:, m:]
