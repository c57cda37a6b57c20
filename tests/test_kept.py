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
from finetune.inference import OpenVinoForward, prune_conversions
from finetune.kept import file_sha256, kept_forward, link_file, link_run_conversion
from finetune.predict import expand_inputs, predict
from finetune.run import MODEL_FILE, Run
from tests.helpers import DIGITS, image_subset, run_python

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
    return np.array([[p for _, p in sorted(r.top)] for r in results if r.error is None])


def linked(model_file: Path):
    return kept_forward(file_sha256(model_file), RUNTIME)


def refuse_loading(monkeypatch) -> None:
    def refused(*args, **kwargs):
        raise AssertionError("the run's Keras model was loaded")

    monkeypatch.setattr(Run, "load", classmethod(refused))


@pytest.mark.slow
def test_training_links_its_conversion_and_predict_uses_it_without_keras(
    trained, tmp_path, monkeypatch
):
    data, out = trained
    assert linked(out / MODEL_FILE) is not None
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    inputs = [data / "1", broken, next((data / "0").glob("*.png"))]
    # A `Run` always predicts through its Keras model (here loading the same conversion).
    expected = predict(Run.load(out, compile=False), inputs, top_k=3, runtime=RUNTIME)

    refuse_loading(monkeypatch)
    results = predict(out, inputs, top_k=3, runtime=RUNTIME)
    assert [r.path for r in results] == [r.path for r in expected] == expand_inputs(inputs)
    assert [r.error for r in results] == [r.error for r in expected]
    assert sum(r.error is not None for r in results) == 1
    np.testing.assert_array_equal(probabilities(results), probabilities(expected))
    assert [r.top for r in results] == [r.top for r in expected]  # order, names, values


@pytest.mark.slow
def test_a_linked_conversion_that_fails_goes_back_to_keras_and_is_unlinked(
    trained, tmp_path, monkeypatch
):
    data, out = trained
    run_dir = tmp_path / "run"
    shutil.copytree(out, run_dir)  # the same bytes: the same link
    assert linked(run_dir / MODEL_FILE) is not None

    def failing(self, batch):
        raise RuntimeError("no CPU plugin today")

    monkeypatch.setattr(OpenVinoForward, "__call__", failing)
    with pytest.warns(RuntimeWarning, match="no CPU plugin today"):
        results = predict(run_dir, [data / "2"], top_k=3, runtime=RUNTIME)  # Keras computed
    assert results and all(r.error is None and len(r.top) == 3 for r in results)
    assert linked(run_dir / MODEL_FILE) is None  # not tried again next time
    monkeypatch.undo()
    again = predict(run_dir, [data / "2"], top_k=3, runtime=RUNTIME)
    assert linked(run_dir / MODEL_FILE) is not None  # linked again by the Keras path
    np.testing.assert_allclose(probabilities(again), probabilities(results), atol=1e-4)


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
    assert linked(other / MODEL_FILE) is None  # other bytes: no link

    inputs = [data / "0"]
    loads = []
    real_load = Run.load.__func__

    def counting(cls, *args, **kwargs):
        loads.append(args)
        return real_load(cls, *args, **kwargs)

    monkeypatch.setattr(Run, "load", classmethod(counting))
    first = predict(other, inputs, top_k=3, runtime=RUNTIME)
    assert len(loads) == 1  # through the run's Keras model, which converted the new weights
    assert linked(other / MODEL_FILE) is not None  # and linked them

    refuse_loading(monkeypatch)
    again = predict(other, inputs, top_k=3, runtime=RUNTIME)
    np.testing.assert_array_equal(probabilities(again), probabilities(first))
    original = predict(out, inputs, top_k=3, runtime=RUNTIME)
    assert not np.array_equal(probabilities(original), probabilities(first))


@pytest.mark.slow
def test_a_conversion_is_linked_only_for_the_weights_it_was_made_from(trained):
    data, out = trained
    run = Run.load(out, compile=False)
    images, _, _ = decode_images(expand_inputs([data / "0"]), run.image_size, progress=False)
    digest = "0" * 64  # stands for the file the model was saved to
    assert link_run_conversion(run, digest) is None  # nothing converted yet: nothing to link
    run.predict_proba(images, runtime=RUNTIME)
    assert link_run_conversion(run, digest) == link_file(digest, RUNTIME)
    bias = run.model.layers[-1].bias
    bias.assign(bias.numpy() + 1.0)  # weights changed after the conversion was made
    assert link_run_conversion(run, digest) is None


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


@pytest.mark.slow
def test_the_command_through_the_runs_model_loads_tensorflow_quietly(trained):
    # Started by the script, finetune defers TensorFlow; predicting in Keras loads it (and every
    # custom layer) through the start-up filter.
    data, out = trained
    image = next((data / "1").glob("*.png"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_CPP")}
    done = subprocess.run(
        [str(COMMAND), "predict", str(out), str(image), "--format", "json", "--runtime", "keras"],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr == ""
    assert json.loads(done.stdout)[0]["predictions"]


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"]], ids=" ".join)
def test_the_commands_help_does_not_import_tensorflow(args):
    env = dict(os.environ, PYTHONPROFILEIMPORTTIME="1")
    done = subprocess.run(
        [str(COMMAND), *args], capture_output=True, text=True, env=env, timeout=120,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0 and "--help" in done.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()}
    assert "typer" in imported and not {"tensorflow", "keras"} & imported


def test_what_predict_from_a_kept_conversion_imports_needs_no_keras():
    # Catches a module-level `import keras` in any module of the fast path.
    code = (
        "import sys, _finetune_cli\n"
        "_finetune_cli.STARTED = True\n"
        "import finetune.cli, finetune.predict, finetune.kept, finetune.inference\n"
        "import finetune.data.decode, finetune.probabilities, finetune.untrusted, finetune.runs\n"
        "print(sorted({'tensorflow', 'keras'} & set(sys.modules)))\n"
    )
    assert run_python(code).strip() == "[]"


@pytest.mark.slow
def test_the_runs_command_reads_json_without_importing_tensorflow(trained):
    _, out = trained
    env = dict(os.environ, PYTHONPROFILEIMPORTTIME="1")
    done = subprocess.run(
        [str(COMMAND), "runs", str(out.parent), "--json"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()}
    assert "finetune.runs" in imported and not {"tensorflow", "keras"} & imported
    listed = json.loads(done.stdout)
    assert [r["path"] for r in listed] == [str(out)]
    assert listed[0]["accuracy"] == json.loads((out / "metrics.json").read_text())["accuracy"]


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
    # a finetune layer, deserialized
    assert run_python(code, timeout=300).strip().startswith("finetune")


def test_links_to_conversions_no_longer_kept_are_pruned(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "cache"))
    digest = "1" * 64
    link = link_file(digest, RUNTIME)
    kept = link.parent / ("a" * 40 + ".blob")
    kept.write_bytes(b"f32\n")
    link.write_text(kept.name + "\n")
    assert kept_forward(digest, RUNTIME) is None  # linked, but not a loadable model:
    assert not link.exists()  # unlinked
    assert link_file("2" * 64, RUNTIME) != link  # named by the file's bytes

    link.write_text(kept.name + "\n")
    prune_conversions(link.parent)
    assert link.is_file()  # its conversion is there
    prune_conversions(link.parent, keep=0)
    assert not kept.exists() and not link.exists()
    link.write_text("../elsewhere.blob\n")  # only a file of the cache folder is loaded
    assert kept_forward(digest, RUNTIME) is None
