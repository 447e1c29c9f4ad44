"""PNG grids of original | masked | reconstruction, written during pretraining."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torchvision.utils import make_grid, save_image


class ReconstructionImages(L.Callback):
    """Every ``every_n_epochs`` validation epochs, save a grid of reconstructions.

    Rows are images; columns are original | masked (grey) | reconstruction with the visible patches
    pasted back (MAE, He et al. 2021, arXiv 2111.06377, Fig. 2). The same ``num_images``
    validation images (evenly spaced over the validation set) and the same masks (``seed``) are
    used every time, so grids compare across epochs. Written by global rank 0 to
    ``<log_dir>/reconstructions/epoch=NNN.png`` and, with a TensorBoard logger, as the image
    ``reconstructions``; under DDP every rank takes part in resolving ``log_dir`` (a broadcast).

    The module must provide ``reconstruct(imgs, generator) -> {"mask": (B,1,H,W), "reconstruction":
    (B,3,H,W)}`` in normalised space; images are un-normalised with ``trainer.datamodule.mean/std``
    (identity when absent).

    Args:
        every_n_epochs: period in validation epochs.
        num_images: rows in the grid.
        seed: seed of the masks.
        scale: integer nearest-neighbour enlargement of the saved grid (e.g. 4 for 32 px images).
    """

    def __init__(self, every_n_epochs: int = 1, num_images: int = 8, seed: int = 0, scale: int = 1) -> None:
        self.every_n_epochs, self.num_images, self.seed, self.scale = every_n_epochs, num_images, seed, scale
        self.images: torch.Tensor | None = None
        self.last_path: Path | None = None

    def _pick_images(self, trainer: L.Trainer) -> torch.Tensor:
        """``num_images`` validation images evenly spaced over the validation set (so a set ordered
        by class shows several classes), stacked ``(N, 3, H, W)``."""
        loaders = trainer.val_dataloaders
        dataset = (loaders[0] if isinstance(loaders, (list, tuple)) else loaders).dataset
        count = min(self.num_images, len(dataset))
        ids = torch.linspace(0, len(dataset) - 1, count).round().long().tolist()
        return torch.stack([dataset[i][0] for i in ids])

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        # ``trainer.log_dir`` is a broadcast under DDP: every rank asks for it, only rank 0 writes.
        folder = Path(trainer.log_dir or trainer.default_root_dir) / "reconstructions"
        if not trainer.is_global_zero:
            return
        if self.images is None:
            self.images = self._pick_images(trainer)
        imgs = self.images.to(pl_module.device)
        was_training = pl_module.training
        pl_module.eval()
        with trainer.precision_plugin.forward_context():
            out = pl_module.reconstruct(imgs, torch.Generator().manual_seed(self.seed))
        pl_module.train(was_training)
        mean, std = self._stats(trainer, imgs)
        original = imgs * std + mean
        recon = out["reconstruction"].float() * std + mean
        masked = original * (1 - out["mask"]) + 0.5 * out["mask"]
        rows = torch.stack([original, masked, recon], dim=1).flatten(0, 1).clamp(0, 1).cpu()
        if self.scale > 1:  # small images (CIFAR's 32 px) are easier to see enlarged
            rows = F.interpolate(rows, scale_factor=self.scale, mode="nearest")
        grid = make_grid(rows, nrow=3, padding=2, pad_value=1.0)
        folder.mkdir(parents=True, exist_ok=True)
        self.last_path = folder / f"epoch={trainer.current_epoch:03d}.png"
        save_image(grid, self.last_path)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("reconstructions", grid, global_step=trainer.global_step)

    @staticmethod
    def _stats(trainer: L.Trainer, imgs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dm = trainer.datamodule
        mean = getattr(dm, "mean", None) or (0.0, 0.0, 0.0)
        std = getattr(dm, "std", None) or (1.0, 1.0, 1.0)
        as_t = lambda v: torch.tensor(v, device=imgs.device, dtype=torch.float32).view(1, -1, 1, 1)  # noqa: E731
        return as_t(mean), as_t(std)
