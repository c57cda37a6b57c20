"""The `finetune` command line, run in-process (Typer's runner) and once as a real process."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from finetune.cli import app
from tests.helpers import DIGITS, image_subset

runner = CliRunner()


def finetune_config(run_dir):
    from finetune.config import load_config

    return load_config(run_dir / "config.toml")


def invoke(*args: str):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    data = image_subset(DIGITS, tmp_path_factory.mktemp("digits"), classes=3, per_class=30)
    out = tmp_path_factory.mktemp("runs") / "digits"
    output = invoke(
        "train",
        data,
        "--out",
        out,
        "--image-size",
        "32",
        "--head-epochs",
        "1",
        "--finetune-epochs",
        "1",
        "--seed",
        "5",
        "--augment",
        "strong",
        "--head-augment",
    )
    return data, out, output


@pytest.mark.slow
def test_train_prints_metrics_and_writes_the_run(trained):
    _, out, output = trained
    assert "accuracy" in output and str(out) in output
    assert (out / "model.keras").is_file()
    assert finetune_config(out).augment.randaugment  # --augment strong reached the run
    assert finetune_config(out).recipe.head_augment  # and --head-augment: phase 1 augmented
    history = json.loads((out / "history.json").read_text())
    assert [r["features_cached"] for r in history if r["phase"] == "head"] == [False]


@pytest.mark.slow
def test_evaluate_and_predict_a_run(trained):
    data, out, _ = trained
    metrics = json.loads(invoke("evaluate", out, "--json"))
    assert metrics["num_images"] > 0 and 0.0 <= metrics["accuracy"] <= 1.0

    as_json = json.loads(invoke("predict", out, data / "0", "--format", "json", "--top-k", "2"))
    assert len(as_json) == len(list((data / "0").glob("*.png")))
    first = as_json[0]["predictions"]
    assert len(first) == 2 and {p["label"] for p in first} <= {"0", "1", "2"}
    assert first[0]["probability"] >= first[1]["probability"]

    rows = list(csv.DictReader(io.StringIO(invoke("predict", out, data / "1", "--format", "csv"))))
    assert rows and rows[0]["rank"] == "1" and float(rows[0]["probability"]) > 0
    assert "probability" in invoke("predict", out, data / "2")

    # A file name that is not UTF-8 is printed with its odd byte escaped, in every format.
    odd = data.parent / "odd" / os.fsdecode(b"caf\xe9.png")
    odd.parent.mkdir(exist_ok=True)
    shutil.copy(next((data / "0").glob("*.png")), odd)
    assert json.loads(invoke("predict", out, odd, "--format", "json"))[0]["path"].endswith(
        "caf\\xe9.png"
    )
    assert "caf\\xe9.png,1," in invoke("predict", out, odd, "--format", "csv")
    invoke("predict", out, odd)  # the table: no UnicodeEncodeError (exit status 0)

    # No classes asked for is an error, not an empty table.
    from finetune.errors import ConfigError

    with pytest.raises(ConfigError, match=r"top_k \(--top-k\) is 0"):
        runner.invoke(app, ["predict", str(out), str(odd), "--top-k", "0"],
                           catch_exceptions=False)  # fmt: skip


@pytest.mark.slow
def test_predict_with_a_backbone_imagenet_head_names_the_cat(tmp_path):
    from skimage import data

    photo = tmp_path / "chelsea.jpg"
    Image.fromarray(data.chelsea()).save(photo)
    (tmp_path / "notes.jpg").write_text("not an image")
    result = json.loads(
        invoke("predict", "efficientnet_lite0", photo, tmp_path / "notes.jpg", "--format", "json")
    )
    assert result[0]["predictions"][0]["label"] in {"tabby", "tiger cat", "Egyptian cat"}
    assert len(result[0]["predictions"]) == 5
    assert result[1]["error"] and not result[1]["predictions"]


def test_backbones_lists_every_entry_with_weights_status():
    output = invoke("backbones")
    for name in (
        "efficientnet_lite0",
        "efficientnet_lite2",
        "vgg16",
        "resnet50",
        "mobilenet_v2",
        "mobilenet_v3_small",
        "efficientnet_b0",
    ):
        assert name in output
    assert "available" in output and "missing" in output


def test_user_errors_exit_2_with_one_clear_line(tmp_path):
    (tmp_path / "only_class").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "only_class" / "a.png")
    proc = subprocess.run(
        [sys.executable, "-m", "finetune", "train", str(tmp_path), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "Traceback" not in proc.stderr
    assert "class" in proc.stderr


def test_a_damaged_run_directory_is_named(tmp_path):
    import finetune

    (tmp_path / "model.keras").write_bytes(b"not a zip")
    with pytest.raises(finetune.FinetuneError, match="run.json is missing"):
        finetune.Run.load(tmp_path)
    (tmp_path / "run.json").write_text('{"class_names": ["a"], "image_size": 32}')
    with pytest.raises(finetune.FinetuneError, match="cannot load"):
        finetune.Run.load(tmp_path)
    with pytest.raises(finetune.FinetuneError, match="not a run directory"):
        finetune.Run.load(tmp_path / "elsewhere")


@pytest.mark.slow
def test_test_time_augmentation(trained):
    import numpy as np

    import finetune

    data, out, _ = trained
    metrics = json.loads(invoke("evaluate", out, "--json", "--tta", "3"))
    assert metrics["tta"] == 3 and metrics["num_images"] > 0
    run = finetune.Run.load(out)
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    plain = run.predict_proba(x)
    np.testing.assert_array_equal(run.predict_proba(x, tta=1), plain)
    averaged = run.predict_proba(x, tta=3)
    np.testing.assert_array_equal(run.predict_proba(x, tta=3), averaged)  # seeded: repeatable
    np.testing.assert_allclose(averaged.sum(axis=1), 1.0, rtol=1e-6)
    assert not np.allclose(averaged, plain)
    with pytest.raises(finetune.FinetuneError, match="tta must be 1 or more"):
        run.predict_proba(x, tta=0)
    with pytest.raises(finetune.FinetuneError, match="ImageNet head"):
        finetune.predict("efficientnet_lite0", [next((data / "0").glob("*.png"))], tta=2)


@pytest.mark.slow
def test_the_runtime_option_of_evaluate_and_predict(trained, tmp_path):
    data, out, _ = trained
    with_keras = json.loads(invoke("evaluate", out, "--json", "--runtime", "keras"))
    with_onnx = json.loads(invoke("evaluate", out, "--json", "--runtime", "onnxruntime"))
    assert (with_keras["runtime"], with_onnx["runtime"]) == ("keras", "onnxruntime")
    assert with_onnx["loss"] == pytest.approx(with_keras["loss"], abs=1e-5)
    with_openvino = json.loads(invoke("evaluate", out, "--json", "--runtime", "OpenVINO"))
    assert with_openvino["runtime"] == "openvino"
    assert with_openvino["loss"] == pytest.approx(with_keras["loss"], abs=1e-5)
    # The default for a few images: bfloat16 OpenVINO on a CPU with it, Keras on others
    # (OpenVINO from 15,000 images). With bfloat16 the conversion is the one the end of
    # training made (its evaluation): evaluating converts nothing new.
    from finetune.inference import cpu_has_bfloat16

    default = "openvino-bf16" if cpu_has_bfloat16() else "keras"
    kept = Path(os.environ["FINETUNE_CACHE_DIR"]) / "openvino"
    before = sorted(kept.glob("*.blob"))
    by_default = json.loads(invoke("evaluate", out, "--json"))
    assert by_default["runtime"] == default
    assert sorted(kept.glob("*.blob")) == before
    if default == "openvino-bf16":
        named = json.loads(invoke("evaluate", out, "--json", "--runtime", "openvino-bf16"))
        assert named["loss"] == by_default["loss"]
        assert named["loss"] != pytest.approx(with_keras["loss"], abs=1e-5)  # not float32

    images = data / "0"
    keras_top = json.loads(invoke("predict", out, images, "--format", "json", "--runtime", "keras"))
    onnx_top = json.loads(
        invoke("predict", out, images, "--format", "json", "--runtime", "onnxruntime")
    )
    for k, o in zip(keras_top, onnx_top, strict=True):
        assert k["path"] == o["path"]
        assert k["predictions"][0]["label"] == o["predictions"][0]["label"]
        assert o["predictions"][0]["probability"] == pytest.approx(
            k["predictions"][0]["probability"], abs=1e-5
        )

    # The API says which runtime ran.
    import finetune

    run = finetune.Run.load(out)
    finetune.predict(run, [images], runtime="onnxruntime")
    assert run.last_runtime == "onnxruntime"
    finetune.predict(run, [images])
    assert run.last_runtime == default

    # (main() turns these errors into one line and exit status 2, as checked above.)
    from finetune.errors import FinetuneError

    with pytest.raises(FinetuneError, match=r"runtime \(--runtime\) is 'gpu'"):
        runner.invoke(app, ["evaluate", str(out), "--runtime", "gpu"], catch_exceptions=False)
    one = str(next(images.glob("*.png")))
    with pytest.raises(FinetuneError, match="--runtime applies to a run directory"):
        args = ["predict", "efficientnet_lite0", one, "--runtime", "keras"]
        runner.invoke(app, args, catch_exceptions=False)
