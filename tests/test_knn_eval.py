"""Weighted kNN: the shared scoring helper, and the offline ``KNNEval`` through ``mim validate``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mim.cli import cli_main
from mim.errors import ConfigError
from mim.eval.features import pooled_features
from mim.eval.knn import knn_top1
from mim.eval.knn_eval import KNNEval

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "eval" / "knn_cifar10.yaml"
TINY = [
    "--data.init_args.limit_per_class", "5", "--data.init_args.val_limit_per_class", "3",
    "--data.init_args.batch_size", "16", "--data.init_args.num_workers", "0",
    "--trainer.enable_progress_bar", "false",
]


def test_knn_on_one_hot_label_features_is_perfect():
    generator = torch.Generator().manual_seed(0)
    bank_labels = torch.randint(10, (200,), generator=generator)
    query_labels = torch.randint(10, (50,), generator=generator)
    bank, queries = F.one_hot(bank_labels, 10).float(), F.one_hot(query_labels, 10).float()
    assert knn_top1(bank, bank_labels, queries, query_labels, 10) == 1.0
    # Unlabelled bank rows (label -1) never vote, even when they equal the queries.
    unlabelled = torch.full((50,), -1)
    assert knn_top1(torch.cat([queries, bank]), torch.cat([unlabelled, bank_labels]), queries, query_labels, 10) == 1.0
    # A wrong bank (labels shifted by one) gives 0: the prediction really comes from the neighbours.
    assert knn_top1(bank, (bank_labels + 1) % 10, queries, query_labels, 10) == 0.0


def test_knn_on_random_features_is_near_chance():
    generator = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(5000, 64, generator=generator), torch.randn(2000, 64, generator=generator)
    bank_labels = torch.randint(10, (5000,), generator=generator)
    query_labels = torch.randint(10, (2000,), generator=generator)
    top1 = knn_top1(bank, bank_labels, queries, query_labels, 10)
    assert 0.07 < top1 < 0.13, top1  # chance is 0.1; 2000 queries give a std of about 0.007


def _encode(encoder: torch.nn.Module, dataset) -> tuple[torch.Tensor, torch.Tensor]:
    imgs = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    return pooled_features(encoder, imgs), labels


def test_knn_eval_through_mim_validate_matches_direct_features(shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("MIM_DATA", str(shared_data))
    cli = cli_main(["validate", "-c", str(CONFIG), "--trainer.default_root_dir", str(tmp_path), *TINY])
    assert isinstance(cli.model, KNNEval) and cli.model.k == 20 and cli.model.temperature == 0.07
    top1, top5 = float(cli.trainer.callback_metrics["knn/top1"]), float(cli.trainer.callback_metrics["knn/top5"])
    assert 0.0 <= top1 <= top5 <= 1.0
    assert len(cli.model.bank) == 50, "the bank is the whole (limited) train split, none dropped"

    bank, bank_labels = _encode(cli.model.encoder, cli.datamodule.train_set)
    queries, query_labels = _encode(cli.model.encoder, cli.datamodule.val_set)
    torch.testing.assert_close(cli.model.bank, bank, atol=1e-5, rtol=1e-5)
    assert torch.equal(cli.model.bank_labels, bank_labels), "the bank is in dataset order"
    assert top1 == pytest.approx(knn_top1(bank, bank_labels, queries, query_labels, 10), abs=1e-6)


def test_knn_eval_refuses_an_augmented_bank(shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("MIM_DATA", str(shared_data))
    with pytest.raises(ConfigError, match="train_augment false"):
        cli_main(["validate", "-c", str(CONFIG), "--trainer.default_root_dir", str(tmp_path),
                  "--data.init_args.train_augment", "true", *TINY])


def test_bad_knn_arguments_are_refused():
    with pytest.raises(ConfigError, match="k must be >= 1"):
        KNNEval("timm:resnet18", k=0)
