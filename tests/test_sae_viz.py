"""SAE latent analysis and gallery (``mim/sae/viz.py``, ``tools/sae_gallery.py``) on the real train store of the
``sae_stores`` fixture (200 CIFAR-10 images, 8x8 patch tokens of d 192), checked against brute force."""

from __future__ import annotations

import csv
import re

import numpy as np
import pytest
import torch
from cli_run import load_tool
from PIL import Image

from mim.errors import ConfigError
from mim.features.store import FeatureStore, FeatureStoreError
from mim.sae import viz
from mim.sae.models import save_sae
from mim.sae.variants import TopKSAE

N_TOP, N_LATENTS = 5, 4


@pytest.fixture(scope="module")
def store(sae_stores) -> FeatureStore:
    return FeatureStore(sae_stores[0])


@pytest.fixture(scope="module")
def sae(store) -> TopKSAE:
    torch.manual_seed(0)
    model = TopKSAE(d_model=192, d_sae=256, k=8)
    model.initialize(store.read("patch").features.reshape(-1, 192))
    return model.eval()


@pytest.fixture(scope="module")
def brute(store, sae) -> dict[str, torch.Tensor]:
    """Every token encoded at once: dense activations (200, 64, 256), labels and image indices (200,)."""
    rows = store.read("patch")
    with torch.no_grad():
        dense = sae.encode(rows.features.reshape(-1, 192)).to_dense(256).view(len(rows.labels), 64, 256)
    return {"dense": dense, "labels": rows.labels, "indices": rows.indices}


@pytest.fixture(scope="module")
def acts(store, sae) -> viz.LatentActivations:
    # 1000 tokens -> 15 images per batch: batches straddle the 64-image shards
    return viz.latent_activations(sae, store, batch_size=1000, n_top=N_TOP, n_latents=N_LATENTS, num_classes=10)


@pytest.fixture(scope="module")
def dataset(store, shared_data):
    return viz.store_dataset(store.metadata, shared_data)


def test_frequencies_and_class_means_equal_brute_force(acts, brute):
    dense, labels = brute["dense"], brute["labels"]
    fired = (dense != 0).sum((0, 1))
    assert acts.token_count == 200 * 64 and acts.patch_grid == (8, 8)
    assert torch.equal(acts.fired, fired)
    torch.testing.assert_close(acts.frequency, fired.double() / 12800)
    assert int(acts.fired.sum()) == 12800 * 8  # TopK: k = 8 active latents on every token
    class_mean = torch.stack([dense[labels == c].double().mean((0, 1)) for c in range(10)], 1)
    torch.testing.assert_close(acts.class_mean, class_mean, rtol=1e-5, atol=1e-7)
    assert torch.equal(acts.class_tokens, torch.full((10,), 20 * 64))


def test_top_images_equal_brute_force(acts, brute):
    scores = brute["dense"].amax(1).t()  # (d_sae, images): per-image max activation
    position = {int(i): p for p, i in enumerate(brute["indices"])}
    checked = 0
    for j in range(256):
        positive = scores[j][scores[j] > 0]
        expected = positive.sort(descending=True).values[:N_TOP]
        used = acts.top_images[j] >= 0
        assert int(used.sum()) == len(expected)
        torch.testing.assert_close(acts.top_values[j][used], expected)
        pos = torch.tensor([position[int(i)] for i in acts.top_images[j][used]], dtype=torch.long)
        torch.testing.assert_close(scores[j][pos], acts.top_values[j][used])  # the images carry those scores
        assert torch.equal(acts.top_labels[j][used], brute["labels"][pos])
        assert len(set(pos.tolist())) == len(pos)
        checked += len(pos)
    assert checked > 256  # most latents have several images


def test_selected_latents_and_heatmaps(acts, brute):
    frequent = torch.sort(brute["dense"].ne(0).sum((0, 1)), descending=True, stable=True).indices[:N_LATENTS]
    assert torch.equal(acts.latents, frequent)
    assert acts.maps.shape == (N_LATENTS, N_TOP, 8, 8)
    position = {int(i): p for p, i in enumerate(brute["indices"])}
    for s, j in enumerate(acts.latents.tolist()):
        for t, image in enumerate(acts.top_images[j].tolist()):
            expected = brute["dense"][position[image], :, j].view(8, 8) if image >= 0 else torch.zeros(8, 8)
            torch.testing.assert_close(acts.maps[s, t], expected)
            assert image < 0 or float(acts.maps[s, t].max()) == pytest.approx(float(acts.top_values[j, t]), rel=1e-5)


def test_score_chunking_and_cls_tokens(store, sae, acts, monkeypatch):
    monkeypatch.setattr(viz, "_SCORE_ELEMENTS", 3 * 256)  # 3 images per score matrix
    chosen = acts.latents.flip(0).tolist()
    chunked = viz.latent_activations(sae, store, batch_size=1000, n_top=N_TOP, latents=chosen)
    torch.testing.assert_close(chunked.top_values, acts.top_values)
    assert torch.equal(chunked.top_images, acts.top_images) and chunked.latents.tolist() == chosen
    torch.testing.assert_close(chunked.maps, acts.maps.flip(0))
    cls = viz.latent_activations(sae, store, tokens="cls", batch_size=64, n_top=3, latents="selective")
    rows = store.read("cls")
    with torch.no_grad():
        dense = sae.encode(rows.features).to_dense(256)
    assert cls.maps is None and cls.patch_grid is None and cls.token_count == 200
    assert torch.equal(cls.fired, (dense != 0).sum(0))
    best = dense.max(0).values
    torch.testing.assert_close(cls.top_values[:, 0][best > 0], best[best > 0])


def test_selection_on_a_hand_made_case():
    fired = torch.tensor([0, 5, 100, 50, 100, 30])
    class_mean = torch.tensor(
        [[0.0, 0.0, 0.0, 0.0],  # dead
         [9.0, 0.0, 0.0, 0.0],  # most selective (4) but fires on 5 tokens only
         [1.0, 1.0, 1.0, 1.0],  # selectivity 1
         [4.0, 0.0, 0.0, 0.0],  # 4
         [3.0, 1.0, 0.0, 0.0],  # 3
         [2.0, 2.0, 0.0, 0.0]],  # 2
    )
    torch.testing.assert_close(viz.class_selectivity(class_mean), torch.tensor([0, 4, 1, 4, 3, 2.0], dtype=torch.float64))
    assert viz.select_latents("frequent", fired, class_mean, n_latents=3).tolist() == [2, 4, 3]
    assert viz.select_latents("frequent", fired, class_mean, n_latents=10).tolist() == [2, 4, 3, 5, 1]
    assert viz.select_latents("selective", fired, class_mean, n_latents=3, min_count=10).tolist() == [3, 4, 5]
    assert viz.select_latents("selective", fired, class_mean, n_latents=2, min_count=1).tolist() == [1, 3]
    assert viz.select_latents([5, 1, 5], fired, class_mean).tolist() == [5, 1]
    for bad in ([6], [-1], [], "rare"):
        with pytest.raises(ConfigError, match="Fix:"):
            viz.select_latents(bad, fired, class_mean)


def test_unnormalised_images_and_bad_input(store, sae, dataset, shared_data):
    raw = dataset.dataset
    image, label, index = dataset[1234]
    expected = np.asarray(Image.open(raw.samples[1234][0]).convert("RGB"), dtype=np.float32) / 255
    assert index == 1234 and label == raw.targets[1234] and image.shape == (3, 32, 32)
    np.testing.assert_allclose(image.permute(1, 2, 0).numpy(), expected, atol=1e-6)
    with pytest.raises(FeatureStoreError, match="Fix: pass the data root"):
        viz.load_images(dataset, [0], [(raw.targets[0] + 1) % 10])
    with pytest.raises(FeatureStoreError, match="d_model"):
        viz.latent_activations(TopKSAE(d_model=96, d_sae=64, k=4), store)
    with pytest.raises(FeatureStoreError, match="Fix:"):
        viz.store_dataset({**store.metadata, "dataset": None}, shared_data)


def test_gallery_files(acts, dataset, tmp_path):
    paths = viz.write_gallery(acts, dataset, tmp_path / "gallery")
    pngs = [p for p in paths if p.suffix == ".png"]
    assert len(pngs) == N_LATENTS + 2 and all(p.parent == tmp_path / "gallery" for p in paths)
    for png in pngs:
        with Image.open(png) as img:
            img.verify()
        with Image.open(png) as img:
            assert img.format == "PNG" and 150 <= min(img.size) and max(img.size) <= 2000
    index = (tmp_path / "gallery" / "index.html").read_text()
    for png in pngs:
        assert f"href='{png.name}'" in index and f"src='{png.name}'" in index
    assert set(re.findall(r"latent_(\d{5})\.png", index)) == {f"{j:05d}" for j in acts.latents.tolist()}
    with open(tmp_path / "gallery" / "class_activations.csv") as f:
        table = list(csv.reader(f))
    assert table[0][5:] == list(dataset.dataset.classes) and len(table) == 257
    assert not list((tmp_path / "gallery").glob("*.tmp"))


def test_cli_end_to_end(store, sae, sae_stores, shared_data, tmp_path, capsys):
    tool = load_tool("sae_gallery")
    weights = save_sae(sae, tmp_path / "sae.safetensors")
    out = tmp_path / "cli"
    paths = tool.main(["--sae", str(weights), "--store", str(sae_stores[0]), "--data-root", str(shared_data),
                       "--out", str(out), "--latents", "3", "17", "--top", "4"])
    assert [p.name for p in paths[:2]] == ["latent_00003.png", "latent_00017.png"]
    assert all(p.is_file() for p in paths) and paths[-1] == out / "index.html"
    assert capsys.readouterr().out.split() == [str(p) for p in paths]
    paths = tool.main(["--sae", str(weights), "--store", str(sae_stores[0]), "--data-root", str(shared_data),
                       "--out", str(out / "cls"), "--select", "selective", "--n-latents", "2", "--tokens", "cls",
                       "--min-count", "10"])
    assert len([p for p in paths if p.name.startswith("latent_")]) == 2
