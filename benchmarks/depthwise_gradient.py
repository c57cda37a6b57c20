"""Training steps with the swapped depthwise filter gradient against oneDNN's own, side by side.

`finetune.fold` computes the filter gradient of 5 x 5 depthwise convolutions on small maps as a
depthwise convolution's forward pass (`_swapped_filter_gradient`). This times training steps
of EfficientNet-Lite0 (random weights, batch 32, Adam, as `fit_phases` trains: folded, op
determinism on) with that on and off, in one process: both training views are built and traced
first, then they take turns, `--rounds` times `--steps` steps each. Prints images/s per round
and the ratio of the medians.

Modes: `full` (every layer trains, BatchNorm frozen: the default phase 2), `full_bn` (BatchNorm
trains too: `--train-batchnorm`, the scratch baseline), `partial` (the top 3 groups, through
the whole network).

Usage:
    .venv/bin/python benchmarks/depthwise_gradient.py [--sizes 64,128,224]
        [--modes full,full_bn,partial] [--rounds 4] [--steps 6] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ("full", "full_bn", "partial")


def child(size: int, mode: str, rounds: int, steps: int) -> dict:
    import numpy as np

    import finetune.fold as fold
    from finetune.backbones.registry import get_backbone
    from finetune.config import RecipeConfig
    from finetune.model import build_classifier, unfreeze_top_groups
    from finetune.recipes.optimizers import make_optimizer
    from finetune.recipes.two_phase import compile_phase
    from finetune.train import seed_everything

    seed_everything(0)
    spec, recipe = get_backbone("efficientnet_lite0"), RecipeConfig()
    model = build_classifier(spec, 10, image_size=size, weights=None)
    groups = 3 if mode == "partial" else -1
    unfreeze_top_groups(model, spec, groups, train_batchnorm=mode == "full_bn")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (32, size, size, 3)).astype("float32")
    y = np.eye(10, dtype="float32")[rng.integers(0, 10, 32)]
    default = fold.SWAPPED_GRADIENT_MAX_SIDE
    views = {}
    for name, side in (("swapped", default), ("onednn", 0)):
        fold.SWAPPED_GRADIENT_MAX_SIDE = side  # read when the view is built and traced
        view = fold.fold_batchnorm(model)
        # A tiny learning rate: the weights hardly move, so both views time the same work.
        compile_phase(view, recipe, make_optimizer(recipe, 1e-6))
        for _ in range(3):
            view.train_on_batch(x, y)
        views[name] = view
    fold.SWAPPED_GRADIENT_MAX_SIDE = default
    speeds: dict[str, list[float]] = {name: [] for name in views}
    for round_ in range(rounds):
        order = list(views) if round_ % 2 == 0 else list(reversed(views))
        for name in order:
            start = time.perf_counter()
            for _ in range(steps):
                views[name].train_on_batch(x, y)
            speeds[name].append(32 * steps / (time.perf_counter() - start))
    medians = {name: statistics.median(v) for name, v in speeds.items()}
    return {
        "size": size,
        "mode": mode,
        "images_per_s": speeds,
        "median": medians,
        "ratio": medians["swapped"] / medians["onednn"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="64,128,224")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", nargs=2, metavar=("SIZE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = child(int(args.child[0]), args.child[1], args.rounds, args.steps)
        print("RESULT " + json.dumps(result), flush=True)
        return
    rows = []
    print("| px | mode | swapped (rounds) | oneDNN's (rounds) | swapped / oneDNN's |")
    print("|---|---|---|---|---|")
    for size in (int(s) for s in args.sizes.split(",")):
        for mode in args.modes.split(","):
            if mode not in MODES:
                raise SystemExit(f"--modes: unknown mode {mode!r}; use {', '.join(MODES)}")
            steps = args.steps if size < 200 else max(2, args.steps // 2)
            # One process per cell: each starts from the same state.
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(size), mode, "--rounds",
                 str(args.rounds), "--steps", str(steps)],
                check=True, capture_output=True, text=True,
            ).stdout  # fmt: skip
            row = json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:])
            rows.append(row)
            fmt = " / ".join
            print(
                f"| {size} | {mode} | {row['median']['swapped']:.1f} "
                f"({fmt(f'{v:.0f}' for v in row['images_per_s']['swapped'])}) | "
                f"{row['median']['onednn']:.1f} "
                f"({fmt(f'{v:.0f}' for v in row['images_per_s']['onednn'])}) | "
                f"**{row['ratio']:.2f}** |",
                flush=True,
            )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
