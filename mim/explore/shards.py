"""Data files of the explorer site: JSON handed to the page by small script files, binary arrays as base64.

A page opened from ``file://`` cannot ``fetch()`` its data files, but it can add ``<script>`` tags, so every data
file is a script ``MIM.put("<key>", {...});`` (JSONP-style) that ``explore.js`` loads when a view needs it. Large
numeric arrays travel as base64 of little-endian binary (``int16`` / ``int32`` / ``float16``): a third of the size
of decimal JSON and parsed without a JSON number parser; ``explore.js`` decodes them (``ints``, ``halves``).
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

#: Binary dtypes of :func:`pack` and the name ``explore.js`` decodes them by.
PACKED = {"i16": "<i2", "i32": "<i4", "u8": "<u1", "f16": "<f2"}


def pack(values: Any, kind: str) -> str:
    """``values`` (1-D) as base64 of little-endian ``kind`` (``"i16"``, ``"i32"``, ``"u8"`` or ``"f16"``).

    Raises:
        ValueError: an integer out of ``kind``'s range (a wrong kind would silently wrap).
    """
    array = np.asarray(values).reshape(-1)
    dtype = np.dtype(PACKED[kind])
    if dtype.kind in "iu" and len(array):
        info = np.iinfo(dtype)
        if int(array.min()) < info.min or int(array.max()) > info.max:
            raise ValueError(f"values in [{int(array.min())}, {int(array.max())}] do not fit {kind}")
    return base64.b64encode(array.astype(dtype).tobytes()).decode("ascii")


def id_kind(count: int) -> str:
    """``"i16"`` when ids ``0..count-1`` fit int16, else ``"i32"``."""
    return "i16" if count <= np.iinfo(np.int16).max + 1 else "i32"


def rounded(values: Any, digits: int = 4) -> list[float]:
    """Floats to ``digits`` significant digits (shorter JSON; plenty for a table or a chart)."""
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    scale = np.where(array != 0, np.floor(np.log10(np.abs(np.where(array != 0, array, 1.0)))), 0.0)
    factor = 10.0 ** (digits - 1 - scale)
    return [float(v) for v in np.round(array * factor) / factor]


def write_data(folder: str | os.PathLike, key: str, data: Any) -> Path:
    """Write ``data/<key>.js`` under the site ``folder``: ``MIM.put("<key>", <data as JSON>);``; returns its path.

    ``key`` is a ``/``-separated name (``"latents"``, ``"latent/0003"``); the page loads it as
    ``data/<key>.js``.
    """
    path = Path(folder) / "data" / f"{key}.js"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, separators=(",", ":"), allow_nan=False)
    path.write_text(f"MIM.put({json.dumps(key)},{text});\n", encoding="utf-8")
    return path


__all__ = ["PACKED", "id_kind", "pack", "rounded", "write_data"]
