"""Weighted k-nearest-neighbour classification on frozen features.

Wu et al. 2018 ("Unsupervised Feature Learning via Non-Parametric Instance Discrimination",
arXiv 1805.01978, Sec. 3.4), with the defaults used by DINO's ``eval_knn.py``: cosine similarity,
``k = 20`` neighbours, each voting for its class with weight ``exp(similarity / T)``, ``T = 0.07``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import multiclass_accuracy


def weighted_knn_scores(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Class scores of each query from its ``k`` most similar bank features.

    Args:
        bank: ``(N, D)`` float features of labelled samples (need not be normalised).
        bank_labels: ``(N,)`` int64 in ``[0, num_classes)``.
        queries: ``(Q, D)`` float features to classify.
        num_classes: ``C``.
        k: neighbours per query (clipped to ``N``).
        temperature: ``T`` of the vote weights ``exp(cos / T)``.
        chunk_size: queries per similarity block (bounds memory to ``chunk_size x N``).

    Returns:
        ``(Q, C)`` float32 summed vote weights; ``argmax(-1)`` is the prediction.
    """
    if bank.shape[0] == 0:
        raise ValueError("the kNN bank is empty: it needs labelled features to vote.")
    bank = F.normalize(bank.float(), dim=1)
    k = min(k, bank.shape[0])
    scores = []
    for chunk in F.normalize(queries.float(), dim=1).split(chunk_size):
        sim, idx = (chunk @ bank.T).topk(k, dim=1)
        weights = (sim / temperature).exp()
        votes = torch.zeros(chunk.shape[0], num_classes, device=chunk.device)
        scores.append(votes.scatter_add_(1, bank_labels[idx], weights))
    return torch.cat(scores)


def knn_top1(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Weighted-kNN top-1 accuracy in [0, 1] of ``queries`` against ``bank``
    (:func:`weighted_knn_scores`).

    Args:
        bank, bank_labels: ``(N, D)`` float features and ``(N,)`` int64 labels; entries with a label
            ``< 0`` (unlabelled images) do not vote.
        queries, query_labels: ``(Q, D)`` and ``(Q,)``; queries labelled ``< 0`` are not counted.
        num_classes, k, temperature: as :func:`weighted_knn_scores`.

    Raises:
        ValueError: no labelled bank entry.
    """
    keep = bank_labels >= 0
    scores = weighted_knn_scores(bank[keep], bank_labels[keep], queries, num_classes, k, temperature)
    acc = multiclass_accuracy(scores, query_labels, num_classes, average="micro", ignore_index=-1)
    return float(acc)
