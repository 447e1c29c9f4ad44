"""MSAE: a TopK SAE whose loss nests over the number of active latents (rank prefixes of one sorted top-k code).
Also holds :func:`auxk_loss`, the AuxK term over any set of candidate latents, shared with the choice and
archetypal SAEs."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from mim.errors import UserError
from mim.sae.kernels import select_linear, sparse_decode
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

#: The prefix-loss weightings of Zaigrajew et al. 2025 (Sec. 3): ``uniform`` (UW) and ``reverse`` (RW).
WEIGHTINGS = ("uniform", "reverse")


def auxk_loss(sae: SparseAutoencoder, x_n: torch.Tensor, x_hat: torch.Tensor, candidates: torch.Tensor,
              W_dec: torch.Tensor | None = None) -> torch.Tensor:
    """AuxK (Gao et al. 2024, arXiv 2406.04093, Sec. 2.4 / App. A.2) over the latents in ``candidates``.

    The ``k_aux`` largest pre-activations among the candidates (ReLU'd; ``sae.k_aux``) reconstruct the detached
    residual ``e = x_n - x_hat`` (no ``b_dec``); the squared error is normalised by the residual's batch variance
    (openai ``normalized_mse``), as :class:`~mim.sae.variants.topk.TopKSAE` does. Only the candidate rows of
    ``W_enc`` enter the matmul, and its backward is sparse (:func:`~mim.sae.kernels.select_linear`).

    Args:
        sae: a variant with ``W_enc``, ``b_enc``, ``b_dec`` and an int ``k_aux``.
        x_n: (N, d_model) normalised inputs.
        x_hat: (N, d_model) their reconstruction (detached here).
        candidates: (d_sae,) bool, the latents that may take part (at least one set).
        W_dec: (d_sae, d_model) decoder to use (default ``sae.W_dec``; pass it when it is computed, as the
            archetypal SAE's is).

    Returns:
        scalar float32 loss.
    """
    ids = candidates.nonzero().squeeze(1)
    k_aux = min(int(sae.k_aux), len(ids))
    residual = (x_n - x_hat).detach()
    values, local = select_linear(x_n, sae.W_enc[ids], sae.b_enc[ids],
                                  lambda z: z.topk(k_aux, dim=1, sorted=False), center=sae.b_dec)
    e_hat = sparse_decode(F.relu(values), ids[local], sae.W_dec if W_dec is None else W_dec)
    return squared_error(residual, e_hat) / batch_variance(residual).clamp_min(1e-12)


class MSAE(SparseAutoencoder):
    """Matryoshka SAE over the number of active latents (Zaigrajew, Baniecki & Biecek 2025, "Interpreting CLIP
    with Hierarchical Sparse Autoencoders", arXiv 2502.20578, Sec. 3).

    One TopK selection of ``k_max = ks[-1]`` latents per token, sorted by value (``f = ReLU(TopK_kmax(z))``, as
    :class:`~mim.sae.variants.topk.TopKSAE`); the reconstruction from the ``k_i`` largest entries,
    ``x_hat_i = W_dec^T f[:k_i] + b_dec``, is scored for every ``k_1 < ... < k_max``, and the loss is their
    weighted mean ``sum_i a_i fvu_i / sum_i a_i`` (``fvu_i``: batch-normalised MSE of prefix ``i``, the TopK
    family's loss) plus ``aux_coeff * auxk`` on dead latents (:func:`auxk_loss`). Because each prefix is the top
    ``k_i`` of the same ranking, one model serves every ``k <= k_max`` at inference (:meth:`code_k`).

    Weightings (the paper's two, Sec. 3): ``uniform`` (UW) ``a_i = 1``; ``reverse`` (RW) ``a_i = m - i + 1``
    for prefix ``i = 1..m`` (the sparsest prefix weighs most). Choices the paper leaves to the implementation:
    the weights are normalised to sum to 1 (a constant factor for fixed ``ks``; it keeps AuxK's coefficient
    1/32 meaning what it does for TopK), the default is ``uniform``, and ``ks`` default to a doubling schedule
    ending at 64 (the paper doubles ``k`` up to the latent width on CLIP embeddings; mim keeps the TopK
    budget of patch-token SAEs). The prefixes are decoded as segment sums (slots ``k_{i-1}..k_i``) and a
    cumulative sum, so the whole nest costs one ``k_max``-sparse decode (:meth:`prefix_reconstructions`).

    Args:
        d_model, d_sae, dead_tokens: see :class:`SparseAutoencoder`.
        ks: strictly increasing prefix sizes in ``[1, d_sae]``; default ``[8, 16, 32, 64]`` (capped at d_sae).
        weighting: ``"uniform"`` or ``"reverse"``.
        inference_k: active latents per token of :meth:`code` (``encode`` / ``forward``); default ``k_max``.
        k_aux: dead latents in the AuxK reconstruction; default ``d_model // 2``.
        aux_coeff: AuxK coefficient (Gao et al.: 1/32).

    Raises:
        ConfigError: ``ks`` empty, not strictly increasing, below 1 or above ``d_sae``; ``weighting`` unknown;
            ``inference_k`` outside ``[1, k_max]``; ``k_aux < 1``; ``aux_coeff < 0``.
    """

    def __init__(self, d_model: int, d_sae: int, ks: list[int] | None = None, weighting: str = "uniform",
                 inference_k: int | None = None, k_aux: int | None = None, aux_coeff: float = 1 / 32,
                 dead_tokens: int = 10_000_000) -> None:
        super().__init__(d_model, d_sae, dead_tokens)
        if ks is None:
            ks = sorted({min(k, d_sae) for k in (8, 16, 32, 64)})
        ks = [int(k) for k in ks]
        _check(bool(ks) and ks[0] >= 1 and ks[-1] <= d_sae and all(b > a for a, b in itertools.pairwise(ks)),
               "ks", ks, f"increase strictly within [1, d_sae={d_sae}]",
               "e.g. ks [8, 16, 32, 64] (each k the number of active latents of one prefix), or leave ks unset")
        _check(weighting in WEIGHTINGS, "weighting", weighting, f"be one of {list(WEIGHTINGS)}",
               "set weighting to uniform (every prefix alike) or reverse (the sparsest prefix weighs most)")
        k_max = ks[-1]
        inference_k = k_max if inference_k is None else int(inference_k)
        _check(1 <= inference_k <= k_max, "inference_k", inference_k, f"be in [1, k_max={k_max}] (k_max = ks[-1])",
               f"choose inference_k <= {k_max}, or end ks with a larger k")
        self.k_aux = k_aux if k_aux is not None else max(d_model // 2, 1)
        _check_positive("k_aux", self.k_aux, integer=True)
        _check_non_negative("aux_coeff", aux_coeff)
        self.ks, self.weighting, self.inference_k, self.aux_coeff = ks, weighting, inference_k, aux_coeff

    @property
    def k_max(self) -> int:
        """The largest prefix, the width of the training selection."""
        return self.ks[-1]

    def prefix_weights(self) -> list[float]:
        """The weight ``a_i / sum_j a_j`` of each prefix loss, in the order of :attr:`ks` (class docstring)."""
        m = len(self.ks)
        raw = [1.0] * m if self.weighting == "uniform" else [float(m - i) for i in range(m)]
        return [w / sum(raw) for w in raw]

    # ----------------------------------------------------------------------------------------------- inference
    def _topk(self, x_n: torch.Tensor, k: int) -> SparseCode:
        values, indices = self.select_pre_acts(x_n, lambda z: z.topk(k, dim=1, sorted=True))
        return SparseCode(F.relu(values), indices)

    def code_k(self, x_n: torch.Tensor, k: int) -> SparseCode:
        """The prefix code with ``k`` active latents: ``ReLU(TopK_k(z))`` of normalised inputs ``x_n``
        (N, d_model), slots sorted by value (largest first).

        Raises:
            UserError: ``k`` outside ``[1, d_sae]`` (``k`` above ``k_max`` works but was never trained).
        """
        if not 1 <= int(k) <= self.d_sae:
            raise UserError(f"MSAE prefix k must be in [1, d_sae={self.d_sae}], got {k}. Fix: pick one of ks {self.ks}.")
        return self._topk(x_n, int(k))

    def encode_k(self, x: torch.Tensor, k: int) -> SparseCode:
        """:meth:`code_k` of raw features ``x`` (N, d_model); decode it with :meth:`decode`."""
        return self.code_k(self.normalize(x), k)

    def code(self, x_n: torch.Tensor) -> SparseCode:
        return self.code_k(x_n, self.inference_k)

    # ------------------------------------------------------------------------------------------------ training
    def prefix_reconstructions(self, code: SparseCode) -> list[torch.Tensor]:
        """``x_hat_n`` (N, d_model) of each prefix of a sorted ``code`` of width ``>= k_max``, in the order of
        :attr:`ks`: one ``embedding_bag`` sums each token's slots ``k_{i-1}..k_i`` (a bag per segment and token,
        segment-major, so each segment's partial reconstructions are one contiguous (N, d_model) block), and
        running sums over the segments give the prefixes (one sparse backward into ``W_dec``, not one dense
        ``W_dec`` gradient per prefix; plain additions, not a ``cumsum`` whose backward flips the gradient)."""
        n, device = code.values.shape[0], code.values.device
        bounds = list(itertools.pairwise([0, *self.ks]))
        values = torch.cat([code.values[:, a:b].flatten() for a, b in bounds]).to(self.W_dec.dtype)
        indices = torch.cat([code.indices[:, a:b].flatten() for a, b in bounds])
        offsets = torch.cat([n * a + torch.arange(n, device=device) * (b - a) for a, b in bounds])
        segments = F.embedding_bag(indices, self.W_dec, offsets, per_sample_weights=values, mode="sum")
        x_hat, *rest = segments.view(len(self.ks), n, -1).unbind(0)
        prefixes = [x_hat + self.b_dec]
        for part in rest:
            prefixes.append(prefixes[-1] + part)
        return prefixes

    def loss(self, x_n: torch.Tensor) -> SAELoss:
        code = self._topk(x_n, self.k_max)
        variance = batch_variance(x_n)
        x_hats = self.prefix_reconstructions(code)
        errors = [squared_error(x_n, x_hat) for x_hat in x_hats]
        fvus = [error / variance for error in errors]
        loss = sum(w * fvu for w, fvu in zip(self.prefix_weights(), fvus))
        dead = self.dead_latents()
        auxk = auxk_loss(self, x_n, x_hats[-1], dead) if bool(dead.any()) else torch.zeros_like(loss)
        terms = {"mse": errors[-1], "fvu": fvus[-1], "auxk": auxk,
                 **{f"fvu_k{k}": fvu for k, fvu in zip(self.ks, fvus)}}
        return self._result(loss + self.aux_coeff * auxk, terms, x_hats[-1], code)
