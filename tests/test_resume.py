"""Exact resume: a run killed with SIGKILL anywhere ends as the uninterrupted run of its seed.

One run is killed three times, each in a fresh process: inside the second epoch of the head
phase (trained on cached features), at the boundary between the phases, and inside the last
epoch of the fine-tuning phase (augmented, MixUp, cosine schedule with warm-up, dropout, the
mean of the last two epochs' weights). It is resumed each time, and its final weights and
history must equal those of an uninterrupted run with the same seed to 1e-6. Resuming with
another option or other data is refused, naming what changed.

The kill points come from hooks in the test's own child script (`CHILD`): it prints a line
after every training step and blocks at the chosen step (or before the chosen phase's compile)
until the test kills it. The library has no test hook.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import finetune
from finetune.recipes.resume import ResumeError, load_state
from tests.helpers import DIGITS, image_subset

OPTIONS = {
    "image_size": 32,
    "batch_size": 8,
    "head_epochs": 2,
    "finetune_epochs": 3,
    "mixup": 0.2,
    "dropout": 0.3,
    "average_last_epochs": 2,
    "seed": 5,
    "check_data": False,
}

CHILD = r"""
import json, os, sys, time
import finetune
from finetune.recipes import two_phase

if os.environ.get("CHILD_BFLOAT16"):  # "0": as on a CPU without bfloat16, "1": with it
    two_phase.frozen_in_bfloat16 = lambda runtime: os.environ["CHILD_BFLOAT16"] == "1"

data, out = sys.argv[1], sys.argv[2]
target, options = json.loads(sys.argv[3]), json.loads(sys.argv[4])

def block():
    print("WAITING", flush=True)
    time.sleep(600)

check_batch = two_phase.StopOnNonFinite.on_train_batch_end

def on_train_batch_end(self, batch, logs=None):
    check_batch(self, batch, logs)
    print(f"STEP {self.phase} {self.epoch} {batch}", flush=True)
    if target.get("step") == [self.phase, self.epoch, batch]:
        block()

two_phase.StopOnNonFinite.on_train_batch_end = on_train_batch_end
compile_phase = two_phase.compile_phase
compiled = []

def compile_and_maybe_block(*args, **kwargs):
    compiled.append(1)
    if target.get("compile") == len(compiled):
        block()
    return compile_phase(*args, **kwargs)

two_phase.compile_phase = compile_and_maybe_block
options |= json.loads(os.environ.get("CHILD_OPTIONS", "{}"))
finetune.train(data, out=out, progress=False, **options)
print("FINISHED", flush=True)
"""


def run_child(data: Path, out: Path, target: dict, **env_vars: str) -> list[str]:
    """Runs a training in a new process (with `env_vars` set); SIGKILLs it when it blocks at
    `target`."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **env_vars}
    argv = [sys.executable, "-c", CHILD, str(data), str(out), json.dumps(target)]
    child = subprocess.Popen(
        [*argv, json.dumps(OPTIONS)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env,
    )  # fmt: skip
    lines = []
    try:
        for line in child.stdout:
            lines.append(line.strip())
            if line.strip() == "WAITING":
                os.kill(child.pid, signal.SIGKILL)
                break
    finally:
        child.wait(timeout=300)
        stderr = child.stderr.read()
        child.stdout.close()
        child.stderr.close()
    if target:
        assert child.returncode == -signal.SIGKILL, stderr[-3000:]
    else:
        assert child.returncode == 0 and lines[-1] == "FINISHED", stderr[-3000:]
    return lines


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return image_subset(DIGITS, tmp_path_factory.mktemp("digits"), classes=3, per_class=16)


@pytest.mark.slow
def test_a_run_killed_three_times_ends_as_the_uninterrupted_run(digits, tmp_path):
    out = tmp_path / "run"
    # 1. Killed inside the head phase's second epoch (cached features), after its third step.
    lines = run_child(digits, out, {"step": ["head", 1, 2]})
    assert "STEP head 0 4" in lines and lines[-2] == "STEP head 1 2"
    state = load_state(out)
    assert (state.meta["phase_name"], state.meta["epoch"], state.meta["phase_done"]) == (
        "head", 1, False,
    )  # fmt: skip
    assert not (out / "model.keras").exists()

    # Resuming with anything changed is refused, naming it; the saved state is untouched.
    with pytest.raises(ResumeError, match=r"recipe\.head_lr: 0\.001 -> 0\.002"):
        finetune.train(digits, out=out, progress=False, **OPTIONS | {"head_lr": 0.002})
    fewer = tmp_path / "fewer"
    shutil.copytree(digits, fewer)
    next(iter(sorted(fewer.rglob("*.png")))).unlink()
    with pytest.raises(ResumeError, match="the data"):
        finetune.train(fewer, out=out, progress=False, **OPTIONS)
    with pytest.MonkeyPatch.context() as env:  # another runtime computes other features
        env.setenv("FINETUNE_RUNTIME", "keras")
        with pytest.raises(ResumeError, match=r"FINETUNE_RUNTIME \(environment\): 'auto' -> 'k"):
            finetune.train(digits, out=out, progress=False, **OPTIONS)
    assert load_state(out).meta == state.meta
    with pytest.raises(finetune.FinetuneError, match="no complete checkpoint"):
        finetune.train(digits, out=tmp_path / "empty", resume=True, progress=False, **OPTIONS)

    # 2. Resumed, then killed at the phase boundary (before the fine-tuning phase compiles).
    lines = run_child(digits, out, {"compile": 2})
    assert "STEP head 1 4" in lines and "STEP head 0 0" not in lines  # epoch 1 was not redone
    state = load_state(out)
    assert (state.meta["phase_name"], state.meta["phase_done"]) == ("head", True)

    # 3. Resumed, then killed inside the last epoch of the fine-tuning phase.
    lines = run_child(digits, out, {"step": ["finetune", 4, 1]})
    assert lines[0] == "STEP finetune 2 0"
    state = load_state(out)
    assert (state.meta["phase_name"], state.meta["epoch"]) == ("finetune", 4)
    assert state.meta["callbacks"]  # early stopping / averaging / checkpoint states saved

    # 4. Resumed to the end.
    lines = run_child(digits, out, {})
    assert lines[0] == "STEP finetune 4 0"
    resumed = finetune.Run.load(out)
    assert load_state(out) is None  # a finished run keeps no resume state

    reference = finetune.train(digits, progress=False, **OPTIONS)
    for a, b in zip(reference.model.get_weights(), resumed.model.get_weights(), strict=True):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3, 4, 5]
    assert [r["averaged"] for r in resumed.history if "averaged" in r] == [True, True]
    for got, want in zip(resumed.history, reference.history, strict=True):
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key] == pytest.approx(value, abs=1e-6), key
    assert resumed.metrics["confusion_matrix"] == reference.metrics["confusion_matrix"]


@pytest.mark.slow
def test_a_resumed_phase_records_how_each_of_its_epochs_trained(digits, tmp_path):
    """The history says how each epoch trained, as its own process did: here the fine-tuning
    phase's first epoch in float32 (the process before the kill, as on a CPU without
    bfloat16), the others in bfloat16 (the resumed process, as "auto" on a CPU with it). The
    report says so, by epochs."""
    out = tmp_path / "run"
    options = json.dumps(
        {"head_epochs": 1, "finetune_epochs": 3, "mixup": 0.0, "average_last_epochs": 0}
    )
    target = {"step": ["finetune", 2, 1]}
    lines = run_child(digits, out, target, CHILD_BFLOAT16="0", CHILD_OPTIONS=options)
    assert lines[-2] == "STEP finetune 2 1"
    run_child(digits, out, {}, CHILD_BFLOAT16="1", CHILD_OPTIONS=options)
    history = finetune.Run.load(out).history
    assert [(r["phase"], r["epoch"]) for r in history] == [
        ("head", 1), ("finetune", 2), ("finetune", 3), ("finetune", 4),
    ]  # fmt: skip
    assert all(not r["features_cached"] for r in history[1:])
    trained = [r.get("trained_bfloat16", False) for r in history[1:]]
    assert trained == [False, True, True]
    page = (out / "report.html").read_text()
    assert "no: through the network (epoch 2); no: through the network (in bfloat16" in page
    assert "(epochs 3-4)" in page


def test_a_state_of_another_format_is_refused_by_name(tmp_path, monkeypatch):
    # A format-1 state saved the augmentation's random state; replayed with keyed augmentation
    # its epoch would differ from the uninterrupted run, so it is refused, not half-resumed.
    from finetune.recipes import resume

    meta = {"phase_name": "finetune", "epoch": 3, "phase_done": False}
    path = tmp_path / "checkpoints" / resume.STATE_FILE
    path.parent.mkdir()
    resume.save_state(path, meta, {"model": [np.zeros(2)]})
    assert load_state(tmp_path).meta["epoch"] == 3
    with monkeypatch.context() as patch:
        patch.setattr(resume, "FORMAT", 1)
        resume.save_state(path, meta, {"model": [np.zeros(2)]})
    saved = path.read_bytes()
    with pytest.raises(ResumeError, match=r"resume\.npz was written by another version .*format 1"):
        load_state(tmp_path)
    assert path.read_bytes() == saved  # refused, left as it was
