"""ReLU SAE with the decoder-norm-weighted L1 penalty."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mim.sae.variants.base import (
    SAELoss,
    SparseAutoencoder,
    SparseCode,
    _check,
    _check_positive,
    squared_error,
    threshold_code,
)


class ReLUSAE(SparseAutoencoder):
    """ReLU SAE with the L1 penalty weighted by decoder norms (Conerly et al. 2024, "Circuits Updates – April
    2024", transformer-circuits.pub/2024/april-update, "Training SAEs"): ``f = ReLU(z)``, loss =
    ``E||x_n - x_hat_n||^2 + l1_coeff * E sum_i f_i ||W_dec,i||``. The decoder is not norm-constrained (the
    penalty makes shrinking it useless); its rows start at norm ``decoder_init_norm`` (0.1; the update draws
    them with norms 0.05-1). ``l1_coeff`` is warmed up linearly over the first ``l1_warmup_steps`` steps
    of training (the update: the first 5 %), counted by the SAE's ``step`` buffer. The update encodes ``x``
    itself and starts ``b_dec`` at 0; here, as in every variant, ``b_dec`` (the geometric median) is
    subtracted first (module docstring).

    Args:
        l1_coeff: the sparsity coefficient lambda (the update used 5 with ``E||x|| = sqrt(d)``).
        l1_warmup_steps: steps of the linear lambda warm-up (0: none).
        (others as :class:`SparseAutoencoder`)

    Raises:
        ConfigError: ``l1_coeff <= 0`` or ``l1_warmup_steps < 0`` (and the base class's).
    """

    unit_norm_decoder = False

    def __init__(self, d_model: int, d_sae: int, l1_coeff: float = 5.0, l1_warmup_steps: int = 0,
                 dead_tokens: int = 10_000_000) -> None:
        _check_positive("l1_coeff", l1_coeff)
        _check(l1_warmup_steps >= 0, "l1_warmup_steps", l1_warmup_steps, "be >= 0",
               "set l1_warmup_steps >= 0 (0: no warm-up)")
        self.l1_coeff, self.l1_warmup_steps = l1_coeff, l1_warmup_steps
        super().__init__(d_model, d_sae, dead_tokens)
        self.register_buffer("step", torch.tensor(0, dtype=torch.long))

    def decoder_init_norm(self) -> float:
        return 0.1

    def code(self, x_n: torch.Tensor) -> SparseCode:
        return threshold_code(self.pre_acts(x_n), 0.0)

    def loss(self, x_n: torch.Tensor) -> SAELoss:
        f = F.relu(self.pre_acts(x_n))
        code = threshold_code(f, 0.0)
        x_hat = self.decode_n(code)
        l1 = (f * self.W_dec.norm(dim=1)).sum(-1).mean()
        warm = min(1.0, (int(self.step) + 1) / self.l1_warmup_steps) if self.l1_warmup_steps else 1.0
        if self.training:
            self.step.add_(1)
        mse = squared_error(x_n, x_hat)
        return self._result(mse + warm * self.l1_coeff * l1, {"mse": mse, "l1": l1}, x_hat, code)
