"""The SAE file format and the registry of variants: :func:`save_sae` / :func:`load_sae` write and read an SAE as
``<name>.safetensors`` (weights and buffers) + ``<name>.json`` (class and constructor arguments), and
:data:`VARIANTS` maps the JSON's class names to the classes of :mod:`mim.sae.variants`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mim.errors import UserError
from mim.export import atomic_write
from mim.sae.variants import (
    MPSAE,
    MSAE,
    AbsTopKSAE,
    ArchetypalSAE,
    BatchTopKSAE,
    FeatureChoiceSAE,
    JumpReLUSAE,
    MatryoshkaSAE,
    MutualChoiceSAE,
    ReLUSAE,
    SparseAutoencoder,
    TopAFASAE,
    TopKSAE,
)

FORMAT = "mim-sae"

#: Variants by class name (what :func:`load_sae` resolves the JSON's ``class`` with).
VARIANTS: dict[str, type[SparseAutoencoder]] = {
    cls.__name__: cls
    for cls in (TopKSAE, BatchTopKSAE, MatryoshkaSAE, AbsTopKSAE, TopAFASAE, ReLUSAE, JumpReLUSAE, MPSAE,
                FeatureChoiceSAE, MutualChoiceSAE, MSAE, ArchetypalSAE)
}


def save_sae(sae: SparseAutoencoder, path: str | os.PathLike) -> Path:
    """Write ``sae``'s weights and buffers (``input_scale``, thresholds, firing counters) to ``path``
    (``.safetensors``) and its class and constructor arguments beside it (``.json``), both atomically.

    Returns:
        the ``.safetensors`` path.
    """
    path = Path(path).with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
    config = {"format": FORMAT, "class": type(sae).__name__, "init_args": sae.init_args(), "weights": path.name}
    atomic_write(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))
    return path


def load_sae(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> SparseAutoencoder:
    """Re-create an SAE written by :func:`save_sae` (``path``: its ``.safetensors`` or ``.json``).

    Raises:
        UserError: a missing file, another format, an unknown class or weights that do not fit the config.
    """
    path = Path(path)
    weights, meta = path.with_suffix(".safetensors"), path.with_suffix(".json")
    for p in (weights, meta):
        if not p.is_file():
            raise UserError(f"{p} does not exist; an SAE is saved as <name>.safetensors + <name>.json together.")
    config = json.loads(meta.read_text())
    if config.get("format") != FORMAT or config.get("class") not in VARIANTS:
        raise UserError(f"{meta} is not a mim SAE config (class {config.get('class')!r}). Fix: pass a saved SAE.")
    sae = VARIANTS[config["class"]](**config["init_args"])
    try:
        sae.load_state_dict(load_file(weights, device=str(map_location)))
    except (RuntimeError, OSError) as err:
        raise UserError(f"{weights} does not fit {meta}: {err}. Fix: keep the two files of one save together.") from err
    return sae.to(map_location)
