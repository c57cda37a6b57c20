"""Past runs side by side: what `finetune runs [DIR]` lists.

A run directory is any folder holding the `run.json` that `train` writes. `list_runs` finds them
under a folder (the folder itself included, nested ones too, e.g. a `scratch_baseline`) and reads
only their small JSON records, so listing hundreds of runs takes no model loading (nor Keras:
`finetune runs` starts without TensorFlow).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError


def phase_spans(history: list[dict[str, Any]]) -> list[tuple[Any, int, int]]:
    """The history's consecutive runs of one phase: (phase name, first index, end index)."""
    spans: list[tuple[Any, int, int]] = []
    for i, record in enumerate(history):
        name = record.get("phase") if isinstance(record, dict) else None
        if spans and spans[-1][0] == name:
            spans[-1] = (name, spans[-1][1], i + 1)
        else:
            spans.append((name, i, i + 1))
    return spans


def model_facts(info: dict[str, Any]) -> tuple[list[str], int, float]:
    """(class names, image size, temperature) of a run's model, from its `run.json` content
    (`info`); the temperature is 1 for a run that was not calibrated.

    Raises:
        KeyError, TypeError, ValueError, AttributeError: `info` lacks them or holds others.
    """
    temperature = float(info.get("calibration", {}).get("temperature", 1.0))
    return list(info["class_names"]), int(info["image_size"]), temperature


@dataclass(frozen=True)
class RunSummary:
    """The key facts of one run directory.

    Attributes:
        path: the run directory.
        created: when training finished (ISO 8601, UTC), or "".
        backbone: the backbone name.
        recipe: how the recipe was chosen: "default", "auto" (`--recipe auto`) or "scratch"
            (a `--compare-scratch` baseline); plus "+calibrated" when a temperature was fitted.
        phases: the phases that ran, with their epochs, e.g. "head 3, finetune 3".
        data_fingerprint: hash of the data seen (see `finetune.train.data_fingerprint`).
        seed: the run's seed.
        accuracy: test (or validation) accuracy, or None.
        macro_f1: macro F1, or None.
        ece: expected calibration error, or None.
        num_images: images the metrics were measured on.
        tta: test-time augmentation views behind the metrics (1: none).
        finished: whether the model file is there (a folder copied without its model, or whose
            model was deleted, lists as unfinished; a run killed during training has no
            `run.json` yet and is not listed).
    """

    path: str
    created: str
    backbone: str
    recipe: str
    phases: str
    data_fingerprint: str
    seed: int | None
    accuracy: float | None
    macro_f1: float | None
    ece: float | None
    num_images: int | None
    tta: int
    finished: bool

    def to_dict(self) -> dict:
        return asdict(self)


def _read(path: Path) -> dict | list | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _summary(folder: Path) -> RunSummary | None:
    info = _read(folder / "run.json")
    if not isinstance(info, dict):
        return None
    metrics = _read(folder / "metrics.json")
    metrics = metrics if isinstance(metrics, dict) else {}
    history = _read(folder / "history.json")
    phases = phase_spans(history if isinstance(history, list) else [])
    recipe = str(
        info.get("recipe", "auto" if (folder / "recipe_auto.json").is_file() else "default")
    )
    if "calibration" in info:
        recipe += "+calibrated"
    return RunSummary(
        path=str(folder),
        created=str(info.get("created", "")),
        backbone=str(info.get("backbone", "")),
        recipe=recipe,
        phases=", ".join(f"{name} {end - start}" for name, start, end in phases),
        data_fingerprint=str(info.get("data_fingerprint", "")),
        seed=info.get("seed"),
        accuracy=metrics.get("accuracy"),
        macro_f1=metrics.get("macro_f1"),
        ece=metrics.get("ece"),
        num_images=metrics.get("num_images"),
        tta=int(metrics.get("tta", 1)),
        finished=(folder / "model.keras").is_file(),
    )


def list_runs(root: str | os.PathLike[str] = "runs") -> list[RunSummary]:
    """The run directories under `root`, newest first.

    Args:
        root: a folder of run directories, or one run directory. Defaults to "runs".

    Returns:
        One `RunSummary` per folder holding a readable `run.json`.

    Raises:
        FinetuneError: `root` does not exist or is not a folder.

    Example:
        >>> [r.accuracy for r in finetune.list_runs("runs")]
    """
    root = Path(root)
    if not root.is_dir():
        raise FinetuneError(f"{root} is not a folder of runs; give the folder --out wrote into.")
    found = []
    for folder, dirs, files in os.walk(root):
        # Checkpoints, TensorBoard logs and hidden folders never hold a run.
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "tensorboard")
        if "run.json" in files:
            summary = _summary(Path(folder))
            if summary is not None:
                found.append(summary)
    return sorted(found, key=lambda r: (r.created, r.path), reverse=True)
