"""Batch inference of one classifier in seven runtimes, side by side (issue 7's inference lever).

EfficientNet-Lite0 classifier from `build_classifier` (random weights, BatchNorm set as trained:
`trained_like.py`; 10 classes), a batch of 32 random images as float32 pixels in [0, 255], in
one process: the Keras model as it was (`predict_on_batch`), the folded models `Run` predicts
with (`fold_batchnorm(model, frozen_only=False)` below 256 images, with `snapshot=True` from
there on), the same model exported to ONNX (Keras' exporter, tf2onnx) and run by ONNX Runtime
(CPU, 2 intra-op threads), converted to LiteRT (TFLiteConverter, float32) and run by its
interpreter (XNNPACK, 2 threads), and converted by `finetune.inference.OpenVinoForward` and run
by OpenVINO in float32 and in bfloat16. Per round, each runtime runs 2 warm-up calls, then
`--steps` timed calls; the table gives images/s of the median call, per round, rounds taking
turns. The largest difference of each runtime's logits from the Keras model's is printed too,
and how long each conversion took.

With `--end-to-end 500,2000,5000`, whole `Run.predict_logits` calls instead, cold (a fresh
`Run` each time, as a new `finetune predict` or `evaluate` process), with `runtime="keras"` and
each of `--runtimes` (default: openvino, openvino-bf16, onnxruntime), converting (conversion
and first-batch check included: where `--runtime auto` should switch) and with the conversion
cached (a private cache folder).

With `--repeated 1,8,32`, repeated `Run.predict_logits` calls on one `Run` in one process
(a notebook, a service), Keras against each of `--runtimes`, the run holding its converted
model (made before the timed calls; each call checks a CRC of the weights, `WeightsWatch`).

With `--spin N`, whole `Run.predict_view_logits` calls on N images in ONNX Runtime (conversion
kept), with 1 and 3 test-time augmentation views, its worker threads spinning between batches
(what `predict` and `evaluate` do) or sleeping (what the cache fill and a streamed phase do),
taking turns.

Usage: .venv/bin/python benchmarks/inference_runtimes.py [--sizes 64,128,224] [--steps 8]
    [--rounds 2] [--end-to-end 1000,4000 [--runtimes openvino,openvino-bf16]] [--spin 5000]
    [--repeated 1,8,32 [--runtimes openvino-bf16]]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trained_like import set_trained_like_batchnorm  # noqa: E402

BATCH = 32


def images_per_s(call, steps: int) -> float:
    call()
    call()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return BATCH / statistics.median(times)


def lite0_classifier(size: int):
    """The EfficientNet-Lite0 classifier every mode measures: 10 classes, random weights
    (seed 0), BatchNorm statistics set as trained (`trained_like.py`)."""
    import keras

    from finetune.backbones.registry import get_backbone
    from finetune.model import build_classifier

    keras.utils.set_random_seed(0)
    model = build_classifier(get_backbone("efficientnet_lite0"), 10, image_size=size, weights=None)
    set_trained_like_batchnorm(model)
    return model


def measure(size: int, steps: int, rounds: int) -> list[str]:
    import keras
    import numpy as np
    import onnxruntime as ort
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    from finetune.fold import fold_batchnorm
    from finetune.inference import OpenVinoForward

    model = lite0_classifier(size)
    folded = fold_batchnorm(model, frozen_only=False)
    snapshot = fold_batchnorm(model, frozen_only=False, snapshot=True)
    x = np.random.default_rng(0).uniform(0, 255, (BATCH, size, size, 3)).astype(np.float32)
    folder = Path(tempfile.mkdtemp(prefix="inference-runtimes-"))
    spec = keras.InputSpec(shape=(None, size, size, 3), dtype="float32")
    start = time.perf_counter()
    model.export(str(folder / "m.onnx"), format="onnx", verbose=False, input_signature=[spec])
    onnx_s = time.perf_counter() - start
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(folder / "m.onnx"), options, ["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    start = time.perf_counter()
    (folder / "m.tflite").write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    litert_s = time.perf_counter() - start
    start = time.perf_counter()
    openvino = OpenVinoForward(model)
    openvino_s = time.perf_counter() - start
    openvino_bf16 = OpenVinoForward(model, bfloat16=True)
    interpreter = Interpreter(model_path=str(folder / "m.tflite"), num_threads=2)
    index = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(index, [BATCH, size, size, 3])
    interpreter.allocate_tensors()

    def litert():
        interpreter.set_tensor(index, x)
        interpreter.invoke()
        return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])

    calls = {
        "keras": lambda: model.predict_on_batch(x),
        "keras folded": lambda: folded.predict_on_batch(x),
        "keras snapshot": lambda: snapshot.predict_on_batch(x),
        "onnxruntime": lambda: session.run(None, {name: x})[0],
        "litert": litert,
        "openvino": lambda: openvino(x),
        "openvino bf16": lambda: openvino_bf16(x),
    }
    reference = model.predict_on_batch(x)
    diffs = {k: float(np.abs(np.asarray(f()) - reference).max()) for k, f in calls.items()}
    rows = []
    for r in range(rounds):
        speed = {k: images_per_s(f, steps) for k, f in calls.items()}
        cells = " | ".join(f"{speed[k]:.1f}" for k in calls)
        ratios = " | ".join(
            f"{speed[k] / speed['keras snapshot']:.2f}"
            for k in ("onnxruntime", "openvino", "openvino bf16")
        )
        rows.append(f"| {size} | {r + 1} | {cells} | {ratios} |")
    rows.append(
        f"| {size} | max logit diff | " + " | ".join(f"{diffs[k]:.1e}" for k in calls) + " | | | |"
    )
    rows.append(
        f"| {size} | conversion, s | | | | {onnx_s:.1f} | {litert_s:.1f} | {openvino_s:.1f} "
        "| | | | |"
    )
    return rows


def end_to_end(size: int, counts: list[int], rounds: int, runtimes: list[str]) -> list[str]:
    """`Run.predict_logits` on N images, cold, in Keras and in each of `runtimes`.

    Each call gets a fresh `Run` of the same model (as a new `finetune predict` or `evaluate`
    process would): the Keras side includes folding and tracing; "R, converting" includes the
    conversion and the check on the first batch (the conversion cache emptied first); "R,
    cached" loads the conversion the previous call kept. Runtimes take turns; seconds per
    call, median over rounds.
    """
    import shutil

    import numpy as np

    from finetune.cache import cache_dir
    from finetune.config import Config
    from finetune.run import Run

    model = lite0_classifier(size)
    rows = []
    calls = {"keras": "keras"}
    for runtime in runtimes:
        calls |= {f"{runtime}, converting": runtime, f"{runtime}, cached": runtime}
    for n in counts:
        x = np.random.default_rng(n).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        seconds: dict[str, list[float]] = {k: [] for k in calls}
        outputs = {}
        for _ in range(rounds):
            for label, runtime in calls.items():
                if label.endswith("converting"):
                    for folder in ("onnx", "openvino"):
                        shutil.rmtree(cache_dir(folder))
                run = Run(model=model, config=Config(), class_names=list("abcdefghij"),
                          image_size=size)  # fmt: skip
                start = time.perf_counter()
                outputs[label] = run.predict_logits(x, runtime=runtime)
                seconds[label].append(time.perf_counter() - start)
                # bfloat16 asked for may compute in float32 (a CPU without it, or its check).
                fell = runtime == "openvino-bf16" and run.last_runtime == "openvino"
                assert run.last_runtime == runtime or fell, run.last_runtime
        median = {label: statistics.median(seconds[label]) for label in calls}
        k = median["keras"]
        cells = [f"{k:.1f} ({n / k:.0f}/s)"]
        for label in list(calls)[1:]:
            diff = float(np.abs(outputs["keras"] - outputs[label]).max())
            t = median[label]
            cells.append(f"{t:.1f} ({n / t:.0f}/s) | {k / t:.2f} | {diff:.1e}")
        rows.append(f"| {size} | {n} | " + " | ".join(cells) + " |")
    return rows


def repeated(size: int, counts: list[int], rounds: int, steps: int, runtimes: list[str]):
    """Repeated `Run.predict_logits` calls on one `Run` in one process (a notebook, a service),
    Keras against each of `runtimes` with the run holding its converted model (the conversion
    made before timing); milliseconds per call, median of `steps` calls, per round, the
    runtimes taking turns within each round."""
    import numpy as np

    from finetune.config import Config
    from finetune.inference import weights_checksum
    from finetune.run import Run

    model = lite0_classifier(size)
    run = Run(model=model, config=Config(), class_names=list("abcdefghij"), image_size=size)
    checksum = []
    for _ in range(steps):
        start = time.perf_counter()
        weights_checksum(model)
        checksum.append(time.perf_counter() - start)
    print(f"weights_checksum at {size} px: {1000 * statistics.median(checksum):.1f} ms")
    rows = []
    for n in counts:
        x = np.random.default_rng(n).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        for r in range(rounds):
            ms = {}
            for runtime in ["keras", *runtimes]:
                for _ in range(2):  # converts (or loads) once, traces; the CRC's reader too
                    run.predict_logits(x, runtime=runtime)
                times = []
                for _ in range(steps):
                    start = time.perf_counter()
                    run.predict_logits(x, runtime=runtime)
                    times.append(time.perf_counter() - start)
                ms[f"{runtime} ({run.last_runtime})"] = 1000 * statistics.median(times)
            k = ms.pop(next(iter(ms)))
            cells = " | ".join(f"{label}: {t:.1f} | {k / t:.2f}" for label, t in ms.items())
            rows.append(f"| {size} | {n} | {r + 1} | {k:.1f} | {cells} |")
    return rows


def spin_compare(size: int, n: int, rounds: int, tta: int) -> list[str]:
    """`Run.predict_view_logits` on N images in ONNX Runtime (conversion kept), threads spinning
    between batches (what `predict` and `evaluate` do) or sleeping (what the cache fill and a
    streamed phase do), taking turns; seconds per call, median over rounds."""
    import numpy as np

    import finetune.inference as inference
    from finetune.config import AugmentConfig, Config
    from finetune.run import Run

    model = lite0_classifier(size)
    x = np.random.default_rng(n).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    config = Config(augment=AugmentConfig())  # enabled: the TTA views use it
    original = inference.guarded_forward

    def forcing(spin: bool):  # whatever the caller asks for
        return lambda *args, **kwargs: original(*args, **{**kwargs, "spin": spin})

    seconds: dict[bool, list[float]] = {True: [], False: []}
    outputs = {}
    try:
        for r in range(rounds + 1):  # round 0 converts and keeps the conversion: not timed
            for spin in (True, False):
                inference.guarded_forward = forcing(spin)
                run = Run(model=model, config=config, class_names=list("abcdefghij"),
                          image_size=size)  # fmt: skip
                start = time.perf_counter()
                outputs[spin] = run.predict_view_logits(x, runtime="onnxruntime", tta=tta)
                if r:
                    seconds[spin].append(time.perf_counter() - start)
    finally:
        inference.guarded_forward = original
    on, off = (statistics.median(seconds[spin]) for spin in (True, False))
    same = np.array_equal(outputs[True], outputs[False])
    images = n * tta
    return [
        f"| {size} | {n} | {tta} | {on:.2f} ({images / on:.0f}/s) "
        f"| {off:.2f} ({images / off:.0f}/s) | {off / on:.2f} | {same} |"
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="64,128,224", help="input sizes, px")
    parser.add_argument("--steps", type=int, default=8, help="timed calls per round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per size")
    parser.add_argument(
        "--end-to-end",
        default="",
        help="instead: image counts N (e.g. 1000,4000) for whole `Run.predict_logits` calls, "
        "cold, Keras against each of --runtimes with its conversion (what `--runtime auto` "
        "decides)",
    )
    parser.add_argument(
        "--repeated",
        default="",
        help="instead: image counts N (e.g. 1,8,32) for repeated `Run.predict_logits` calls "
        "on one run in one process, Keras against each of --runtimes held by the run",
    )
    parser.add_argument(
        "--runtimes",
        default="openvino,openvino-bf16,onnxruntime",
        help="with --end-to-end or --repeated: the runtimes to compare with Keras",
    )
    parser.add_argument(
        "--spin",
        type=int,
        default=0,
        help="instead: N images through `Run.predict_logits` in ONNX Runtime with its threads "
        "spinning or sleeping between batches, with and without test-time augmentation",
    )
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if args.spin:
        os.environ["FINETUNE_CACHE_DIR"] = tempfile.mkdtemp(prefix="inference-runtimes-cache-")
        print("| px | images | tta | spinning, s | sleeping, s | sleeping / spinning | same |")
        print("|---|---|---|---|---|---|---|")
        for size in sizes:
            for tta in (1, 3):
                for row in spin_compare(size, args.spin, args.rounds, tta):
                    print(row, flush=True)
        return
    if args.repeated:
        counts = [int(n) for n in args.repeated.split(",") if n]
        os.environ["FINETUNE_CACHE_DIR"] = tempfile.mkdtemp(prefix="inference-runtimes-cache-")
        runtimes = [r for r in args.runtimes.split(",") if r]
        print("| px | images | round | keras, ms per call | runtime: ms per call | keras / that |")
        print("|---|---|---|---|---|---|")
        for size in sizes:
            for row in repeated(size, counts, args.rounds, args.steps, runtimes):
                print(row, flush=True)
        return
    if args.end_to_end:
        counts = [int(n) for n in args.end_to_end.split(",") if n]
        os.environ["FINETUNE_CACHE_DIR"] = tempfile.mkdtemp(prefix="inference-runtimes-cache-")
        runtimes = [r for r in args.runtimes.split(",") if r]
        head = "".join(
            f" | {r}, {how}, s | keras / that | max logit diff"
            for r in runtimes
            for how in ("converting", "cached")
        )
        print(f"| px | images | keras, s{head} |")
        print("|---" * (3 + 6 * len(runtimes)) + "|")
        for size in sizes:
            for row in end_to_end(size, counts, args.rounds, runtimes):
                print(row, flush=True)
        return
    print(
        "| px | round | keras | keras folded | keras snapshot | onnxruntime | litert "
        "| openvino | openvino bf16 | onnxruntime / snapshot | openvino / snapshot "
        "| openvino bf16 / snapshot |"
    )
    print("|---" * 12 + "|")
    for size in sizes:
        for row in measure(size, args.steps, args.rounds):
            print(row, flush=True)


if __name__ == "__main__":
    main()
