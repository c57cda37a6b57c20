"""The parity check: does the exported model still behave like the Keras model it came from?

Both models classify the run's test split (its val split when there is no test split), each with
its own runtime, and the check reports the share of images on which their top-1 classes agree,
the accuracy of both, the largest logit difference, both file sizes and the single-image CPU
latency of both (median of repeated calls, the two models called alternately so that both see
the same machine load). Float exports (`none`, `float16`) must agree on at least
`MIN_FLOAT_AGREEMENT` of the images; quantized ones (`dynamic`, `int8`) only report how much
accuracy they change.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from finetune.errors import DataError
from finetune.export.runtime import ExportedModel, graph_call
from finetune.run import MODEL_FILE, Run

MIN_FLOAT_AGREEMENT = 0.995
FLOAT_QUANTIZATIONS = ("none", "float16")
LATENCY_WARMUP = 3


@dataclass
class ParityReport:
    """How an exported model compares with the run's Keras model (see the module docstring).

    Attributes:
        data: what was classified ("test split" or "val split"); num_images: how many.
        agreement: share of images whose top-1 class is the same in both models.
        keras_accuracy, export_accuracy: top-1 accuracy of each; accuracy_change: their
            difference (export - Keras).
        max_abs_logit_diff: the largest absolute difference between the two models' logits.
        keras_size_bytes, export_size_bytes: the run's `model.keras` (which also holds the
            optimizer's state) and the artifact (a folder: all its files).
        keras_weights_bytes: the Keras model's weights alone, as float32.
        keras_latency_ms, export_latency_ms: median single-image latency over `latency_runs`.
        min_agreement: the bound the agreement had to reach (None for quantized exports).
        passed: the agreement reached the bound (always True without a bound).
    """

    format: str
    quantize: str
    int8_io: bool
    runtime: str
    data: str
    num_images: int
    agreement: float
    keras_accuracy: float
    export_accuracy: float
    accuracy_change: float
    max_abs_logit_diff: float
    keras_size_bytes: int
    keras_weights_bytes: int
    export_size_bytes: int
    keras_latency_ms: float
    export_latency_ms: float
    latency_runs: int
    min_agreement: float | None
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluation_images(run: Run) -> tuple[np.ndarray, np.ndarray, str]:
    """The decoded images and labels of the run's test split (else its val split).

    Raises:
        DataError: the run records neither split, or none of its images can be read.
    """
    from finetune.data.decode import decode_images

    for split in ("test", "val"):
        samples = run.split_samples(split)
        if samples:
            break
    else:
        raise DataError(
            f"{run.path} has no test or val split in split.json to check the export on."
        )
    paths = [p for p, _ in samples]
    images, ok, bad = decode_images(paths, run.image_size, progress=False)
    if not ok:
        raise DataError(
            f"none of the {len(paths)} images of the {split} split can be read (the first: "
            f"{bad[0].path}: {bad[0].reason}); the parity check needs them."
        )
    labels = np.asarray([samples[i][1] for i in ok], np.int64)
    return images, labels, f"{split} split"


def median_latencies_ms(calls: dict[str, Callable[[], Any]], runs: int) -> dict[str, float]:
    """Median wall time of each call in milliseconds; the calls take turns in every round."""
    for _ in range(LATENCY_WARMUP):
        for call in calls.values():
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(runs):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * float(np.median(t)) for name, t in times.items()}


def size_bytes(path: Path) -> int:
    """A file's size, or the total size of the files in a folder."""
    path = Path(path)
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def check_parity(
    run: Run,
    exported: ExportedModel,
    fmt: str,
    quantize: str,
    int8_io: bool,
    latency_runs: int = 50,
) -> ParityReport:
    """Compares an exported model with the run's Keras model on the run's held-out images.

    Args:
        run: the run the export was made from (saved, with its `split.json`).
        exported: the exported model, opened with its runtime (`load_exported`).
        fmt, quantize, int8_io: how it was exported (recorded, and deciding the bound).
        latency_runs: timed single-image calls per model. Defaults to 50.

    Returns:
        The `ParityReport`; `passed` is False when a float export falls below the bound (the
        caller decides what to do about it).

    Raises:
        DataError: no held-out images to check on.
    """
    images, labels, where = evaluation_images(run)
    # The Keras model as `Run.predict_proba` runs it (BatchNorm folded: the fastest Keras path).
    keras_call = graph_call(run.inference_model(), run.image_size)
    x = images.astype(np.float32)
    keras_logits = np.concatenate([keras_call(x[i : i + 32]).numpy() for i in range(0, len(x), 32)])
    export_logits = exported.predict_logits(x)
    keras_top1, export_top1 = keras_logits.argmax(1), export_logits.argmax(1)
    agreement = float(np.mean(keras_top1 == export_top1))
    keras_accuracy = float(np.mean(keras_top1 == labels))
    export_accuracy = float(np.mean(export_top1 == labels))

    one = x[:1]
    latency = median_latencies_ms(
        {"keras": lambda: keras_call(one), "export": exported.single_image_call(x[0])},
        runs=max(1, int(latency_runs)),
    )
    bound = MIN_FLOAT_AGREEMENT if quantize in FLOAT_QUANTIZATIONS else None
    return ParityReport(
        format=fmt,
        quantize=quantize,
        int8_io=int8_io,
        runtime=exported.runtime,
        data=where,
        num_images=len(labels),
        agreement=agreement,
        keras_accuracy=keras_accuracy,
        export_accuracy=export_accuracy,
        accuracy_change=export_accuracy - keras_accuracy,
        max_abs_logit_diff=float(np.max(np.abs(keras_logits - export_logits))),
        keras_size_bytes=size_bytes(run.path / MODEL_FILE),
        keras_weights_bytes=int(sum(np.prod(w.shape) * 4 for w in run.model.weights)),
        export_size_bytes=size_bytes(exported.path),
        keras_latency_ms=latency["keras"],
        export_latency_ms=latency["export"],
        latency_runs=max(1, int(latency_runs)),
        min_agreement=bound,
        passed=bound is None or agreement >= bound,
    )
