import lightning as L
import pytest
import torch
from cli_run import load_tool, run_tool

from mim.data import ImageDataModule
from mim.errors import ConfigError
from mim.eval import (
    EpochLinearProbe,
    OnlineKNN,
    OnlineLinearProbe,
    fit_linear_classifier,
    pooled_features,
    weighted_knn_scores,
)
from mim.methods import MAE

SMALL = dict(
    backbone="vit_tiny_patch16_224", img_size=32, patch_size=4,
    decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=2,
)


class GradSpy(L.Callback):
    """Snapshots the encoder's gradients at on_train_batch_end (placed before and after the probe)."""

    def __init__(self):
        self.snapshots = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.snapshots.append([None if p.grad is None else p.grad.clone() for p in pl_module.encoder.parameters()])


def _fit(tmp_path, shared_data, callbacks, max_steps=3, **model_kwargs):
    L.seed_everything(0)
    dm = ImageDataModule(root=str(shared_data), batch_size=20, num_workers=0, limit_per_class=6, val_limit_per_class=2)
    model = MAE(**SMALL, **model_kwargs)
    trainer = L.Trainer(
        max_steps=max_steps, callbacks=callbacks, default_root_dir=tmp_path, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0, accelerator="cpu",
    )
    trainer.fit(model, dm)
    return trainer, model


def test_probe_gradients_never_reach_the_encoder(tmp_path, shared_data):
    before, after = GradSpy(), GradSpy()
    probe = OnlineLinearProbe()
    head_before = None

    class HeadSpy(L.Callback):
        def on_train_start(self, trainer, pl_module):
            nonlocal head_before
            head_before = [p.clone() for p in probe.head.parameters()]

    _fit(tmp_path, shared_data, [HeadSpy(), before, probe, after])
    assert len(before.snapshots) == 3
    for snap_before, snap_after in zip(before.snapshots, after.snapshots):
        for g0, g1 in zip(snap_before, snap_after):
            assert (g0 is None and g1 is None) or torch.equal(g0, g1)
    # ...while the probe's own head did learn
    assert any(not torch.equal(a, b) for a, b in zip(head_before, probe.head.parameters()))


def test_frozen_encoder_is_bit_identical_after_probe_training(tmp_path, shared_data):
    torch.manual_seed(0)
    reference = MAE(**SMALL).encoder.state_dict()
    trainer, model = _fit(tmp_path, shared_data, [OnlineLinearProbe(), OnlineKNN(), EpochLinearProbe()], lr=0.0)
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, reference[key]), key
    metrics = trainer.callback_metrics
    assert 0.0 <= metrics["probe/val_top1"] <= 1.0
    assert 0.0 <= metrics["knn/val_top1"] <= 1.0
    assert 0.0 <= metrics["epoch_probe/val_top1"] <= 1.0


def test_epoch_probe_fit_reaches_the_optimum_and_is_deterministic():
    """Three Gaussian classes in 16 dims: the L-BFGS fit ends at a stationary point of the regularised
    cross-entropy (what a probe that stopped early would miss), classifies held-out samples well, and two fits
    are bit-identical (every DDP rank fits the same probe)."""
    gen = torch.Generator().manual_seed(0)
    centres = 2 * torch.randn(3, 16, generator=gen)
    labels = torch.arange(3).repeat_interleave(400)
    features = 5.0 + 3.0 * (centres[labels] + torch.randn(1200, 16, generator=gen))  # not standardised
    train, test = torch.arange(1200) % 4 != 0, torch.arange(1200) % 4 == 0
    probe = fit_linear_classifier(features[train], labels[train], 3, weight_decay=1e-3)
    weight, bias = probe.weight.clone().requires_grad_(), probe.bias.clone().requires_grad_()
    x = (features[train] - probe.mean) / probe.std
    loss = torch.nn.functional.cross_entropy(x @ weight.T + bias, labels[train]) + 5e-4 * weight.pow(2).sum()
    loss.backward()
    assert weight.grad.abs().max() < 1e-4 and bias.grad.abs().max() < 1e-4
    assert (probe.logits(features[test]).argmax(1) == labels[test]).float().mean() > 0.95
    again = fit_linear_classifier(features[train], labels[train], 3, weight_decay=1e-3)
    assert torch.equal(again.weight, probe.weight) and torch.equal(again.bias, probe.bias)
    with torch.inference_mode():  # Lightning's validation runs in inference mode
        inside = fit_linear_classifier(features[train], labels[train], 3, weight_decay=1e-3)
    assert torch.equal(inside.weight, probe.weight)


def test_bad_epoch_probe_arguments_are_one_config_error():
    for kwargs in ({"weight_decay": -1.0}, {"max_iter": 0}, {"max_bank_size": 0}, {"pool": "max"}):
        with pytest.raises(ConfigError, match="EpochLinearProbe"):
            EpochLinearProbe(**kwargs)


def test_pooled_features_are_detached_and_restore_mode(cifar_batch):
    encoder = MAE(**SMALL).encoder.train()
    feats = pooled_features(encoder, cifar_batch[0], "mean")
    assert feats.shape == (16, 192) and not feats.requires_grad and feats.dtype == torch.float32
    assert encoder.training
    cls = pooled_features(encoder, cifar_batch[0], "cls")
    assert not torch.allclose(cls, feats)


def test_knn_one_hot_features_are_perfect_and_random_features_near_chance():
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (2000,), generator=gen)
    onehot = torch.nn.functional.one_hot(labels, 10).float()
    scores = weighted_knn_scores(onehot, labels, onehot[:500], 10, k=20, temperature=0.07)
    assert (scores.argmax(1) == labels[:500]).float().mean() == 1.0
    bank = torch.randn(2000, 64, generator=gen)
    queries = torch.randn(1000, 64, generator=gen)
    query_labels = torch.randint(0, 10, (1000,), generator=gen)
    acc = (weighted_knn_scores(bank, labels, queries, 10).argmax(1) == query_labels).float().mean()
    assert 0.05 < acc < 0.17


def test_knn_weights_votes_by_similarity():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    scores = weighted_knn_scores(bank, labels, torch.tensor([[1.0, 0.05]]), 2, k=3, temperature=0.1)
    cos = torch.nn.functional.normalize(bank, dim=1) @ torch.nn.functional.normalize(torch.tensor([1.0, 0.05]), dim=0)
    expected = torch.tensor([(cos[0] / 0.1).exp() + (cos[1] / 0.1).exp(), (cos[2] / 0.1).exp()])
    torch.testing.assert_close(scores[0], expected)


def test_probe_state_round_trips_through_checkpoint(tmp_path, shared_data):
    probe = OnlineLinearProbe()
    _fit(tmp_path, shared_data, [probe], max_steps=2)
    state = probe.state_dict()
    restored = OnlineLinearProbe()
    restored.load_state_dict(state)
    assert restored._pending_state["head"].keys() == state["head"].keys()
    assert state["optimizer"]["state"], "the head's optimiser state is saved"


def test_probe_requires_num_classes():
    probe = OnlineLinearProbe()
    trainer = L.Trainer(logger=False, accelerator="cpu")
    trainer.datamodule = None
    with pytest.raises(ValueError, match="needs num_classes"):
        probe.setup(trainer, MAE(**SMALL), "fit")


def test_probes_and_knn_share_one_encoder_pass_per_batch(tmp_path, shared_data, monkeypatch):
    calls = []
    callbacks = [OnlineLinearProbe(), OnlineLinearProbe(pool="mean", name="probe_mean"), OnlineKNN()]

    class CountForward(L.Callback):
        def on_fit_start(self, trainer, pl_module):
            forward = pl_module.encoder.forward_features
            monkeypatch.setattr(pl_module.encoder, "forward_features", lambda x: calls.append(1) or forward(x))

    _fit(tmp_path, shared_data, [CountForward(), *callbacks], max_steps=2)
    assert len(calls) == 2  # one frozen pass per training batch, shared by the three callbacks


def test_converged_probe_tool_prints_one_row_per_encoder_and_weight_decay(shared_data):
    """``tools/converged_probe.py`` on real CIFAR-10 images (50 train, 20 test) with a random-init timm ViT."""
    out = run_tool(
        "converged_probe", "timm:vit_tiny_patch16_224", "--model-kwargs", '{"img_size": 32, "patch_size": 4}',
        "--root", str(shared_data), "--limit-per-class", "5", "--val-limit-per-class", "2",
        "--weight-decay", "1e-4", "1e-2", "--batch-size", "10",
    )
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| timm:")]
    assert [r[1].strip() for r in rows] == ["0.0001", "0.01"]
    for _, _, train, test in rows:
        assert 0 <= float(test) <= 100 and float(train) > 50  # 50 images in 192 dims: the probe fits them


def test_token_variance_shares_and_participation_ratio_on_known_tokens():
    """Tokens that depend on the position only, or on the image only, put all variance in that share; the
    participation ratio is 1 for features on one line and about D for isotropic ones."""
    tv = load_tool("token_variance")
    torch.manual_seed(0)
    by_position = torch.randn(1, 16, 8).expand(32, 16, 8)
    by_image = torch.randn(32, 1, 8).expand(32, 16, 8)
    assert tv.variance_shares(by_position) == pytest.approx((1.0, 0.0), abs=1e-12)
    assert tv.variance_shares(by_image) == pytest.approx((0.0, 1.0), abs=1e-12)
    position, image = tv.variance_shares(by_position + by_image + 0.1 * torch.randn(32, 16, 8))
    assert 0.3 < position < 0.7 and 0.3 < image < 0.7 and position + image < 1
    assert tv.participation_ratio(torch.randn(500, 1) * torch.randn(1, 8)) == pytest.approx(1.0)
    assert 7 < tv.participation_ratio(torch.randn(20000, 8)) <= 8


def test_token_variance_tool_prints_one_row_per_encoder(shared_data):
    """``tools/token_variance.py`` on real CIFAR-10 test images (20) with a random-init timm ViT: the three
    shares of each reported block add up to 1."""
    out = run_tool(
        "token_variance", "timm:vit_tiny_patch16_224", "--model-kwargs",
        '{"img_size": 32, "patch_size": 4, "depth": 4}', "--root", str(shared_data), "--images-per-class", "2",
    )
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| timm:")]
    assert len(rows) == 1 and out.startswith("20 test images")
    shares = [[float(v) for v in col.split("/")] for col in rows[0][1:4]]
    for block in zip(*shares):
        assert all(0 <= v <= 1 for v in block) and sum(block) == pytest.approx(1.0, abs=0.011)
    assert 1 <= float(rows[0][4]) <= 192
