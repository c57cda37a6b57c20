"""What a fine-tuning phase pays besides its steps' arithmetic: the optimizer's update and the
first call (the trace), before and after issue 7's sixteenth slice (benchmarks/RESULTS.md).

Two measurements of EfficientNet-Lite0, batch 32, random pixels, the phase-2 optimizer as
`finetune train` makes it (`make_optimizer`: Adam on the cosine schedule with the per-group
learning rates of phase 2), on the model `fit_phases` trains (`fold_batchnorm(model,
snapshot=True)`):

- `--steps`: the median train step with Keras' own Adam (`keras.optimizers.Adam` with the same
  per-group rates) against finetune's `FusedAdam` (ResourceApplyAdam), in one process per image
  size, two compiled views of one model taking turns round by round (the order reversed every
  other round), for the modes `full` (every layer, BatchNorm frozen: phase 2's default),
  `full_bn` (`--train-batchnorm`) and `partial` (the top 3 layer groups).
- `--first-call`: the first `train_on_batch` of a phase in a fresh process (what a phase's
  first epoch pays once), for three variants taking turns: Keras' Adam built inside the first
  trace (what `fit` did before: TensorFlow then traced the step twice), Keras' Adam built
  before `fit`, and `FusedAdam` built before `fit` (what `compile_phase` does now).

Usage:
    .venv/bin/python benchmarks/train_step_overhead.py --steps --sizes 64,128,224
    .venv/bin/python benchmarks/train_step_overhead.py --first-call --sizes 64 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BATCH, CLASSES, GROUPS = 32, 10, 3
VARIANTS = ("keras-adam-in-trace", "keras-adam", "fused-adam")


def build(size: int, mode: str):
    """A batch, and a function giving the model `fit` trains for `mode`, compiled as a variant
    of `VARIANTS` says."""
    import keras
    import numpy as np

    from finetune.backbones.registry import get_backbone
    from finetune.config import RecipeConfig
    from finetune.fold import fold_batchnorm
    from finetune.model import build_classifier, unfreeze_top_groups
    from finetune.recipes.discriminative import group_lr_multipliers, with_lr_multipliers
    from finetune.recipes.optimizers import FusedAdam
    from finetune.recipes.schedules import phase_learning_rate
    from finetune.recipes.two_phase import compile_phase
    from finetune.train import seed_everything

    sys.path.insert(0, str(HERE))
    from trained_like import set_trained_like_batchnorm

    seed_everything(0)
    spec, recipe = get_backbone("efficientnet_lite0"), RecipeConfig()
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (BATCH, size, size, 3)).astype("float32")
    y = np.eye(CLASSES, dtype="float32")[rng.integers(0, CLASSES, BATCH)]
    model = build_classifier(spec, CLASSES, image_size=size, weights=None)
    set_trained_like_batchnorm(model)
    count = GROUPS if mode == "partial" else -1
    groups = unfreeze_top_groups(model, spec, count, train_batchnorm=mode == "full_bn")
    factors = group_lr_multipliers(model, spec, groups, recipe.discriminative_lr)
    lr = phase_learning_rate(recipe, recipe.finetune_lr, 100, 5)

    def compiled(which: str):
        fit_model = fold_batchnorm(model, snapshot=True)
        base = keras.optimizers.Adam(lr) if which.startswith("keras") else FusedAdam(lr)
        compile_phase(fit_model, recipe, with_lr_multipliers(base, factors))
        if which == "keras-adam-in-trace":  # as before: built by the first traced step
            fit_model.optimizer = with_lr_multipliers(keras.optimizers.Adam(lr), factors)
            assert not fit_model.optimizer.built
        return fit_model

    return compiled, x, y


def steps_child(size: int, modes: list[str], rounds: int, steps: int) -> dict:
    out: dict = {}
    for mode in modes:
        compiled, x, y = build(size, mode)
        views = {v: compiled(v) for v in VARIANTS[1:]}
        for view in views.values():  # trace and warm up
            for _ in range(2):
                view.train_on_batch(x, y)
        times: dict[str, list[float]] = {v: [] for v in views}
        for round_ in range(rounds):
            order = list(views) if round_ % 2 == 0 else list(reversed(views))
            for name in order:
                calls = []
                for _ in range(steps):
                    start = time.perf_counter()
                    views[name].train_on_batch(x, y)
                    calls.append(time.perf_counter() - start)
                times[name].append(statistics.median(calls))
        out[mode] = {name: times[name] for name in views}
    return out


def first_call_child(size: int, variant: str) -> dict:
    compiled, x, y = build(size, "full")
    fit_model = compiled(variant)
    start = time.perf_counter()
    fit_model.train_on_batch(x, y)
    return {"first_call_s": time.perf_counter() - start}


def child_json(argv: list[str]) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, *argv], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", action="store_true", help="time the train steps")
    parser.add_argument("--first-call", action="store_true", help="time a phase's first call")
    parser.add_argument("--sizes", default="64,128,224")
    parser.add_argument("--modes", default="full,full_bn,partial")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=8, help="timed steps per round")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.child:
        kind, size, *rest = args.child.split(":")
        if kind == "steps":
            result = steps_child(int(size), args.modes.split(","), args.rounds, args.calls)
        else:
            result = first_call_child(int(size), rest[0])
        print(json.dumps(result))
        return
    if not (args.steps or args.first_call):
        parser.error("give --steps, --first-call or both")
    sys.path.insert(0, str(HERE))
    from throughput_vs_torch import cpu_flags, cpu_model

    report: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
    }
    print(f"{report['cpu_model']}, {', '.join(report['cpu_flags'])}; {report['date']}\n")
    if args.steps:
        print("| px | mode | Keras Adam, ms | FusedAdam, ms | Keras / fused (median of rounds) |")
        print("|---|---|---|---|---|")
        for size in sizes:
            argv = ["--child", f"steps:{size}", "--modes", args.modes,
                    "--rounds", str(args.rounds), "--calls", str(args.calls)]  # fmt: skip
            result = child_json(argv)
            report[f"steps_{size}"] = result
            for mode, times in result.items():
                keras_ms = 1000 * statistics.median(times["keras-adam"])
                fused_ms = 1000 * statistics.median(times["fused-adam"])
                pairs = zip(times["keras-adam"], times["fused-adam"], strict=True)
                ratios = [k / f for k, f in pairs]
                print(
                    f"| {size} | {mode} | {keras_ms:.1f} | {fused_ms:.1f} | "
                    f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}) |",
                    flush=True,
                )
    if args.first_call:
        for size in sizes:
            firsts: dict[str, list[float]] = {v: [] for v in VARIANTS}
            for round_ in range(args.rounds):
                order = VARIANTS if round_ % 2 == 0 else tuple(reversed(VARIANTS))
                for variant in order:
                    firsts[variant].append(
                        child_json(["--child", f"first:{size}:{variant}"])["first_call_s"]
                    )
            report[f"first_call_{size}"] = firsts
            print(f"\nfirst train_on_batch of a phase, {size} px, seconds (every round):")
            for variant, values in firsts.items():
                shown = ", ".join(f"{v:.2f}" for v in values)
                print(f"  {variant}: median {statistics.median(values):.2f} ({shown})", flush=True)
    out = HERE / "out" / f"train_step_overhead-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"\nJSON: {out}")


if __name__ == "__main__":
    main()
