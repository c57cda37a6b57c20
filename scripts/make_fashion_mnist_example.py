"""Export a small, balanced Fashion-MNIST image folder for examples and tests.

Reads the official Fashion-MNIST training set (Zalando Research, MIT licence) from the IDX files
Debian's `dataset-fashion-mnist` package installs, picks a fixed number of images per class with a
seeded random choice, and writes them as 8-bit grayscale 28x28 PNGs to
`examples/data/fashion_mnist/<class_name>/<id>.png`, where `<id>` is the image's index in the
official training set. A README recording the source, licence and command is written beside them.
The output is byte-for-byte reproducible: same files, seed and count give the same PNGs.

Usage:
    apt-get install dataset-fashion-mnist      # once, if the IDX files are not there
    python scripts/make_fashion_mnist_example.py [--per-class 250] [--seed 0] [--force]
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "examples" / "data" / "fashion_mnist"

#: Class names in label order (0..9), file-system friendly versions of the official labels.
CLASS_NAMES = [
    "t-shirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
]

IMAGES_FILE = "train-images-idx3-ubyte.gz"
LABELS_FILE = "train-labels-idx1-ubyte.gz"

# Where the Debian package puts the files (`dpkg -L dataset-fashion-mnist`), plus a fallback.
SEARCH_DIRS = [Path("/usr/share/datasets/fashion-mnist"), Path("/usr/share/fashion-mnist")]

# IDX type codes (third byte of the magic number) and their big-endian NumPy types.
IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

LICENCE = """\
The MIT License (MIT) Copyright © 2017 Zalando SE, https://tech.zalando.com

Permission is hereby granted, free of charge, to any person obtaining a copy of this software and
associated documentation files (the “Software”), to deal in the Software without restriction,
including without limitation the rights to use, copy, modify, merge, publish, distribute,
sublicense, and/or sell copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or
substantial portions of the Software.

THE SOFTWARE IS PROVIDED “AS IS”, WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT
NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND
NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM,
DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT
OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""


def find_source(explicit: Path | None) -> Path:
    """Finds the folder holding the Fashion-MNIST training IDX files, or exits with advice.

    Args:
        explicit: a folder given with --source, searched alone if given.

    Returns:
        The folder holding both training files.
    """
    env = os.environ.get("FASHION_MNIST_DIR")
    candidates = [explicit] if explicit else [*([Path(env)] if env else []), *SEARCH_DIRS]
    for folder in candidates:
        if (folder / IMAGES_FILE).is_file() and (folder / LABELS_FILE).is_file():
            return folder
    searched = ", ".join(str(c) for c in candidates)
    sys.exit(
        f"error: Fashion-MNIST files {IMAGES_FILE} and {LABELS_FILE} not found in: {searched}.\n"
        "Install them with:  apt-get install dataset-fashion-mnist\n"
        "or download them from https://github.com/zalandoresearch/fashion-mnist and pass "
        "--source FOLDER."
    )


def read_idx(path: Path) -> np.ndarray:
    """Reads a gzip-compressed IDX file (the MNIST format) into an array.

    The header is two zero bytes, a type code, the number of dimensions, then one big-endian
    uint32 per dimension; the data follows in C order.

    Args:
        path: the .gz file.

    Returns:
        The array, in native byte order.

    Raises:
        ValueError: the file is not a well-formed IDX file.
    """
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0:2] != b"\x00\x00" or data[2] not in IDX_TYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(IDX_TYPES[data[2]])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(f"{path}: header says {dims} but holds {len(data) - header} data bytes")
    return (
        np.frombuffer(data, dtype=dtype, offset=header)
        .reshape(dims)
        .astype(dtype.newbyteorder("="))
    )


def readme(per_class: int, seed: int, command: str) -> str:
    """The README written beside the exported images."""
    total = per_class * len(CLASS_NAMES)
    classes = "\n".join(f"| {i} | `{name}` |" for i, name in enumerate(CLASS_NAMES))
    return f"""\
# Fashion-MNIST example image folder

A small, balanced subset of [Fashion-MNIST](https://github.com/zalandoresearch/fashion-mnist)
by Zalando Research, laid out as an image folder (one sub-folder per class) so that
`finetune train examples/data/fashion_mnist` works out of the box.

- {len(CLASS_NAMES)} classes x {per_class} images = {total} images, 28x28 pixels, 8-bit
  grayscale PNG (finetune's loader turns them into RGB).
- Taken from the official **training** set (`{IMAGES_FILE}`,
  `{LABELS_FILE}`): for each class in label order,
  `rng.choice(indices_of_the_class, {per_class}, replace=False)` with
  `rng = numpy.random.default_rng({seed})`, i.e. a seeded random choice, not the first {per_class}.
- File name = the image's index in the official training set, zero-padded (`00042.png` is
  training image 42), so every image can be traced back to the source.
- Source files: Debian package `dataset-fashion-mnist` (`/usr/share/datasets/fashion-mnist/`).

| official label | folder |
| --- | --- |
{classes}

finetune numbers classes by sorted folder name, so its class indices differ from the official
labels above; the folder names are what matter.

## How it was made

```
{command}
```

Run from the repository root (add `--force` to replace existing class folders). With the same
NumPy and Pillow versions the output is reproducible byte for byte.

## Licence

Fashion-MNIST is released under the MIT licence:

```
{LICENCE}```
"""


def export(source: Path, out: Path, per_class: int, seed: int, force: bool) -> int:
    """Writes the balanced subset and its README; returns the number of images written."""
    images = read_idx(source / IMAGES_FILE)
    labels = read_idx(source / LABELS_FILE)
    if images.shape[1:] != (28, 28) or images.dtype != np.uint8 or len(images) != len(labels):
        raise ValueError(f"unexpected Fashion-MNIST arrays: {images.shape} {images.dtype}")

    existing = [out / name for name in CLASS_NAMES if (out / name).exists()]
    if existing and not force:
        sys.exit(f"error: {out} already holds class folders; pass --force to replace them.")
    for folder in existing:
        shutil.rmtree(folder)

    rng = np.random.default_rng(seed)
    written = 0
    for label, name in enumerate(CLASS_NAMES):
        candidates = np.flatnonzero(labels == label)
        if len(candidates) < per_class:
            sys.exit(f"error: class {name} has only {len(candidates)} training images")
        chosen = np.sort(rng.choice(candidates, size=per_class, replace=False))
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in chosen:
            # 2-D uint8 array -> mode "L": 8-bit grayscale PNG, no metadata, deterministic bytes.
            Image.fromarray(images[index]).save(folder / f"{index:05d}.png", optimize=True)
            written += 1
    return written


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, help="folder holding the Fashion-MNIST .gz files")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output image folder")
    parser.add_argument("--per-class", type=int, default=250, help="images per class")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random choice")
    parser.add_argument("--force", action="store_true", help="replace existing class folders")
    args = parser.parse_args(argv)
    if args.per_class < 1:
        parser.error("--per-class must be at least 1")

    source = find_source(args.source)
    count = export(source, args.out, args.per_class, args.seed, args.force)
    command = f"python scripts/make_fashion_mnist_example.py --per-class {args.per_class} "
    command += f"--seed {args.seed}"
    if args.out.resolve() != DEFAULT_OUT:
        command += f" --out {args.out}"
    (args.out / "README.md").write_text(readme(args.per_class, args.seed, command), "utf-8")
    print(f"wrote {count} images to {args.out} (from {source})")


if __name__ == "__main__":
    main()
