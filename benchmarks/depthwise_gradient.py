"""Two forms of the same training (or inference) step, side by side in one process.

`--lever swapped` (the default): `finetune.fold` computes the filter gradient of 5 x 5
depthwise convolutions on small maps as a depthwise convolution's forward pass
(`_swapped_filter_gradient`); this times training steps with that on and off.
`--lever snapshot`: views with the weights that cannot change compiled in
(`fold_batchnorm(..., snapshot=True)`) against views that read them on every call.

EfficientNet-Lite0 (random weights, BatchNorm set as trained: `trained_like.py`; batch 32,
Adam, as `fit_phases` trains: folded, op determinism on), one process per cell: both views are
built and traced first, then they take turns, `--rounds` times `--steps` steps each. Prints
images/s per round and the ratio of the medians.

Modes: `full` (every layer trains, BatchNorm frozen: the default phase 2), `full_bn` (BatchNorm
trains too: `--train-batchnorm`, the scratch baseline), `partial` (the top 3 groups, through
the whole network), `head` (frozen backbone, the step through it) and `infer`
(`predict_on_batch` of the inference view).

Usage:
    .venv/bin/python benchmarks/depthwise_gradient.py [--lever swapped|snapshot]
        [--sizes 64,128,224] [--modes full,full_bn,partial] [--rounds 4] [--steps 6]
        [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ("full", "full_bn", "partial", "head", "infer")
LEVERS = {"swapped": ("swapped", "onednn"), "snapshot": ("snapshot", "live")}


def child(size: int, mode: str, rounds: int, steps: int, lever: str) -> dict:
    import numpy as np

    import finetune.fold as fold
    from finetune.backbones.registry import get_backbone
    from finetune.config import RecipeConfig
    from finetune.model import build_classifier, freeze_backbone, unfreeze_top_groups
    from finetune.recipes.optimizers import make_optimizer
    from finetune.recipes.two_phase import compile_phase
    from finetune.train import seed_everything

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from trained_like import set_trained_like_batchnorm

    seed_everything(0)
    spec, recipe = get_backbone("efficientnet_lite0"), RecipeConfig()
    model = build_classifier(spec, 10, image_size=size, weights=None)
    set_trained_like_batchnorm(model)
    if mode == "head":
        freeze_backbone(model)
    elif mode != "infer":
        groups = 3 if mode == "partial" else -1
        unfreeze_top_groups(model, spec, groups, train_batchnorm=mode == "full_bn")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (32, size, size, 3)).astype("float32")
    y = np.eye(10, dtype="float32")[rng.integers(0, 10, 32)]
    default = fold.SWAPPED_GRADIENT_MAX_SIDE
    calls = {}
    on, off = LEVERS[lever]
    for name in (on, off):
        if lever == "swapped":
            fold.SWAPPED_GRADIENT_MAX_SIDE = default if name == on else 0  # read when traced
        snapshot = lever == "swapped" or name == on  # as finetune trains and predicts
        view = fold.fold_batchnorm(model, frozen_only=mode != "infer", snapshot=snapshot)
        if mode == "infer":
            calls[name] = lambda v=view: v.predict_on_batch(x)
        else:
            # A tiny learning rate: the weights hardly move, so both views time the same work.
            compile_phase(view, recipe, make_optimizer(recipe, 1e-6))
            calls[name] = lambda v=view: v.train_on_batch(x, y)
        for _ in range(3):
            calls[name]()
    fold.SWAPPED_GRADIENT_MAX_SIDE = default
    speeds: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in range(rounds):
        order = list(calls) if round_ % 2 == 0 else list(reversed(calls))
        for name in order:
            start = time.perf_counter()
            for _ in range(steps):
                calls[name]()
            speeds[name].append(32 * steps / (time.perf_counter() - start))
    medians = {name: statistics.median(v) for name, v in speeds.items()}
    return {
        "size": size,
        "mode": mode,
        "images_per_s": speeds,
        "median": medians,
        "lever": lever,
        "ratio": medians[on] / medians[off],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lever", default="swapped", choices=sorted(LEVERS))
    parser.add_argument("--sizes", default="64,128,224")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", nargs=2, metavar=("SIZE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = child(int(args.child[0]), args.child[1], args.rounds, args.steps, args.lever)
        print("RESULT " + json.dumps(result), flush=True)
        return
    rows = []
    on, off = LEVERS[args.lever]
    print(f"| px | mode | {on} (rounds) | {off} (rounds) | {on} / {off} |")
    print("|---|---|---|---|---|")
    for size in (int(s) for s in args.sizes.split(",")):
        for mode in args.modes.split(","):
            if mode not in MODES:
                raise SystemExit(f"--modes: unknown mode {mode!r}; use {', '.join(MODES)}")
            steps = args.steps if size < 200 else max(2, args.steps // 2)
            # One process per cell: each starts from the same state.
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(size), mode, "--rounds",
                 str(args.rounds), "--steps", str(steps), "--lever", args.lever],
                check=True, capture_output=True, text=True,
            ).stdout  # fmt: skip
            row = json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:])
            rows.append(row)
            fmt = " / ".join
            print(
                f"| {size} | {mode} | {row['median'][on]:.1f} "
                f"({fmt(f'{v:.0f}' for v in row['images_per_s'][on])}) | "
                f"{row['median'][off]:.1f} "
                f"({fmt(f'{v:.0f}' for v in row['images_per_s'][off])}) | "
                f"**{row['ratio']:.2f}** |",
                flush=True,
            )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
