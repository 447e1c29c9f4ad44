"""Export a pretrained encoder as plain timm weights, and load it back with timm.

Files: ``<name>.safetensors`` (the timm model's ``state_dict``) and ``<name>.json``
(``{"model_name": ..., "model_kwargs": {...}}``). Loading is
``timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay={"file": path}, **model_kwargs)``,
so any timm user can take the weights without ``mim``.

Also the file-writing helpers of the package: :func:`atomic_write` (readers never see half a file) and
:func:`check_writable` (an unwritable output folder is refused before any work starts).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import timm
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from mim.errors import UserError


class OutputError(UserError):
    """An output folder that cannot be written (a file in its path, no permission, a read-only mount),
    or a disk with too little free space for what a run will write."""


def check_writable(folder: str | os.PathLike, what: str, fix: str) -> Path:
    """Create ``folder`` (with parents) and a temporary file in it (removed at once), or raise.

    A real write catches what permission bits do not (read-only mounts, full disks, root-squashed
    network folders), and works for root, whom ``os.access`` always allows.

    Args:
        folder: the output folder.
        what: what the folder is for, for the message (``"the feature store folder"``).
        fix: the message's fix (``"pass --trainer.default_root_dir DIR"``).

    Returns:
        ``folder`` as a ``Path``.

    Raises:
        OutputError: the folder cannot be created or written; the message names the cause (the
            first existing part of the path when it is a file) and ``fix``.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
        why = err.strerror or str(err)
        if existing is not None and not existing.is_dir():
            why = f"{existing} is a file, not a folder"
        raise OutputError(f"{what} {folder} cannot be written: {why}. Fix: {fix}") from None
    return folder


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


def write_format_json(path: Path, fmt: str, version: int, metadata: dict[str, Any]) -> Path:
    """Write ``{"format": fmt, "format_version": version, **metadata}`` as JSON to ``path`` atomically (the
    ``metadata.json`` of a feature store or latent cache, written only once every shard is complete)."""
    text = json.dumps({"format": fmt, "format_version": version, **metadata}, indent=2, default=str)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def read_format_json(
    path: Path, fmt: str, version: int, error: type[UserError], what: str, fixes: tuple[str, str, str]
) -> dict[str, Any] | None:
    """The JSON written by :func:`write_format_json`, or None when ``path`` does not exist.

    Args:
        path: the ``metadata.json``.
        fmt, version: the expected ``format`` and ``format_version``.
        error: the error class raised (a :class:`~mim.errors.UserError`).
        what: what the folder is, e.g. ``"feature store"`` (named in the messages).
        fixes: the ``Fix: ...`` sentences for unreadable JSON, another format, another version.

    Raises:
        error: the file is not JSON, not of format ``fmt``, or of another version.
    """
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise error(f"{path} is not readable JSON ({err}). {fixes[0]}") from err
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise error(f"{path} is not the metadata of a mim {what}. {fixes[1]}")
    if meta.get("format_version") != version:
        raise error(
            f"{path} has {what.replace(' ', '-')} format version {meta.get('format_version')}; this mim reads version "
            f"{version}. {fixes[2]}"
        )
    return meta


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

    Nothing from the files is run: the weights are read as safetensors only (a pickle renamed
    ``.safetensors`` is refused), and the JSON's ``model_kwargs`` may not point timm at another file
    (``checkpoint_path``, ``pretrained_cfg``, ...: :data:`mim.eval.encoders.FILE_KWARGS`).

    Raises:
        FileNotFoundError: the weights or the JSON are missing.
        mim.eval.encoders.EncoderLoadError: weights that are not safetensors (or truncated), or a JSON
            whose ``model_kwargs`` name another file.
    """
    from mim.eval.encoders import EncoderLoadError, check_file_kwargs  # lazy: mim.eval's modules import this one

    path = Path(path)
    weights, meta = path.with_suffix(".safetensors"), path.with_suffix(".json")
    for p in (weights, meta):
        if not p.is_file():
            raise FileNotFoundError(f"{p} does not exist; export writes <name>.safetensors and <name>.json together.")
    config = json.loads(meta.read_text())
    check_file_kwargs(config["model_kwargs"], str(meta))
    try:
        with safe_open(str(weights), framework="pt"):
            pass
    except (SafetensorError, OSError) as err:
        raise EncoderLoadError(
            f"{weights} is not a readable safetensors file (truncated or another format): {err}. "
            "Fix: re-export it (mim.callbacks.ExportEncoder / mim.export.save_encoder)."
        ) from err
    kwargs = {**config["model_kwargs"], **overrides}
    return timm.create_model(
        config["model_name"], pretrained=True, pretrained_cfg_overlay={"file": str(weights)}, **kwargs
    )


__all__ = ["OutputError", "atomic_write", "check_writable", "load_encoder", "save_encoder"]
