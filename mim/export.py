"""Export a pretrained encoder as plain timm weights, and load it back with timm.

Files: ``<name>.safetensors`` (the timm model's ``state_dict``) and ``<name>.json``
(``{"model_name": ..., "model_kwargs": {...}}``). Loading is
``timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay={"file": path}, **model_kwargs)``,
so any timm user can take the weights without ``mim``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import timm
from safetensors.torch import save_file
from torch import nn


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_encoder(encoder: nn.Module, config: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``encoder``'s weights to ``path`` (``.safetensors``) and ``config`` beside it (``.json``).

    Args:
        encoder: a timm model.
        config: ``{"model_name": str, "model_kwargs": dict}`` re-creating ``encoder`` with timm.
        path: target ``.safetensors`` file; written atomically (temporary name, then rename), the
            JSON last, so a present JSON means complete weights.

    Returns:
        The path of the weights.
    """
    path = Path(path)
    state = {k: v.detach().to("cpu").contiguous() for k, v in encoder.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    text = json.dumps({**config, "weights": path.name}, indent=2)
    atomic_write(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(text))
    return path


def load_encoder(path: str | os.PathLike, **overrides: Any) -> nn.Module:
    """Re-create an exported encoder with timm from ``path`` (``.safetensors`` or its ``.json``).

    Args:
        path: the exported weights or their JSON.
        **overrides: ``timm.create_model`` kwargs replacing the saved ones (e.g. ``num_classes=10``
            to add a fresh head, ``drop_path_rate=0.1``).

    Raises:
        FileNotFoundError: the weights or the JSON are missing.
    """
    path = Path(path)
    weights, meta = path.with_suffix(".safetensors"), path.with_suffix(".json")
    for p in (weights, meta):
        if not p.is_file():
            raise FileNotFoundError(f"{p} does not exist; export writes <name>.safetensors and <name>.json together.")
    config = json.loads(meta.read_text())
    kwargs = {**config["model_kwargs"], **overrides}
    return timm.create_model(
        config["model_name"], pretrained=True, pretrained_cfg_overlay={"file": str(weights)}, **kwargs
    )


__all__ = ["atomic_write", "load_encoder", "save_encoder"]
