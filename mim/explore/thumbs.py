"""Thumbnails of the explorer site: a feature store's images as sprite sheets (WebP, or PNG without WebP).

Image ``r`` (the ``r``-th image of the store in image-index order) lies in sheet ``r // per_sheet`` at column
``(r % per_sheet) % columns`` and row ``(r % per_sheet) // columns``; each cell is ``size x size`` pixels. The
images are the store's own (:func:`mim.sae.viz.store_dataset`: the split, resize and centre crop the features
were extracted from, unnormalised), so the patch grid of the store lies exactly over each thumbnail.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, features

from mim.sae.viz import load_images

#: Images per sheet row.
COLUMNS = 16
#: Images per sheet (16 x 16).
PER_SHEET = 256


def sheet_format() -> tuple[str, dict[str, Any]]:
    """``(extension, Pillow save options)``: lossy WebP (quality 90) when Pillow has WebP, else PNG."""
    if features.check("webp"):
        return "webp", {"format": "WEBP", "quality": 90, "method": 4}
    return "png", {"format": "PNG", "optimize": True}


def thumb_size(img_size: int, largest: int = 96) -> int:
    """Thumbnail side in pixels: the store's ``img_size``, shrunk to at most ``largest`` (CIFAR stays 32)."""
    return int(min(img_size, largest))


def write_sheets(folder: str | os.PathLike, dataset: torch.utils.data.Dataset, indices: Sequence[int],
                 labels: Sequence[int], size: int) -> dict[str, Any]:
    """Write the sprite sheets of images ``indices`` (image-index order) into ``folder/thumbs``.

    Args:
        folder: the site folder.
        dataset: :func:`mim.sae.viz.store_dataset` of the store.
        indices: (n,) image indices, the order of the cells.
        labels: (n,) their labels in the store (checked against the dataset's).
        size: cell side in pixels (:func:`thumb_size`).

    Returns:
        The layout for ``meta``: ``{"size", "columns", "per_sheet", "sheets", "ext"}``.

    Raises:
        FeatureStoreError: an image whose label differs from the store's (another data root).
    """
    out = Path(folder) / "thumbs"
    out.mkdir(parents=True, exist_ok=True)
    ext, options = sheet_format()
    n = len(indices)
    sheets = math.ceil(n / PER_SHEET)
    for sheet in range(sheets):
        rows = range(sheet * PER_SHEET, min(n, (sheet + 1) * PER_SHEET))
        images = load_images(dataset, [indices[r] for r in rows], [labels[r] for r in rows])
        if images.shape[-1] != size or images.shape[-2] != size:
            images = torch.nn.functional.interpolate(images, size=(size, size), mode="area")
        pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        grid_rows = math.ceil(len(rows) / COLUMNS)
        canvas = np.zeros((grid_rows * size, COLUMNS * size, 3), np.uint8)
        for cell, picture in enumerate(pixels):
            r, c = divmod(cell, COLUMNS)
            canvas[r * size:(r + 1) * size, c * size:(c + 1) * size] = picture
        Image.fromarray(canvas).save(out / f"sheet-{sheet:04d}.{ext}", **options)
    return {"size": size, "columns": COLUMNS, "per_sheet": PER_SHEET, "sheets": sheets, "ext": ext}


__all__ = ["COLUMNS", "PER_SHEET", "sheet_format", "thumb_size", "write_sheets"]
