"""`export_run`: one run's model as a deployable artifact, checked against the Keras model.

The artifact is written under a temporary name beside its destination, opened with its own
runtime and checked (`finetune.export.parity`), and only then renamed into place, so a failed
conversion or a failed check leaves no half-written or untrusted file behind. The check's figures
are added to `RUN_DIR/export.json` (one record per artifact path, the latest kept), also when a
float export fails its agreement bound.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import keras
import numpy as np

from finetune.atomic import write_json
from finetune.errors import DataError, FinetuneError
from finetune.export.convert import (
    DEFAULT_CALIBRATION_IMAGES,
    calibrated,
    check_options,
    default_output,
    labels_path,
    labels_record,
    remove,
    write_artifact,
)
from finetune.export.parity import ParityReport, check_parity
from finetune.export.runtime import load_exported
from finetune.run import MODEL_FILE, Run

EXPORT_RECORD = "export.json"


@dataclass
class ExportReport:
    """What `export_run` wrote.

    Attributes:
        path: the artifact (a file, or a SavedModel folder).
        labels_path: its labels file (class names, image size, temperature).
        parity: the parity check's figures.
        calibration_images: training images used to calibrate int8 (0 otherwise).
    """

    path: Path
    labels_path: Path
    parity: ParityReport
    calibration_images: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "labels_path": str(self.labels_path),
            "calibration_images": self.calibration_images,
            **self.parity.to_dict(),
        }


def calibration_sample(run: Run, count: int) -> np.ndarray:
    """`count` training images (a seeded random sample; all when fewer), decoded.

    Raises:
        DataError: the run records no training split, or none of its images can be read.
    """
    from finetune.data.decode import decode_images

    samples = run.split_samples("train")
    if not samples:
        raise DataError(f"{run.path} has no training split in split.json to calibrate int8 on.")
    rng = np.random.default_rng(run.config.seed)
    chosen = sorted(rng.permutation(len(samples))[: min(count, len(samples))])
    images, ok, bad = decode_images([samples[i][0] for i in chosen], run.image_size, progress=False)
    if not ok:
        raise DataError(
            f"none of the {len(chosen)} calibration images can be read (the first: "
            f"{bad[0].path}: {bad[0].reason})."
        )
    return images


def _check_destination(out: Path, run_dir: Path, fmt: str, overwrite: bool) -> None:
    resolved = out.resolve()
    run_resolved = run_dir.resolve()
    if resolved == run_resolved or run_resolved.is_relative_to(resolved):
        raise FinetuneError(f"--out {out} would replace the run directory itself.")
    if resolved == (run_dir / MODEL_FILE).resolve():
        raise FinetuneError(f"--out {out} is the run's own model; choose another path.")
    if not out.exists():
        return
    if not overwrite:
        raise FinetuneError(f"{out} already exists; add --overwrite to replace it.")
    if out.is_dir() and not (fmt == "saved_model" and (out / "saved_model.pb").is_file()):
        raise FinetuneError(f"{out} is a folder that is not a SavedModel; refusing to replace it.")
    if out.is_file() and fmt == "saved_model":
        raise FinetuneError(f"{out} is a file; a SavedModel export needs a folder path.")


def _move_into_place(tmp: Path, out: Path) -> None:
    if tmp.is_dir() and out.exists():  # a folder cannot be renamed over a folder: swap
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        remove(old)
    else:
        os.replace(tmp, out)


def _record(run_dir: Path, entry: dict[str, Any]) -> None:
    path = run_dir / EXPORT_RECORD
    try:
        exports = json.loads(path.read_text(encoding="utf-8")).get("exports", [])
    except (OSError, ValueError, AttributeError):
        exports = []
    entry = {**entry, "created": datetime.now(UTC).isoformat(timespec="seconds")}
    exports = [e for e in exports if e.get("path") != entry["path"]] + [entry]
    write_json(path, {"exports": exports})


def export_run(
    run: Run | str | Path,
    format: str,
    quantize: str = "none",
    out: str | Path | None = None,
    calibration_images: int | None = None,
    int8_io: bool = False,
    overwrite: bool = False,
    latency_runs: int = 50,
) -> ExportReport:
    """Exports a run's model and checks it against the Keras model.

    Args:
        run: a saved `Run` or a run directory.
        format: "keras", "saved_model", "litert" or "onnx".
        quantize: "none", or for LiteRT "float16", "dynamic" (int8 weights, float activations)
            or "int8" (full-integer, calibrated on the training split); for Keras "int8"
            (Keras' `model.quantize("int8")`: the Dense head only). Defaults to "none".
        out: the artifact path. Defaults to `RUN_DIR/export/model[_<quantize>].<ext>`
            (`RUN_DIR/export/saved_model` for a SavedModel).
        calibration_images: training images to calibrate int8 on. Defaults to 200.
        int8_io: with int8, make the input and output tensors int8 too (for microcontrollers;
            the input is then the pixel value - 128). Defaults to False.
        overwrite: replace an existing artifact. Defaults to False.
        latency_runs: timed single-image calls per model in the parity check. Defaults to 50.

    Returns:
        The `ExportReport` (artifact, labels file, parity figures), also in `RUN_DIR/export.json`.

    Raises:
        ConfigError: an unknown format or quantization, or options that do not go together.
        FinetuneError: not a run directory, an existing output without `overwrite`, a failed
            conversion, or a float export agreeing with Keras on fewer than 99.5% of the images.

    Example:
        >>> export_run("runs/photos", "litert", quantize="int8").parity.accuracy_change
    """
    check_options(format, quantize, int8_io, calibration_images)
    run = run if isinstance(run, Run) else Run.load(run)
    if run.path is None:
        raise FinetuneError("export_run needs a saved run (its split.json); train with out=...")
    run_dir = Path(run.path)
    out = Path(out) if out is not None else default_output(run_dir, format, quantize, int8_io)
    _check_destination(out, run_dir, format, overwrite)

    representative, n_calibration = None, 0
    if calibrated(format, quantize):
        representative = calibration_sample(run, calibration_images or DEFAULT_CALIBRATION_IMAGES)
        n_calibration = len(representative)
    labels = labels_record(
        run.class_names,
        run.image_size,
        run.temperature,
        format,
        quantize,
        int8_io,
        run_dir,
        run.config.model.backbone,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.partial-{os.getpid()}{out.suffix}")
    remove(tmp)
    model = run.model
    if format == "keras":
        # Read back without compiling: the run's file also holds the optimizer's state (up to
        # twice the weights again for Adam), which an inference artifact does not need.
        model = keras.saving.load_model(run_dir / MODEL_FILE, compile=False, safe_mode=True)
    try:
        write_artifact(model, format, tmp, labels, quantize, int8_io, representative)
        parity = check_parity(
            run, load_exported(tmp, labels), format, quantize, int8_io, latency_runs
        )
        report = ExportReport(out, labels_path(out), parity, n_calibration)
        if not parity.passed:
            _record(run_dir, {**report.to_dict(), "written": False})
            raise FinetuneError(
                f"the {format} export ({quantize}) agrees with the Keras model on only "
                f"{100 * parity.agreement:.1f}% of the {parity.num_images} images of the "
                f"{parity.data} (at least {100 * parity.min_agreement:.1f}% is required; "
                f"largest logit difference {parity.max_abs_logit_diff:.3g}). Nothing was "
                f"written to {out}; the figures are in {run_dir / EXPORT_RECORD}."
            )
        if format != "saved_model":
            write_json(labels_path(out), labels)
        _move_into_place(tmp, out)
    finally:
        remove(tmp)
    _record(run_dir, {**report.to_dict(), "written": True})
    return report
