"""Write the pretrained encoder as timm-loadable safetensors at the end of ``fit``."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from mim.export import save_encoder


class ExportEncoder(L.Callback):
    """At the end of fit, save ``pl_module.encoder`` as ``<dirpath>/<filename>.safetensors`` + ``.json``.

    Args:
        dirpath: target folder; default the run's log directory (``trainer.log_dir``).
        filename: file stem.

    The module must expose ``encoder`` (timm model) and ``encoder_config``
    (``{"model_name", "model_kwargs"}``); see :func:`mim.export.load_encoder` to load it.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "encoder") -> None:
        self.dirpath, self.filename = dirpath, filename
        self.path: Path | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        dirpath = Path(self.dirpath or trainer.log_dir or trainer.default_root_dir)
        self.path = save_encoder(pl_module.encoder, pl_module.encoder_config, dirpath / f"{self.filename}.safetensors")
        rank_zero_info(f"Exported encoder to {self.path} (load with mim.export.load_encoder or timm).")


class ExportSAE(L.Callback):
    """At the end of fit, save ``pl_module.sae`` with :func:`mim.sae.save_sae` as
    ``<dirpath>/<filename>.safetensors`` + ``.json`` (load with :func:`mim.sae.load_sae`).

    Args:
        dirpath: target folder; default the run's log directory (``trainer.log_dir``).
        filename: file stem.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "sae") -> None:
        self.dirpath, self.filename = dirpath, filename
        self.path: Path | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        from mim.sae.models import save_sae

        dirpath = Path(self.dirpath or trainer.log_dir or trainer.default_root_dir)
        self.path = save_sae(pl_module.sae, dirpath / f"{self.filename}.safetensors")
        rank_zero_info(f"Exported SAE to {self.path} (load with mim.sae.load_sae).")
