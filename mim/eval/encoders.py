"""Encoders to evaluate: an exported file, a ``mim`` checkpoint of any method, a public pretrained timm
model (``pretrained:<name>.<tag>``, from the Hugging Face hub cache or a local safetensors file), or a
random-init timm model (``timm:<name>``).

Nothing here runs code from a file: exported weights are safetensors, Lightning checkpoints are read
with ``torch.load(..., weights_only=True)`` (:func:`read_checkpoint`: a pickle that names anything beyond
tensors, containers, numbers and strings, e.g. ``os.system``, is refused with
:class:`UnsafeCheckpointError` before any of it runs), a ``pretrained_file`` must be safetensors (pickle
files are refused unread), and timm kwargs read from a file may not point timm at another file
(:data:`FILE_KWARGS`).

A pretrained model comes with its own preprocessing (``pretrained_cfg``: input size, mean / std,
interpolation, crop fraction): :func:`encoder_data_config` resolves it and :func:`adopt_preprocessing`
hands it to the datamodule (``ImageDataModule.adopt_data_config``) for every field the user left unset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
from contextlib import contextmanager
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from mim.backbones.vit import check_model_name
from mim.errors import ConfigError, UserError

#: Prefix of a ``source`` naming a timm model to build with random weights (the baseline row).
TIMM_PREFIX = "timm:"
#: Prefix of a ``source`` naming a timm model with its public pretrained weights, ``<architecture>.<tag>``
#: as ``timm.list_pretrained()`` spells it (e.g. ``pretrained:vit_base_patch14_reg4_dinov2.lvd142m``; no
#: tag: timm's default tag of that architecture).
PRETRAINED_PREFIX = "pretrained:"


#: timm kwargs that make ``timm.create_model`` read another file (or the hub): refused when they come from
#: a file's ``model_kwargs``, so an ``encoder.json`` cannot redirect loading to a pickle.
FILE_KWARGS = ("checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "pretrained")


class EncoderLoadError(UserError, ValueError):
    """An encoder file that cannot be used: not safetensors, truncated, or for another model."""


class EncoderNotFoundError(EncoderLoadError, FileNotFoundError):
    """An encoder source that names a missing file (also a ``FileNotFoundError``)."""

    def __init__(self, path: str | os.PathLike, detail: str = "", fix: str | None = None) -> None:
        fix = fix or (
            "pass the encoder.safetensors (or .json) that a run's ExportEncoder wrote, a .ckpt from its "
            "checkpoints/ folder, pretrained:<model_name>.<tag> for public weights, or timm:<model_name> for "
            "random weights."
        )
        super().__init__(f"{path} does not exist{detail}. Fix: {fix}")


class PretrainedWeightsUnavailableError(UserError, OSError):
    """The public weights of a ``pretrained:`` source are neither in the local cache nor downloadable
    (offline, no network, hub error): the message names the model, the cache folder and how to pass a file."""


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


_TRUE = ("1", "ON", "YES", "TRUE")
#: Preprocessing keys of :func:`encoder_data_config` (those of ``timm.data.resolve_data_config``).
DATA_CONFIG_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")


def hub_offline() -> bool:
    """``True`` when the Hugging Face hub is switched off: ``HF_HUB_OFFLINE`` (read now, so a value set
    after ``huggingface_hub`` was imported counts too) or ``huggingface_hub``'s own setting."""
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE:
        return True
    try:
        from huggingface_hub import constants
    except ImportError:  # timm then reads torch hub URLs only
        return False
    return bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir() -> str:
    """The Hugging Face hub cache folder: ``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else huggingface_hub's
    default (``~/.cache/huggingface/hub``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    try:
        from huggingface_hub import constants
    except ImportError:
        return os.path.join(os.path.expanduser("~"), ".cache", "huggingface", "hub")
    return str(constants.HF_HUB_CACHE)


def _resolve_pretrained(name: str) -> Any:
    """timm's ``PretrainedCfg`` of ``name`` (``arch`` or ``arch.tag``).

    Raises:
        ConfigError: an unknown architecture, an unknown tag, or an architecture without public weights.
    """
    from timm.models import get_pretrained_cfg, split_model_name_tag

    arch, tag = split_model_name_tag(name)
    check_model_name(arch, example="vit_base_patch14_reg4_dinov2.lvd142m or resnet50.a1_in1k", pattern="*")
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:  # "Invalid pretrained tag"
        cfg = None
    if cfg is None:
        tags = timm.list_pretrained(arch)
        listed = ", ".join(tags[:8]) + (" ..." if len(tags) > 8 else "")
        known = f"its weights: {listed}" if tags else f"timm has none for {arch}"
        raise ConfigError(
            f"timm has no pretrained weights named '{name}' ({known}). Fix: pass pretrained:<name>.<tag> with a "
            f"name from timm.list_pretrained('{arch}*'), or timm:{arch} for random weights."
        )
    return cfg


def _hub_weights(cfg: Any) -> tuple[str | None, str]:
    """``(cached file or None, where it is looked for)`` of the weights timm would download for ``cfg``:
    the Hugging Face hub repo (``hf_hub_id``; ``model.safetensors`` or ``pytorch_model.bin``) in
    :func:`hub_cache_dir`, else the torch hub folder (``torch.hub.get_dir()/checkpoints``) for a URL."""
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache
        from timm.models._hub import _get_safe_alternatives, hf_split

        repo, revision = hf_split(cfg.hf_hub_id)
        cache = hub_cache_dir()
        filename = cfg.hf_hub_filename or "pytorch_model.bin"
        for candidate in (*_get_safe_alternatives(filename), filename):
            found = try_to_load_from_cache(repo, candidate, cache_dir=cache, revision=revision)
            if isinstance(found, str) and os.path.isfile(found):
                return found, f"{cache} (Hugging Face hub repo {repo})"
        return None, f"{cache} (Hugging Face hub repo {repo})"
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    url = cfg.url if isinstance(cfg.url, str) else (cfg.url or [""])[0]
    path = os.path.join(folder, os.path.basename(urlparse(url).path)) if url else folder
    return (path if url and os.path.isfile(path) else None), f"{folder} (torch hub, from {url or 'no URL'})"


class _TimmLoadLog(logging.Handler):
    """Records of timm's weight loader (``timm.models._builder``) during one ``create_model``: whether
    loading started, and the keys it reported missing / unexpected (timm loads non-strictly whenever the
    head is dropped, ``num_classes=0``, and only logs the keys it could not place)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.started, self.missing, self.unexpected = False, [], []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if text.startswith("Loading pretrained weights"):
            self.started = True
        for prefix, keys in (("Missing keys (", self.missing), ("Unexpected keys (", self.unexpected)):
            if text.startswith(prefix):
                keys += text[len(prefix) : text.rindex(")")].split(", ")


@contextmanager
def _timm_load_log() -> Iterator[_TimmLoadLog]:
    logger = logging.getLogger("timm.models._builder")
    handler, level, propagate = _TimmLoadLog(), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # its info lines would reach the root handlers now that INFO is on
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _first_key(err: BaseException) -> str | None:
    """The first state-dict key named by a load error (``size mismatch for k``, ``Missing key(s) ... "k"``)."""
    if isinstance(err, KeyError) and err.args:
        return str(err.args[0])
    text = str(err)
    found = re.search(r"size mismatch for ([\w.]+)", text) or re.search(r'key\(s\) in state_dict: "([\w.]+)"', text)
    return found.group(1) if found else None


def _check_pretrained_file(path: Path) -> None:
    """Refuse a missing, pickle or unreadable ``pretrained_file`` before timm sees it (only the
    safetensors header is read; a pickle is never unpickled)."""
    fix = "pass the model's weights as a .safetensors file: --model.init_args.pretrained_file <weights>.safetensors."
    if not path.is_file():
        raise EncoderNotFoundError(path, " (the pretrained_file)", fix=fix)
    if path.suffix != ".safetensors":
        raise EncoderLoadError(
            f"{path} is refused: pretrained_file must be a .safetensors file, and a {path.suffix or 'suffix-less'} "
            "file is (or may be) a pickle, which can run code while it loads; it was not opened. Fix: convert it "
            "once where you trust it (safetensors.torch.save_file(torch.load(f, weights_only=True), "
            "'<weights>.safetensors'); see the pretrained-encoder docs) and pass the .safetensors file."
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            if not list(f.keys()):
                raise EncoderLoadError(f"{path} holds no tensors. Fix: {fix}")
    except (SafetensorError, OSError, ValueError) as err:
        raise EncoderLoadError(
            f"{path} is not a readable safetensors file (truncated, or a pickle renamed .safetensors): {err}. "
            f"Fix: {fix}"
        ) from err


def _check_patch_size(full: str, patch_size: Any, file: Path | None) -> None:
    """Refuse a ``patch_size`` in model_kwargs that differs from the one of the weights (those of
    ``file``'s ``patch_embed.proj.weight`` when it has that key, else the pretrained architecture's):
    timm would resample the patch embedding (FlexiViT-style) and the features would not be the model's."""
    own = None
    if file is not None:
        with safe_open(str(file), framework="pt") as f:
            if "patch_embed.proj.weight" in f.keys():
                own = tuple(f.get_slice("patch_embed.proj.weight").get_shape()[-2:])
    else:
        with torch.device("meta"):  # the architecture only: no weights, no memory
            embed = getattr(timm.create_model(full, pretrained=False), "patch_embed", None)
        own = tuple(embed.patch_size) if getattr(embed, "patch_size", None) is not None else None
    wanted = tuple(patch_size) if isinstance(patch_size, (list, tuple)) else (patch_size, patch_size)
    if own is not None and own != wanted:
        raise ConfigError(
            f"model_kwargs patch_size={patch_size} would resample the {own} px patch embedding of the "
            f"pretrained '{full}' weights, so the features would not be the model's. Fix: drop patch_size "
            "(the configs/eval files set {img_size: 32, patch_size: 4} for the random-init baseline): pass "
            "--model.init_args.model_kwargs null, or '{img_size: 224}' to resize only the position embeddings."
        )


def _create_pretrained(
    name: str, kwargs: dict[str, Any], pretrained_file: str | os.PathLike | None, source: str
) -> tuple[nn.Module, str | None]:
    """``timm.create_model(name, pretrained=True, **kwargs, num_classes=0)``, from ``pretrained_file``
    (``pretrained_cfg_overlay=dict(file=...)``: timm's own key conversion and position-embedding resize
    run) or the hub / its cache; returns ``(model, file used or None)``."""
    bad = sorted(k for k in kwargs if k in FILE_KWARGS)
    if bad:
        raise ConfigError(
            f"{source}: model_kwargs may not set {', '.join(bad)} (they choose the weights). Fix: pass a local "
            "weights file as --model.init_args.pretrained_file <weights>.safetensors."
        )
    cfg = _resolve_pretrained(name)
    full = f"{cfg.architecture}.{cfg.tag}" if cfg.tag else cfg.architecture
    file_fix = (
        f"download the weights where there is internet (timm.create_model('{full}', pretrained=True) fills the "
        f"cache) or save them as safetensors, then pass --model.init_args.pretrained_file <weights>.safetensors "
        f"(pretrained_file: in a config)"
    )
    if pretrained_file is not None:
        path = Path(pretrained_file).expanduser()
        _check_pretrained_file(path)
        file: str | None = str(path)
        if kwargs.get("patch_size") is not None:
            _check_patch_size(full, kwargs["patch_size"], path)
    else:
        if not (cfg.hf_hub_id or cfg.url):
            raise ConfigError(f"timm knows no download location for '{full}'. Fix: {file_fix}.")
        if kwargs.get("patch_size") is not None:
            _check_patch_size(full, kwargs["patch_size"], None)
        cached, where = _hub_weights(cfg)
        if hub_offline() and cached is None:
            raise PretrainedWeightsUnavailableError(
                f"the weights of '{full}' are not in the local cache ({where}) and HF_HUB_OFFLINE is set, so "
                f"they cannot be downloaded. Fix: {file_fix}."
            )
        # offline with a cached safetensors file: load that file directly, so nothing asks the network
        file = cached if hub_offline() and cached is not None and cached.endswith(".safetensors") else None
    overlay = {"pretrained_cfg_overlay": {"file": file}} if file is not None else {}
    with _timm_load_log() as log:
        try:
            model = timm.create_model(full, pretrained=True, **{**kwargs, "num_classes": 0}, **overlay)
        except Exception as err:  # timm / huggingface_hub / urllib raise many types
            if not log.started:  # failed while building: the kwargs
                raise ConfigError(
                    f"timm cannot build '{full}' with model_kwargs {kwargs}: {err or type(err).__name__}. "
                    "Fix: pass only arguments of that model's class (e.g. img_size for a ViT)."
                ) from err
            if file is None:
                _, where = _hub_weights(cfg)
                raise PretrainedWeightsUnavailableError(
                    f"the weights of '{full}' could not be downloaded or read ({type(err).__name__}: "
                    f"{str(err)[:300]}); they are looked for in {where}. Fix: {file_fix}."
                ) from err
            key = _first_key(err)
            raise EncoderLoadError(
                f"{file} does not hold weights of '{full}'"
                + (f": the first mismatching key is '{key}'" if key else "")
                + f" ({type(err).__name__}: {str(err)[:300]}). Fix: pass the safetensors file of {full} (hub "
                "checkpoints of the same architecture work: timm converts their keys), or the model_kwargs it "
                "was saved with."
            ) from err
    if log.missing and pretrained_file is None:  # timm's published weights: its own tests check they fit
        rank_zero_warn(f"'{full}': timm left {len(log.missing)} keys at random init (first: '{log.missing[0]}').")
    elif log.missing:
        raise EncoderLoadError(
            f"{file or full} does not hold weights of '{full}': the model's key '{log.missing[0]}' is not in it "
            f"({len(log.missing)} keys missing, so they would keep random values). Fix: pass the safetensors "
            f"file of {full}, or the model_kwargs it was saved with."
        )
    if log.unexpected:
        rank_zero_warn(
            f"{file or full}: {len(log.unexpected)} keys of the file are not used by '{full}' "
            f"(first: '{log.unexpected[0]}')."
        )
    return model, file


def encoder_data_config(model: nn.Module) -> dict[str, Any]:
    """The preprocessing a timm model was trained with (``timm.data.resolve_data_config(model=model)``,
    i.e. its ``pretrained_cfg``), as JSON-friendly values.

    ``input_size`` follows the model as built: a ViT built with another ``img_size`` (its position
    embeddings resized) takes that size, whatever the checkpoint was trained at.

    Returns:
        ``{"input_size": [C, H, W], "mean": [3 floats], "std": [3 floats], "interpolation": str
        ("bicubic", "bilinear", ...), "crop_pct": float in (0, 1], "crop_mode": str ("center",
        "squash", "border")}``; mean / std in [0, 1] pixel units.
    """
    from timm.data import resolve_data_config

    config = resolve_data_config(model=model)
    input_size = [int(v) for v in config["input_size"]]
    fixed = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if fixed is not None and not getattr(model, "dynamic_img_size", False):
        input_size[1:] = [int(v) for v in fixed]
    return {
        "input_size": input_size,
        "mean": [float(v) for v in config["mean"]],
        "std": [float(v) for v in config["std"]],
        "interpolation": str(config["interpolation"]),
        "crop_pct": float(config["crop_pct"]),
        "crop_mode": str(config.get("crop_mode", "center")),
    }


def adopt_preprocessing(trainer: Any, info: dict[str, Any]) -> dict[str, Any] | None:
    """Give ``trainer.datamodule`` the preprocessing of a pretrained encoder (``info["data_config"]`` from
    :func:`load_encoder_from`) for every field its user left unset, before the dataloaders are built.

    Call it from a LightningModule's ``setup(stage)`` (Lightning 2.6 runs ``datamodule.setup`` first and
    builds the dataloaders afterwards). Sources without ``data_config`` (``timm:``, mim exports and
    checkpoints) change nothing. One info line names what was adopted.

    Args:
        trainer: the Lightning trainer (or None).
        info: the ``info`` dict of :func:`load_encoder_from`.

    Returns:
        The datamodule's effective preprocessing (its ``preprocessing`` property) when a data config was
        handed over, else ``None`` (no data config, no trainer / datamodule, or a datamodule without
        ``adopt_data_config``, which gets a warning).
    """
    config = info.get("data_config")
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    if not config or datamodule is None:
        return None
    if not hasattr(datamodule, "adopt_data_config"):
        rank_zero_warn(
            f"{type(datamodule).__name__} cannot adopt the preprocessing of {info.get('pretrained')} "
            f"({config}); set its image size, mean, std and interpolation to these values yourself."
        )
        return None
    datamodule.adopt_data_config(config)
    effective = dict(datamodule.preprocessing)
    adopted = effective.get("adopted") or []
    kept = [k for k in ("img_size", "mean", "std", "interpolation", "eval_crop_pct") if k not in adopted]
    rank_zero_info(
        f"Preprocessing of {info.get('pretrained')}: "
        + (", ".join(f"{k}={effective[k]}" for k in adopted) if adopted else "nothing adopted")
        + (f" (set by you: {', '.join(f'{k}={effective[k]}' for k in kept)})" if kept else "")
    )
    return effective


def load_encoder_from(
    source: str | os.PathLike,
    model_kwargs: dict[str, Any] | None = None,
    pretrained_file: str | os.PathLike | None = None,
    **overrides: Any,
) -> tuple[nn.Module, dict[str, Any]]:
    """Build a timm encoder from ``source``.

    Args:
        source: ``<file>.safetensors`` or its ``.json`` (written by ``ExportEncoder``), a ``.ckpt``
            of any ``mim`` pretraining method, ``"pretrained:<model_name>.<tag>"`` for timm's public
            weights (e.g. ``pretrained:vit_base_patch14_reg4_dinov2.lvd142m``: the Hugging Face hub cache,
            downloaded when online) or ``"timm:<model_name>"`` for random weights.
        model_kwargs: ``timm.create_model`` kwargs for ``"timm:"`` and ``"pretrained:"`` sources (e.g.
            ``img_size``, ``patch_size``: timm resizes pretrained position / patch embeddings to them); for
            files they come from the file.
        pretrained_file: ``"pretrained:"`` sources only: a local ``.safetensors`` file with the weights
            (a timm / hub checkpoint of that architecture, in timm's or the original key layout), loaded
            through ``timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=...))`` so
            timm's checkpoint conversion runs; nothing is downloaded.
        **overrides: kwargs replacing the saved ones (``num_classes=10`` adds a fresh head,
            ``drop_path_rate=0.1``).

    Returns:
        ``(model, info)``; ``info`` = ``{"model_name", "model_kwargs", "source", "weights_sha256"}``
        (the hash of the loaded weights, before any new head); ``"pretrained:"`` sources add
        ``"pretrained"`` (``<architecture>.<tag>``), ``"pretrained_file"`` (the file read, or None for
        the hub) and ``"data_config"`` (:func:`encoder_data_config`).

    Raises:
        EncoderNotFoundError: a missing file (a ``FileNotFoundError``).
        EncoderLoadError: a file that is not safetensors / a readable checkpoint, is truncated,
            belongs to another model (the first mismatching key is named), or whose model_kwargs name
            another file (:data:`FILE_KWARGS`); a ``pretrained_file`` that is not ``.safetensors``
            (refused unopened).
        PretrainedWeightsUnavailableError: ``"pretrained:"`` without ``pretrained_file`` when the weights
            are not cached and cannot be downloaded (``HF_HUB_OFFLINE``, no network).
        UnsafeCheckpointError: a ``.ckpt`` whose pickle would run code (:func:`read_checkpoint`).
        ConfigError: an unknown timm model name or pretrained tag, ``model_kwargs`` the model does not
            take, or a ``pretrained_file`` with another source than ``"pretrained:"``.
    """
    text = str(source)
    if pretrained_file is not None and not text.startswith(PRETRAINED_PREFIX):
        raise ConfigError(
            f"pretrained_file is for pretrained:<model_name> sources, but the encoder is {text}. Fix: use "
            "--model.init_args.encoder pretrained:<model_name>.<tag>, or drop pretrained_file."
        )
    if text.startswith(PRETRAINED_PREFIX):
        name, kwargs = text[len(PRETRAINED_PREFIX) :], dict(model_kwargs or {})
        model, file = _create_pretrained(name, kwargs, pretrained_file, text)
        cfg = model.pretrained_cfg
        full = f"{cfg['architecture']}.{cfg['tag']}" if cfg.get("tag") else cfg["architecture"]
        info = {
            "model_name": full,
            "model_kwargs": kwargs,
            "source": text,
            "weights_sha256": weights_sha256(model),
            "pretrained": full,
            "pretrained_file": file if pretrained_file is not None else None,
            "data_config": encoder_data_config(model),
        }
        if overrides:
            fresh = timm.create_model(full, pretrained=False, **{**kwargs, **overrides})
            load_weights(fresh, model.state_dict(), text)
            model = fresh
        return model, info
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
    "DATA_CONFIG_KEYS",
    "FILE_KWARGS",
    "EncoderLoadError",
    "EncoderNotFoundError",
    "PRETRAINED_PREFIX",
    "PretrainedWeightsUnavailableError",
    "TIMM_PREFIX",
    "UnsafeCheckpointError",
    "adopt_preprocessing",
    "check_file_kwargs",
    "encoder_data_config",
    "hub_cache_dir",
    "hub_offline",
    "load_encoder_from",
    "load_weights",
    "read_checkpoint",
    "weights_sha256",
]
