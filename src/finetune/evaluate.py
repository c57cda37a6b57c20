"""Metrics of a classifier on labelled images, computed with scikit-learn.

`classification_metrics` turns true labels and predicted probabilities into the `metrics.json`
content: accuracy, top-k accuracy, macro and weighted F1, per-class precision / recall / F1 /
support, the confusion matrix (counts and row-normalised), one-vs-rest ROC-AUC, and calibration:
the expected calibration error (ECE) and the reliability diagram's bins. `evaluate` runs a
saved run's model on its own test split or on another labelled folder; `Predictions` holds the
per-image results behind `predictions.csv`.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
    top_k_accuracy_score,
)

from finetune.atomic import write_text_atomic
from finetune.errors import DataError, FinetuneError

if TYPE_CHECKING:
    from finetune.run import Run


#: Equal-width confidence bins of the expected calibration error and the reliability diagram.
CALIBRATION_BINS = 15


def calibration_bins(
    y_true: np.ndarray, probabilities: np.ndarray, bins: int = CALIBRATION_BINS
) -> list[dict[str, float]]:
    """The reliability diagram's data: accuracy against confidence in equal-width bins.

    An image falls in the bin of its top probability (the confidence); a bin's accuracy is the
    share of its images whose top class is the true one.

    Args:
        y_true: int labels (N,).
        probabilities: predicted probabilities (N, num_classes).
        bins: number of bins over [0, 1]. Defaults to 15.

    Returns:
        One dict per non-empty bin: `lower`, `upper`, `confidence` (mean), `accuracy`, `count`.
    """
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == np.asarray(y_true)
    # Bin i holds (edge i, edge i+1]; a confidence of exactly 0 joins the first bin.
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    rows = []
    for i in range(bins):
        members = index == i
        if members.any():
            rows.append(
                {
                    "lower": float(edges[i]),
                    "upper": float(edges[i + 1]),
                    "confidence": float(confidence[members].mean()),
                    "accuracy": float(correct[members].mean()),
                    "count": int(members.sum()),
                }
            )
    return rows


def expected_calibration_error(
    y_true: np.ndarray, probabilities: np.ndarray, bins: int = CALIBRATION_BINS
) -> float:
    """ECE: the count-weighted mean gap between accuracy and confidence over the bins.

    0 is perfectly calibrated; a model that is 99% sure and right half the time scores 0.49.
    (Guo et al. 2017, "On Calibration of Modern Neural Networks", with equal-width bins.)
    """
    rows = calibration_bins(y_true, probabilities, bins)
    total = sum(r["count"] for r in rows)
    return float(sum(r["count"] * abs(r["accuracy"] - r["confidence"]) for r in rows) / total)


def roc_auc_one_vs_rest(
    y_true: np.ndarray, probabilities: np.ndarray, class_names: list[str]
) -> tuple[float | None, dict[str, float | None]]:
    """One-vs-rest ROC-AUC per class and their unweighted mean.

    A class's AUC is defined only when the labels hold both that class and another one; classes
    absent from `y_true` get None and are left out of the mean (scikit-learn's
    `roc_auc_score(multi_class="ovr")` would refuse the whole set instead).

    Returns:
        (macro mean or None when no class has an AUC, {class name: AUC or None}).
    """
    y_true = np.asarray(y_true)
    per_class: dict[str, float | None] = {}
    for i, name in enumerate(class_names):
        positives = y_true == i
        if positives.all() or not positives.any():
            per_class[name] = None
        else:
            per_class[name] = float(roc_auc_score(positives, probabilities[:, i]))
    defined = [v for v in per_class.values() if v is not None]
    return (float(np.mean(defined)) if defined else None), per_class


def classification_metrics(
    y_true: np.ndarray, probabilities: np.ndarray, class_names: list[str]
) -> dict[str, Any]:
    """Computes the metrics written to `metrics.json`.

    Args:
        y_true: int labels (N,).
        probabilities: predicted probabilities (N, num_classes).
        class_names: names in label order.

    Returns:
        A JSON-ready dict with `accuracy`, `macro_f1`, `weighted_f1`, `macro_precision`,
        `macro_recall`, `weighted_precision`, `weighted_recall`,
        `loss`, `num_images`, `per_class` (precision, recall, f1, support and one-vs-rest
        `roc_auc` per class name), `confusion_matrix` (rows: true class, columns: predicted
        class), `confusion_matrix_normalized` (each row divided by its count, so the diagonal
        is the per-class recall; an empty row stays 0), `roc_auc_ovr` (macro mean), `ece` and
        `reliability` (see `calibration_bins`), `class_names`, and `top_k` /
        `top_k_accuracy` when there are more than two classes. When the images hold only
        some of the classes (a folder of a few of them), the macro averages are over those
        classes (`averaged_over` names them): a class with no images has no recall to average.
        Their precision is then that of the predictions of those classes; an image taken for
        a class that has no images counts against its own class's recall (and the accuracy)
        only.

    Example:
        >>> classification_metrics(np.array([0, 1]), np.array([[0.9, 0.1], [0.2, 0.8]]), ["a", "b"])
    """
    labels = list(range(len(class_names)))
    y_pred = probabilities.argmax(axis=1)
    present = sorted({int(label) for label in y_true})
    averaged = present if 0 < len(present) < len(labels) else labels
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    k = min(5, len(class_names) - 1)
    counts = confusion_matrix(y_true, y_pred, labels=labels)
    rows = counts.sum(axis=1, keepdims=True)
    normalized = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    auc, auc_per_class = roc_auc_one_vs_rest(y_true, probabilities, class_names)
    result: dict[str, Any] = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(
            f1_score(y_true, y_pred, labels=averaged, average="macro", zero_division=0)
        ),
        "weighted_f1": float(
            f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)
        ),
        **{
            f"{average}_{name}": float(value)
            for average in ("macro", "weighted")
            for name, value in zip(
                ("precision", "recall"),
                precision_recall_fscore_support(
                    y_true, y_pred, labels=averaged, average=average, zero_division=0
                )[:2],
                strict=True,
            )
        },
        "loss": float(log_loss(y_true, probabilities, labels=labels)),
        "num_images": int(len(y_true)),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
                "roc_auc": auc_per_class[name],
            }
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": counts.tolist(),
        "confusion_matrix_normalized": normalized.tolist(),
        "roc_auc_ovr": auc,
        "ece": expected_calibration_error(y_true, probabilities),
        "reliability": calibration_bins(y_true, probabilities),
        "class_names": list(class_names),
    }
    if averaged is not labels:
        result["averaged_over"] = [class_names[i] for i in averaged]
    if k >= 2:
        result["top_k"] = k
        result["top_k_accuracy"] = float(
            top_k_accuracy_score(y_true, probabilities, k=k, labels=labels)
        )
    return result


@dataclass
class Predictions:
    """Per-image results of an evaluation: what `predictions.csv` in a run directory holds.

    Args:
        paths: the image files, in evaluation order.
        y_true: int true labels (N,).
        probabilities: predicted probabilities (N, num_classes).
        class_names: names in label order.
    """

    paths: list[str]
    y_true: np.ndarray
    probabilities: np.ndarray
    class_names: list[str]

    @property
    def y_pred(self) -> np.ndarray:
        return self.probabilities.argmax(axis=1)

    @property
    def losses(self) -> np.ndarray:
        """Each image's cross-entropy: high for confident mistakes ("top losses")."""
        p = self.probabilities[np.arange(len(self.y_true)), self.y_true]
        return -np.log(np.clip(p, 1e-12, 1.0))

    def write_csv(self, path: str | Path) -> None:
        """Writes path, true and predicted class, confidence, loss and every probability."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(
            ["path", "true", "predicted", "confidence", "loss"]
            + [f"p:{name}" for name in self.class_names]
        )
        for path_, t, pred, probs, loss in zip(
            self.paths, self.y_true, self.y_pred, self.probabilities, self.losses, strict=True
        ):
            writer.writerow(
                [path_, self.class_names[t], self.class_names[pred], f"{probs.max():.6f}"]
                + [f"{loss:.6f}"]
                + [f"{q:.6g}" for q in probs]
            )
        write_text_atomic(Path(path), buf.getvalue())

    @classmethod
    def read_csv(cls, path: str | Path) -> Predictions:
        """Reads a file written by `write_csv`.

        Raises:
            FinetuneError: the file is missing columns or names a class it does not list.
        """
        path = Path(path)
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        header = rows[0] if rows else []
        names = [h[2:] for h in header[5:]]
        if header[:5] != ["path", "true", "predicted", "confidence", "loss"] or not names:
            raise FinetuneError(f"{path} is not a predictions file written by finetune.")
        try:
            y = np.array([names.index(r[1]) for r in rows[1:]], np.int64)
            probs = np.array([[float(q) for q in r[5:]] for r in rows[1:]], np.float64)
        except (ValueError, IndexError) as err:
            raise FinetuneError(f"{path} is damaged ({err}).") from None
        probs = probs.reshape(len(y), len(names))
        # Written with 6 significant digits: make each row sum to 1 again.
        probs /= np.maximum(probs.sum(axis=1, keepdims=True), 1e-12)
        return cls([r[0] for r in rows[1:]], y, probs, names)


def evaluate(
    run: Run | str | Path,
    data_dir: str | Path | None = None,
    progress: bool = True,
    tta: int = 1,
    runtime: str | None = None,
) -> dict[str, Any]:
    """Evaluates a run's model on its test split, or on every image of `data_dir`.

    Args:
        run: a `Run` or the path of a run directory.
        data_dir: a labelled folder (class folders, or one with a `test/` folder, whose test split
            is used). Its class names must be among the run's. Defaults to the run's own test
            split.
        progress: show progress bars while decoding and predicting. Defaults to True.
        tta: test-time augmentation copies per image (see `Run.predict_proba`). Defaults to 1.
        runtime: "auto", "keras", "openvino", "openvino-bf16" or "onnxruntime" (see
            `Run.predict_proba`). Defaults to None (`FINETUNE_RUNTIME`, or "auto").

    Returns:
        The metrics (see `classification_metrics`) plus `data` (what was evaluated) and `tta`.

    Decoded images above the run's `data.max_memory_gb` go to a memory-mapped temporary file
    in the run folder (see `finetune.data.decode.decode_within`).

    Raises:
        DataError: the folder has classes the model does not know, or no images, or the
            decoded images need that file and the run folder has no room.
    """
    return evaluate_with_predictions(run, data_dir, progress=progress, tta=tta, runtime=runtime)[0]


def averaged_over_note(metrics: dict[str, Any]) -> str:
    """A note such as " (over the 1 of 10 classes with images)" when the macro averages of
    `metrics` cover only the classes the images hold (`averaged_over`), else ""."""
    over = metrics.get("averaged_over")
    if not over:
        return ""
    return f" (over the {len(over)} of {len(metrics['class_names'])} classes with images)"


def evaluate_with_predictions(
    run: Run | str | Path,
    data_dir: str | Path | None = None,
    progress: bool = True,
    tta: int = 1,
    runtime: str | None = None,
    decoded: tuple[list[Path], np.ndarray, list[int], list[Any]] | None = None,
) -> tuple[dict[str, Any], Predictions]:
    """`evaluate`, also returning the per-image `Predictions`.

    `decoded`: the run's own split (without `data_dir`) already decoded at its image size, so
    that a caller that needs the images too decodes them once: `(paths, images, ok, bad)`, the
    paths in the split's order and what `decode_within` returned for them."""
    from finetune.data.decode import decode_within
    from finetune.data.scan import scan_image_folder
    from finetune.run import Run, probabilities_from_views

    run = run if isinstance(run, Run) else Run.load(run)
    if data_dir is None:
        samples = run.split_samples("test") or run.split_samples("val")
        where = "test split" if run.split_samples("test") else "val split"
        paths = [p for p, _ in samples]
        y = np.asarray([label for _, label in samples], dtype=np.int64)
    else:
        trained_on = run.info.get("data_dir")
        if trained_on and Path(data_dir).resolve() == Path(trained_on).resolve():
            raise DataError(
                f"{data_dir} is the folder this run was trained on: evaluating all of it would "
                "score the training images too. Run `finetune evaluate RUN_DIR` without a "
                "folder to use the run's own test split."
            )
        folder = scan_image_folder(data_dir, min_classes=1)  # e.g. photos of one class
        # The held-out split of a pre-split folder; never its train/ when val/ exists.
        split = next(s for s in ("test", "val", "all", "train") if s in folder.samples)
        unknown = sorted(set(folder.class_names) - set(run.class_names))
        if unknown:
            raise DataError(
                f"{data_dir} has classes the model was not trained on: {', '.join(unknown)}. "
                f"The model knows: {', '.join(run.class_names)}."
            )
        remap = {i: run.class_names.index(n) for i, n in enumerate(folder.class_names)}
        paths = [s.path for s in folder.samples[split]]
        y = np.asarray([remap[s.label] for s in folder.samples[split]], dtype=np.int64)
        where = f"{data_dir} ({split})"
    if not paths:
        raise DataError(f"nothing to evaluate: {where} holds no images.")
    config = "its config" if run.path is None else run.path / "config.toml"
    if decoded is not None:
        if data_dir is not None:
            raise ValueError("`decoded` is for the run's own split, not a data_dir")
        given, images, ok, bad = decoded
        if [Path(p).resolve() for p in given] != [Path(p).resolve() for p in paths]:
            raise ValueError(f"`decoded` is not the images of the {where}, in its order")
    else:
        images, ok, bad = decode_within(
            paths,
            run.image_size,
            progress=progress,
            max_memory_gb=run.config.data.max_memory_gb,
            spill_dir=run.path,  # not TMPDIR: it may be in memory itself
            source=where if data_dir is not None else f"{run.path or 'the run'}: {where}",
            limit_name=f"data.max_memory_gb in {config}",
            advice=f"or raise max_memory_gb in {config} if this machine has the memory.",
        )
    if not ok:
        raise DataError(
            f"none of the {len(paths)} images of the {where} can be read (the first: "
            f"{bad[0].path}: {bad[0].reason}). If the data folder moved, evaluate the new "
            "location with `finetune evaluate RUN_DIR DATA_DIR`."
        )
    views = run.predict_view_logits(images, progress=progress, tta=tta, runtime=runtime)
    probabilities = probabilities_from_views(views, run.temperature)
    y = y[ok]
    metrics = classification_metrics(y, probabilities, run.class_names)
    metrics["data"] = where
    metrics["tta"] = tta
    metrics["runtime"] = run.last_runtime
    metrics["bad_files"] = [{"path": str(b.path), "reason": b.reason} for b in bad]
    if run.temperature != 1.0:
        fitted_on = run.info.get("calibration", {}).get("fitted_on", "val split")
        metrics["calibration"] = calibration_record(
            y, probabilities_from_views(views), probabilities, run.temperature, fitted_on, where
        )
    kept = [str(Path(paths[i]).resolve()) for i in ok]
    return metrics, Predictions(kept, y, probabilities, list(run.class_names))


def calibration_record(
    y_true: np.ndarray,
    uncalibrated: np.ndarray,
    calibrated: np.ndarray,
    temperature: float,
    fitted_on: str,
    measured_on: str,
) -> dict[str, Any]:
    """What `metrics.json` says about a calibrated run: the ECE before and after, and where."""
    return {
        "temperature": temperature,
        "fitted_on": fitted_on,
        "measured_on": measured_on,
        "ece_before": expected_calibration_error(y_true, uncalibrated),
        "ece_after": expected_calibration_error(y_true, calibrated),
        "reliability_before": calibration_bins(y_true, uncalibrated),
    }
