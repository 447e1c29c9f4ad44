"""ReLU SAE with the decoder-norm-weighted L1 penalty."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mim.sae.variants.base import (
    SAELoss,
    SparseAutoencoder,
    SparseCode,
    SupportStep,
    _check,
    _check_fraction,
    _check_non_negative,
    _check_positive,
    host_ints,
    threshold_code,
)


class ReLUSAE(SupportStep, SparseAutoencoder):
    """ReLU SAE with the L1 penalty weighted by decoder norms (Conerly et al. 2024, "Circuits Updates – April
    2024", transformer-circuits.pub/2024/april-update, "Training SAEs"): ``f = ReLU(z)``, loss =
    ``E||x_n - x_hat_n||^2 + l1_coeff * E sum_i f_i ||W_dec,i||``. The decoder is not norm-constrained (the
    penalty makes shrinking it useless); its rows start at norm ``decoder_init_norm`` (0.1; the update draws
    them with norms 0.05-1). ``l1_coeff`` is warmed up linearly over the first ``l1_warmup_steps`` steps
    of training (the update: the first 5 %), counted by the SAE's ``step`` buffer. The update encodes ``x``
    itself and starts ``b_dec`` at 0; here, as in every variant, ``b_dec`` (the geometric median) is
    subtracted first (module docstring).

    Dead latents (optional, ``pre_act_coeff > 0``): SAELens' pre-activation loss
    (:meth:`~mim.sae.variants.base.SupportStep.dead_pre_act_loss` with threshold 0),
    ``pre_act_coeff * E_n sum_{j dead} ReLU(-z_nj) ||W_dec,j||``, on the dead latents' columns only.

    Sparse training step (exact, :class:`~mim.sae.variants.base.SupportStep`): the positive entries of ``z`` from
    row-wise candidates (rows with more recomputed in full), the decoder, the L1 term and the encoder's
    backward only at them; the dense step (plain autograd) while the code is dense (the candidate width for
    the mean positive count above ``sparse_max_fraction * d_sae``). One sync per step (one more when a row needs the fallback).

    Args:
        l1_coeff: the sparsity coefficient lambda (the update used 5 with ``E||x|| = sqrt(d)``).
        l1_warmup_steps: steps of the linear lambda warm-up (0: none).
        pre_act_coeff: coefficient of the dead latents' pre-activation loss (0: off, SAELens' default).
        sparse_max_fraction: the candidate width (3 x the mean positive count + 16), as a fraction of ``d_sae``,
            above which the dense step runs (speed only; the result is the same).
        (others as :class:`SparseAutoencoder`)

    Raises:
        ConfigError: ``l1_coeff <= 0``, ``l1_warmup_steps < 0``, ``pre_act_coeff < 0`` or ``sparse_max_fraction``
            outside ``(0, 1]`` (and the base class's).
    """

    unit_norm_decoder = False

    def __init__(self, d_model: int, d_sae: int, l1_coeff: float = 5.0, l1_warmup_steps: int = 0,
                 dead_tokens: int = 10_000_000, pre_act_coeff: float = 0.0, sparse_max_fraction: float = 0.1) -> None:
        _check_positive("l1_coeff", l1_coeff)
        _check(l1_warmup_steps >= 0, "l1_warmup_steps", l1_warmup_steps, "be >= 0",
               "set l1_warmup_steps >= 0 (0: no warm-up)")
        _check_non_negative("pre_act_coeff", pre_act_coeff)
        _check_fraction("sparse_max_fraction", sparse_max_fraction)
        self.l1_coeff, self.l1_warmup_steps = l1_coeff, l1_warmup_steps
        self.pre_act_coeff, self.sparse_max_fraction = pre_act_coeff, sparse_max_fraction
        super().__init__(d_model, d_sae, dead_tokens)
        self.register_buffer("step", torch.tensor(0, dtype=torch.long))
        #: whether the last sparse training step recomputed some rows in full (diagnostics; not saved)
        self.last_fallback = False

    def decoder_init_norm(self) -> float:
        return 0.1

    def code(self, x_n: torch.Tensor) -> SparseCode:
        return threshold_code(self.pre_acts(x_n), 0.0)

    def loss(self, x_n: torch.Tensor) -> SAELoss:
        dead = self.dead_latents()
        norms = self.W_dec.norm(dim=1)
        width = self.sparse_width()
        f = code = None
        if width is None:  # the dense step: plain autograd through all pre-activations, a dense decoder matmul
            f = F.relu(self.pre_acts(x_n))
            nnz, n_dead = host_ints((f.detach() > 0).sum(), dead.sum())
            l1 = (f * norms).sum(-1).mean()
            self.note_support(nnz / max(len(x_n), 1))
            self.last_fallback = False
            x_hat = self.dense_decode_n(f)
        else:  # the positive entries only (exact; class docstring)
            code, n_dead = self.support_entries(x_n, None, 0.0, False, width, dead)
            code = code._replace(values=F.relu(self.attach_ragged(x_n, code)))
            l1 = (code.values * norms[code.indices]).sum() / len(x_n)
            x_hat = self.decode_n(code)
        return self.penalised_result(x_n, x_hat, "l1", l1, self.l1_coeff, self.l1_warmup_steps,
                                     lambda: self.dead_pre_act_loss(x_n, dead, n_dead, None, False), f, code)
