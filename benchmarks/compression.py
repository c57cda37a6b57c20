"""Compression benchmark: float vs int8 vs pruned vs an ensemble, side by side in one run.

On the accuracy benchmark's data (Fashion-MNIST from Debian's `dataset-fashion-mnist`, 64 px by
default), `finetune` itself does everything, as a user would:

    finetune train     three runs of EfficientNet-Lite0 (seeds 0, 1, 2), the default recipe, on
                       100 training images per class with 20 per class for validation; the
                       official 10,000-image test set is every run's test split
    finetune export    seed 0's model as .keras, LiteRT float32 and LiteRT int8
    finetune prune     seed 0's run to 50% and 75% zeros per layer (the defaults: 2 epochs at
                       1e-4; and 75% with 4 epochs at 1e-3), each then exported as int8
    finetune ensemble  the three runs (mean of probabilities), exported as .keras and LiteRT
    (and ONNX float32 and int8 of seed 0's model, run by onnxruntime)

Every model is scored on the same 10,000 test images; the sizes are the files a user ships
(and their gzip size, which is what pruning shrinks); the latencies are single-image CPU calls,
all models taking turns in the same rounds (median), so machine noise hits them alike.

Targets (issue 6): int8 LiteRT at most 30% of the float LiteRT file, at most 0.5x its latency,
at most 1 point of accuracy lost; the ensemble of three more accurate than its best member.

Runs are kept in --out and reused when the script runs again (delete the folder to start over).

Usage:
    .venv/bin/python benchmarks/compression.py                 # about 30 min on 2 cores
    .venv/bin/python benchmarks/compression.py --quick         # a few minutes: smoke test
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "benchmarks"))

from accuracy import FILES, find_data, subset  # noqa: E402
from make_fashion_mnist_example import CLASS_NAMES, read_idx  # noqa: E402


def write_folder(root: Path, per_class: int, val_per_class: int, test_size: int, seed: int):
    """train/ val/ test/ class folders of 28x28 PNGs; test/ holds the official test images."""
    from PIL import Image

    if (root / "done").is_file():
        return root
    folder = find_data()
    train_x = read_idx(folder / FILES["train"][0])
    train_y = read_idx(folder / FILES["train"][1]).astype(np.int64)
    test_x = read_idx(folder / FILES["test"][0])
    test_y = read_idx(folder / FILES["test"][1]).astype(np.int64)
    picked = subset(train_y, per_class + val_per_class, seed)
    rng = np.random.default_rng(seed)
    rng.shuffle(picked)
    seen: dict[int, int] = {}
    for i in picked:
        label = int(train_y[i])
        split = "train" if seen.get(label, 0) < per_class else "val"
        seen[label] = seen.get(label, 0) + 1
        _save(Image, root / split / CLASS_NAMES[label] / f"train_{i:05d}.png", train_x[i])
    rows = np.arange(len(test_y)) if test_size <= 0 else subset(test_y, test_size // 10, seed)
    for i in rows:
        _save(Image, root / "test" / CLASS_NAMES[int(test_y[i])] / f"test_{i:05d}.png", test_x[i])
    (root / "done").write_text("")
    return root


def _save(image_module, path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image_module.fromarray(pixels, mode="L").save(path)


def gzip_size(path: Path) -> int:
    """Bytes after gzip of a file, or of a folder's files one after another."""
    path = Path(path)
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    return len(gzip.compress(b"".join(f.read_bytes() for f in files), compresslevel=6))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-class", type=int, default=100, help="training images per class")
    parser.add_argument("--val-per-class", type=int, default=20)
    parser.add_argument("--test-size", type=int, default=0, help="0: all 10,000 test images")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--head-epochs", type=int, default=6)
    parser.add_argument("--finetune-epochs", type=int, default=6)
    parser.add_argument("--prune-epochs", type=int, default=2)
    parser.add_argument("--seeds", default="0,1,2", help="one run per seed; the first is pruned")
    parser.add_argument("--latency-runs", type=int, default=200)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "compression")
    parser.add_argument("--quick", action="store_true", help="tiny settings, for a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.per_class, args.val_per_class, args.test_size = 10, 5, 200
        args.head_epochs, args.finetune_epochs, args.prune_epochs = 2, 1, 1
        args.latency_runs = 20
        args.out = args.out.with_name(args.out.name + "_quick")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import finetune
    from finetune.export import load_exported
    from finetune.export.parity import evaluation_images, median_latencies_ms, size_bytes

    seeds = [int(s) for s in args.seeds.split(",")]
    data = write_folder(
        args.out / "data", args.per_class, args.val_per_class, args.test_size, seeds[0]
    )
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def step(name: str, make, done: Path):
        """Runs `make` unless `done` exists (a finished run or export from an earlier call)."""
        if not done.exists():
            print(f"[{time.strftime('%H:%M:%S')}] {name}", flush=True)
            t = time.perf_counter()
            make()
            timings[name] = time.perf_counter() - t

    runs = []
    for seed in seeds:
        out = args.out / f"run_seed{seed}"
        step(
            f"train seed {seed}",
            lambda out=out, seed=seed: finetune.train(
                data, out=out, image_size=args.image_size, head_epochs=args.head_epochs,
                finetune_epochs=args.finetune_epochs, seed=seed, check_data=False,
                progress=False, overwrite=True,
            ),
            out / "run.json",
        )  # fmt: skip
        runs.append(out)
    base = runs[0]
    pruned = {}
    # The defaults (2 epochs at 1e-4), and 75% with the longer, faster phase it needs.
    for key, sparsity, options in [
        ("pruned50", 0.5, {}),
        ("pruned75", 0.75, {}),
        ("pruned75_e4_lr1e-3", 0.75, {"epochs": 2 * args.prune_epochs, "learning_rate": 1e-3}),
    ]:
        out = args.out / key
        options.setdefault("epochs", args.prune_epochs)
        step(
            f"prune {key}",
            lambda out=out, s=sparsity, o=options: finetune.prune(
                base, out=out, sparsity=s, progress=False, overwrite=True, **o
            ),
            out / "run.json",
        )
        pruned[key] = out
    ensemble_dir = args.out / "ensemble"
    step(
        "ensemble of three",
        lambda: finetune.ensemble(runs, method="mean", out=ensemble_dir, overwrite=True),
        ensemble_dir / "run.json",
    )

    def export(run_dir: Path, fmt: str, quantize: str = "none"):
        path = run_dir / "export" / (
            "model" + ("" if quantize == "none" else f"_{quantize}")
            + {"keras": ".keras", "litert": ".tflite", "onnx": ".onnx"}[fmt]
        )  # fmt: skip
        step(
            f"export {run_dir.name} {fmt} {quantize}",
            lambda: finetune.export_run(
                run_dir, fmt, quantize=quantize, overwrite=True, latency_runs=5
            ),
            path,
        )
        return path

    rows = [
        ("Keras float32 (.keras)", base, export(base, "keras")),
        ("LiteRT float32", base, export(base, "litert")),
        ("LiteRT int8", base, export(base, "litert", "int8")),
        ("ONNX float32 (onnxruntime)", base, export(base, "onnx")),
        ("ONNX int8 (onnxruntime)", base, export(base, "onnx", "int8")),
        ("pruned 50%, LiteRT float32", pruned["pruned50"], export(pruned["pruned50"], "litert")),
        *[
            (f"{label} + LiteRT int8", pruned[key], export(pruned[key], "litert", "int8"))
            for key, label in [
                ("pruned50", "pruned 50%"),
                ("pruned75", "pruned 75%"),
                ("pruned75_e4_lr1e-3", "pruned 75% (4 epochs at 1e-3)"),
            ]
        ],
        ("ensemble of 3, Keras (.keras)", ensemble_dir, export(ensemble_dir, "keras")),
        ("ensemble of 3, LiteRT float32", ensemble_dir, export(ensemble_dir, "litert")),
    ]
    members = [finetune.Run.load(r).metrics["accuracy"] for r in runs]

    print(f"[{time.strftime('%H:%M:%S')}] scoring and timing", flush=True)
    results = []
    models = {}
    for name, run_dir, path in rows:
        model = load_exported(path)
        run = finetune.Run.load(run_dir)
        images, labels, _ = evaluation_images(run)
        accuracy = float(np.mean(model.predict_logits(images).argmax(1) == labels))
        models[name] = model.single_image_call(images[0])
        results.append(
            {
                "model": name,
                "accuracy": accuracy,
                "test_images": len(labels),
                "size_bytes": size_bytes(path),
                "gzip_bytes": gzip_size(path),
                "runtime": model.runtime,
            }
        )
    latencies = median_latencies_ms(models, args.latency_runs)
    for r in results:
        r["latency_ms"] = latencies[r["model"]]
    reference = next(r for r in results if r["model"] == "LiteRT float32")
    int8 = next(r for r in results if r["model"] == "LiteRT int8")
    ensemble = next(r for r in results if r["model"].startswith("ensemble of 3, Keras"))
    targets = {
        "int8 size <= 30% of float LiteRT": int8["size_bytes"] / reference["size_bytes"] <= 0.30,
        "int8 latency <= 0.5x float LiteRT": int8["latency_ms"] / reference["latency_ms"] <= 0.5,
        "int8 loses <= 1 point": reference["accuracy"] - int8["accuracy"] <= 0.01,
        "ensemble beats its best member": ensemble["accuracy"] > max(members),
    }
    summary = {
        "settings": {k: str(v) for k, v in vars(args).items()},
        "members_accuracy": members,
        "results": results,
        "targets": targets,
        "step_seconds": timings,
        "total_seconds": time.perf_counter() - started,
        "load_average": os.getloadavg(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (args.out / f"results-{stamp}.json").write_text(json.dumps(summary, indent=2))
    lines = [
        "| model | test accuracy | size | gzip | size vs LiteRT float | latency ms (median) "
        "| latency vs LiteRT float |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['model']} | {100 * r['accuracy']:.2f}% | {r['size_bytes'] / 1e6:.2f} MB | "
            f"{r['gzip_bytes'] / 1e6:.2f} MB | {r['size_bytes'] / reference['size_bytes']:.2f}x | "
            f"{r['latency_ms']:.2f} | {r['latency_ms'] / reference['latency_ms']:.2f}x |"
        )
    lines.append("")
    lines.append("Ensemble members (Keras): " + ", ".join(f"{100 * a:.2f}%" for a in members))
    lines += [f"- {name}: {'met' if ok else 'NOT met'}" for name, ok in targets.items()]
    table = "\n".join(lines)
    (args.out / f"summary-{stamp}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
