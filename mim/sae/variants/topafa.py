"""top-AFA SAE: per-token active counts chosen by matching the code norm to the input norm."""

from __future__ import annotations

import torch

from mim.sae.kernels import LatentSort, Selector, select_entries
from mim.sae.variants.base import (
    SAELoss,
    SparseCode,
    _check_non_negative,
    _check_positive,
    batch_variance,
    squared_error,
)
from mim.sae.variants.topk import TopKSAE


class TopAFASAE(TopKSAE):
    """top-AFA SAE (Lee et al. 2025, "Evaluating and Designing Sparse Autoencoders by Approximating
    Quasi-Orthogonality", arXiv 2503.24277, Sec. 5): no fixed ``k``. With quasi-orthogonal unit atoms the norm
    of the sparse code approximates the norm of the input it encodes (the approximate feature activation, AFA),
    so each token keeps its largest ``ReLU(z)`` values, sorted descending, up to the count whose cumulative
    norm ``sqrt(sum_{i<=n} f_i^2)`` is closest to ``||x_n - b_dec||`` (the authors' ``training/sae.py``: the
    closest prefix, at least one latent). The loss adds the AFA term ``afa_coeff * E (||f|| - ||x_n - b_dec||)^2``
    to :class:`TopKSAE`'s ``fvu + aux_coeff * auxk``.

    Deviation (for speed): the search runs over the ``k_max`` largest values, not all ``d_sae``; a token that
    would need more keeps ``k_max``.

    Args:
        k_max: cap on active latents per token (a cap above ``d_sae`` acts as ``d_sae``).
        afa_coeff: weight of the AFA norm-matching term (the authors sweep 1/128 to 1/16).
        (others as :class:`TopKSAE`)

    Raises:
        ConfigError: ``k_max < 1`` or ``afa_coeff < 0`` (and :class:`TopKSAE`'s).
    """

    def __init__(self, d_model: int, d_sae: int, k_max: int = 128, afa_coeff: float = 1 / 32,
                 k_aux: int | None = None, aux_coeff: float = 1 / 32, dead_tokens: int = 10_000_000) -> None:
        _check_positive("k_max", k_max, integer=True)
        _check_non_negative("afa_coeff", afa_coeff)
        super().__init__(d_model, d_sae, min(k_max, max(d_sae, 1)), k_aux, aux_coeff, dead_tokens)
        self.k_max, self.afa_coeff = k_max, afa_coeff

    def _select(self, dead: torch.Tensor | None) -> Selector:
        select = super()._select(dead)

        def sorted_select(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            values, indices = select_entries(z, select)
            order = values[:, : self.k].argsort(dim=1, descending=True)
            return (torch.cat([values[:, : self.k].gather(1, order), values[:, self.k :]], dim=1),
                    torch.cat([indices[:, : self.k].gather(1, order), indices[:, self.k :]], dim=1))

        return sorted_select

    def _afa(self, x_n: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> SparseCode:
        """Keep, per row, the prefix of the descending ``values`` whose norm is closest to ``||x_n - b_dec||``
        (norms in float32, also when ``values`` come from an autocast matmul)."""
        target = (x_n - self.b_dec).detach().float().norm(dim=1, keepdim=True)
        norms = values.detach().float().pow(2).cumsum(1).sqrt()
        count = (norms - target).abs().argmin(dim=1, keepdim=True)  # index of the last kept slot
        keep = torch.arange(values.shape[1], device=values.device) <= count
        return SparseCode(values * keep, indices)

    def code(self, x_n: torch.Tensor) -> SparseCode:
        values, indices = self.select_pre_acts(x_n, self._select(None))
        return self._afa(x_n, self.activate(values), indices)

    def loss(self, x_n: torch.Tensor) -> SAELoss:
        dead = self.step_dead_latents()
        sort = LatentSort()  # shared by the encoder's and decoder's backwards (as TopKSAE.loss)
        values, indices = self.select_pre_acts(x_n, self._select(dead), sort=sort)
        values = self.activate(values)
        code = self._afa(x_n, values[:, : self.k], indices[:, : self.k])
        x_hat = self.decode_n(code, sort)
        mse = squared_error(x_n, x_hat)
        fvu = mse / batch_variance(x_n)
        afa = (code.values.float().norm(dim=1) - (x_n - self.b_dec).float().norm(dim=1)).pow(2).mean()
        auxk = torch.zeros_like(fvu)
        if dead is not None:
            auxk = self.dead_auxk(x_n, x_hat, values[:, self.k :], indices[:, self.k :], dead)
        terms = {"mse": mse, "fvu": fvu, "afa": afa, "auxk": auxk}
        return self._result(fvu + self.afa_coeff * afa + self.aux_coeff * terms["auxk"], terms, x_hat, code)
