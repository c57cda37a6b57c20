"""Small real datasets for the tests, cut from the bundled example data."""

from __future__ import annotations

import shutil
from pathlib import Path

EXAMPLES = Path(__file__).parents[1] / "examples"
FASHION = EXAMPLES / "data" / "fashion_mnist"
DIGITS = EXAMPLES / "data" / "digits"


def image_subset(
    source: Path, dest: Path, classes: int, per_class: int, layout: str = "flat"
) -> Path:
    """Copies the first `per_class` images of the first `classes` class folders of `source`.

    With layout="split", writes train/val/test sub-folders (60/20/20 of each class) instead.
    """
    for class_dir in sorted(p for p in source.iterdir() if p.is_dir())[:classes]:
        files = sorted(class_dir.glob("*.png"))[:per_class]
        if layout == "flat":
            targets = [(dest / class_dir.name, files)]
        else:
            n_train, n_val = int(0.6 * len(files)), int(0.2 * len(files))
            targets = [
                (dest / "train" / class_dir.name, files[:n_train]),
                (dest / "val" / class_dir.name, files[n_train : n_train + n_val]),
                (dest / "test" / class_dir.name, files[n_train + n_val :]),
            ]
        for folder, chosen in targets:
            folder.mkdir(parents=True, exist_ok=True)
            for f in chosen:
                shutil.copy(f, folder / f.name)
    return dest


def run_python(code: str, timeout: float = 120) -> str:
    """Runs `code` in a fresh Python process; returns its stdout (its stderr if it fails)."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout
