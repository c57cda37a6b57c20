"""Speed of the augmented training pipeline alone, under op determinism (finetune's default).

Times one epoch of the training pipeline (`image_dataset(..., training=True)`, random uint8
images, batch 32, the chosen preset, no model) in four ways, each in a child process of its own
(op determinism is process-wide), taking turns and reversing the order every other round:

- `keras`: Keras' RandomFlip, RandomRotation, RandomTranslation, RandomZoom (and RandomShear)
  called the usual way in the map, as finetune did before: each layer's seed generator is a
  variable, and with op determinism on tf.data then runs every map of the pipeline on one
  thread and drops its prefetching (so did the epoch variable finetune's pipeline read);
- `keras-keyed`: the same layers run by `finetune.data.augment.augment`, every draw keyed by
  (seed, epoch, batch): no state, so the maps run in parallel;
- `geometry`: `image_dataset` as it is: the keyed map with `RandomGeometry`, the same
  transformations composed and resampled once;
- `geometry-nondet`: the same without op determinism, for reference.

Prints the median images/s of each per size and the ratios against `keras`.

Usage:
    .venv/bin/python benchmarks/augment_pipeline.py [--sizes 64,128,224] [--rounds 3]
        [--images 1024] [--preset light]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

MODES = ("keras", "keras-keyed", "geometry", "geometry-nondet")


def keras_layers(config):
    """The geometric augmentation as Keras' layers, one after another (finetune before)."""
    import keras

    from finetune.data.augment import KeyedRandAugment

    fill = config.fill_mode
    layers = []
    flips = {(True, True): "horizontal_and_vertical", (True, False): "horizontal",
             (False, True): "vertical"}  # fmt: skip
    flip = flips.get((config.horizontal_flip, config.vertical_flip))
    if flip:
        layers.append(keras.layers.RandomFlip(flip, seed=1))
    if config.rotation:
        layers.append(keras.layers.RandomRotation(config.rotation / 360, fill_mode=fill, seed=2))
    if config.width_shift or config.height_shift:
        layers.append(keras.layers.RandomTranslation(
            config.height_shift, config.width_shift, fill_mode=fill, seed=3))  # fmt: skip
    if config.shear:
        layers.append(keras.layers.RandomShear(config.shear, config.shear, fill_mode=fill, seed=4))
    if config.zoom:
        layers.append(keras.layers.RandomZoom(config.zoom, fill_mode=fill, seed=5))
    if config.randaugment:
        layers.append(KeyedRandAugment(value_range=(0, 255), seed=6))
    return keras.Sequential(layers)


def child(mode: str, size: int, images: int, preset: str) -> None:
    import numpy as np
    import tensorflow as tf

    from finetune.config import augment_preset
    from finetune.data.augment import build_augmentation
    from finetune.data.pipeline import image_dataset
    from finetune.train import seed_everything

    seed_everything(0, deterministic=mode != "geometry-nondet")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (images, size, size, 3), dtype=np.uint8)
    y = np.arange(images) % 10
    config = augment_preset(preset)
    if mode.startswith("keras"):
        augmentation = keras_layers(config)
    else:
        augmentation = build_augmentation(config, seed=0)
    ds = image_dataset(
        x, y, 10, batch_size=32, training=True, first_epoch=0,
        augmentation=None if mode == "keras" else augmentation,
    )  # fmt: skip
    if mode == "keras":
        ds = ds.map(
            lambda b, label: (augmentation(b, training=True), label),
            num_parallel_calls=tf.data.AUTOTUNE,
        ).prefetch(tf.data.AUTOTUNE)
    steps = -(-images // 32)
    batches = iter(ds)  # one iterator through the epochs, as `fit` with steps_per_epoch
    speeds = []
    for _ in range(3):  # the first epoch traces and warms up
        start = time.perf_counter()
        seen = sum(int(next(batches)[0].shape[0]) for _ in range(steps))
        speeds.append(seen / (time.perf_counter() - start))
    print(json.dumps({"images_per_s": statistics.median(speeds[1:])}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="64,128,224")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--preset", default="light")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.images, args.preset)
        return
    env = os.environ | {"TF_CPP_MIN_LOG_LEVEL": "2"}
    sizes = [int(s) for s in args.sizes.split(",")]
    speeds: dict[tuple[int, str], list[float]] = {}
    for size in sizes:
        for round_ in range(args.rounds):
            for mode in MODES if round_ % 2 == 0 else reversed(MODES):
                out = subprocess.run(
                    [sys.executable, __file__, "--child", mode, str(size),
                     "--images", str(args.images), "--preset", args.preset],
                    env=env, capture_output=True, text=True, check=True,
                )  # fmt: skip
                speed = json.loads(out.stdout.strip().splitlines()[-1])["images_per_s"]
                speeds.setdefault((size, mode), []).append(speed)
                print(f"  {size} px, round {round_ + 1}, {mode}: {speed:.0f} images/s", flush=True)
    print(f"\nAugmented pipeline alone, preset {args.preset!r}, batch 32, {args.images} images, "
          f"median of {args.rounds} rounds (images/s):\n")  # fmt: skip
    others = MODES[1:]
    header = [*MODES, *(f"{m} / keras" for m in others)]
    print("| size | " + " | ".join(header) + " |")
    print("|---|" + "---|" * (2 * len(MODES) - 1))
    for size in sizes:
        median = {m: statistics.median(speeds[(size, m)]) for m in MODES}
        cells = " | ".join(f"{median[m]:.0f}" for m in MODES)
        ratios = " | ".join(f"{median[m] / median['keras']:.2f}x" for m in others)
        print(f"| {size} px | {cells} | {ratios} |")


if __name__ == "__main__":
    main()
