"""The 1,000 ImageNet class names, in the index order of the pretrained classifier heads.

The names ship as a package resource (taken from keras-hub's `IMAGENET_NAMES`, underscores turned
into spaces) because Keras itself only downloads them, and this package must work offline.
"""

from __future__ import annotations

import functools
from importlib import resources

_RESOURCE = "resources/imagenet_classes.txt"
NUM_IMAGENET_CLASSES = 1000


@functools.cache
def _load_names() -> tuple[str, ...]:
    text = resources.files("finetune").joinpath(_RESOURCE).read_text(encoding="utf-8")
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    # A wrong count would silently shift every label after the damage: refuse it outright.
    if len(names) != NUM_IMAGENET_CLASSES:
        raise RuntimeError(
            f"finetune/{_RESOURCE} has {len(names)} class names, expected "
            f"{NUM_IMAGENET_CLASSES}: the installation is damaged, reinstall keras-finetune."
        )
    return names


def imagenet_class_names() -> list[str]:
    """Returns the ImageNet class names, index `i` naming output `i` of an ImageNet head.

    Returns:
        A new list of 1,000 short names ("tench", "goldfish", ..., "toilet tissue"). Two names
        repeat with different meanings, as in Keras' own list: "crane" (134, the bird; 517, the
        machine) and "maillot" (638, 639).

    Raises:
        RuntimeError: if the packaged resource does not hold exactly 1,000 names.
    """
    return list(_load_names())
