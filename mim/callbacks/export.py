"""Write the pretrained encoder as timm-loadable safetensors at the end of ``fit``."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from mim.export import save_encoder
from mim.sae.models import save_sae


class _ExportAtFitEnd(L.Callback):
    """Save something of the module as ``<dirpath>/<filename>.safetensors`` (+ ``.json``) at the end of fit, on
    global rank 0 (``dirpath`` default: the run's log directory).

    Under DDP every rank resolves the folder (``trainer.log_dir`` is a broadcast), rank 0 writes (atomically),
    and all ranks meet at a barrier afterwards, so no rank leaves ``fit`` before the file exists."""

    def __init__(self, dirpath: str | None, filename: str) -> None:
        self.dirpath, self.filename = dirpath, filename
        self.path: Path | None = None

    def save(self, pl_module: L.LightningModule, path: Path) -> Path:
        raise NotImplementedError

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dirpath = Path(self.dirpath or trainer.log_dir or trainer.default_root_dir)  # a collective: all ranks
        self.path = dirpath / f"{self.filename}.safetensors"
        if trainer.is_global_zero:
            self.path = self.save(pl_module, self.path)
        trainer.strategy.barrier(f"mim_export_{self.filename}")


class ExportEncoder(_ExportAtFitEnd):
    """At the end of fit, save ``pl_module.encoder`` as ``<dirpath>/<filename>.safetensors`` + ``.json``.

    Args:
        dirpath: target folder; default the run's log directory (``trainer.log_dir``).
        filename: file stem.

    The module must expose ``encoder`` (timm model) and ``encoder_config``
    (``{"model_name", "model_kwargs"}``); see :func:`mim.export.load_encoder` to load it.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "encoder") -> None:
        super().__init__(dirpath, filename)

    def save(self, pl_module: L.LightningModule, path: Path) -> Path:
        path = save_encoder(pl_module.encoder, pl_module.encoder_config, path)
        rank_zero_info(f"Exported encoder to {path} (load with mim.export.load_encoder or timm).")
        return path


class ExportSAE(_ExportAtFitEnd):
    """At the end of fit, save ``pl_module.sae`` with :func:`mim.sae.save_sae` as
    ``<dirpath>/<filename>.safetensors`` + ``.json`` (load with :func:`mim.sae.load_sae`).

    Args:
        dirpath: target folder; default the run's log directory (``trainer.log_dir``).
        filename: file stem.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "sae") -> None:
        super().__init__(dirpath, filename)

    def save(self, pl_module: L.LightningModule, path: Path) -> Path:
        path = save_sae(pl_module.sae, path)
        rank_zero_info(f"Exported SAE to {path} (load with mim.sae.load_sae).")
        return path
