"""Training throughput of the default backbone under each Keras backend, and of the data pipeline.

Part 1: one child process per backend (KERAS_BACKEND=<backend>, run one after the other) builds
EfficientNet-Lite0 (random weights: speed does not depend on them) + GlobalAveragePooling +
Dense(10), compiles it (Adam, cross-entropy from logits, the backend's default jit_compile as in
`finetune.train`) and times `train_on_batch` on a fixed random batch: first call (trace/compile)
apart, warm-up, then the median of the timed steps; likewise `predict_on_batch` and head-only
training (backbone frozen, recompiled).
Part 2: writes 10,000 PNGs (the bundled Fashion-MNIST sample replicated with flips; not timed),
times `prepare_image_data` once (cold), one pass of the augmented training `image_dataset` with no
model, and `model.fit` fed by it, against the TensorFlow figures of part 1.

Usage: .venv/bin/python benchmarks/throughput.py [--help]; prints markdown tables and writes
benchmarks/out/throughput-<time>.json.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
SAMPLE = HERE.parent / "examples" / "data" / "fashion_mnist"
BACKBONE, NUM_CLASSES, BATCH = "efficientnet_lite0", 10, 32
BACKEND_MODULES = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}


def import_lite():
    """Imports the backbone module without finetune/__init__.py, which imports TensorFlow."""
    if "finetune" not in sys.modules:
        root = Path(importlib.util.find_spec("finetune").submodule_search_locations[0])
        for name, path in (("finetune", root), ("finetune.backbones", root / "backbones")):
            package = types.ModuleType(name)
            package.__path__ = [str(path)]
            sys.modules[name] = package
    return importlib.import_module("finetune.backbones.efficientnet_lite")


def build_model(size: int, num_classes: int = NUM_CLASSES):
    """EfficientNet-Lite0 features + GlobalAveragePooling + Dense(10), compiled; + backbone."""
    import keras

    backbone = import_lite().build_efficientnet_lite(BACKBONE, size, include_top=False)
    features = keras.layers.GlobalAveragePooling2D()(backbone.output)
    model = keras.Model(backbone.input, keras.layers.Dense(num_classes)(features))
    compile_model(model)
    return model, backbone


def compile_model(model) -> None:
    import keras

    jit = {"on": True, "off": False}.get(os.environ.get("BENCH_JIT_COMPILE", "auto"), "auto")
    loss = keras.losses.CategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss, jit_compile=jit)


def time_calls(call, warmup: int, steps: int) -> dict:
    """Times the first call apart (tracing/compiling), runs warm-up calls, then `steps` calls."""
    times = []
    for _ in range(max(1, warmup) + steps):
        start = time.perf_counter()
        call()  # returns NumPy values, so the step has finished when it returns
        times.append(time.perf_counter() - start)
    first, times = times[0], times[max(1, warmup) :]
    median = statistics.median(times)
    return {"first_call_s": first, "median_step_s": median, "images_per_s": BATCH / median,
            "steps": steps, "step_times_s": times}  # fmt: skip


def child(args: argparse.Namespace) -> None:
    """Runs in a child process under one backend; prints its results as one JSON line."""
    import keras
    import numpy as np

    backend = keras.backend.backend()
    steps = args.jax_steps if backend == "jax" else args.steps
    rng = np.random.default_rng(0)
    out = {"backend": backend, "status": "ok", "sizes": {}}
    if backend == "torch":
        import torch

        out["torch_threads"] = torch.get_num_threads()
    keras.utils.set_random_seed(0)
    for size in args.sizes:
        x = rng.normal(size=(BATCH, size, size, 3)).astype("float32")
        y = np.eye(NUM_CLASSES, dtype="float32")[rng.integers(0, NUM_CLASSES, BATCH)]
        model, backbone = build_model(size)
        row = {"jit_compile": bool(model.jit_compile)}
        row["train"] = time_calls(lambda: model.train_on_batch(x, y), args.warmup, steps)  # noqa: B023
        row["infer"] = time_calls(lambda: model.predict_on_batch(x), args.warmup, steps)  # noqa: B023
        backbone.trainable = False
        compile_model(model)
        row["head"] = time_calls(lambda: model.train_on_batch(x, y), args.warmup, steps)  # noqa: B023
        out["sizes"][str(size)] = row
        print(f"[{backend}] {size}px done", file=sys.stderr, flush=True)
    print("RESULT " + json.dumps(out))


def run_backend(backend: str, args: argparse.Namespace) -> dict:
    if importlib.util.find_spec(BACKEND_MODULES.get(backend, backend)) is None:
        return {"backend": backend, "status": "not installed"}
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2",
               BENCH_JIT_COMPILE=args.jit_compile)  # fmt: skip
    cmd = [sys.executable, __file__, "--child", "--sizes", ",".join(map(str, args.sizes)),
           "--steps", str(args.steps), "--jax-steps", str(args.jax_steps),
           "--warmup", str(args.warmup)]  # fmt: skip
    print(f"--- {backend}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)  # stderr: shown
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"backend": backend, "status": f"failed (exit {proc.returncode})"}
    result = json.loads(lines[-1][len("RESULT ") :])
    result["wall_s"] = time.perf_counter() - start
    return result


def make_folder(root: Path, count: int) -> None:
    """Writes `count` PNGs into class folders by replicating the bundled sample with flips."""
    from PIL import Image

    by_class = [sorted(d.glob("*.png")) for d in sorted(SAMPLE.iterdir()) if d.is_dir()]
    sources = [p for paths in zip(*by_class, strict=False) for p in paths]  # classes mixed
    flips = [None, Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM,
             Image.Transpose.ROTATE_180]  # fmt: skip
    for i in range(count):
        source, copy = sources[i % len(sources)], i // len(sources)
        image = Image.open(source)
        if flips[copy % len(flips)] is not None:
            image = image.transpose(flips[copy % len(flips)])
        (root / source.parent.name).mkdir(exist_ok=True)
        image.save(root / source.parent.name / f"{copy:03d}_{source.stem}.png")


def pipeline_bench(args: argparse.Namespace) -> dict:
    os.environ["KERAS_BACKEND"] = "tensorflow"
    from finetune.config import AugmentConfig
    from finetune.data.augment import build_augmentation
    from finetune.data.pipeline import image_dataset, prepare_image_data

    out: dict = {"files": args.files, "image_size": args.pipeline_size}
    root = Path(tempfile.mkdtemp(prefix="finetune-bench-"))
    try:
        make_folder(root, args.files)
        start = time.perf_counter()
        data = prepare_image_data(root, image_size=args.pipeline_size, progress=False)
        out["prepare_s"] = time.perf_counter() - start
    finally:
        shutil.rmtree(root)
    out["counts"] = data.counts()
    images, labels = data.images["train"], data.labels["train"]

    def dataset():
        return image_dataset(images, labels, data.num_classes, batch_size=BATCH, training=True,
                             augmentation=build_augmentation(AugmentConfig()))  # fmt: skip

    start = time.perf_counter()
    batches = iter(dataset())
    out["build_dataset_s"] = time.perf_counter() - start
    start = time.perf_counter()
    next(batches)  # the first batch waits for the shuffle buffer: the whole split, every epoch
    out["first_batch_s"] = time.perf_counter() - start
    seen = sum(int(x.shape[0]) for x, _ in batches)
    out["pass_s"] = time.perf_counter() - start
    out["pipeline_images_per_s"] = (seen + BATCH) / out["pass_s"]
    out["steady_images_per_s"] = seen / (out["pass_s"] - out["first_batch_s"])
    if args.fed_steps:  # model.fit fed by the pipeline; steps timed after the warm-up steps
        import keras
        import numpy as np

        ends: list[float] = []
        stamp = keras.callbacks.LambdaCallback(
            on_train_batch_end=lambda *_, **__: ends.append(time.perf_counter())
        )
        model, backbone = build_model(args.pipeline_size, data.num_classes)
        for kind in ("train", "head"):
            if kind == "head":
                backbone.trainable = False
                compile_model(model)
            ends.clear()
            model.fit(dataset().take(args.warmup + args.fed_steps), verbose=0, shuffle=False,
                      callbacks=[stamp])  # fmt: skip
            step = float(np.median(np.diff(ends)[args.warmup - 1 :]))
            out[f"fed_{kind}_images_per_s"] = BATCH / step
    return out


def ratios(report: dict) -> dict:
    """Pipeline against TensorFlow training at the pipeline's image size."""
    pipe = report.get("pipeline")
    tf_run = next((r for r in report["backends"] if r["backend"] == "tensorflow"), {})
    row = tf_run.get("sizes", {}).get(str(pipe["image_size"])) if pipe else None
    if not row:
        return {}
    n = pipe["counts"]["train"]
    out = {}
    for kind in ("train", "head"):
        speed = row[kind]["images_per_s"]
        out[f"epoch_s_{kind}"] = n / speed
        out[f"prepare_over_epoch_{kind}"] = pipe["prepare_s"] / (n / speed)
        out[f"pipeline_over_{kind}_speed"] = pipe["pipeline_images_per_s"] / speed
        if f"fed_{kind}_images_per_s" in pipe:
            out[f"fed_over_fixed_{kind}"] = pipe[f"fed_{kind}_images_per_s"] / speed
    return out


def markdown(report: dict) -> str:
    lines = ["| backend | px | jit (XLA) | train img/s | head-only img/s | infer img/s "
             "| first train call s | timed steps |", "|---" * 8 + "|"]  # fmt: skip
    for run in report["backends"]:
        if run["status"] != "ok":
            lines.append(f"| {run['backend']} | | {run['status']} | | | | | |")
            continue
        for size, r in run["sizes"].items():
            cells = [run["backend"], size, "yes" if r["jit_compile"] else "no",
                     *(f"{r[k]['images_per_s']:.1f}" for k in ("train", "head", "infer")),
                     f"{r['train']['first_call_s']:.1f}", str(r["train"]["steps"])]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    if report.get("pipeline"):
        lines += ["", "| pipeline | value |", "|---|---|"]
        lines += [f"| {k} | {v:.3g} |" if isinstance(v, float) else f"| {k} | {v} |"
                  for k, v in {**report["pipeline"], **report["ratios"]}.items()]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sizes = lambda text: [int(s) for s in text.split(",") if s]  # noqa: E731
    parser.add_argument("--backends", default="tensorflow,jax,torch")
    parser.add_argument("--sizes", type=sizes, default=[96, 128], help="input sizes, px")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--jax-steps", type=int, default=3, help="timed steps under jax (slow)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls, the first included")
    parser.add_argument("--files", type=int, default=10_000, help="images in the pipeline test")
    parser.add_argument("--pipeline-size", type=int, default=96)
    parser.add_argument("--fed-steps", type=int, default=10, help="fit steps fed by the pipeline")
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--jit-compile", choices=("auto", "on", "off"), default="auto",
                        help="compile(jit_compile=...) in the backend runs")  # fmt: skip
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    start = time.perf_counter()
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
              "date": datetime.now().astimezone().isoformat(timespec="seconds"),
              "batch": BATCH, "backbone": BACKBONE, "cpus": os.cpu_count(),
              "versions": {p: importlib.metadata.version(p) if importlib.util.find_spec(m) else None
                           for p, m in (("keras", "keras"), ("tensorflow-cpu", "tensorflow"),
                                        ("jax", "jax"), ("torch", "torch"))}}  # fmt: skip
    report["backends"] = [run_backend(b, args) for b in args.backends.split(",") if b]
    if not args.skip_pipeline:
        print("--- pipeline", file=sys.stderr, flush=True)
        report["pipeline"] = pipeline_bench(args)
    report["ratios"] = ratios(report)
    report["total_s"] = time.perf_counter() - start
    out_dir = HERE / "out"
    out_dir.mkdir(exist_ok=True)
    path = out_dir / f"throughput-{datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(report, indent=2))
    print(markdown(report))
    print(f"\ntotal {report['total_s']:.0f} s; JSON: {path}")


if __name__ == "__main__":
    main()
