"""Unusual and broken image files in an ImageFolder tree (``mim.data.datasets.load_rgb`` / ``to_rgb``,
``mim.data.transforms``): each crafted in tmp_path next to real CIFAR-10 JPEGs, then decoded pixels
checked. tests/test_data.py already covers: truncated / zero-byte / text-as-.jpg raising
``BadImageError`` (also from workers), ``skip_bad_images`` on those, and L / CMYK / P / RGBA ending in
mode RGB; here the pixel values and the cases it does not have."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mim.data import BadImageError, ImageDataModule, build_dataset
from mim.data.datasets import ALPHA_BACKGROUND, decode_rgb, load_rgb, to_uint8
from mim.data.transforms import eval_transform, train_transform

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


@pytest.fixture
def cat(tmp_path, shared_data) -> Path:
    """``tmp_path/train/{cat,dog}`` and ``tmp_path/test/{cat,dog}`` with 3 real CIFAR-10 JPEGs each;
    returns the train cat folder, where the tests put their crafted files."""
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for src in sorted((shared_data / "cifar10" / "train" / cls).iterdir())[:3]:
                shutil.copy(src, tmp_path / split / cls / src.name)
    return tmp_path / "train" / "cat"


def rgb(path: Path) -> np.ndarray:
    img = load_rgb(path)
    assert img.mode == "RGB"
    return np.asarray(img).astype(int)


def test_16_bit_png_and_tiff_scale_by_the_dtype_range(cat):
    ramp = np.linspace(0, 65535, 256).round().astype(np.uint16)[None].repeat(4, 0)  # (4, 256) 0..65535
    Image.fromarray(ramp).save(cat / "ramp16.png")
    Image.fromarray(ramp).save(cat / "ramp16.tif")
    with Image.open(cat / "ramp16.png") as img:
        assert img.mode == "I;16"
        assert (np.asarray(img.convert("RGB")) == 255).mean() > 0.95  # what PIL alone does: clipped to white
    for name in ("ramp16.png", "ramp16.tif"):
        out = rgb(cat / name)
        assert out.shape == (4, 256, 3) and (out == out[..., :1]).all()  # gray in all 3 channels
        np.testing.assert_array_equal(out[0, :, 0], np.arange(256))  # v * 255 / 65535, rounded
    dark = np.full((4, 4), 4095, np.uint16)  # 12-bit data in a 16-bit file stays dark (not stretched)
    Image.fromarray(dark).save(cat / "dark16.png")
    assert (rgb(cat / "dark16.png") == 16).all()


def test_32_bit_int_and_float_tiff(cat):
    as16 = np.array([[0, 65535, 257 * 100]], np.int32)  # mode I within 0..65535: as 16-bit data
    wide = np.array([[-1000, 99000, 49000]], np.int32)  # beyond: the image's min..max
    unit = np.array([[0.0, 1.0, 0.5]], np.float32)  # mode F within [0, 1]: x 255
    hdr = np.array([[-3.0, 5.0, 1.0]], np.float32)  # beyond: min..max
    for name, values, want in [("i16.tif", as16, [0, 255, 100]), ("iwide.tif", wide, [0, 255, 128]),
                               ("funit.tif", unit, [0, 255, 128]), ("fhdr.tif", hdr, [0, 255, 128])]:
        Image.fromarray(values).save(cat / name)
        with Image.open(cat / name) as img:
            assert img.mode == ("F" if values.dtype == np.float32 else "I")
        assert rgb(cat / name)[0, :, 0].tolist() == want, name
    assert to_uint8(np.full((2, 2), 7.5, np.float32), "F").tolist() == [[0, 0], [0, 0]]  # constant -> 0

    nan = np.array([[0.0, np.nan]], np.float32)
    Image.fromarray(nan).save(cat / "nan.tif")
    with pytest.raises(BadImageError, match=r"nan\.tif.*NaN"):
        load_rgb(cat / "nan.tif")


def test_transparency_is_composited_over_white(cat):
    assert ALPHA_BACKGROUND == (255, 255, 255)
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(200, 10, 10, 255), (200, 10, 10, 0), (200, 10, 10, 128)])
    rgba.save(cat / "rgba.png")
    assert rgb(cat / "rgba.png")[0].tolist() == [[200, 10, 10], [255, 255, 255], [227, 132, 132]]  # 200 a + 255 (1 - a), a = 128/255

    la = Image.new("LA", (2, 1))
    la.putdata([(100, 255), (100, 0)])
    la.save(cat / "la.png")
    assert rgb(cat / "la.png")[0].tolist() == [[100, 100, 100], [255, 255, 255]]

    palette = Image.new("P", (2, 2))
    palette.putpalette([*RED, *GREEN] + [0] * 762)
    palette.putdata([0, 1, 1, 0])
    palette.save(cat / "palette.png")  # no transparency: plain palette lookup
    palette.save(cat / "palette_t.png", transparency=0)  # index 0 (red) transparent
    palette.save(cat / "palette_t.gif", transparency=0)
    assert rgb(cat / "palette.png").reshape(-1, 3).tolist() == [list(RED), list(GREEN), list(GREEN), list(RED)]
    for name in ("palette_t.png", "palette_t.gif"):
        assert rgb(cat / name).reshape(-1, 3).tolist() == [[255] * 3, list(GREEN), list(GREEN), [255] * 3], name


def test_grayscale_and_cmyk_values(cat, shared_data):
    src = load_rgb(cat / "0000.jpg")
    src.convert("L").save(cat / "gray.png")
    gray = rgb(cat / "gray.png")
    np.testing.assert_array_equal(gray, np.repeat(np.asarray(src.convert("L"))[..., None], 3, -1))
    src.convert("CMYK").save(cat / "cmyk.tif")  # lossless: C = 255 - R, ..., K = 0 converts back exactly
    np.testing.assert_array_equal(rgb(cat / "cmyk.tif"), np.asarray(src))
    src.convert("CMYK").save(cat / "cmyk.jpg", quality=95)  # JPEG: close to the source
    assert np.abs(rgb(cat / "cmyk.jpg") - np.asarray(src)).mean() < 6


def exif_jpeg(path: Path, orientation: int) -> None:
    """A 40 x 20 (w x h) JPEG, left half red, right half blue, with the EXIF orientation tag."""
    img = Image.new("RGB", (40, 20), BLUE)
    img.paste(Image.new("RGB", (20, 20), RED), (0, 0))
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, exif=exif, quality=95)


def test_exif_orientation_is_applied(cat):
    exif_jpeg(cat / "upright.jpg", 1)
    exif_jpeg(cat / "rot90.jpg", 6)  # 6: rotate 90 degrees clockwise to display
    exif_jpeg(cat / "rot180.jpg", 3)
    upright, rot90, rot180 = rgb(cat / "upright.jpg"), rgb(cat / "rot90.jpg"), rgb(cat / "rot180.jpg")
    assert upright.shape == (20, 40, 3) and rot180.shape == (20, 40, 3)
    assert rot90.shape == (40, 20, 3)  # width and height swapped
    close = lambda pixel, colour: np.abs(pixel - np.array(colour)).max() < 40  # noqa: E731  (JPEG)
    assert close(upright[10, 5], RED) and close(upright[10, 35], BLUE)
    assert close(rot90[5, 10], RED) and close(rot90[35, 10], BLUE)  # left half went to the top
    assert close(rot180[10, 5], BLUE) and close(rot180[10, 35], RED)


def test_animated_gif_first_frame_and_listed(cat):
    frames = [Image.new("RGB", (8, 8), c) for c in (RED, BLUE, GREEN)]
    frames[0].save(cat / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(cat / "anim.gif") as img:
        assert img.n_frames == 3
    assert (rgb(cat / "anim.gif") == RED).all()
    raw = build_dataset("imagefolder", "train", cat.parents[1])
    assert str(cat / "anim.gif") in [p for p, _ in raw.samples]  # .gif is an image extension here


def test_tiny_and_extreme_aspect_images_give_img_size(cat):
    for name, (w, h) in {"one.png": (1, 1), "wide.png": (1000, 3), "tall.png": (3, 1000)}.items():
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(cat / name)
        img = np.asarray(load_rgb(cat / name))
        assert img.shape == (h, w, 3)
        for tf in (train_transform(32, MEAN, STD), eval_transform(32, MEAN, STD, 0.875), eval_transform(24, MEAN, STD)):
            out = tf(image=img)["image"]
            assert out.dtype == torch.float32 and out.shape[0] == 3 and out.shape[1] == out.shape[2] in (24, 32)
    panorama = np.zeros((1, 20000, 3), np.uint8)  # resizing its short side to 256 alone would need ~4 GB
    start = time.perf_counter()
    assert eval_transform(224, MEAN, STD, 0.875)(image=panorama)["image"].shape == (3, 224, 224)
    assert time.perf_counter() - start < 2.0


def test_corrupt_bytes_are_named(cat):
    good = (cat / "0000.jpg").read_bytes()
    corrupt = good[:20] + bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8))
    (cat / "corrupt.jpg").write_bytes(corrupt)
    with pytest.raises(BadImageError, match="corrupt.jpg.*skip_bad_images"):
        load_rgb(cat / "corrupt.jpg")
    with pytest.raises(BadImageError, match="shard item 7.*convert again"):
        decode_rgb(corrupt, name="shard item 7", fix="Fix: convert again.")
    np.testing.assert_array_equal(np.asarray(decode_rgb(good)), rgb(cat / "0000.jpg"))


def test_skip_bad_images_counts_them_and_iterates_the_rest(cat, caplog):
    """Every crafted kind in one tree: the good ones load to img_size, the bad ones are dropped and counted."""
    good = (cat / "0000.jpg").read_bytes()
    ramp = np.linspace(0, 65535, 64).astype(np.uint16)[None].repeat(8, 0)
    Image.fromarray(ramp).save(cat / "ramp16.png")
    Image.fromarray(np.linspace(-1, 1, 64, dtype=np.float32)[None].repeat(8, 0)).save(cat / "float.tif")
    exif_jpeg(cat / "rot90.jpg", 6)
    Image.new("RGB", (1000, 3), RED).save(cat / "wide.png")
    Image.new("LA", (5, 5), (10, 0)).save(cat / "la.png")
    Image.new("RGB", (6, 6), RED).save(cat / "anim.gif", save_all=True, append_images=[Image.new("RGB", (6, 6), BLUE)])
    bad = {
        "corrupt.jpg": good[:20] + b"\x00" * 500,
        "zero.png": b"",
        "text.tif": b"not a TIFF\n",
        "truncated.png": (cat / "ramp16.png").read_bytes()[:60],
    }
    for name, data in bad.items():
        (cat / name).write_bytes(data)
    Image.fromarray(np.array([[np.inf, 0.0]], np.float32)).save(cat / "inf.tif")
    bad_paths = sorted(str(cat / n) for n in [*bad, "inf.tif"])

    dm = ImageDataModule(root=str(cat.parents[1]), num_workers=0, batch_size=4, skip_bad_images=True)
    with caplog.at_level(logging.WARNING, logger="mim.data.datasets"):
        dm.setup("fit")
    assert sorted(dm.skipped_images) == bad_paths and "Skipped 5 unreadable image(s)" in caplog.text
    n_good = 3 + 6 + 3  # real cats, crafted good cats, real dogs
    assert len(dm.train_set) == n_good
    batches = list(dm.train_dataloader())
    assert sum(len(x) for x, _ in batches) == n_good // 4 * 4  # drop_last
    assert all(x.shape[1:] == (3, 32, 32) and torch.isfinite(x).all() for x, _ in batches)

    dm = ImageDataModule(root=str(cat.parents[1]), num_workers=0, batch_size=4)  # without: reading one stops
    dm.setup("fit")
    with pytest.raises(BadImageError, match="Cannot read image"):
        for i in range(len(dm.train_set)):
            dm.train_set[i]
