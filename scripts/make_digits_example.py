"""Exports scikit-learn's handwritten digits (1,797 images, 8x8) as an ImageFolder of PNGs.

The seed scenario 002 fine-tunes an ImageNet backbone on handwritten digits; this gives it real
data with no download. Pixel values 0-16 are scaled to 0-255 and saved as 8-bit grayscale PNGs.

    python scripts/make_digits_example.py [--out examples/data/digits]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def export_digits(out: Path) -> int:
    """Writes out/<digit>/<index>.png for every image; returns the number written."""
    digits = load_digits()
    for index, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        folder = out / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.round(image * (255.0 / 16.0)).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"{index:04d}.png", optimize=True)
    return len(digits.images)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("examples/data/digits"))
    args = parser.parse_args()
    print(f"wrote {export_digits(args.out)} images to {args.out}")
