"""Shared fixtures: real CIFAR-10 from ../shared/data (or $MIM_DATA), small and fast."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: one thread per worker (and per subprocess it starts),
    os.environ["OMP_NUM_THREADS"] = "1"    # so that N workers share N cores without spinning OpenMP threads
    torch.set_num_threads(1)


def shared_data_root() -> Path:
    """``$MIM_DATA`` when set, else ``../shared/data`` beside the repository."""
    return Path(os.environ.get("MIM_DATA") or REPO.parent / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = shared_data_root()
    if not (root / "cifar10" / "train").is_dir():
        pytest.fail(f"real test data not found at {root}/cifar10; set MIM_DATA to the folder holding cifar10/")
    return root


@pytest.fixture(scope="session")
def cifar_batch(shared_data: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """16 real CIFAR-10 validation images (2 per class for 8 classes), normalised, with labels."""
    from mim.data import ImageDataModule

    dm = ImageDataModule(root=str(shared_data), batch_size=16, num_workers=0, val_limit_per_class=2)
    dm.setup("fit")
    imgs, labels = next(iter(dm.val_dataloader()))
    return imgs, labels


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def extract_store(
    path: Path, root: Path, encoder: str, split: str, per_class: int, tokens: list[str], layer: int = -1
) -> Path:
    """Extract a real feature store with ``trainer.predict`` (what ``mim predict`` runs); returns ``path``."""
    import lightning as L

    from mim.data import ImageDataModule
    from mim.features import FeatureExtractor, FeatureStoreWriter

    limits = {"limit_per_class": per_class} if split == "train" else {"val_limit_per_class": per_class}
    dm = ImageDataModule(root=str(root), batch_size=64, num_workers=0, predict_split=split, train_augment=False,
                         return_index=True, **limits)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(path.parent),
                        callbacks=[FeatureStoreWriter(str(path), shard_size=64)])
    trainer.predict(FeatureExtractor(encoder, layers=layer, tokens=tokens), datamodule=dm, return_predictions=False)
    return path


@pytest.fixture(scope="session")
def sae_stores(tmp_path_factory, shared_data: Path) -> tuple[Path, Path]:
    """Real feature stores for SAE tests: a ViT-Tiny/4 (fixed random init) on CIFAR-10, last block,
    residual stream after block 6 of 12 (no final norm, so token norms vary), cls + mean + 64 patch
    tokens of d 192. Train: 200 images (20 per class, 12,800 patch tokens) in
    shards of 64 images; val: 100 test images (10 per class)."""
    import timm

    from mim.export import save_encoder

    folder = tmp_path_factory.mktemp("sae_stores")
    torch.manual_seed(1)
    kwargs = {"img_size": 32, "patch_size": 4}
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, **kwargs)
    encoder = save_encoder(model, {"model_name": "vit_tiny_patch16_224", "model_kwargs": kwargs},
                           folder / "encoder.safetensors")
    tokens = ["cls", "mean", "patch"]
    train = extract_store(folder / "train", shared_data, str(encoder), "train", 20, tokens, layer=6)
    val = extract_store(folder / "val", shared_data, str(encoder), "val", 10, tokens, layer=6)
    return train, val


@pytest.fixture(scope="session")
def sae_tokens(sae_stores) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``sae_stores`` patch tokens as (train, val): (12800, 192) and (6400, 192) float32."""
    from mim.features import FeatureStore

    train, val = (FeatureStore(p).read("patch").features.reshape(-1, 192) for p in sae_stores)
    return train, val


#: Files whose tests start subprocesses (DDP ranks, killed-and-resumed runs): they run first, the longest first of
#: all, so that under ``pytest -n`` the workers end together instead of one finishing a long test alone.
SUBPROCESS_FILES = ("test_ddp_configs.py", "test_resume.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def order(item: pytest.Item) -> int:
        if item.name == "test_extract_sae_cache_and_splice_configs_under_ddp":
            return 0
        return 1 if item.path.name in SUBPROCESS_FILES else 2

    items.sort(key=order)  # stable: file order within each group
