"""Accuracy benchmark: fine-tuning recipes compared on Fashion-MNIST, same backbone and budget.

Every recipe fine-tunes the same pretrained EfficientNet-Lite0 (or, for "scratch", the same
network from random weights) on the same training subset, for the same number of epochs, at
64x64 px, and is scored on the full 10,000-image Fashion-MNIST test set:

    scratch       the same network from random initialisation (Adam 1e-3, everything trains)
    linear_probe  frozen backbone, only the new head trains
    seed_docs     the seed documents' recipe: everything trainable from the start, Adam 1e-3
    keras_guide   the Keras transfer-learning guide: head on the frozen base (1e-3), then
                  everything unfrozen at 1e-5, BatchNorm in inference mode
    fastai        fastai's `fine_tune`: 1 frozen epoch of one-cycle at 2e-3, then everything
                  unfrozen, one-cycle with discriminative rates slice(1e-5, 1e-3), BatchNorm
                  trainable, AdamW with weight decay 0.01
    default       `finetune train`'s defaults
    auto          `finetune train --recipe auto`

Training sets: 10 and 100 images per class drawn from the 60,000 training images (one draw
per seed), and the full training set. There is no validation split: a user with 10 images per
class has none to spare, so every recipe runs its full epoch budget. All recipes use the same
("light") augmentation where they augment; see each recipe below for what differs.

The data comes from Debian's `dataset-fashion-mnist` package (installed with apt-get if
missing and allowed). Results are appended to a JSON-lines file as each run finishes, so an
interrupted benchmark continues where it stopped when run again with the same --out.

Usage:
    .venv/bin/python benchmarks/accuracy.py                        # 10 and 100 per class, seeds 0-2
    .venv/bin/python benchmarks/accuracy.py --sizes full --seeds 0  # the full training set
    .venv/bin/python benchmarks/accuracy.py --summary-only          # print the table again
    .venv/bin/python benchmarks/accuracy.py --score-runtimes keras,openvino-bf16
        # also score every trained model in these inference runtimes (accuracy_<runtime>,
        # agreement_<runtime>: the share of predicted classes equal to Keras')
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from make_fashion_mnist_example import CLASS_NAMES, SEARCH_DIRS, read_idx  # noqa: E402

FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
RECIPES = (
    "scratch",
    "linear_probe",
    "seed_docs",
    "keras_guide",
    "fastai",
    "default",
    "auto",
)
# Run only when named in --recipes: the head alone on augmented images (--head-augment), the
# phase whose features "auto" streams from OpenVINO (bfloat16 on a CPU with it); and the
# default with only the top 3 layer groups unfrozen in phase 2 (`--unfreeze-groups 3`), whose
# augmented phase 2 "auto" may train on the frozen groups' output streamed from bfloat16
# OpenVINO.
EXTRA_RECIPES = ("linear_probe_augmented", "partial")
# Epoch budget per training-set size: about 150 steps at 10 per class, 400 at 100 per class,
# 3,750 (two epochs: one per phase for the two-phase recipes) on the full training set.
EPOCHS = {"10": 40, "100": 12, "full": 2}


def _installed() -> Path | None:
    for folder in SEARCH_DIRS:
        if all((folder / f).is_file() for pair in FILES.values() for f in pair):
            return folder
    return None


def find_data() -> Path:
    """The folder holding Fashion-MNIST's IDX files; installs Debian's package if missing."""
    folder = _installed()
    apt = shutil.which("apt-get")
    if folder is None and apt:
        command = [apt, "install", "-y", "dataset-fashion-mnist"]
        if os.geteuid() != 0 and shutil.which("sudo"):
            command = ["sudo", "-n", *command]
        print("Fashion-MNIST not found; running:", " ".join(command), flush=True)
        subprocess.run(command, check=False)
        folder = _installed()
    if folder is None:
        sys.exit(
            "error: Fashion-MNIST IDX files not found in "
            + ", ".join(map(str, SEARCH_DIRS))
            + ".\nInstall them with: apt-get install dataset-fashion-mnist"
        )
    return folder


def load_split(folder: Path, split: str, size: int, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images of one official split as uint8 RGB at `size`, resized as `finetune` resizes."""
    cached = cache / f"fashion_mnist_{split}_{size}.npz"
    if cached.is_file():
        with np.load(cached) as f:
            return f["images"], f["labels"]
    from PIL import Image

    images_file, labels_file = FILES[split]
    gray = read_idx(folder / images_file)
    labels = read_idx(folder / labels_file).astype(np.int64)
    out = np.empty((len(gray), size, size, 3), np.uint8)
    for i, g in enumerate(gray):
        rgb = Image.fromarray(g, mode="L").convert("RGB")
        out[i] = np.asarray(rgb.resize((size, size), Image.Resampling.BILINEAR))
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(cached, images=out, labels=labels)
    return out, labels


def subset(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Indices of `per_class` images of each class, drawn with `seed`."""
    rng = np.random.default_rng(seed)
    picks = [
        rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
        for c in range(len(CLASS_NAMES))
    ]
    return np.sort(np.concatenate(picks))


def recipe_config(name: str, epochs: int, seed: int, image_size: int, labels: np.ndarray):
    """The `finetune` config of one recipe with an epoch budget of `epochs`."""
    from finetune.config import Config, DataConfig, RecipeConfig
    from finetune.train import scratch_config

    half = max(1, epochs // 2)
    base = Config(
        data=DataConfig(image_size=image_size, val_fraction=0.0, test_fraction=0.0),
        seed=seed,
    )
    default = dataclasses.replace(
        base.recipe, head_epochs=half, finetune_epochs=epochs - half, early_stopping_patience=0
    )
    # The reference recipes pin every setting they depend on, so that changing finetune's
    # defaults never changes them.
    constant = {"schedule": "constant", "warmup_epochs": 0.0, "discriminative_lr": 1.0}
    recipes = {
        "scratch": lambda: dataclasses.replace(
            scratch_config(dataclasses.replace(base, recipe=default)).recipe, **constant
        ),
        "linear_probe": lambda: RecipeConfig(
            head_epochs=epochs, finetune_epochs=0, head_lr=1e-3, **constant
        ),
        "linear_probe_augmented": lambda: RecipeConfig(
            head_epochs=epochs, finetune_epochs=0, head_lr=1e-3, head_augment=True, **constant
        ),
        "seed_docs": lambda: RecipeConfig(
            head_epochs=0, finetune_epochs=epochs, finetune_lr=1e-3,
            unfreeze_groups=-1, train_batchnorm=True, optimizer="adam", **constant,
        ),
        "keras_guide": lambda: RecipeConfig(
            head_epochs=half, head_lr=1e-3, head_augment=True,
            finetune_epochs=epochs - half, finetune_lr=1e-5, unfreeze_groups=-1,
            optimizer="adam", **constant,
        ),
        "fastai": lambda: RecipeConfig(
            head_epochs=1, head_lr=2e-3, head_augment=True,
            finetune_epochs=epochs - 1, finetune_lr=1e-3, discriminative_lr=0.01,
            unfreeze_groups=-1, train_batchnorm=True, schedule="one_cycle",
            optimizer="adamw", weight_decay=0.01,
        ),
        "default": lambda: default,
        "partial": lambda: dataclasses.replace(default, unfreeze_groups=3),
    }  # fmt: skip
    if name == "auto":
        from finetune.backbones.registry import get_backbone
        from finetune.recipes.auto import auto_recipe

        config, _ = auto_recipe(
            base, labels, len(CLASS_NAMES), get_backbone(base.model.backbone), epochs=epochs
        )
        return config
    recipe = dataclasses.replace(recipes[name](), early_stopping_patience=0)
    model = base.model
    if name == "scratch":
        model = dataclasses.replace(model, weights="none")
    return dataclasses.replace(base, recipe=recipe, model=model)


def run_one(
    name,
    size_name,
    seed,
    images,
    labels,
    test,
    image_size,
    config=None,
    epochs=None,
    runtimes=(),
) -> dict:
    """Trains one recipe (or the given `config`) and scores it on the test set in Keras, and
    again in each of `runtimes` ("accuracy_<runtime>", and "agreement_<runtime>": the share
    of predicted classes equal to Keras')."""
    epochs = epochs or EPOCHS[size_name]
    from sklearn.metrics import accuracy_score, f1_score

    from finetune.data.pipeline import PreparedData
    from finetune.train import fit_run

    empty = np.zeros((0, image_size, image_size, 3), np.uint8)
    none = np.zeros((0,), np.int64)
    data = PreparedData(
        root=Path("fashion_mnist"),
        class_names=[str(c) for c in range(int(max(labels.max(), test[1].max())) + 1)],
        image_size=image_size,
        splits={"train": [], "val": [], "test": []},
        images={"train": images, "val": empty, "test": empty},
        labels={"train": labels, "val": none, "test": none},
        seed=seed,
    )
    if config is None:
        config = recipe_config(name, epochs, seed, image_size, labels)
    start = time.perf_counter()
    run = fit_run(data, config, None, progress=False)
    train_seconds = time.perf_counter() - start
    # Scored in Keras (float32) whatever "auto" would pick on this CPU, so that figures stay
    # comparable across machines and commits; --score-runtimes adds the others.
    predicted = run.predict_proba(test[0], progress=False, runtime="keras").argmax(axis=1)
    scored = {}
    for runtime in runtimes:
        other = run.predict_proba(test[0], progress=False, runtime=runtime).argmax(axis=1)
        scored[f"accuracy_{runtime}"] = float(accuracy_score(test[1], other))
        scored[f"agreement_{runtime}"] = float(np.mean(other == predicted))
    return {
        "recipe": name,
        "size": size_name,
        "seed": seed,
        "train_images": len(labels),
        "epochs": epochs,
        "image_size": image_size,
        "accuracy": float(accuracy_score(test[1], predicted)),
        "macro_f1": float(f1_score(test[1], predicted, average="macro")),
        "train_seconds": train_seconds,
        "epochs_run": len(run.history),
        # Which runtime computed the features a phase trained on, where it had any.
        "features_runtime": sorted(
            {r["features_runtime"] for r in run.history if r.get("features_runtime")}
        ),
        # The phases that took them from a converted model batch by batch (augmented).
        "features_streamed": sorted(
            {r["phase"] for r in run.history if r.get("features_streamed")}
        ),
        # The phases that trained through frozen layers Keras computed in bfloat16.
        "frozen_bfloat16": sorted({r["phase"] for r in run.history if r.get("frozen_bfloat16")}),
        "trained_bfloat16": sorted({r["phase"] for r in run.history if r.get("trained_bfloat16")}),
        "config": config.to_dict()["recipe"],
        **scored,
    }


def summary(results: list[dict]) -> str:
    """Markdown table: mean and spread of accuracy and macro-F1, median wall time."""
    lines = [
        "| train set | recipe | runs | test accuracy % (mean ± sd) | macro-F1 % | "
        "train time s (median) |",
        "|---|---|---|---|---|---|",
    ]
    sizes = [s for s in ("10", "100", "full") if any(r["size"] == s for r in results)]
    for size in sizes:
        for name in RECIPES + EXTRA_RECIPES:
            rows = [r for r in results if r["size"] == size and r["recipe"] == name]
            if not rows:
                continue
            acc = 100 * np.array([r["accuracy"] for r in rows])
            f1 = 100 * np.array([r["macro_f1"] for r in rows])
            secs = np.median([r["train_seconds"] for r in rows])
            label = "full (60,000)" if size == "full" else f"{size} per class"
            lines.append(
                f"| {label} | {name} | {len(rows)} | {acc.mean():.1f} ± {acc.std():.1f} | "
                f"{f1.mean():.1f} ± {f1.std():.1f} | {secs:.0f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10,100", help="10, 100 and/or full")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "accuracy")
    parser.add_argument("--summary-only", action="store_true")
    parser.add_argument(
        "--score-runtimes",
        default="",
        help="also score each trained model with these inference runtimes (e.g. "
        "keras,openvino-bf16): accuracy_<runtime> and agreement_<runtime> in results.jsonl",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "results.jsonl"
    results = (
        [json.loads(line) for line in results_file.read_text().splitlines() if line.strip()]
        if results_file.is_file()
        else []
    )
    if not args.summary_only:
        import finetune.recipes.auto  # noqa: F401  (loaded now: later edits cannot mix in)
        from finetune.inference import requested_runtime

        # Checked (a typo stops it before any training) and parsed once.
        score_runtimes = [requested_runtime(r) for r in args.score_runtimes.split(",") if r]
        folder = find_data()
        train = load_split(folder, "train", args.image_size, args.out / "cache")
        test = load_split(folder, "test", args.image_size, args.out / "cache")
        done = {
            (r["recipe"], r["size"], r["seed"], r["epochs"], r.get("image_size")) for r in results
        }
        for size in args.sizes.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                if size == "full":
                    rows = np.arange(len(train[1]))
                else:
                    rows = subset(train[1], int(size), seed)
                for name in args.recipes.split(","):
                    if (name, size, seed, EPOCHS[size], args.image_size) in done:
                        continue
                    print(f"[{time.strftime('%H:%M:%S')}] {name}, {size}, seed {seed}", flush=True)
                    result = run_one(
                        name, size, seed, train[0][rows], train[1][rows], test, args.image_size,
                        runtimes=score_runtimes,
                    )  # fmt: skip
                    print(
                        f"    accuracy {100 * result['accuracy']:.1f}%  macro-F1 "
                        f"{100 * result['macro_f1']:.1f}%  train {result['train_seconds']:.0f}s",
                        *(f" {k} {100 * v:.2f}" for k, v in result.items()
                          if k.startswith(("accuracy_", "agreement_"))),
                        flush=True,
                    )  # fmt: skip
                    results.append(result)
                    with results_file.open("a") as f:
                        f.write(json.dumps(result) + "\n")
    table = summary(results)
    (args.out / "summary.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
