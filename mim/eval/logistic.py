"""Multinomial logistic regression on cached features, fitted to convergence by L-BFGS (a linear probe in closed
loop, for features small enough to hold in memory)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class LinearClassifier(NamedTuple):
    """A fitted probe: ``logits = ((x - mean) / std) @ weight.T + bias``.

    Attributes:
        mean, std: (D,) float32 feature statistics of the training features (the standardisation, as
            ``BatchNorm1d(affine=False)`` in MAE's linear probe).
        weight: (C, D) float32; bias: (C,) float32.
    """

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """(Q, C) float32 class logits of ``features`` (Q, D)."""
        return F.linear((features.float() - self.mean) / self.std, self.weight, self.bias)


def fit_linear_classifier(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    weight_decay: float = 1e-4,
    max_iter: int = 100,
) -> LinearClassifier:
    """Minimise ``mean cross-entropy + weight_decay / 2 * ||W||^2`` over standardised features with full-batch
    L-BFGS (strong-Wolfe line search) from zero weights.

    The problem is convex and the start fixed, so the fit is deterministic: every DDP rank fitting the same
    gathered features gets the same probe. ``weight_decay`` 1e-4 is about scikit-learn's default (C = 1) for
    10,000 samples.

    Args:
        features: (N, D) float features; labels: (N,) int64 in ``[0, num_classes)``.
        num_classes: C.
        weight_decay: L2 coefficient on the weights (not the bias), >= 0.
        max_iter: L-BFGS iterations.

    Returns:
        the fitted :class:`LinearClassifier` (float32, on ``features``' device).

    Raises:
        ValueError: no features.
    """
    if len(features) == 0:
        raise ValueError("fit_linear_classifier needs at least one labelled feature.")
    # Callers may hold inference tensors (Lightning validates under inference mode): fit on normal copies.
    with torch.inference_mode(False), torch.enable_grad():
        x, y = features.detach().float().clone(), labels.detach().clone()
        mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
        x = (x - mean) / std
        weight = torch.zeros(num_classes, x.shape[1], device=x.device, requires_grad=True)
        bias = torch.zeros(num_classes, device=x.device, requires_grad=True)
        optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, history_size=20,
                                      line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(F.linear(x, weight, bias), y) + 0.5 * weight_decay * weight.pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        return LinearClassifier(mean, std, weight.detach(), bias.detach())
