"""Tests for the hardened image loader: odd modes, EXIF, bad files, bombs, batch decoding."""

from __future__ import annotations

import io
import json
import os
import resource
import struct
import tempfile
import time
import tracemalloc
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image, features

from finetune.data.decode import (
    IMAGE_EXTENSIONS,
    MAX_IMAGE_PIXELS,
    BadFile,
    decode_images,
    is_image_file,
    load_image,
)
from finetune.errors import ConfigError, ImageDecodeError
from tests.helpers import DIGITS

# Display transform per EXIF orientation, as the EXIF 2.3 specification defines it.
EXIF_TRANSPOSE = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def noise_jpeg(path: Path, size: tuple[int, int] = (128, 96), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return path


def solid_png(path: Path, colour: tuple[int, int, int], size: int = 16) -> Path:
    Image.new("RGB", (size, size), colour).save(path)
    return path


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A tiny PNG that declares a huge size: a decompression bomb as far as the header goes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )
    return path


def marker_image(width: int = 64, height: int = 32) -> Image.Image:
    """Black image with a white top-left quadrant: each of the 8 orientations looks different."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[: height // 2, : width // 2] = 255
    return Image.fromarray(pixels)


def save_with_orientation(img: Image.Image, path: Path, orientation: int) -> Path:
    exif = img.getexif()
    exif[ExifTags.Base.Orientation] = orientation
    img.save(path, exif=exif, quality=95)
    return path


# --- load_image: formats and modes -------------------------------------------------------------


def test_extensions_are_the_documented_ones():
    assert {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"} == IMAGE_EXTENSIONS
    assert is_image_file("a/B.JPG") and is_image_file("x.WebP")
    assert not is_image_file("notes.txt") and not is_image_file("jpg")


def test_rgb_jpeg_full_size(tmp_path):
    path = noise_jpeg(tmp_path / "a.jpg", (40, 30))
    arr = load_image(path)
    assert arr.shape == (30, 40, 3) and arr.dtype == np.uint8
    assert arr.flags["C_CONTIGUOUS"]


def test_resize_is_exact_square_without_crop(tmp_path):
    # Left half red, right half blue, 4:1 aspect: a plain resize keeps both halves.
    pixels = np.zeros((20, 80, 3), dtype=np.uint8)
    pixels[:, :40, 0] = 255
    pixels[:, 40:, 2] = 255
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    arr = load_image(tmp_path / "wide.png", size=10, interpolation="nearest")
    assert arr.shape == (10, 10, 3)
    assert (arr[:, :5, 0] == 255).all() and (arr[:, 5:, 2] == 255).all()


@pytest.mark.parametrize("name", ["nearest", "bilinear", "bicubic", "lanczos", "area", "BOX"])
def test_interpolation_names(tmp_path, name):
    path = noise_jpeg(tmp_path / "a.jpg")
    assert load_image(path, 24, name).shape == (24, 24, 3)


def test_bad_options_are_config_errors(tmp_path):
    path = noise_jpeg(tmp_path / "a.jpg")
    with pytest.raises(ConfigError, match="interpolation"):
        load_image(path, 24, "cubic-spline")
    for size in (0, -3, 2.5, True):
        with pytest.raises(ConfigError, match="size"):
            load_image(path, size)


def test_png_content_under_jpg_name_is_decoded(tmp_path):
    path = tmp_path / "really_png.jpg"
    Image.new("RGB", (4, 4), (0, 255, 0)).save(path, format="PNG")
    assert (load_image(path) == (0, 255, 0)).all()


def test_grayscale_becomes_three_equal_channels(tmp_path):
    Image.new("L", (8, 8), 77).save(tmp_path / "g.jpg", quality=100)
    arr = load_image(tmp_path / "g.jpg")
    assert arr.shape == (8, 8, 3)
    assert np.abs(arr.astype(int) - 77).max() <= 1


def test_cmyk_jpeg_keeps_colours(tmp_path):
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(tmp_path / "red.jpg", quality=95)
    with Image.open(tmp_path / "red.jpg") as img:
        assert img.mode == "CMYK"
    arr = load_image(tmp_path / "red.jpg").astype(int)
    r, g, b = arr[..., 0].mean(), arr[..., 1].mean(), arr[..., 2].mean()
    assert r > 230 and g < 25 and b < 25


def test_rgba_png_is_composited_on_white(tmp_path):
    pixels = np.zeros((4, 3, 4), dtype=np.uint8)
    pixels[0] = (255, 0, 0, 255)  # opaque red stays red
    pixels[1] = (0, 255, 0, 0)  # invisible green must not show: white
    pixels[2] = (0, 0, 0, 128)  # half-transparent black over white: mid grey
    pixels[3] = (0, 0, 255, 255)
    Image.fromarray(pixels, "RGBA").save(tmp_path / "rgba.png")
    arr = load_image(tmp_path / "rgba.png").astype(int)
    assert (arr[0] == (255, 0, 0)).all()
    assert (arr[1] == (255, 255, 255)).all()
    assert (np.abs(arr[2] - 127) <= 1).all()
    assert (arr[3] == (0, 0, 255)).all()


def test_palette_png_with_transparency(tmp_path):
    img = Image.new("P", (4, 2), 0)
    img.putpalette([0, 255, 0, 0, 0, 255] + [0, 0, 0] * 254)  # 0 = green (transparent), 1 = blue
    img.paste(1, (2, 0, 4, 2))
    img.save(tmp_path / "p.png", transparency=0)
    with Image.open(tmp_path / "p.png") as check:
        assert check.mode == "P" and "transparency" in check.info
    arr = load_image(tmp_path / "p.png")
    assert (arr[:, :2] == 255).all()
    assert (arr[:, 2:] == (0, 0, 255)).all()


def test_palette_png_without_transparency(tmp_path):
    img = Image.new("P", (2, 2), 1)
    img.putpalette([0, 0, 0, 200, 100, 50] + [0, 0, 0] * 254)
    img.save(tmp_path / "p.png")
    assert (load_image(tmp_path / "p.png") == (200, 100, 50)).all()


def test_grey_with_alpha_png(tmp_path):
    Image.new("LA", (3, 3), (0, 0)).save(tmp_path / "la.png")
    assert (load_image(tmp_path / "la.png") == 255).all()


def test_16bit_grey_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as img:
        assert img.mode.startswith("I")  # really 16-bit on disk
    arr = load_image(tmp_path / "g16.png")
    assert arr.shape == (1, 4, 3)
    assert arr[0, :, 0].tolist() == [0, 1, 128, 255]
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()


def test_bmp(tmp_path):
    Image.new("RGB", (5, 7), (10, 20, 30)).save(tmp_path / "a.bmp")
    assert (load_image(tmp_path / "a.bmp") == (10, 20, 30)).all()


@pytest.mark.skipif(not features.check("webp"), reason="Pillow built without WebP")
def test_webp_lossless_with_alpha(tmp_path):
    Image.new("RGBA", (6, 6), (255, 0, 0, 255)).save(tmp_path / "a.webp", lossless=True)
    assert (load_image(tmp_path / "a.webp") == (255, 0, 0)).all()


def test_animated_gif_uses_first_frame(tmp_path):
    frames = [Image.new("RGB", (10, 10), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    with Image.open(tmp_path / "anim.gif") as img:
        assert img.n_frames == 3
    assert (load_image(tmp_path / "anim.gif") == (255, 0, 0)).all()


# --- EXIF orientation --------------------------------------------------------------------------


def test_exif_orientation_6_rotates_clockwise(tmp_path):
    # Left half white, 64 wide x 32 high. Orientation 6 means "rotate 90 degrees clockwise to
    # display": the left edge becomes the top edge.
    pixels = np.zeros((32, 64, 3), dtype=np.uint8)
    pixels[:, :32] = 255
    path = save_with_orientation(Image.fromarray(pixels), tmp_path / "o6.jpg", 6)
    arr = load_image(path)
    assert arr.shape == (64, 32, 3)
    assert arr[:32].mean() > 200 and arr[32:].mean() < 50


def test_exif_orientation_8_rotates_counter_clockwise(tmp_path):
    pixels = np.zeros((32, 64, 3), dtype=np.uint8)
    pixels[:, :32] = 255
    path = save_with_orientation(Image.fromarray(pixels), tmp_path / "o8.jpg", 8)
    arr = load_image(path)
    assert arr.shape == (64, 32, 3)
    assert arr[32:].mean() > 200 and arr[:32].mean() < 50


@pytest.mark.parametrize("orientation", range(1, 9))
def test_all_exif_orientations(tmp_path, orientation):
    img = marker_image()
    path = save_with_orientation(img, tmp_path / f"o{orientation}.jpg", orientation)
    method = EXIF_TRANSPOSE[orientation]
    expected = np.asarray(img if method is None else img.transpose(method))
    arr = load_image(path)
    assert arr.shape == expected.shape
    # JPEG blurs the edges a little; the quadrants themselves must match.
    assert ((arr > 127) == (expected > 127)).mean() > 0.98


def test_exif_orientation_with_resize_and_draft(tmp_path):
    big = marker_image(1024, 512)
    path = save_with_orientation(big, tmp_path / "big.jpg", 6)
    arr = load_image(path, size=32)
    expected = np.asarray(big.transpose(Image.Transpose.ROTATE_270).resize((32, 32)))
    assert ((arr > 127) == (expected > 127)).mean() > 0.95


def test_jpeg_draft_matches_full_decode(tmp_path):
    # A smooth gradient: decoding at 1/8 scale must look like decoding in full and resizing.
    y, x = np.mgrid[0:1024, 0:1024]
    pixels = np.stack([x // 4, y // 4, (x + y) // 8], axis=-1).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "grad.jpg", quality=95)
    fast = load_image(tmp_path / "grad.jpg", size=64).astype(float)
    with Image.open(tmp_path / "grad.jpg") as img:
        full = np.asarray(img.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR))
    assert np.abs(fast - full).mean() < 3


# --- bad files ---------------------------------------------------------------------------------


def reason_for(path: Path) -> str:
    with pytest.raises(ImageDecodeError) as info:
        load_image(path, 16)
    assert info.value.path == path
    return info.value.reason


def test_truncated_jpeg(tmp_path):
    good = noise_jpeg(tmp_path / "good.jpg", (256, 256)).read_bytes()
    (tmp_path / "cut.jpg").write_bytes(good[: len(good) // 2])
    assert "truncated or corrupt" in reason_for(tmp_path / "cut.jpg")


def test_truncated_png(tmp_path):
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    assert "truncated or corrupt" in reason_for(tmp_path / "cut.png")


def test_text_file_named_jpg(tmp_path):
    (tmp_path / "notes.jpg").write_text("this is not a picture\n")
    assert "not an image" in reason_for(tmp_path / "notes.jpg")


def test_unsupported_format_is_refused(tmp_path):
    # TIFF is a real image format, but not one the loader promises (smaller attack surface).
    Image.new("RGB", (4, 4)).save(tmp_path / "a.tiff")
    (tmp_path / "a.tiff").rename(tmp_path / "a.png")
    assert "not an image" in reason_for(tmp_path / "a.png")


def test_empty_file(tmp_path):
    (tmp_path / "zero.png").write_bytes(b"")
    assert reason_for(tmp_path / "zero.png") == "empty file"


def test_folder_instead_of_file(tmp_path):
    (tmp_path / "dir.jpg").mkdir()
    assert "not a regular file" in reason_for(tmp_path / "dir.jpg")


def test_missing_file(tmp_path):
    assert "not found" in reason_for(tmp_path / "nope.jpg")


def test_decompression_bomb_refused_quickly(tmp_path):
    path = png_header_only(tmp_path / "bomb.png", 100_000, 100_000)
    assert path.stat().st_size < 100
    start = time.perf_counter()
    reason = reason_for(path)
    # Generous (another test process may share the cores): decoding 10^10 pixels would take
    # minutes and 30 GB.
    assert time.perf_counter() - start < 5.0
    assert "decompression bomb" in reason and "10000000000 pixels" in reason


def test_image_just_over_the_limit_is_refused_without_warning(tmp_path):
    # Above Pillow's warning threshold but below its error threshold: must still be refused,
    # and the DecompressionBombWarning must not leak out.
    path = png_header_only(tmp_path / "big.png", 10_000, MAX_IMAGE_PIXELS // 10_000 + 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert "decompression bomb" in reason_for(path)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_own_limit_holds_when_pillow_limit_is_disabled(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    path = png_header_only(tmp_path / "bomb.png", 100_000, 100_000)
    assert "decompression bomb" in reason_for(path)


# --- decode_images -----------------------------------------------------------------------------


def test_decode_images_skips_bad_files_and_keeps_order(tmp_path):
    good = [
        solid_png(tmp_path / "red.png", (255, 0, 0)),
        noise_jpeg(tmp_path / "noise.jpg"),
        solid_png(tmp_path / "blue.png", (0, 0, 255)),
    ]
    jpeg = noise_jpeg(tmp_path / "big.jpg", (256, 256)).read_bytes()
    (tmp_path / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (tmp_path / "text.jpg").write_text("hello")
    (tmp_path / "zero.png").write_bytes(b"")
    png_header_only(tmp_path / "bomb.png", 100_000, 100_000)
    paths = [
        tmp_path / "cut.jpg",
        good[0],
        tmp_path / "text.jpg",
        good[1],
        tmp_path / "zero.png",
        tmp_path / "bomb.png",
        good[2],
        str(tmp_path / "missing.png"),  # plain strings are accepted too
    ]
    images, ok, bad = decode_images(paths, 16, workers=3, progress=False)
    assert ok == [1, 3, 6]
    assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8
    for row, index in enumerate(ok):
        np.testing.assert_array_equal(images[row], load_image(paths[index], 16))
    assert [b.path for b in bad] == [Path(paths[i]) for i in (0, 2, 4, 5, 7)]
    assert all(isinstance(b, BadFile) for b in bad)
    reasons = [b.reason for b in bad]
    assert "truncated or corrupt" in reasons[0]
    assert "not an image" in reasons[1]
    assert reasons[2] == "empty file"
    assert "decompression bomb" in reasons[3]
    assert "not found" in reasons[4]


def test_decode_images_same_result_for_any_worker_count(tmp_path, capsys):
    paths = [noise_jpeg(tmp_path / f"{i}.jpg", (50, 40), seed=i) for i in range(12)]
    one, ok_one, _ = decode_images(paths, 20, workers=1, progress=False)
    many, ok_many, _ = decode_images(paths, 20, workers=4, progress=True)
    assert ok_one == ok_many == list(range(12))
    np.testing.assert_array_equal(one, many)
    assert "Decoding images" in capsys.readouterr().err


def test_decode_images_empty_and_all_bad(tmp_path):
    images, ok, bad = decode_images([], 8, progress=False)
    assert images.shape == (0, 8, 8, 3) and ok == [] and bad == []
    (tmp_path / "a.png").write_bytes(b"")
    images, ok, bad = decode_images([tmp_path / "a.png"], 8, progress=False)
    assert images.shape == (0, 8, 8, 3) and ok == [] and len(bad) == 1


def test_decode_images_rejects_bad_options(tmp_path):
    with pytest.raises(ConfigError):
        decode_images([], 0, progress=False)
    with pytest.raises(ConfigError):
        decode_images([], 8, interpolation="nope", progress=False)
    with pytest.raises(ConfigError):
        decode_images([], 8, workers=0, progress=False)


# --- hostile and unusual files (issue 5: every file is decoded right or reported by name) -------


def raw_png(path: Path, pixels: np.ndarray, colour_type: int) -> Path:
    """Writes a 16-bit PNG by hand (Pillow cannot write 16-bit colour): 0 grey, 2 RGB, 6 RGBA."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    height, width = pixels.shape[:2]
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )
    return path


def test_16bit_rgb_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[[0, 257, 65535], [32768, 1000, 65280], [12850, 25700, 51400]]], np.uint16)
    path = raw_png(tmp_path / "rgb16.png", values, colour_type=2)
    arr = load_image(path).astype(int)
    expected = np.rint(values / 257).astype(int)
    # Pillow keeps the high byte (v >> 8): within 1 of exact rounding, and never clipped to 255.
    assert np.abs(arr - expected).max() <= 1
    assert arr[0, 0].tolist() == [0, 1, 255] and arr[0, 1, 0] == 128


def test_16bit_rgba_png_is_composited_on_white(tmp_path):
    values = np.array([[[65535, 0, 0, 65535], [0, 65535, 0, 0], [0, 0, 0, 32768]]], np.uint16)
    arr = load_image(raw_png(tmp_path / "rgba16.png", values, colour_type=6)).astype(int)
    assert arr[0, 0].tolist() == [255, 0, 0]
    assert arr[0, 1].tolist() == [255, 255, 255]
    assert (np.abs(arr[0, 2] - 127) <= 1).all()


def test_palette_png_with_partial_transparency(tmp_path):
    img = Image.new("P", (3, 1))
    img.putpalette([255, 0, 0, 0, 0, 0, 0, 0, 255] + [0, 0, 0] * 253)
    img.putdata([0, 1, 2])
    img.save(tmp_path / "p.png", transparency=bytes([0, 128, 255]))
    arr = load_image(tmp_path / "p.png").astype(int)
    assert arr[0, 0].tolist() == [255, 255, 255]  # fully transparent red: white
    assert (np.abs(arr[0, 1] - 127) <= 1).all()  # half-transparent black over white: grey
    assert arr[0, 2].tolist() == [0, 0, 255]


def test_cmyk_jpeg_colours_are_roughly_right(tmp_path):
    inks = {
        (255, 0, 0, 0): (0, 255, 255),  # cyan
        (0, 255, 0, 0): (255, 0, 255),  # magenta
        (0, 0, 255, 0): (255, 255, 0),  # yellow
        (0, 0, 0, 255): (0, 0, 0),  # black
        (0, 0, 0, 0): (255, 255, 255),  # paper
    }
    img = Image.new("CMYK", (32 * len(inks), 32))
    for i, ink in enumerate(inks):
        img.paste(ink, (32 * i, 0, 32 * (i + 1), 32))
    img.save(tmp_path / "cmyk.jpg", quality=95)
    arr = load_image(tmp_path / "cmyk.jpg").astype(int)
    for i, rgb in enumerate(inks.values()):
        patch = arr[8:24, 32 * i + 8 : 32 * i + 24].reshape(-1, 3).mean(axis=0)
        assert np.abs(patch - rgb).max() < 30, (rgb, patch)


# The transform that stores an upright image so that EXIF orientation N displays it upright:
# the inverse of the display transform.
STORE_TRANSPOSE = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def upright_image() -> Image.Image:
    """Asymmetric under every flip and rotation: smooth ramps plus one off-centre block."""
    y, x = np.mgrid[0:48, 0:80]
    pixels = np.stack([x * 3, y * 5, (x + 2 * y) % 256], axis=-1).astype(np.uint8)
    pixels[6:18, 10:30] = (255, 255, 0)
    return Image.fromarray(pixels)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_exif_orientation_gives_the_upright_pixels(tmp_path, orientation, fmt):
    upright = upright_image()
    method = STORE_TRANSPOSE[orientation]
    stored = upright if method is None else upright.transpose(method)
    exif = stored.getexif()
    exif[ExifTags.Base.Orientation] = orientation
    path = tmp_path / f"o{orientation}.{fmt}"
    stored.save(path, format=fmt.upper(), exif=exif, **({"quality": 95} if fmt == "jpeg" else {}))
    arr = load_image(path).astype(int)
    expected = np.asarray(upright).astype(int)
    assert arr.shape == expected.shape
    if fmt == "png":
        np.testing.assert_array_equal(arr, expected)
    else:
        assert np.abs(arr - expected).mean() < 4


def test_animated_png_uses_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((0, 200, 0), (200, 0, 0))]
    frames[0].save(tmp_path / "anim.png", save_all=True, append_images=frames[1:])
    with Image.open(tmp_path / "anim.png") as img:
        assert getattr(img, "n_frames", 1) == 2
    assert (load_image(tmp_path / "anim.png") == (0, 200, 0)).all()


@pytest.mark.parametrize("cut", [0.02, 0.1, 0.5, 0.9, -2, -1])
@pytest.mark.parametrize("progressive", [False, True])
def test_truncated_jpeg_anywhere_is_reported(tmp_path, cut, progressive):
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "full.jpg", quality=90, progressive=progressive)
    data = (tmp_path / "full.jpg").read_bytes()
    end = int(len(data) * cut) if cut > 0 else len(data) + cut
    (tmp_path / "cut.jpg").write_bytes(data[:end])
    reason = reason_for(tmp_path / "cut.jpg")
    assert "truncated or corrupt" in reason or "not an image" in reason


@pytest.mark.parametrize("name", ["text.png", "text.jpg", "text.gif", "text.webp", "text.bmp"])
def test_text_under_every_image_extension(tmp_path, name):
    (tmp_path / name).write_text("<html>not a picture</html>\n")
    assert "not an image" in reason_for(tmp_path / name)


def bomb_header(fmt: str, width: int, height: int) -> bytes:
    """A small valid file of `fmt` whose header is patched to declare width x height."""
    if fmt == "png":
        with tempfile.TemporaryDirectory() as folder:
            return png_header_only(Path(folder) / "h.png", width, height).read_bytes()
    buffer = io.BytesIO()
    img = Image.new("P" if fmt == "gif" else "RGB", (16, 16), 1)
    img.save(buffer, format=fmt.upper())
    data = bytearray(buffer.getvalue())
    if fmt == "jpeg":
        struct.pack_into(">HH", data, data.find(b"\xff\xc0") + 5, height, width)
    elif fmt == "gif":
        struct.pack_into("<HH", data, 6, width, height)
    else:
        struct.pack_into("<ii", data, 18, width, height)
    return bytes(data)


@pytest.mark.parametrize("fmt", ["png", "jpeg", "gif", "bmp"])
def test_bomb_is_refused_before_any_pixel_memory(tmp_path, monkeypatch, fmt):
    path = tmp_path / f"bomb.{fmt}"
    path.write_bytes(bomb_header(fmt, 50_000, 50_000))
    assert path.stat().st_size < 1000
    # Every image buffer Pillow creates goes through core.new or core.fill: record their sizes.
    sizes: list[tuple[int, int]] = []
    for name in ("new", "fill"):
        real = getattr(Image.core, name)

        def spy(mode, size, *args, _real=real):
            sizes.append(tuple(size))
            return _real(mode, size, *args)

        monkeypatch.setattr(Image.core, name, spy)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    tracemalloc.start()
    try:
        reason = reason_for(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    rss_growth_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert "decompression bomb" in reason and "2500000000 pixels" in reason
    assert all(w * h <= MAX_IMAGE_PIXELS for w, h in sizes), sizes
    assert peak < 8 * 2**20, f"{peak / 2**20:.1f} MiB traced"
    assert rss_growth_mib < 64, f"peak RSS grew by {rss_growth_mib:.0f} MiB"  # 7.5 GB if decoded


# --- file names ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", [b"with space.png", b"caf\xe9.png", b"\xff\xfe odd\x80.png", "na\u00efve.png".encode()]
)
def test_odd_file_names_decode(tmp_path, name):
    path = Path(os.fsdecode(os.path.join(os.fsencode(tmp_path), name)))
    Image.new("RGB", (6, 4), (9, 99, 199)).save(path, format="PNG")
    assert (load_image(path) == (9, 99, 199)).all()
    images, ok, bad = decode_images([path], 4, progress=False)
    assert ok == [0] and bad == [] and (images[0] == (9, 99, 199)).all()


def test_bad_files_with_non_utf8_names_can_be_reported(tmp_path):
    broken = Path(os.fsdecode(os.path.join(os.fsencode(tmp_path), b"caf\xe9 cut.jpg")))
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    _, ok, bad = decode_images([broken], 4, progress=False)
    assert ok == [] and len(bad) == 1
    (entry,) = bad
    assert entry.path.name == "caf\\xe9 cut.jpg"  # shown as `ls -b` would, never a lone surrogate
    text = json.dumps([{"path": str(entry.path), "reason": entry.reason}], ensure_ascii=False)
    text.encode("utf-8")  # what every JSON file finetune writes goes through
    with pytest.raises(ImageDecodeError) as caught:
        load_image(broken)
    assert caught.value.path == broken  # the real path, for a caller that acts on the file


def test_decode_within_maps_images_above_the_limit_from_a_temporary_file(tmp_path):
    from finetune.data.decode import decode_within

    paths = [DIGITS / "0" / name for name in sorted(os.listdir(DIGITS / "0"))[:6]]
    paths.insert(2, tmp_path / "missing.png")
    in_memory = decode_within(paths, 20, progress=False)
    mapped = decode_within(paths, 20, progress=False, max_memory_gb=1e-6, spill_dir=tmp_path)
    assert not isinstance(in_memory[0], np.memmap) and isinstance(mapped[0], np.memmap)
    np.testing.assert_array_equal(mapped[0], in_memory[0])
    assert mapped[1] == in_memory[1] == [0, 1, 3, 4, 5, 6]
    assert [b.path for b in mapped[2]] == [tmp_path / "missing.png"]
    assert list(tmp_path.iterdir()) == []  # nothing left in the folder
