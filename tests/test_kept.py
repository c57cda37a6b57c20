"""`finetune predict RUN` from the conversion training kept, found by the model file's bytes:
the same probabilities as the run's own path, without Keras or TensorFlow in the process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import finetune
from finetune.data.decode import decode_images
from finetune.inference import prune_conversions
from finetune.kept import kept_forward, link_file, link_run_conversion
from finetune.predict import expand_inputs, predict
from finetune.run import MODEL_FILE, Run
from tests.helpers import DIGITS, image_subset

# float32 OpenVINO: converted and linked on any CPU (bfloat16 "auto" only where the CPU has it).
RUNTIME = "openvino"
COMMAND = Path(sys.executable).with_name("finetune")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    data = image_subset(DIGITS, tmp_path_factory.mktemp("digits"), classes=3, per_class=20)
    out = tmp_path_factory.mktemp("runs") / "digits"
    saved = os.environ.get("FINETUNE_RUNTIME")
    os.environ["FINETUNE_RUNTIME"] = RUNTIME  # training's own evaluation converts, and links
    try:
        finetune.train(
            data, out=out, image_size=32, head_epochs=1, finetune_epochs=1, seed=2,
            progress=False,
        )  # fmt: skip
    finally:
        if saved is None:
            os.environ.pop("FINETUNE_RUNTIME")
        else:
            os.environ["FINETUNE_RUNTIME"] = saved
    return data, out


def probabilities(results) -> np.ndarray:
    return np.array([[p for _, p in sorted(r.top)] for r in results])


def through_keras_runs_path(run_dir: Path, inputs: list[Path]) -> list:
    """What `predict` gave before: the run loaded, its `predict_proba` (same conversion)."""
    run = Run.load(run_dir, compile=False)
    images, ok, _ = decode_images(expand_inputs(inputs), run.image_size, progress=False)
    assert len(ok) == len(expand_inputs(inputs))
    p = run.predict_proba(images, runtime=RUNTIME)
    return [sorted(zip(run.class_names, row, strict=True)) for row in p]


def refuse_loading(monkeypatch) -> None:
    def refused(*args, **kwargs):
        raise AssertionError("the run's Keras model was loaded")

    monkeypatch.setattr(Run, "load", classmethod(refused))


@pytest.mark.slow
def test_training_links_its_conversion_and_predict_uses_it_without_keras(trained, monkeypatch):
    data, out = trained
    assert kept_forward(out / MODEL_FILE, RUNTIME) is not None
    inputs = [data / "1", next((data / "0").glob("*.png"))]
    expected = through_keras_runs_path(out, inputs)

    refuse_loading(monkeypatch)
    results = predict(out, inputs, top_k=3, runtime=RUNTIME)
    assert [r.path for r in results] == expand_inputs(inputs)
    assert all(r.error is None for r in results)
    got = probabilities(results)
    want = np.array([[p for _, p in row] for row in expected])
    np.testing.assert_array_equal(got, want)  # the same conversion, the same batches
    assert [r.top[0][0] for r in results] == [max(row, key=lambda c: c[1])[0] for row in expected]


@pytest.mark.slow
def test_a_changed_model_file_is_not_linked_until_predicted_through_keras(
    trained, tmp_path, monkeypatch
):
    data, out = trained
    other = tmp_path / "other"
    shutil.copytree(out, other)
    run = Run.load(other, compile=False)
    bias = run.model.layers[-1].bias
    bias.assign(bias.numpy() + np.array([0.0, 3.0, 0.0], "float32"))  # class "1" favoured
    run.model.save(other / MODEL_FILE)
    assert kept_forward(other / MODEL_FILE, RUNTIME) is None  # other bytes: no link

    inputs = [data / "0"]
    loads = []
    real_load = Run.load.__func__

    def counting(cls, *args, **kwargs):
        loads.append(args)
        return real_load(cls, *args, **kwargs)

    monkeypatch.setattr(Run, "load", classmethod(counting))
    first = predict(other, inputs, top_k=3, runtime=RUNTIME)
    assert len(loads) == 1  # through the run's Keras model, which converted the new weights
    assert kept_forward(other / MODEL_FILE, RUNTIME) is not None  # and linked them

    refuse_loading(monkeypatch)
    again = predict(other, inputs, top_k=3, runtime=RUNTIME)
    np.testing.assert_array_equal(probabilities(again), probabilities(first))
    original = predict(out, inputs, top_k=3, runtime=RUNTIME)
    assert not np.array_equal(probabilities(original), probabilities(first))


@pytest.mark.slow
def test_a_conversion_is_linked_only_for_the_weights_it_was_made_from(trained, tmp_path):
    data, out = trained
    run = Run.load(out, compile=False)
    images, _, _ = decode_images(expand_inputs([data / "0"]), run.image_size, progress=False)
    copy = tmp_path / MODEL_FILE
    shutil.copy(out / MODEL_FILE, copy)
    assert link_run_conversion(run, copy) is None  # nothing predicted yet: nothing to link
    run.predict_proba(images, runtime="keras")
    assert link_run_conversion(run, copy) is None  # Keras computed: no conversion
    run.predict_proba(images, runtime=RUNTIME)
    assert link_run_conversion(run, copy) == link_file(copy, RUNTIME)
    bias = run.model.layers[-1].bias
    bias.assign(bias.numpy() + 1.0)  # weights changed after the conversion was made
    assert link_run_conversion(run, copy) is None


@pytest.mark.slow
def test_the_command_predicts_from_the_link_without_importing_tensorflow(trained):
    data, out = trained
    image = next((data / "2").glob("*.png"))
    env = dict(os.environ, FINETUNE_RUNTIME=RUNTIME, PYTHONPROFILEIMPORTTIME="1")
    done = subprocess.run(
        [str(COMMAND), "predict", str(out), str(image), "--format", "json", "--top-k", "3"],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()}
    assert "openvino" in imported  # it predicted, in OpenVINO
    assert not {"tensorflow", "keras"} & imported
    shown = json.loads(done.stdout)
    in_process = predict(out, [image], top_k=3, runtime=RUNTIME)[0].to_dict()
    assert shown[0]["predictions"] == in_process["predictions"]


def test_the_commands_help_does_not_import_tensorflow():
    env = dict(os.environ, PYTHONPROFILEIMPORTTIME="1")
    done = subprocess.run(
        [str(COMMAND), "--help"], capture_output=True, text=True, env=env, timeout=120,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0 and "predict" in done.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()}
    assert "typer" in imported and not {"tensorflow", "keras"} & imported


@pytest.mark.slow
def test_import_finetune_still_registers_its_layers_for_keras(trained):
    # Outside the command, `import finetune` loads everything at once, as before.
    _, out = trained
    code = (
        "import sys, finetune, keras\n"
        "assert 'tensorflow' in sys.modules\n"
        f"m = keras.saving.load_model({str(out / MODEL_FILE)!r}, compile=False)\n"
        "print(type(m.layers[1]).__module__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().startswith("finetune")  # a finetune layer, deserialized


def test_links_to_conversions_no_longer_kept_are_pruned(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "cache"))
    model_file = tmp_path / "model.keras"
    model_file.write_bytes(b"one model's bytes")
    link = link_file(model_file, RUNTIME)
    kept = link.parent / ("a" * 40 + ".blob")
    kept.write_bytes(b"f32\n")
    link.write_text(kept.name + "\n")
    assert kept_forward(model_file, RUNTIME) is None  # linked, but not a loadable model
    model_file.write_bytes(b"other bytes")
    assert link_file(model_file, RUNTIME) != link  # named by the file's bytes

    prune_conversions(link.parent)
    assert link.is_file()  # its conversion is there
    prune_conversions(link.parent, keep=0)
    assert not kept.exists() and not link.exists()
