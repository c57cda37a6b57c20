"""Metrics of a classifier on labelled images, computed with scikit-learn.

`classification_metrics` turns true labels and predicted probabilities into the `metrics.json`
content: accuracy, top-k accuracy, macro and weighted F1, per-class precision / recall / F1 /
support and the confusion matrix. `evaluate` runs a saved run's model on its own test split or on
another labelled folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

from finetune.errors import DataError

if TYPE_CHECKING:
    from finetune.run import Run


def classification_metrics(
    y_true: np.ndarray, probabilities: np.ndarray, class_names: list[str]
) -> dict[str, Any]:
    """Computes the metrics written to `metrics.json`.

    Args:
        y_true: int labels (N,).
        probabilities: predicted probabilities (N, num_classes).
        class_names: names in label order.

    Returns:
        A JSON-ready dict with `accuracy`, `top_k_accuracy`, `macro_f1`, `weighted_f1`,
        `loss`, `num_images`, `per_class` (precision, recall, f1, support per class name),
        `confusion_matrix` (rows: true class, columns: predicted class) and `class_names`.

    Example:
        >>> classification_metrics(np.array([0, 1]), np.array([[0.9, 0.1], [0.2, 0.8]]), ["a", "b"])
    """
    labels = list(range(len(class_names)))
    y_pred = probabilities.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    k = min(5, len(class_names) - 1)
    result: dict[str, Any] = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(
            f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)
        ),
        "weighted_f1": float(
            f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)
        ),
        "loss": float(log_loss(y_true, probabilities, labels=labels)),
        "num_images": int(len(y_true)),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "class_names": list(class_names),
    }
    if k >= 2:
        result["top_k"] = k
        result["top_k_accuracy"] = float(
            top_k_accuracy_score(y_true, probabilities, k=k, labels=labels)
        )
    return result


def evaluate(
    run: Run | str | Path,
    data_dir: str | Path | None = None,
    progress: bool = True,
    tta: int = 1,
) -> dict[str, Any]:
    """Evaluates a run's model on its test split, or on every image of `data_dir`.

    Args:
        run: a `Run` or the path of a run directory.
        data_dir: a labelled folder (class folders, or one with a `test/` folder, whose test split
            is used). Its class names must be among the run's. Defaults to the run's own test
            split.
        progress: show progress bars while decoding and predicting. Defaults to True.
        tta: test-time augmentation copies per image (see `Run.predict_proba`). Defaults to 1.

    Returns:
        The metrics (see `classification_metrics`) plus `data` (what was evaluated) and `tta`.

    Raises:
        DataError: the folder has classes the model does not know, or no images.
    """
    from finetune.data.decode import decode_images
    from finetune.data.scan import scan_image_folder
    from finetune.run import Run

    run = run if isinstance(run, Run) else Run.load(run)
    if data_dir is None:
        samples = run.split_samples("test") or run.split_samples("val")
        where = "test split of the run" if run.split_samples("test") else "validation split"
        paths = [p for p, _ in samples]
        y = np.asarray([label for _, label in samples], dtype=np.int64)
    else:
        folder = scan_image_folder(data_dir)
        split = "test" if "test" in folder.samples else next(iter(folder.samples))
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
    images, ok, bad = decode_images(paths, run.image_size, progress=progress)
    probabilities = run.predict_proba(images, progress=progress, tta=tta)
    metrics = classification_metrics(y[ok], probabilities, run.class_names)
    metrics["data"] = where
    metrics["tta"] = tta
    metrics["bad_files"] = [{"path": str(b.path), "reason": b.reason} for b in bad]
    return metrics
