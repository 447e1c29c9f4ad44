"""Encoders to evaluate: an exported file, a ``mim`` checkpoint of any method, or a random-init timm model.

Nothing here runs code from a file: exported weights are safetensors, Lightning checkpoints are read
with ``torch.load(..., weights_only=True)`` (:func:`read_checkpoint`: a pickle that names anything beyond
tensors, containers, numbers and strings, e.g. ``os.system``, is refused with
:class:`UnsafeCheckpointError` before any of it runs), and timm kwargs read from a file may not point
timm at another file (:data:`FILE_KWARGS`).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from mim.backbones.vit import check_model_name
from mim.errors import ConfigError, UserError

#: Prefix of a ``source`` naming a timm model to build with random weights (the baseline row).
TIMM_PREFIX = "timm:"


#: timm kwargs that make ``timm.create_model`` read another file (or the hub): refused when they come from
#: a file's ``model_kwargs``, so an ``encoder.json`` cannot redirect loading to a pickle.
FILE_KWARGS = ("checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "pretrained")


class EncoderLoadError(UserError, ValueError):
    """An encoder file that cannot be used: not safetensors, truncated, or for another model."""


class EncoderNotFoundError(EncoderLoadError, FileNotFoundError):
    """An encoder source that names a missing file (also a ``FileNotFoundError``)."""

    def __init__(self, path: str | os.PathLike, detail: str = "") -> None:
        super().__init__(
            f"{path} does not exist{detail}. Fix: pass the encoder.safetensors (or .json) that a run's "
            "ExportEncoder wrote, a .ckpt from its checkpoints/ folder, or timm:<model_name> for random weights."
        )


class UnsafeCheckpointError(EncoderLoadError):
    """A checkpoint whose pickle asks to call or build something outside torch's weights-only allowlist
    (e.g. ``os.system``): refused before any of it runs."""


def weights_sha256(model: nn.Module) -> str:
    """Hex SHA-256 of a model's ``state_dict`` (keys in sorted order, their dtypes, shapes and bytes):
    the same weights give the same hash whatever the file they came from."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        value = value.detach().to("cpu").contiguous()
        digest.update(f"{key}:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(value.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    names = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(f"{name}." for name in names)


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``state`` into ``model``, strictly except for the classifier head (which a fresh
    ``num_classes`` adds and pretraining never has).

    Raises:
        EncoderLoadError: a key with another shape (the first one is named), or keys the model
            lacks / needs (the first of each named).
    """
    own = model.state_dict()
    head = _classifier_prefixes(model)
    name = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
    for key, expected in own.items():  # in the model's order, so "first" means first layer
        value = state.get(key)
        if value is not None and expected.shape != value.shape and not key.startswith(head):
            raise EncoderLoadError(
                f"{source} belongs to another model than '{name}': the first mismatching key '{key}' has "
                f"shape {tuple(value.shape)} in the file and {tuple(expected.shape)} in the model. Fix: pass "
                "the model_name / model_kwargs the encoder was trained with (see its encoder.json)."
            )
    missing = [k for k in own if k not in state and not k.startswith(head)]
    unexpected = [k for k in state if k not in own and not k.startswith(head)]
    if missing or unexpected:
        what = f"lacks '{missing[0]}' ({len(missing)} keys)" if missing else ""
        what += (" and " if missing and unexpected else "") + (
            f"has '{unexpected[0]}' the model does not ({len(unexpected)} keys)" if unexpected else ""
        )
        raise EncoderLoadError(f"{source} does not fit '{name}': the file {what}. Fix: check the model name and kwargs.")
    kept = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(kept, strict=False)


def check_file_kwargs(kwargs: dict[str, Any], source: str) -> None:
    """Raise :class:`EncoderLoadError` when timm kwargs read from ``source`` name a key of
    :data:`FILE_KWARGS` (they would make timm load another file than ``source``)."""
    bad = sorted(k for k in kwargs if k in FILE_KWARGS)
    if bad:
        raise EncoderLoadError(
            f"{source} is refused: its model_kwargs set {', '.join(bad)}, which would make timm load another "
            "file than this one. Fix: remove those keys from the file's model_kwargs (mim never writes them)."
        )


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise EncoderLoadError(
            f"{path} is not a readable safetensors file (truncated or another format): {err}. "
            "Fix: re-export it (mim.callbacks.ExportEncoder / mim.export.save_encoder)."
        ) from err


def read_checkpoint(path: str | os.PathLike, mmap: bool = False) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``, with errors a user can act on.

    A checkpoint is a pickle, and a pickle can ask to call any function while it loads. torch's
    weights-only unpickler (``torch.serialization``, the default since torch 2.6) allows only tensors,
    containers, numbers, strings and a few torch types: anything else is refused before it runs. mim
    and Lightning checkpoints need nothing more (verified on MAE, SparK, CAE, MixedAE, FineTune runs).

    Args:
        path: a ``.ckpt`` (any torch zip file).
        mmap: map the file instead of reading it (tensors are not read: a cheap check of a big file).

    Returns:
        The unpickled object (a dict for Lightning checkpoints), tensors on the CPU.

    Raises:
        EncoderNotFoundError: no file at ``path`` (a ``FileNotFoundError``).
        UnsafeCheckpointError: the pickle names a global outside the allowlist (named in the message).
        EncoderLoadError: not a torch checkpoint (truncated, another format).
    """
    path = Path(path)
    if not path.is_file():
        raise EncoderNotFoundError(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err)) or re.search(r"global '?([\w.]+)", str(err))
        what = found.group(1) if found else "a Python object"
        raise UnsafeCheckpointError(
            f"{path} is refused: its pickle asks to run or build {what} while loading, which a checkpoint "
            "written by mim never needs (tensors, numbers, strings only), so nothing from it was run. "
            "Fix: use a checkpoint of a run you trust, or its exported encoder.safetensors; do not load "
            "this file with weights_only=False."
        ) from None
    except Exception as err:  # zip / storage errors come in many types
        raise EncoderLoadError(
            f"{path} is not a readable torch checkpoint (truncated or another format): {err}. "
            "Fix: pass a .ckpt written by a mim run (its checkpoints/ folder)."
        ) from err


def _read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    ckpt = read_checkpoint(path)
    described = ckpt.get("mim_encoder") if isinstance(ckpt, dict) else None
    if not described:
        raise EncoderLoadError(
            f"{path} has no 'mim_encoder' entry, so its encoder cannot be told apart from the rest. "
            "Fix: use a checkpoint written by a mim pretraining run, or its exported encoder.safetensors."
        )
    prefix = described["prefix"] + "."
    state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    return described, state


def load_encoder_from(
    source: str | os.PathLike, model_kwargs: dict[str, Any] | None = None, **overrides: Any
) -> tuple[nn.Module, dict[str, Any]]:
    """Build a timm encoder from ``source``.

    Args:
        source: ``<file>.safetensors`` or its ``.json`` (written by ``ExportEncoder``), a ``.ckpt``
            of any ``mim`` pretraining method, or ``"timm:<model_name>"`` for random weights.
        model_kwargs: ``timm.create_model`` kwargs for ``"timm:"`` sources (e.g. ``img_size``,
            ``patch_size``); for files they come from the file.
        **overrides: kwargs replacing the saved ones (``num_classes=10`` adds a fresh head,
            ``drop_path_rate=0.1``).

    Returns:
        ``(model, info)``; ``info`` = ``{"model_name", "model_kwargs", "source", "weights_sha256"}``
        (the hash of the loaded weights, before any new head).

    Raises:
        EncoderNotFoundError: a missing file (a ``FileNotFoundError``).
        EncoderLoadError: a file that is not safetensors / a readable checkpoint, is truncated,
            belongs to another model (the first mismatching key is named), or whose model_kwargs name
            another file (:data:`FILE_KWARGS`).
        UnsafeCheckpointError: a ``.ckpt`` whose pickle would run code (:func:`read_checkpoint`).
        ConfigError: an unknown timm model name, or ``model_kwargs`` the model does not take.
    """
    text = str(source)
    if text.startswith(TIMM_PREFIX):
        name, kwargs, state = text[len(TIMM_PREFIX) :], dict(model_kwargs or {}), None
    else:
        path = Path(text)
        if path.suffix == ".ckpt":
            if not path.is_file():
                raise EncoderNotFoundError(path)
            described, state = _read_checkpoint(path)
            name, kwargs = described["model_name"], dict(described["model_kwargs"])
        else:
            weights, meta = path.with_suffix(".safetensors"), path.with_suffix(".json")
            for p in (weights, meta):
                if not p.is_file():
                    raise EncoderNotFoundError(p, " (an export writes <name>.safetensors and <name>.json together)")
            config = json.loads(meta.read_text())
            name, kwargs, state = config["model_name"], dict(config["model_kwargs"]), _read_safetensors(weights)
        check_file_kwargs(kwargs, text)
    check_model_name(name, example="vit_tiny_patch16_224 or resnet18", pattern="*")
    try:
        model = timm.create_model(name, pretrained=False, **{**kwargs, "num_classes": 0})
    except (TypeError, AssertionError, ZeroDivisionError) as err:  # a kwarg the model does not take / cannot use
        raise ConfigError(
            f"timm cannot build '{name}' with model_kwargs {kwargs}: {err or type(err).__name__}. "
            "Fix: pass only arguments of that model's class (e.g. img_size, patch_size for a ViT)."
        ) from err
    if state is not None:
        load_weights(model, state, text)
    info = {"model_name": name, "model_kwargs": kwargs, "source": text, "weights_sha256": weights_sha256(model)}
    if overrides:
        fresh = timm.create_model(name, pretrained=False, **{**kwargs, **overrides})
        load_weights(fresh, model.state_dict(), text)
        model = fresh
    return model, info


__all__ = [
    "FILE_KWARGS",
    "EncoderLoadError",
    "EncoderNotFoundError",
    "TIMM_PREFIX",
    "UnsafeCheckpointError",
    "check_file_kwargs",
    "load_encoder_from",
    "load_weights",
    "read_checkpoint",
    "weights_sha256",
]
