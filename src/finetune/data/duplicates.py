"""Read every image of a data folder once, and find the files that hold the same picture.

This is the per-image half of `inspect_folder`. `_examine_all` reads every image once, in a
thread pool, through the hardened loader `load_image` at a 128x128 thumbnail (large JPEGs are
decoded at a reduced scale), so a broken file is found by the same code, with the same reason, as
in training. For each image it records the size and colour mode from the file header, a BLAKE2b
hash of the file bytes (exact duplicates) and a 256-bit perceptual hash (near duplicates: the same
picture resized or re-encoded). The perceptual hash is the sign, against their median, of the
16x16 lowest DCT frequencies of the grey thumbnail averaged down to 64x64 ("phash" with 256 bits:
the usual 64-bit phash puts thousands of distinct Fashion-MNIST images within a few bits of each
other). Two images are near duplicates when their hashes differ in at most
`near_duplicate_distance` bits AND their 8x8 colour thumbnails differ by at most
`COLOUR_TOLERANCE` on average: the hash ignores colour, so the same shape in red and in blue (two
traffic signs, two colourways of one product) would otherwise match; a greyscale copy of a colour
photo is therefore not reported. Near pairs are linked into groups (`DuplicateGroup`). The pair
search compares all hashes with NumPy bit operations, a block at a time: quadratic, but 10,000
images take well under a second.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from finetune.data.decode import BadFile, for_each_in_threads, load_image
from finetune.data.scan import SPLIT_NAMES
from finetune.errors import ImageDecodeError

__all__ = [
    "COLOUR_TOLERANCE",
    "DEFAULT_NEAR_DUPLICATE_DISTANCE",
    "HASH_BITS",
    "DuplicateFile",
    "DuplicateGroup",
]

#: Bits in the perceptual hash.
HASH_BITS = 256

#: Default largest Hamming distance (of 256 bits) between near duplicates. Measured with
#: `benchmarks/inspect_speed.py --calibrate` (figures in benchmarks/RESULTS.md): photos bundled
#: with scikit-learn and scikit-image, resized to 0.5-2x and re-encoded as JPEG at quality 30-95,
#: stay within 14 bits of the original, and within 26 at quarter size (a brick texture at quality
#: 30); only a synthetic colour chart drifts further (up to 44). Distinct photos are 106 or more
#: apart, the 200 look-alike LFW faces 78 or more. 28x28 Fashion-MNIST pictures re-encoded at
#: quality 75 or more stay within 16, and 9,960 distinct ones hold only 5 pairs within 24 (the
#: same garment, or cut, shot alike; colour check included) but 45 within 32.
DEFAULT_NEAR_DUPLICATE_DISTANCE = 24

#: Largest mean absolute difference (0-255) between the 8x8 RGB thumbnails of near duplicates.
#: The re-encoded copies above differ by at most 2 (4.1 for 28x28 images at quality 20).
COLOUR_TOLERANCE = 16.0

KINDS = ("across_classes", "across_splits", "within_class")

_THUMB = 64  # side of the thumbnail the hashes are computed from
_LOW = 16  # the hash keeps the _LOW x _LOW lowest DCT frequencies
_GREY = np.array([0.299, 0.587, 0.114], np.float32)  # Pillow's RGB -> L weights
_k = np.arange(_THUMB)
# The first _LOW rows of the DCT-II matrix: low = D @ grey @ D.T keeps the lowest frequencies.
_DCT_LOW = np.ascontiguousarray(
    np.cos(np.pi * (2 * _k[None, :] + 1) * _k[:_LOW, None] / (2 * _THUMB)), np.float32
)
_HALF = _LOW * _LOW // 2
_BLOCK = (_THUMB // 8) ** 2  # pixels averaged into one of the 8x8 colour thumbnail's cells
_PAIR_BLOCK = 1 << 20  # hash pairs compared at once: temporary arrays of 1-8 MB each
_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], np.uint8)


@dataclass(frozen=True)
class DuplicateFile:
    """One file of a duplicate group.

    Attributes:
        path: the file.
        split: the split it is in ("train", "val", "test", or "all" for a flat folder).
        class_name: its class.
    """

    path: Path
    split: str
    class_name: str


@dataclass(frozen=True)
class DuplicateGroup:
    """Files holding the same picture.

    Attributes:
        match: "exact" (identical bytes) or "near" (same picture resized or re-encoded; the group
            may also hold exact copies of its members).
        files: the files, ordered by split then path.
        distance: largest Hamming distance between linked members (0 for exact groups).
    """

    match: str
    files: tuple[DuplicateFile, ...]
    distance: int = 0

    @property
    def across_classes(self) -> bool:
        """Whether the group holds more than one class."""
        return len({f.class_name for f in self.files}) > 1

    @property
    def across_splits(self) -> bool:
        """Whether the group holds more than one split."""
        return len({f.split for f in self.files}) > 1

    @property
    def kind(self) -> str:
        """Where the copies are: "across_classes", else "across_splits", else "within_class"."""
        if self.across_classes:
            return "across_classes"
        return "across_splits" if self.across_splits else "within_class"

    def to_dict(self, root: Path) -> dict[str, Any]:
        """JSON-ready form, paths relative to root."""
        return {
            "kind": self.kind,
            "match": self.match,
            "across_classes": self.across_classes,
            "across_splits": self.across_splits,
            "distance": self.distance,
            "paths": [_relative(f.path, root) for f in self.files],
            "files": [
                {"path": _relative(f.path, root), "split": f.split, "class": f.class_name}
                for f in self.files
            ],
        }


@dataclass(frozen=True)
class _Image:
    """What is kept of one decodable file."""

    size: tuple[int, int]
    mode: str
    format: str
    digest: bytes
    phash: np.ndarray  # (HASH_BITS // 64,) uint64
    colour: np.ndarray  # (8 * 8 * 3,) uint8


def _examine(path: Path) -> _Image | BadFile:
    """Decodes one file to a thumbnail with `load_image` and hashes it; BadFile if it fails."""
    try:
        # Decoded at twice the side, then halved by averaging: the hash then depends much less
        # on how the file was scaled down (JPEG's reduced-scale decoding or a full decode).
        large = load_image(path, 2 * _THUMB, "bilinear")
    except ImageDecodeError as exc:
        return BadFile(path, exc.reason)
    try:
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).digest()
        # Header only: the loader has just checked this file, so this is safe and cheap.
        with Image.open(path) as img:
            size, mode, fmt = img.size, img.mode, img.format or "unknown"
    except Exception as exc:  # the file changed or vanished since it was decoded
        return BadFile(path, f"cannot read file ({getattr(exc, 'strerror', None) or exc})")
    rgb = np.asarray(Image.fromarray(large).reduce(2))
    grey = rgb.astype(np.float32) @ _GREY
    low = (_DCT_LOW @ grey @ _DCT_LOW.T).ravel()
    middle = np.partition(low, (_HALF - 1, _HALF))
    bits = np.packbits(low > (middle[_HALF - 1] + middle[_HALF]) / 2).view(np.uint64)
    # Mean of each 8x8-pixel block, summed in two contiguous steps (far faster than a 4-D mean).
    rows = rgb.reshape(8, _THUMB // 8, _THUMB * 3).sum(axis=1, dtype=np.uint16)
    colour = (rows.reshape(8, 8, _THUMB // 8, 3).sum(axis=2) + _BLOCK // 2) // _BLOCK
    return _Image(size, mode, fmt, digest, bits, colour.astype(np.uint8).ravel())


def _examine_all(paths: list[Path], workers: int, progress: bool) -> list[_Image | BadFile]:
    """Runs `_examine` over paths in a thread pool; results in input order."""
    results: list[_Image | BadFile | None] = [None] * len(paths)

    def work(i: int) -> None:
        results[i] = _examine(paths[i])

    for_each_in_threads(work, len(paths), workers, "Inspecting images", progress)
    return results  # type: ignore[return-value]


def _popcount_table(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64 of a C-contiguous array, as uint8, by table (for NumPy 1)."""
    return _POPCOUNT8[x.view(np.uint8)].reshape(*x.shape, 8).sum(axis=-1, dtype=np.uint8)


_popcount = getattr(np, "bitwise_count", _popcount_table)


def _near_pairs(hashes: np.ndarray, max_distance: int) -> tuple[np.ndarray, ...]:
    """All pairs i < j of rows of `hashes` ((n, 4) uint64) within `max_distance` bits.

    Brute force, but a block of rows at a time against all later rows with NumPy bit
    operations: the 50 million pairs of 10,000 hashes take about 0.3 s (benchmarks/RESULTS.md).

    Returns:
        `(i, j, distance)` arrays.
    """
    n = len(hashes)
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    rows = max(1, _PAIR_BLOCK // max(n, 1))
    for start in range(0, n - 1, rows):
        block = hashes[start : start + rows]
        later = hashes[start + 1 :]
        # Two words sum to at most 128, so uint8 cannot overflow; the total of all four wraps only
        # at 256, when both halves are 128, which the `half <= max_distance` test excludes.
        half = _popcount(block[:, None, 0] ^ later[None, :, 0])
        half += _popcount(block[:, None, 1] ^ later[None, :, 1])
        total = _popcount(block[:, None, 2] ^ later[None, :, 2])
        total += _popcount(block[:, None, 3] ^ later[None, :, 3])
        total += half
        r, c = np.nonzero((total <= max_distance) & (half <= max_distance))
        i, j = start + r, start + 1 + c
        keep = j > i
        found.append((i[keep], j[keep], total[r[keep], c[keep]].astype(np.int64)))
    if not found:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    return tuple(np.concatenate(parts) for parts in zip(*found, strict=True))


def _duplicate_groups(
    good: list[tuple[DuplicateFile, _Image]], max_distance: int
) -> tuple[list[DuplicateGroup], list[DuplicateGroup]]:
    """Groups files by identical bytes, and by near perceptual hash and colour."""
    by_digest: dict[bytes, list[DuplicateFile]] = defaultdict(list)
    image_of: dict[bytes, _Image] = {}
    for file, image in good:
        by_digest[image.digest].append(file)
        image_of.setdefault(image.digest, image)
    exact = [
        DuplicateGroup("exact", _sorted(files)) for files in by_digest.values() if len(files) > 1
    ]

    digests = list(by_digest)
    near: list[DuplicateGroup] = []
    if len(digests) > 1:
        hashes = np.stack([image_of[d].phash for d in digests])
        colours = np.stack([image_of[d].colour for d in digests]).astype(np.int16)
        i, j, dist = _near_pairs(hashes, max_distance)
        close = np.abs(colours[i] - colours[j]).mean(axis=1) <= COLOUR_TOLERANCE
        parent = list(range(len(digests)))

        def find(a: int) -> int:
            while parent[a] != a:
                parent[a] = parent[parent[a]]
                a = parent[a]
            return a

        for a, b in zip(i[close].tolist(), j[close].tolist(), strict=True):
            parent[find(a)] = find(b)
        members: dict[int, list[int]] = defaultdict(list)
        for a in range(len(digests)):
            members[find(a)].append(a)
        worst: dict[int, int] = defaultdict(int)
        for a, d in zip(i[close].tolist(), dist[close].tolist(), strict=True):
            worst[find(a)] = max(worst[find(a)], d)
        for rep, group in members.items():
            if len(group) > 1:
                files = [f for a in group for f in by_digest[digests[a]]]
                near.append(DuplicateGroup("near", _sorted(files), worst[rep]))
    return _by_kind(exact), _by_kind(near)


def _split_key(split: str) -> tuple[int, str]:
    return (SPLIT_NAMES.index(split) if split in SPLIT_NAMES else len(SPLIT_NAMES), split)


def _sorted(files: list[DuplicateFile]) -> tuple[DuplicateFile, ...]:
    return tuple(sorted(files, key=lambda f: (_split_key(f.split), f.path.as_posix())))


def _by_kind(groups: list[DuplicateGroup]) -> list[DuplicateGroup]:
    return sorted(groups, key=lambda g: (KINDS.index(g.kind), g.files[0].path.as_posix()))


def _relative(path: Path, root: Path) -> str:
    """path relative to root, POSIX style; the absolute path if it is not inside root."""
    for candidate, base in (
        (path, root),
        (Path(os.path.abspath(path)), Path(os.path.abspath(root))),
    ):
        with contextlib.suppress(ValueError):
            return candidate.relative_to(base).as_posix()
    return Path(os.path.abspath(path)).as_posix()
