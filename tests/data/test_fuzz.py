"""Fuzzing the image loader and the folder scanner with hypothesis.

Random bytes (bare, or behind a real format's magic number) and mutated real images (bit flips,
overwritten runs, truncation) from the bundled examples and from JPEG, GIF, BMP and WebP files made
here. The only outcomes allowed are a decoded image (C-contiguous uint8 RGB of the expected
shape) or finetune's own `ImageDecodeError` naming the file; the scanner may also refuse a folder
with a `DataError`, and every file it lists must end up decoded or in the bad-file list. Examples
are derandomized (fixed seed) so CI sees the same cases every run; the whole file takes ~10 s
(`--hypothesis-show-statistics` shows how many cases decoded and why the others were refused).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from finetune.data.decode import decode_images, load_image
from finetune.data.scan import scan_image_folder
from finetune.errors import DataError, ImageDecodeError
from tests.helpers import DIGITS, FASHION

FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SIZE = 12


def _encoded(fmt: str, **options) -> bytes:
    y, x = np.mgrid[0:40, 0:56]
    pixels = np.stack([x * 4, y * 6, (x * y) % 256], axis=-1).astype(np.uint8)
    image = Image.fromarray(pixels)
    if fmt == "GIF":
        image = image.convert("P")
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _seeds() -> list[bytes]:
    bundled = [
        sorted((FASHION / "bag").glob("*.png"))[0],
        sorted((FASHION / "sneaker").glob("*.png"))[0],
        sorted((DIGITS / "3").glob("*.png"))[0],
    ]
    made = [
        _encoded("JPEG", quality=85),
        _encoded("JPEG", quality=70, progressive=True),
        _encoded("GIF"),
        _encoded("BMP"),
        _encoded("WEBP", quality=80),
        _encoded("PNG"),
    ]
    return [p.read_bytes() for p in bundled] + made


SEEDS = _seeds()
MAGIC = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM", b"RIFF\x00\x00\x00\x00WEBP"]


@st.composite
def mutated_images(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 4))):  # bit flips, half of them in the headers
        end = draw(st.sampled_from([64, len(data)]))
        position = draw(st.integers(8, min(end, len(data)) - 1))  # past the magic number
        data[position] ^= 1 << draw(st.integers(0, 7))
    if draw(st.booleans()):  # overwrite a run of bytes
        start = draw(st.integers(0, len(data) - 1))
        chunk = draw(st.binary(min_size=1, max_size=16))
        data[start : start + len(chunk)] = chunk
    if draw(st.booleans()):  # truncate
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


random_files = st.one_of(
    st.binary(max_size=512),
    st.builds(lambda magic, tail: magic + tail, st.sampled_from(MAGIC), st.binary(max_size=512)),
)


def _check_decoding(path: Path) -> None:
    """Decoded right, or refused with finetune's own error naming the file: nothing else."""
    for size in (SIZE, None):
        try:
            array = load_image(path, size)
        except ImageDecodeError as error:
            assert error.path == path and error.reason
            event(f"refused: {error.reason.split(' (')[0]}")  # --hypothesis-show-statistics
            continue
        event("decoded")
        assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3
        assert array.flags["C_CONTIGUOUS"]
        if size is not None:
            assert array.shape == (SIZE, SIZE, 3)


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory() as folder:
        yield Path(folder)


def test_seeds_decode(scratch):
    for i, data in enumerate(SEEDS):
        path = scratch / f"seed{i}.img"
        path.write_bytes(data)
        assert load_image(path, SIZE).shape == (SIZE, SIZE, 3)


@FUZZ
@given(data=st.one_of(mutated_images(), mutated_images(), random_files))
def test_decoder_on_random_and_mutated_files(scratch, data):
    path = scratch / "fuzzed.jpg"
    path.write_bytes(data)
    _check_decoding(path)


# Names as raw bytes: any byte but '/' and NUL, so also names that are not UTF-8.
names = (
    st.lists(st.integers(1, 255).filter(lambda b: b != ord("/")), min_size=1, max_size=10)
    .map(bytes)
    .filter(lambda n: n not in (b".", b".."))
)
extensions = st.sampled_from([b".png", b".jpg", b".gif", b".txt", b""])
contents = st.one_of(mutated_images(), st.sampled_from(SEEDS), st.binary(max_size=64))
tree_files = st.lists(
    st.tuples(st.sampled_from([b"cat", b"dog", b"d\xe9g", b"a b"]), names, extensions, contents),
    min_size=1,
    max_size=8,
)


@settings(FUZZ, max_examples=100)
@given(files=tree_files)
def test_scanner_and_decoder_on_random_folders(files):
    with tempfile.TemporaryDirectory() as folder:
        root = os.fsencode(folder)
        for class_name, name, extension, data in files:
            os.makedirs(os.path.join(root, class_name), exist_ok=True)
            with open(os.path.join(root, class_name, name + extension), "wb") as f:
                f.write(data)
        try:
            found = scan_image_folder(folder)
        except DataError as error:
            str(error).encode("utf-8")  # the message can be printed
            return
        paths = [s.path for samples in found.samples.values() for s in samples]
        images, ok, bad = decode_images(paths, SIZE, workers=2, progress=False)
        assert len(ok) + len(bad) == len(paths) and images.shape == (len(ok), SIZE, SIZE, 3)
        record = {
            "bad_files": [{"path": str(b.path), "reason": b.reason} for b in bad],
            "ignored": [{"path": str(i.path), "reason": i.reason} for i in found.ignored],
            "classes": found.class_names,
            "samples": [str(p) for p in paths],
        }
        json.dumps(record, ensure_ascii=False).encode("utf-8")  # how finetune writes JSON
