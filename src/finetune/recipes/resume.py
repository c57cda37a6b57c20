"""Exact resume of an interrupted run: the state `fit_phases` saves after every epoch and phase.

`checkpoints/resume.npz` (a checkpoint with a completion marker, the previous one kept until
the new one is complete: see `finetune.checkpoint`) holds everything the rest of the run
depends on, taken at the end of an epoch (after every callback has seen it) and again at the
end of each phase:

- where the recipe is: the phase, the epoch the phase started at, the epochs done, the shared
  epoch budgets, the history records so far, whether early stopping had ended the phase;
- every variable of the classifier (weights, BatchNorm statistics, dropout's random state) and
  of the phase's optimizer (its step, hence the learning-rate schedule's position, the learning
  rate a plateau schedule lowered, the moments);
- nothing of the input pipeline: the training order, the augmentation and the MixUp/CutMix
  draws are functions of (seed, epoch) (`finetune.data.pipeline`);
- the state of the callbacks: early stopping (counter, best value, best weights), the
  best-weights checkpoint's best value, the plateau schedule, weight averaging's running mean;
- a fingerprint of the config and the data, so a resume with anything changed is refused with
  what changed.

A run killed inside an epoch resumes from the end of the epoch before and replays the epoch,
exactly: that epoch's order, augmentation and dropout draws come out the same.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from finetune.checkpoint import remove_checkpoint, save_checkpoint, usable_checkpoint
from finetune.errors import FinetuneError

STATE_FILE = "resume.npz"
# 2: augmentation keyed by (seed, epoch, batch) and no longer saved; a format-1 state would
# replay its epoch with other augmentation draws, so it is refused.
FORMAT = 2

# Callback attributes that carry state from epoch to epoch (reset by `on_train_begin`).
_FIELDS = {
    "EarlyStopping": ("wait", "stopped_epoch", "best", "best_epoch"),
    "ReduceLROnPlateau": ("wait", "best", "cooldown_counter"),
    "BestWeightsCheckpoint": ("best",),
    "WeightAveraging": ("averaged_epochs",),
}
# Callback attributes holding lists of arrays.
_ARRAYS = {"EarlyStopping": "best_weights", "WeightAveraging": "_mean"}


class ResumeError(FinetuneError):
    """A run cannot be resumed: its saved state does not fit what was asked."""


@dataclass
class ResumeState:
    """What `fit_phases` needs to go on where a run stopped.

    Attributes:
        meta: JSON values: phase_index, phase_name, phase_start, epoch (epochs done),
            phase_done, stop_training, budgets, records, callbacks, fingerprint.
        arrays: model/i, optimizer/i and callback arrays, by name.
        path: the file it was read from.
    """

    meta: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    path: Path | None = None

    def array_list(self, prefix: str) -> list[np.ndarray]:
        count = int(self.meta["counts"].get(prefix, 0))
        return [self.arrays[f"{prefix}/{i}"] for i in range(count)]

    def describe(self) -> str:
        m = self.meta
        where = "at its end" if m["phase_done"] else f"after epoch {m['epoch']}"
        return f"phase '{m['phase_name']}' {where}"


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float | np.floating | np.integer):
        return value.item() if hasattr(value, "item") else value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    try:
        return float(keras.ops.convert_to_numpy(value))
    except (TypeError, ValueError):
        return str(value)


def callback_states(
    callbacks: list[keras.callbacks.Callback],
) -> tuple[list[dict[str, Any]], dict[str, list[np.ndarray]]]:
    """The epoch-to-epoch state of the callbacks that have one, by position in the list."""
    states: list[dict[str, Any]] = []
    arrays: dict[str, list[np.ndarray]] = {}
    for index, callback in enumerate(callbacks):
        kind = type(callback).__name__
        if kind not in _FIELDS:
            continue
        state = {"index": index, "kind": kind}
        for name in _FIELDS[kind]:
            state[name] = _plain(getattr(callback, name, None))
        held = getattr(callback, _ARRAYS.get(kind, ""), None)
        if held is not None:
            arrays[f"callback{index}"] = [np.asarray(a) for a in held]
        states.append(state)
    return states, arrays


class RestoreCallbackStates(keras.callbacks.Callback):
    """Puts saved callback states back after the callbacks reset themselves in `on_train_begin`.

    Must come after them in the callback list.
    """

    def __init__(self, callbacks: list[keras.callbacks.Callback], state: ResumeState):
        super().__init__()
        self.callbacks, self.state = callbacks, state

    def on_train_begin(self, logs=None):
        for saved in self.state.meta["callbacks"]:
            callback = self.callbacks[saved["index"]]
            if type(callback).__name__ != saved["kind"]:
                raise ResumeError(
                    f"{self.state.path}: callback {saved['index']} is a "
                    f"{type(callback).__name__}, the saved state is a {saved['kind']}'s; "
                    "the recipe changed since the run was interrupted."
                )
            for name in _FIELDS[saved["kind"]]:
                setattr(callback, name, saved[name])
            key = f"callback{saved['index']}"
            if key in self.state.meta["counts"]:
                held = self.state.array_list(key)
                if saved["kind"] == "WeightAveraging":
                    held = [a.astype(np.float64) for a in held]
                setattr(callback, _ARRAYS[saved["kind"]], held)


def save_state(path: Path, meta: dict[str, Any], lists: dict[str, list[np.ndarray]]) -> None:
    """Writes the state atomically with its completion marker (the previous one kept until then)."""
    arrays = {f"{prefix}/{i}": a for prefix, items in lists.items() for i, a in enumerate(items)}
    meta = meta | {"format": FORMAT, "counts": {k: len(v) for k, v in lists.items()}}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, __meta__=np.array(json.dumps(meta)), **arrays)

    save_checkpoint(
        path,
        write,
        phase=meta["phase_name"],
        epoch=meta["epoch"],
        phase_done=meta["phase_done"],
    )


def load_state(run_dir: Path) -> ResumeState | None:
    """The newest complete resume state of a run directory, or None (incomplete ones named)."""
    found = usable_checkpoint(Path(run_dir) / "checkpoints" / STATE_FILE)
    if found is None:
        return None
    path, _ = found
    with np.load(path, allow_pickle=False) as npz:
        meta = json.loads(str(npz["__meta__"]))
        arrays = {k: npz[k] for k in npz.files if k != "__meta__"}
    if meta.get("format") != FORMAT:
        raise ResumeError(
            f"{path} was written by another version of finetune (format {meta.get('format')}); "
            "it cannot be resumed: pass --overwrite to start the run again."
        )
    return ResumeState(meta, arrays, path)


def remove_state(run_dir: Path) -> None:
    """Deletes the resume state (and its previous copy) of a finished run."""
    remove_checkpoint(Path(run_dir) / "checkpoints" / STATE_FILE)


def assign_all(variables: list[Any], values: list[np.ndarray], what: str, path: Any) -> None:
    """Assigns saved values to variables, refusing a different count or shape."""
    if len(variables) != len(values):
        raise ResumeError(
            f"{path}: {len(values)} saved {what} values for {len(variables)} variables; the "
            "model or recipe changed since the run was interrupted. Pass --overwrite to start "
            "again."
        )
    for variable, value in zip(variables, values, strict=True):
        if tuple(variable.shape) != tuple(value.shape):
            raise ResumeError(
                f"{path}: saved {what} {variable.path} has shape {tuple(value.shape)}, the "
                f"model's {tuple(variable.shape)}; the model changed. Pass --overwrite to start "
                "again."
            )
        variable.assign(value)


def fingerprint_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between two run fingerprints, one line per difference."""
    changes = []
    for key in sorted(set(saved) | set(current)):
        before, after = saved.get(key), current.get(key)
        if before == after:
            continue
        if key == "data_fingerprint":
            changes.append(
                f"the data (its files, contents, labels or split): fingerprint {before} -> {after}"
            )
        else:
            changes.append(f"{key}: {before!r} -> {after!r}")
    return changes
