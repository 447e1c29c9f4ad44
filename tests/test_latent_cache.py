"""The sparse latent cache (``mim/sae/cache.py``, ``mim/sae/encode.py``) on the real train store of the
``sae_stores`` fixture (200 CIFAR-10 images, 8x8 patch tokens of d 192), checked against the dense codes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from cli_run import load_tool

from mim.cli import cli_main
from mim.features.store import FeatureStore, FeatureStoreError
from mim.sae import viz
from mim.sae.cache import (
    CacheShardWriter,
    LatentCache,
    LatentCacheError,
    LatentCacheWriter,
    coalesce,
    merge_slots,
    write_metadata,
)
from mim.sae.encode import SAEEncoder, StoreImages, StoreImagesDataModule
from mim.sae.models import save_sae
from mim.sae.variants import MPSAE, SparseCode, TopKSAE

REPO = Path(__file__).resolve().parents[1]
D_SAE, K = 256, 8
# Lightning's prediction writer looks for a batch sampler; the store's batches carry their image indices instead.
pytestmark = pytest.mark.filterwarnings("ignore:Couldn't infer the batch indices")


@pytest.fixture(scope="module")
def store(sae_stores) -> FeatureStore:
    return FeatureStore(sae_stores[0])


@pytest.fixture(scope="module")
def sae_file(store, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    sae = TopKSAE(d_model=192, d_sae=D_SAE, k=K)
    sae.initialize(store.read("patch").features.reshape(-1, 192)[::4])
    return save_sae(sae, tmp_path_factory.mktemp("sae") / "sae.safetensors")


@pytest.fixture(scope="module")
def sae(sae_file) -> TopKSAE:
    return SAEEncoder(str(sae_file)).sae


@pytest.fixture(scope="module")
def dense(store, sae) -> dict[str, torch.Tensor]:
    """Every token encoded at once: dense codes (200, 64, 256), labels and image indices (200,)."""
    rows = store.read("patch")
    with torch.no_grad():
        codes = sae.encode(rows.features.reshape(-1, 192)).to_dense(D_SAE).view(len(rows.labels), 64, D_SAE)
    return {"codes": codes, "labels": rows.labels, "indices": rows.indices}


def predict_cache(store_path: Path, sae_file: Path, path: Path, tokens: str = "patch",
                  **writer_kwargs) -> LatentCacheWriter:
    """What ``mim predict`` runs, in-process: 30 images per batch, 48 images per shard (not aligned)."""
    writer = LatentCacheWriter(str(path), shard_size=48, **writer_kwargs)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=[writer],
                        default_root_dir=str(path.parent))
    trainer.predict(SAEEncoder(str(sae_file)), datamodule=StoreImagesDataModule(str(store_path), tokens, batch_size=30),
                    return_predictions=False)
    return writer


@pytest.fixture(scope="module")
def cache(sae_stores, sae_file, tmp_path_factory) -> LatentCache:
    path = tmp_path_factory.mktemp("cache") / "cache"
    predict_cache(sae_stores[0], sae_file, path)
    return LatentCache(path)


def test_cache_equals_dense_codes(cache, dense):
    assert len(cache) == 200 and cache.tokens_per_image == 64 and cache.patch_grid == (8, 8)
    assert torch.equal(cache.indices, dense["indices"]) and torch.equal(cache.labels, dense["labels"])
    meta = cache.metadata
    assert meta["entries"] == 200 * 64 * K and meta["id_dtype"] == "int16"
    assert [s["images"] for s in meta["shards"]] == [48, 48, 48, 48, 8]
    for p, image in enumerate(dense["indices"].tolist()):
        assert torch.equal(cache.dense(image), dense["codes"][p])
    offsets, latents, values = cache.image_latents(int(dense["indices"][3]))
    assert offsets.tolist() == list(range(0, 64 * K + 1, K))
    assert bool((latents.view(64, K).diff(dim=1) > 0).all())  # ids ascending within each token
    ids, vals = cache.token_latents(int(dense["indices"][3]), 17)
    expected = dense["codes"][3, 17].nonzero().squeeze(1)
    assert torch.equal(ids, expected) and torch.equal(vals, dense["codes"][3, 17, expected])
    with pytest.raises(LatentCacheError, match="not in latent cache"):
        cache.image_latents(10**9)


def test_top_images_and_stats_equal_brute_force(cache, dense):
    codes, labels = dense["codes"], dense["labels"]
    scores = codes.amax(1).t()  # (d_sae, images)
    checked = 0
    for j in range(D_SAE):
        top = cache.top_images(j, k=5)
        positive = (scores[j] > 0).nonzero().squeeze(1)
        order = torch.sort(scores[j][positive], descending=True, stable=True).indices[:5]
        pos = positive[order]
        assert torch.equal(top.scores, scores[j][pos]) and torch.equal(top.images, dense["indices"][pos])
        assert torch.equal(top.labels, labels[pos])
        assert torch.equal(top.maps, codes[pos, :, j].view(-1, 8, 8))
        checked += len(pos)
    assert checked > 3 * D_SAE
    everything = cache.top_images(0, k=1000, maps=False)
    assert len(everything.images) == int((scores[0] > 0).sum()) and everything.maps is None
    stats = cache.stats()
    fired = (codes != 0).sum((0, 1))
    assert stats.token_count == 12800 and torch.equal(stats.fired, fired)
    assert torch.equal(stats.image_count, (scores > 0).sum(1))
    assert torch.equal(stats.max, codes.amax((0, 1)).clamp_min(0))
    torch.testing.assert_close(stats.total, codes.double().sum((0, 1)))
    class_fired = torch.stack([(codes[labels == c] != 0).sum((0, 1)) for c in range(10)], 1)
    assert torch.equal(stats.class_fired, class_fired) and torch.equal(stats.class_tokens, torch.full((10,), 1280))
    class_mean = torch.stack([codes[labels == c].double().mean((0, 1)) for c in range(10)], 1)
    torch.testing.assert_close(stats.class_mean, class_mean)
    assert torch.equal(stats.hist.sum(1), (codes > 0).sum((0, 1)))
    torch.testing.assert_close(cache.frequency(), fired.double() / 12800)
    assert (cache.path / "latent_index.safetensors").is_file()  # built by the writer, read back memory-mapped


def test_cls_token_cache(store, sae, sae_file, tmp_path):
    predict_cache(store.path, sae_file, tmp_path / "cls", tokens="cls")
    cache = LatentCache(tmp_path / "cls")
    rows = store.read("cls")
    with torch.no_grad():
        dense = sae.encode(rows.features).to_dense(D_SAE)
    assert cache.tokens == "cls" and cache.tokens_per_image == 1 and cache.patch_grid is None
    for p, image in enumerate(rows.indices.tolist()):
        assert torch.equal(cache.dense(image)[0], dense[p])
    j = int((dense > 0).sum(0).argmax())  # the most frequent latent
    top, expected = cache.top_images(j, k=3), dense[:, j].topk(3)
    assert top.maps.shape == (3, 1) and torch.equal(top.maps[:, 0], top.scores)
    assert torch.equal(top.scores, expected.values) and torch.equal(top.images, rows.indices[expected.indices])
    acts = viz.latent_activations(sae, store, tokens="cls", n_top=3, latents="frequent", cache=cache)
    assert acts.maps is None and torch.equal(acts.fired, (dense != 0).sum(0))


def test_repeated_slots_are_summed(tmp_path):
    """Matching pursuit may put a latent in several slots of a token: the cache keeps it once, with the sum."""
    code = SparseCode(torch.tensor([[1.0, 2.0, 0.5, 0.0], [0.0, 3.0, 3.0, 1.0]]),
                      torch.tensor([[4, 1, 4, 4], [2, 7, 7, 0]]))
    counts, latents, values = coalesce(code, 8)
    assert counts.tolist() == [2, 2] and latents.tolist() == [1, 4, 0, 7] and values.tolist() == [2.0, 1.5, 1.0, 6.0]
    merged = merge_slots(code, 8)
    assert torch.equal(merged.to_dense(8), code.to_dense(8)) and torch.equal(merged.fired(8), code.fired(8))
    writer = CacheShardWriter(tmp_path, 0, 4, 2, 8)
    writer.add({"counts": counts, "latents": latents, "values": values, "indices": torch.tensor([5]),
                "labels": torch.tensor([1])})
    write_metadata(tmp_path, {"d_sae": 8, "tokens": "patch", "tokens_per_image": 2, "patch_grid": [1, 2], "count": 1,
                              "entries": 4, "shards": writer.close()})
    cache = LatentCache(tmp_path)
    assert torch.equal(cache.dense(5), code.to_dense(8))
    assert cache.top_images(7).scores.tolist() == [6.0] and cache.top_images(7).maps.tolist() == [[[0.0, 6.0]]]
    half = CacheShardWriter(tmp_path / "half", 0, 4, 2, 8, values_dtype="float16")
    with pytest.raises(LatentCacheError, match="does not fit float16.*values_dtype float32"):
        half.add({"counts": counts, "latents": latents, "values": values * 1e5, "indices": torch.tensor([5]),
                  "labels": torch.tensor([1])})


def test_matching_pursuit_cache_and_gallery(store, tmp_path):
    """A small MP-SAE on real features picks atoms again; cache and streaming gallery both use the slot sums."""
    torch.manual_seed(0)
    mp = MPSAE(d_model=192, d_sae=16, steps=4)
    mp.initialize(store.read("patch").features.reshape(-1, 192)[::8])
    file = save_sae(mp, tmp_path / "mp.safetensors")
    predict_cache(store.path, file, tmp_path / "cache")
    cache = LatentCache(tmp_path / "cache")
    rows = store.read("patch")
    with torch.no_grad():
        code = mp.eval().encode(rows.features.reshape(-1, 192))
    assert int((code.l0() < 4).sum()) > 100  # tokens that hold a latent in several slots
    dense = code.to_dense(16).view(200, 64, 16)
    assert cache.metadata["entries"] == int(code.l0().sum())
    for p, image in enumerate(rows.indices.tolist()):
        assert torch.equal(cache.dense(image), dense[p])
    streamed = viz.latent_activations(mp, store, batch_size=6400, n_top=4, n_latents=3)
    cached = viz.latent_activations(mp, store, n_top=4, n_latents=3, cache=cache)
    torch.testing.assert_close(cached.top_values, streamed.top_values)
    torch.testing.assert_close(cached.top_values[:, 0], dense.amax((0, 1)))
    assert torch.equal(cached.top_images, streamed.top_images) and torch.equal(cached.fired, streamed.fired)
    torch.testing.assert_close(cached.maps, streamed.maps)


def test_gallery_from_cache_is_identical(cache, store, sae, sae_stores, shared_data, tmp_path):
    streamed = viz.latent_activations(sae, store, batch_size=1000, n_top=5, n_latents=4, num_classes=10)
    cached = viz.latent_activations(sae, store, n_top=5, n_latents=4, num_classes=10, cache=cache)
    for name in ("fired", "top_images", "top_values", "top_labels", "class_tokens", "latents", "maps"):
        assert torch.equal(getattr(cached, name), getattr(streamed, name)), name
    torch.testing.assert_close(cached.class_mean, streamed.class_mean, rtol=1e-12, atol=1e-12)
    assert cached.token_count == streamed.token_count and cached.patch_grid == streamed.patch_grid
    selective = viz.latent_activations(None, store, n_top=5, latents="selective", cache=cache.path)  # no SAE
    assert torch.equal(selective.latents, viz.select_latents("selective", streamed.fired, streamed.class_mean))
    other = TopKSAE(d_model=192, d_sae=D_SAE, k=K)
    with pytest.raises(LatentCacheError, match="another SAE"):
        viz.latent_activations(other, store, cache=cache)
    with pytest.raises(LatentCacheError, match="another feature store"):
        viz.latent_activations(sae, FeatureStore(sae_stores[1]), cache=cache)
    tool = load_tool("sae_gallery")
    paths = tool.main(["--cache", str(cache.path), "--store", str(sae_stores[0]), "--data-root", str(shared_data),
                       "--out", str(tmp_path / "gallery"), "--latents", "3", "--top", "4"])
    assert paths[0].name == "latent_00003.png" and paths[-1].name == "index.html" and all(p.is_file() for p in paths)


def test_two_ranks_merge_like_one(cache, store, sae_file, tmp_path):
    """Two writers of rank 0 / 1 each taking every other batch (the DDP split) read back as the 1-process cache."""
    encoder = SAEEncoder(str(sae_file))
    writers = [CacheShardWriter(tmp_path, rank, 40, 64, D_SAE) for rank in range(2)]
    for rank in range(2):
        dataset = StoreImages(store, "patch", 30, rank=rank, world_size=2)
        assert len(dataset) == (4 if rank == 0 else 3)
        for batch in dataset:
            writers[rank].add(encoder.predict_step(batch, 0))
    shards = [s for w in writers for s in w.close()]
    write_metadata(tmp_path, {**{k: cache.metadata[k] for k in ("d_sae", "tokens", "tokens_per_image", "patch_grid")},
                              "count": 200, "entries": sum(s["entries"] for s in shards), "world_size": 2,
                              "shards": shards})
    merged = LatentCache(tmp_path)
    assert {s["rank"] for s in shards} == {0, 1} and torch.equal(merged.indices, cache.indices)
    assert torch.equal(merged.labels, cache.labels)
    for image in cache.indices.tolist()[::7]:
        assert torch.equal(merged.dense(image), cache.dense(image))
    for name in ("offsets", "images", "scores", "fired", "class_fired", "hist"):
        assert np.array_equal(merged.index()[name], cache.index()[name]), name


def test_cli_predict_and_reuse(cache, sae_stores, sae_file, tmp_path):
    """``mim predict`` with the shipped config writes the same cache; a re-run with the same settings reuses it."""
    out = tmp_path / "cli_cache"
    cli_main(["predict", "-c", str(REPO / "configs/sae/latent_cache_vit_tiny_cifar10.yaml"),
              "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
              "--model.init_args.sae", str(sae_file), "--data.init_args.store", str(sae_stores[0]),
              "--data.init_args.batch_size", "32", "--trainer.callbacks.init_args.path", str(out),
              "--trainer.callbacks.init_args.shard_size", "64", "--trainer.default_root_dir", str(tmp_path)])
    written = LatentCache(out)
    assert written.metadata["sae"]["class"] == "TopKSAE" and written.metadata["store"]["count"] == 200
    assert torch.equal(written.indices, cache.indices)
    for image in cache.indices.tolist()[::5]:
        assert torch.equal(written.dense(image), cache.dense(image))
    assert np.array_equal(written.index()["images"], cache.index()["images"])
    stamp = (out / "metadata.json").stat().st_mtime_ns
    writer = predict_cache(sae_stores[0], sae_file, out)  # same SAE, store and options: nothing encoded
    assert writer.reused and (out / "metadata.json").stat().st_mtime_ns == stamp


def test_broken_caches_give_one_clear_error(cache, sae_stores, sae_file, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(cache.path, copy)
    shard = copy / cache.metadata["shards"][1]["file"]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(LatentCacheError, match=r"rank0-00001.safetensors is truncated.*Fix: re-run mim predict"):
        LatentCache(copy)
    (copy / "metadata.json").unlink()
    with pytest.raises(LatentCacheError, match="incomplete"):
        LatentCache(copy)
    with pytest.raises(LatentCacheError, match="other settings"):
        predict_cache(sae_stores[0], sae_file, cache.path, values_dtype="float16")
    narrow = save_sae(TopKSAE(d_model=96, d_sae=64, k=4), tmp_path / "narrow.safetensors")
    with pytest.raises(FeatureStoreError, match="d_model 192 but the SAE .* has d_model 96"):
        predict_cache(sae_stores[0], narrow, tmp_path / "narrow_cache")
    assert json.loads((cache.path / "metadata.json").read_text())["values_dtype"] == "float32"
