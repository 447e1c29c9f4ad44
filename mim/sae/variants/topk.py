"""TopK and AbsTopK SAEs: a fixed number of active latents per token, AuxK against dead latents."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mim.sae.kernels import LatentSort, Selector, sparse_decode
from mim.sae.variants.base import (
    SAELoss,
    SparseAutoencoder,
    SparseCode,
    _check,
    _check_non_negative,
    _check_positive,
    batch_variance,
    squared_error,
)


def aux_candidates(score: torch.Tensor, dead: torch.Tensor, k_aux: int) -> torch.Tensor:
    """(n, min(k_aux, d_sae)) int64: per row, the ids of the largest ``score`` (n, d_sae) among the ``dead``
    (d_sae,) bool latents (AuxK's, Gao et al. Sec. 2.4). Rows hold ``min(k_aux, d_sae)`` ids whatever the dead
    count (no sync): when fewer than ``k_aux`` are dead the extra slots hold live ids, which the caller zeroes
    (``values * dead[ids]``), so the code equals the top ``min(k_aux, n_dead)`` of the dead latents."""
    return score.masked_fill(~dead, -math.inf).topk(min(k_aux, score.shape[1]), dim=1, sorted=False).indices


class TopKSAE(SparseAutoencoder):
    """TopK SAE (Gao et al. 2024, arXiv 2406.04093, Sec. 2.3) with the AuxK loss on dead latents (Sec. 2.4).

    ``f = ReLU(TopK_k(z))``; loss = ``fvu + aux_coeff * auxk``. ``fvu`` is the batch-normalised MSE (module
    docstring). AuxK: the ``k_aux`` largest pre-activations among dead latents (ReLU'd) reconstruct the detached
    residual ``e = x_n - x_hat_n`` (no ``b_dec``), normalised by the residual's batch variance as in
    openai/sparse_autoencoder (``normalized_mse``); 0 when no latent is dead.

    Training step: one blocked encoder pass (:func:`~mim.sae.kernels.select_linear`) selects the top ``k`` and
    AuxK's dead-latent candidates together (no second dense pass), with a sparse backward; no host-device sync
    (see :meth:`step_dead_latents`).

    Args:
        d_model, d_sae, dead_tokens: see :class:`SparseAutoencoder`.
        k: active latents per token (``1 <= k <= d_sae``).
        k_aux: dead latents in the AuxK reconstruction; default ``d_model // 2`` (Gao et al. App. B.1's
            heuristic, sparsify's default; the paper's own runs used 512 at d_model 768+).
        aux_coeff: AuxK coefficient (Gao et al.: 1/32).

    Raises:
        ConfigError: ``k`` outside ``[1, d_sae]``, ``k_aux < 1`` or ``aux_coeff < 0`` (and the base class's).
    """

    def __init__(self, d_model: int, d_sae: int, k: int = 32, k_aux: int | None = None,
                 aux_coeff: float = 1 / 32, dead_tokens: int = 10_000_000) -> None:
        super().__init__(d_model, d_sae, dead_tokens)
        _check(1 <= k <= d_sae, "k", k, f"be in [1, d_sae={d_sae}]", f"choose 1 <= k <= {d_sae} (or raise d_sae)")
        self.k_aux = k_aux if k_aux is not None else max(d_model // 2, 1)
        _check_positive("k_aux", self.k_aux, integer=True)
        _check_non_negative("aux_coeff", aux_coeff)
        self.k, self.aux_coeff = k, aux_coeff

    def rank(self, z: torch.Tensor) -> torch.Tensor:
        """The score the top ``k`` is taken of (``z``; AbsTopK overrides it with ``|z|``)."""
        return z

    def activate(self, values: torch.Tensor) -> torch.Tensor:
        """Activation of the kept pre-activations (ReLU; AbsTopK keeps them signed)."""
        return F.relu(values)

    def _select(self, dead: torch.Tensor | None) -> Selector:
        """Per block: the top ``k`` entries, then (with a ``dead`` mask) AuxK's ``min(k_aux, d_sae)`` candidates, as
        ``(values, indices)``."""
        k, k_aux = self.k, self.k_aux

        def select(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            score = self.rank(z)
            top = score.topk(k, dim=1, sorted=False)
            if score is not z:  # ranked by another score (AbsTopK's |z|): the values are z's
                top = top.indices if dead is None else torch.cat([top.indices, aux_candidates(score, dead, k_aux)], 1)
                return z.gather(1, top), top
            if dead is None:
                return top.values, top.indices
            aux = aux_candidates(score, dead, k_aux)
            return torch.cat([top.values, z.gather(1, aux)], dim=1), torch.cat([top.indices, aux], dim=1)

        return select

    def step_dead_latents(self) -> torch.Tensor | None:
        """The dead mask (d_sae,) bool AuxK runs on this step, or ``None`` for no AuxK pass.

        Without a host-device sync: on an accelerator it is always the mask (AuxK's candidates are computed
        every step and its loss is multiplied by ``dead.any()``, so it is exactly 0 when none is dead); on the
        CPU, where reading a tensor costs nothing, ``None`` when no latent is dead (the cheaper step).
        """
        dead = self.dead_latents()
        if dead.device.type == "cpu" and not bool(dead.any()):
            return None
        return dead

    def code(self, x_n: torch.Tensor) -> SparseCode:
        values, indices = self.select_pre_acts(x_n, self._select(None))
        return SparseCode(self.activate(values), indices)

    def loss(self, x_n: torch.Tensor) -> SAELoss:
        dead = self.step_dead_latents()
        sort = LatentSort()  # the encoder's and decoder's backwards share one sort (without AuxK, the same ids)
        values, indices = self.select_pre_acts(x_n, self._select(dead), sort=sort)
        values = self.activate(values)
        code = SparseCode(values[:, : self.k], indices[:, : self.k])
        x_hat = self.decode_n(code, sort)
        mse = squared_error(x_n, x_hat)
        fvu = mse / batch_variance(x_n)
        auxk = torch.zeros_like(fvu)
        if dead is not None:
            auxk = self.dead_auxk(x_n, x_hat, values[:, self.k :], indices[:, self.k :], dead)
        return self._result(fvu + self.aux_coeff * auxk, {"mse": mse, "fvu": fvu, "auxk": auxk}, x_hat, code)

    def dead_auxk(self, x_n: torch.Tensor, x_hat: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                  dead: torch.Tensor) -> torch.Tensor:
        """AuxK of :func:`aux_candidates`' slots (``values`` already activated): live latents' slots zeroed, and 0
        when no latent is dead (no sync)."""
        values = values * dead[indices]
        return self._auxk(x_n, x_hat, values, indices) * dead.any()

    def _auxk(self, x_n: torch.Tensor, x_hat: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """AuxK: the dead latents' code (``values``, ``indices``, no ``b_dec``) against the detached residual,
        normalised by the residual's batch variance (openai ``normalized_mse``)."""
        residual = (x_n - x_hat).detach()
        e_hat = sparse_decode(values, indices, self.W_dec)
        return squared_error(residual, e_hat) / batch_variance(residual).clamp_min(1e-12)


class AbsTopKSAE(TopKSAE):
    """AbsTopK SAE ("AbsTopK: Rethinking Sparse Autoencoders For Bidirectional Features", 2025): keep the ``k``
    pre-activations of largest ``|z|`` with their signs (no ReLU), so one latent can encode both directions
    of a feature. Training as :class:`TopKSAE` (AuxK ranks dead latents by ``|z|`` too)."""

    def rank(self, z: torch.Tensor) -> torch.Tensor:
        return z.abs()

    def activate(self, values: torch.Tensor) -> torch.Tensor:
        return values
