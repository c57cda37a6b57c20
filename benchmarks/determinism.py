"""Cost of TensorFlow op determinism (finetune's default) on full fine-tuning speed.

Times `train_on_batch` of an EfficientNet-Lite0 classifier (random weights, everything
trainable, Adam, batch 32) with and without `tf.config.experimental.enable_op_determinism()`,
each mode in its own process (the switch is process-wide), alternating modes over several rounds
so both see the same machine load. Prints the median images/s of each mode and their ratio.

    .venv/bin/python benchmarks/determinism.py [--size 96] [--rounds 3] [--steps 12]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def child(deterministic: bool, size: int, steps: int) -> None:
    import numpy as np
    import tensorflow as tf

    if deterministic:
        tf.config.experimental.enable_op_determinism()
    import keras

    from finetune.backbones import get_backbone
    from finetune.model import build_classifier, unfreeze_top_groups

    spec = get_backbone("efficientnet_lite0")
    model = build_classifier(spec, 10, image_size=size, weights=None)
    unfreeze_top_groups(model, spec, -1, train_batchnorm=True)
    model.compile(optimizer="adam", loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (32, size, size, 3)).astype(np.float32)
    y = np.eye(10, dtype=np.float32)[np.arange(32) % 10]
    for _ in range(3):  # trace and warm up
        model.train_on_batch(x, y)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model.train_on_batch(x, y)
        times.append(time.perf_counter() - start)
    print(json.dumps({"images_per_s": 32 / statistics.median(times)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--child", choices=["det", "nodet"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child == "det", args.size, args.steps)
        return
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    results: dict[str, list[float]] = {"nodet": [], "det": []}
    for _ in range(args.rounds):
        for mode in ("nodet", "det"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", mode, "--size", str(args.size),
                 "--steps", str(args.steps)],
                capture_output=True, text=True, check=True, env=env,
            )  # fmt: skip
            results[mode].append(json.loads(out.stdout.strip().splitlines()[-1])["images_per_s"])
    medians = {mode: statistics.median(v) for mode, v in results.items()}
    print(f"EfficientNet-Lite0, {args.size} px, batch 32, full fine-tuning, train_on_batch")
    for mode, label in (("nodet", "default kernels"), ("det", "op determinism")):
        rounds = ", ".join(f"{v:.1f}" for v in results[mode])
        print(f"  {label:16s} median {medians[mode]:6.1f} img/s  (rounds: {rounds})")
    print(f"  ratio deterministic / default: {medians['det'] / medians['nodet']:.3f}")


if __name__ == "__main__":
    main()
