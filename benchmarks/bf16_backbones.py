"""Does `auto`'s bfloat16 pay on every backbone? A phase-2 step per registered backbone, side
by side: the float32 view `fit_phases` trains with `FINETUNE_RUNTIME=keras` against the view it
trains with under `auto` on a CPU with bfloat16 (`frozen_view(..., bfloat16=True,
train=True)`: the frozen part and the folded pairs that train in bfloat16 where the first-batch
check lets them).

For each backbone, size and phase (`--groups`: -1 the whole backbone, BatchNorm frozen, as the
default phase 2; 3 the top three layer groups), both views train on the same batch of 32
bundled Fashion-MNIST images with Adam; after warm-up steps, `--rounds` rounds alternate two
steps of each, and the medians are compared. Random weights (the Keras Applications' ImageNet
weights are not on this machine); speed does not depend on them. The figures quoted in
benchmarks/RESULTS.md come from this script.

Usage:
    .venv/bin/python benchmarks/bf16_backbones.py [--backbones efficientnet_lite0,resnet50]
        [--sizes 64,128,224] [--groups -1,3] [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from finetune import build_classifier, get_backbone  # noqa: E402
from finetune.config import RecipeConfig  # noqa: E402
from finetune.data.decode import decode_images  # noqa: E402
from finetune.data.scan import scan_image_folder  # noqa: E402
from finetune.fold import bfloat16_parts, describe_bfloat16  # noqa: E402
from finetune.inference import cpu_has_bfloat16  # noqa: E402
from finetune.model import unfreeze_top_groups  # noqa: E402
from finetune.recipes.optimizers import make_optimizer  # noqa: E402
from finetune.recipes.two_phase import compile_phase, frozen_view  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "fashion_mnist"
BATCH = 32


def batch(size: int) -> tuple[np.ndarray, np.ndarray]:
    folder = scan_image_folder(DATA)
    samples = [s for split in folder.samples.values() for s in split][::50][:BATCH]
    images, ok, _ = decode_images([s.path for s in samples], size, progress=False)
    labels = np.eye(len(folder.class_names), dtype="float32")[[samples[i].label for i in ok]]
    return images.astype("float32"), labels


def measure(name: str, size: int, groups: int, rounds: int) -> dict:
    spec = get_backbone(name)
    x, y = batch(size)
    keras.utils.set_random_seed(0)
    model = build_classifier(spec, y.shape[1], image_size=size, weights=None)
    unfreeze_top_groups(model, spec, groups)
    recipe = RecipeConfig()
    views = {
        "float32": frozen_view(model, x, bfloat16=False, train=True)[0],
        "auto": frozen_view(model, x, bfloat16=True, train=True)[0],
    }
    for view in views.values():
        compile_phase(view, recipe, make_optimizer(recipe, 1e-5))
        for _ in range(3):  # the first call traces
            view.train_on_batch(x, y)
    times: dict[str, list[float]] = {k: [] for k in views}
    for _ in range(rounds):
        for key, view in views.items():
            start = time.perf_counter()
            for _ in range(2):
                view.train_on_batch(x, y)
            times[key].append((time.perf_counter() - start) / 2)
    f32, auto = (statistics.median(times[k]) for k in ("float32", "auto"))
    frozen, training = bfloat16_parts(views["auto"])
    return {
        "backbone": name,
        "size": size,
        "groups": groups,
        "float32_ms": 1000 * f32,
        "auto_ms": 1000 * auto,
        "speedup": f32 / auto,
        "auto_in_bfloat16": describe_bfloat16(frozen, training) if frozen or training else "no",
        "times_ms": {k: [round(1000 * t, 1) for t in v] for k, v in times.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    names = "efficientnet_lite0,mobilenet_v2,mobilenet_v3_small,efficientnet_b0,resnet50"
    parser.add_argument("--backbones", default=names, help="comma-separated registry names")
    parser.add_argument("--sizes", default="64,128,224", help="input sizes, px")
    parser.add_argument("--groups", default="-1,3", help="layer groups that train (-1: all)")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds of 2 steps")
    args = parser.parse_args()
    if not cpu_has_bfloat16():
        raise SystemExit("This CPU has no bfloat16: `auto` trains in float32 here.")
    rows = []
    for name in args.backbones.split(","):
        for size in map(int, args.sizes.split(",")):
            for groups in map(int, args.groups.split(",")):
                row = measure(name, size, groups, args.rounds)
                rows.append(row)
                print(
                    f"{name:20s} {size:4d} px  groups {groups:3d}  float32 "
                    f"{row['float32_ms']:8.1f} ms  auto {row['auto_ms']:8.1f} ms  "
                    f"{row['speedup']:5.2f}x  ({row['auto_in_bfloat16']})",
                    flush=True,
                )
    out = ROOT / "benchmarks" / "out"
    out.mkdir(exist_ok=True)
    path = out / f"bf16_backbones-{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    print("\n| backbone | px | groups | float32 ms | auto ms | auto / float32 speed |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['backbone']} | {r['size']} | {r['groups']} | {r['float32_ms']:.1f} | "
            f"{r['auto_ms']:.1f} | **{r['speedup']:.2f}** |"
        )
    print(f"\n{path}")


if __name__ == "__main__":
    main()
