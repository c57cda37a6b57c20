"""Speed of the dataset check (`finetune.data.inspect.inspect_folder`) on 10,000 image files.

Writes (once; later runs reuse it) a folder of real pictures: the first 9,960 Fashion-MNIST
training images in their 10 class folders, alternately as PNG and as JPEG (quality 90), plus 40
planted duplicates, each placed in a different class than its original: 20 byte-for-byte copies
and 20 copies resized to twice the side and re-encoded as JPEG at quality 80. With --side the
images are first upscaled (bicubic) to that side, to see the cost of decoding larger files.
Writing is not timed. Then `inspect_folder` is timed --repeats times (files in the page cache
after the first run) and the median is printed as images per second, with the time of the two
parts that are not per-file work: the folder scan, and the near-duplicate pair search.
The planted duplicates are checked: the script says how many of the 40 were found, and lists
the other duplicate groups found (Fashion-MNIST holds a few look-alike shots of a garment).

With --calibrate it times nothing and instead prints the figures behind the near-duplicate
defaults (`DEFAULT_NEAR_DUPLICATE_DISTANCE`, `COLOUR_TOLERANCE`): Hamming distances between 21
photos bundled with scikit-learn and scikit-image and their copies resized to 0.25-2x and
re-encoded as JPEG at quality 30-95, between distinct photos and between the 200 LFW faces
bundled with scikit-image, and between the distinct Fashion-MNIST pictures of the folder above
and their re-encoded copies.

The data comes from Debian's `dataset-fashion-mnist` (found, or installed, by
`benchmarks/accuracy.py`'s `find_data`); --calibrate also needs scikit-image (the test extra).

Usage:
    .venv/bin/python benchmarks/inspect_speed.py [--side 28] [--repeats 5] [--workers N]
    .venv/bin/python benchmarks/inspect_speed.py --calibrate
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "out"
sys.path.insert(0, str(REPO / "benchmarks"))

from accuracy import FILES, find_data, read_idx  # noqa: E402
from make_fashion_mnist_example import CLASS_NAMES  # noqa: E402

TOTAL = 10_000
PLANTED = 20  # of each kind: exact copies, and resized + re-encoded copies


def build_folder(side: int) -> tuple[Path, list[tuple[str, str, str]]]:
    """Writes (or reuses) the benchmark folder; returns it and the planted (kind, original, copy).

    Paths in the planted list are relative to the folder.
    """
    import numpy as np
    from PIL import Image

    folder = OUT / "inspect_speed" / f"fashion_mnist_{TOTAL}_{side}px"
    manifest = folder / "planted.json"
    if manifest.is_file():
        return folder, [tuple(p) for p in json.loads(manifest.read_text())]
    source = find_data()
    images_file, labels_file = FILES["train"]
    images = read_idx(source / images_file)
    labels = read_idx(source / labels_file)
    originals = TOTAL - 2 * PLANTED
    print(f"writing {TOTAL:,} images to {folder} ...", flush=True)
    names: list[str] = []
    for i in range(originals):
        picture = Image.fromarray(images[i], mode="L")
        if side != picture.width:
            picture = picture.resize((side, side), Image.Resampling.BICUBIC)
        ext = "png" if i % 2 == 0 else "jpg"
        name = f"{CLASS_NAMES[labels[i]]}/{i:05d}.{ext}"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        picture.save(folder / name, **({"quality": 90} if ext == "jpg" else {}))
        names.append(name)
    planted: list[tuple[str, str, str]] = []
    rng = np.random.default_rng(0)
    picks = rng.choice(originals, 2 * PLANTED, replace=False)
    for n, i in enumerate(picks.tolist()):
        other = CLASS_NAMES[(labels[i] + 1 + n % 9) % len(CLASS_NAMES)]
        original = folder / names[i]
        if n < PLANTED:
            copy = f"{other}/copy_{i:05d}{original.suffix}"
            (folder / copy).write_bytes(original.read_bytes())
            planted.append(("exact", names[i], copy))
        else:
            copy = f"{other}/resized_{i:05d}.jpg"
            with Image.open(original) as img:
                bigger = img.resize((2 * img.width, 2 * img.height), Image.Resampling.BICUBIC)
            buffer = io.BytesIO()
            bigger.save(buffer, "JPEG", quality=80)
            (folder / copy).write_bytes(buffer.getvalue())
            planted.append(("near", names[i], copy))
    manifest.write_text(json.dumps(planted))
    return folder, planted


SKIMAGE_PHOTOS = [
    "astronaut.png",
    "camera.png",
    "chelsea.png",
    "coffee.png",
    "coins.png",
    "horse.png",
    "moon.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "page.png",
    "text.png",
    "brick.png",
    "grass.png",
    "gravel.png",
    "ihc.png",
    "color.png",
    "logo.png",
]
PHOTOS = [("sklearn", "china.jpg"), ("sklearn", "flower.jpg")] + [
    ("skimage", name) for name in SKIMAGE_PHOTOS
]


def calibrate(folder: Path) -> None:
    """Prints hash distances of copies and of distinct pictures (see the module docstring)."""
    import tempfile

    import numpy as np
    import skimage
    import sklearn.datasets
    from PIL import Image

    from finetune.data import duplicates

    places = {
        "sklearn": Path(sklearn.datasets.__file__).parent / "images",
        "skimage": Path(skimage.__file__).parent / "data",
    }
    scratch = Path(tempfile.mkdtemp(prefix="inspect_calibrate_"))

    def examine(img: Image.Image, name: str, **options):
        img.save(scratch / name, **options)
        return duplicates._examine(scratch / name)

    def apart(a, b) -> tuple[int, float]:
        bits = int(np.bitwise_count(a.phash ^ b.phash).sum())
        return bits, float(np.abs(a.colour.astype(np.int16) - b.colour).mean())

    def closest(images) -> int:
        _, _, d = duplicates._near_pairs(np.stack([x.phash for x in images]), 255)
        return int(d.min())

    rows, originals = [], []
    for where, name in PHOTOS:
        with Image.open(places[where] / name) as img:
            rgb = img.convert("RGB")
        originals.append(examine(rgb, "original.png"))
        for scale in (0.25, 0.5, 1.0, 2.0):
            size = (round(rgb.width * scale), round(rgb.height * scale))
            smaller = rgb.resize(size, Image.Resampling.BICUBIC)
            for quality in (30, 50, 75, 95):
                copy = examine(smaller, "copy.jpg", quality=quality)
                rows.append((name, scale, quality, *apart(originals[-1], copy)))
    print(f"{len(PHOTOS)} photos, each resized (bicubic) and re-encoded as JPEG:")
    for scale in (0.25, 0.5, 1.0, 2.0):
        mine = [r for r in rows if r[1] == scale]
        worst = max(mine, key=lambda r: r[3])
        natural = max(r[3] for r in mine if r[0] != "color.png")
        print(f"  {scale}x, quality 30-95: largest distance {worst[3]} ({worst[0]}, quality "
              f"{worst[2]}); without color.png {natural}")  # fmt: skip
    print(f"  largest colour difference: {max(r[4] for r in rows):.1f}")
    print(f"distinct photos: closest pair {closest(originals)} bits apart")
    faces = np.load(places["skimage"] / "lfw_subset.npy")
    lfw = [examine(Image.fromarray(np.rint(f * 255).astype(np.uint8)), "face.png") for f in faces]
    print(f"{len(lfw)} LFW faces: closest pair {closest(lfw)} bits apart")

    paths = sorted(
        p for p in folder.glob("*/*") if p.suffix in (".png", ".jpg") and p.stem[0].isdigit()
    )
    found = duplicates._examine_all(paths, 2, False)
    hashes = np.stack([x.phash for x in found])
    colours = np.stack([x.colour for x in found]).astype(np.int16)
    i, j, d = duplicates._near_pairs(hashes, 40)
    same_colour = np.abs(colours[i] - colours[j]).mean(axis=1) <= duplicates.COLOUR_TOLERANCE
    counts = ", ".join(
        f"{t}: {int((d <= t).sum())} ({int(((d <= t) & same_colour).sum())})"
        for t in (8, 16, 20, 24, 28, 32, 40)
    )
    print(f"{len(paths):,} distinct Fashion-MNIST pictures, pairs within t bits (and of similar "
          f"colour): {counts}")  # fmt: skip
    for scale, quality in ((1, 95), (1, 75), (1, 50), (1, 20), (2, 80), (3, 60)):
        bits, colour = [], []
        for path in paths[:500]:
            with Image.open(path) as img:
                img.load()
            copy = img.resize((img.width * scale, img.height * scale), Image.Resampling.BICUBIC)
            b, c = apart(examine(img, "original.png"), examine(copy, "copy.jpg", quality=quality))
            bits.append(b)
            colour.append(c)
        print(f"  500 copies at {scale}x, quality {quality}: distance median "
              f"{np.median(bits):.0f}, 99th percentile {np.percentile(bits, 99):.0f}, largest "
              f"{max(bits)}; largest colour difference {max(colour):.1f}")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--side", type=int, default=28, help="image side in px (28 = native)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=None, help="default: inspect_folder's")
    parser.add_argument("--calibrate", action="store_true", help="print the threshold figures")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    folder, planted = build_folder(args.side)
    if args.calibrate:
        calibrate(folder)
        return
    import numpy as np

    from finetune.data import duplicates
    from finetune.data import inspect as inspection
    from finetune.data.scan import scan_image_folder

    print(f"{folder}: load average before timing {os.getloadavg()[0]:.2f}", flush=True)
    seconds, scans, pair_searches = [], [], []
    report = None
    for repeat in range(args.repeats):
        start = time.perf_counter()
        report = inspection.inspect_folder(folder, workers=args.workers)
        seconds.append(time.perf_counter() - start)
        start = time.perf_counter()
        scan_image_folder(folder)
        scans.append(time.perf_counter() - start)
        hashes = np.random.default_rng(repeat).integers(0, 2**63, (report.images, 4), np.uint64)
        start = time.perf_counter()
        duplicates._near_pairs(hashes, report.near_duplicate_distance)
        pair_searches.append(time.perf_counter() - start)
        print(f"  run {repeat + 1}: {seconds[-1]:.2f} s", flush=True)
    assert report is not None

    median = statistics.median(seconds)
    print(f"{report.images:,} images, workers={args.workers or 'default'}: median {median:.2f} s "
          f"of {args.repeats} ({report.images / median:,.0f} images/s); "
          f"min {min(seconds):.2f} s, max {max(seconds):.2f} s")  # fmt: skip
    scan, pairs = statistics.median(scans), statistics.median(pair_searches)
    print(f"  of which the folder scan: median {scan:.2f} s; the near-duplicate pair search: "
          f"median {pairs:.2f} s")  # fmt: skip
    print(f"load average after timing {os.getloadavg()[0]:.2f}")

    def found(kind: str, original: str, copy: str) -> bool:
        groups = report.exact_duplicates if kind == "exact" else report.near_duplicates
        return any({original, copy} <= set(g.to_dict(folder)["paths"]) for g in groups)

    for kind in ("exact", "near"):
        mine = [p for p in planted if p[0] == kind]
        hits = sum(found(*p) for p in mine)
        print(f"planted {kind} duplicates found: {hits} of {len(mine)}")
    planted_pairs = [{p[1], p[2]} for p in planted]
    others = [
        g
        for g in report.exact_duplicates + report.near_duplicates
        if not any(pair <= set(g.to_dict(folder)["paths"]) for pair in planted_pairs)
    ]
    print(f"other duplicate groups found: {len(others)}")
    for g in others:
        d = g.to_dict(folder)
        print(f"  {d['match']} {d['kind']} distance {d['distance']}: {' | '.join(d['paths'])}")
    print(report.verdict)

    OUT.mkdir(parents=True, exist_ok=True)
    result = OUT / f"inspect_speed-{time.strftime('%Y%m%d-%H%M%S')}.json"
    result.write_text(json.dumps({
        "args": vars(args),
        "folder": str(folder),
        "seconds": seconds,
        "scan_seconds": scans,
        "pair_search_seconds": pair_searches,
        "report": report.to_dict(),
    }, indent=1))  # fmt: skip
    print(f"wrote {result}")


if __name__ == "__main__":
    main()
