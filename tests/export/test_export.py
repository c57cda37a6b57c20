"""Export of a real (small) run to every format, checked with each format's own runtime."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
from typer.testing import CliRunner

import finetune
from finetune.cli import app
from finetune.errors import FinetuneError
from finetune.export import load_exported
from finetune.export.parity import evaluation_images
from tests.helpers import FASHION, image_subset

pytestmark = pytest.mark.slow

# Planted in run.json as if the run had been calibrated: exports must carry it to predict.
TEMPERATURE = 2.0
# Largest |logit difference| measured on this run's 9 test images: keras and saved_model 0,
# litert 3e-6, onnx 3e-6, litert float16 2.5e-3.
LOGIT_TOLERANCE = {"keras": 1e-4, "saved_model": 1e-4, "litert": 1e-4, "onnx": 1e-4}
FLOAT16_TOLERANCE = 2e-2


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    data = image_subset(FASHION, tmp_path_factory.mktemp("fashion"), classes=3, per_class=30)
    out = tmp_path_factory.mktemp("runs") / "fashion"
    finetune.train(
        data,
        out=out,
        image_size=32,
        head_epochs=3,
        finetune_epochs=0,
        check_data=False,
        progress=False,
    )
    info = json.loads((out / "run.json").read_text())
    info["calibration"] = {"temperature": TEMPERATURE}
    (out / "run.json").write_text(json.dumps(info))
    return out


@pytest.fixture(scope="module")
def run(run_dir):
    loaded = finetune.Run.load(run_dir)
    assert loaded.temperature == TEMPERATURE
    return loaded


@pytest.fixture(scope="module")
def test_images(run):
    images, labels, where = evaluation_images(run)
    assert where == "test split" and len(images) == 9
    return images, labels


_exports: dict[tuple, finetune.ExportReport] = {}


def exported(run_dir, fmt, quantize="none", **options) -> finetune.ExportReport:
    """Each export made once per module, and timed."""
    key = (fmt, quantize, tuple(sorted(options.items())))
    if key not in _exports:
        start = time.perf_counter()
        _exports[key] = finetune.export_run(
            run_dir, fmt, quantize=quantize, latency_runs=3, **options
        )
        print(f"export {key}: {time.perf_counter() - start:.1f} s")
    return _exports[key]


@pytest.mark.parametrize(
    ("fmt", "quantize"),
    [
        ("keras", "none"),
        ("saved_model", "none"),
        ("litert", "none"),
        ("litert", "float16"),
        ("onnx", "none"),
    ],
)
def test_float_export_agrees_with_keras(run_dir, run, test_images, fmt, quantize):
    report = exported(run_dir, fmt, quantize)
    images, labels = test_images
    model = load_exported(report.path)
    logits = model.predict_logits(images)
    reference = run.predict_logits(images, runtime="keras")  # what exports are held to
    tolerance = FLOAT16_TOLERANCE if quantize == "float16" else LOGIT_TOLERANCE[fmt]
    np.testing.assert_allclose(logits, reference, atol=tolerance, rtol=0)
    agreement = np.mean(logits.argmax(1) == reference.argmax(1))
    assert agreement >= 0.995
    # The parity report is computed from the same predictions, not written down.
    p = report.parity
    assert p.passed and p.min_agreement == 0.995
    assert p.agreement == pytest.approx(agreement)
    assert p.num_images == len(labels)
    assert p.keras_accuracy == pytest.approx(np.mean(reference.argmax(1) == labels))
    assert p.export_accuracy == pytest.approx(np.mean(logits.argmax(1) == labels))
    assert p.max_abs_logit_diff == pytest.approx(np.abs(logits - reference).max(), abs=1e-6)


def test_keras_int8_quantizes_the_dense_head_and_nothing_else(run_dir, run, test_images):
    report = exported(run_dir, "keras", "int8")
    model = load_exported(report.path)  # Keras safe mode
    quantized = [layer for layer in model.model.layers if getattr(layer, "quantization_mode", None)]
    assert [layer.name for layer in quantized] == ["logits"]
    assert {w.dtype for w in quantized[0].weights} == {"int8", "float32"}  # kernel, scale, bias
    assert any(w.dtype == "int8" and len(w.shape) == 2 for w in quantized[0].weights)
    convolutions = [w for w in model.model.weights if len(w.shape) == 4]
    assert convolutions and all(w.dtype == "float32" for w in convolutions)
    images, _ = test_images
    logits, reference = model.predict_logits(images), run.predict_logits(images, runtime="keras")
    p = report.parity
    assert p.min_agreement is None  # quantized: reported, not bounded
    assert p.agreement == pytest.approx(np.mean(logits.argmax(1) == reference.argmax(1)))
    assert p.max_abs_logit_diff == pytest.approx(np.abs(logits - reference).max(), abs=1e-6)
    assert p.max_abs_logit_diff < 0.1  # int8 weights of one layer: a small error
    assert json.loads(report.labels_path.read_text())["quantize"] == "int8"


def test_onnx_int8_is_integer_inside_and_keeps_its_labels(run_dir, run):
    import onnx

    report = exported(run_dir, "onnx", "int8", calibration_images=16)
    proto = onnx.load(str(report.path))
    ops = {node.op_type for node in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    conv_weights = {node.input[1] for node in proto.graph.node if node.op_type == "Conv"}
    producers = {node.output[0]: node for node in proto.graph.node}
    initializers = {t.name: t for t in proto.graph.initializer}
    # Every convolution's weight comes from an int8 initializer through DequantizeLinear.
    for name in conv_weights:
        node = producers[name]
        assert node.op_type == "DequantizeLinear", name
        assert initializers[node.input[0]].data_type == onnx.TensorProto.INT8, name
    p = report.parity
    assert p.min_agreement is None and p.passed
    assert report.calibration_images == 16
    assert p.export_size_bytes < 0.35 * exported(run_dir, "onnx").parity.export_size_bytes
    model = load_exported(report.path)
    assert model.class_names == run.class_names and model.temperature == TEMPERATURE
    props = {e.key for e in proto.metadata_props}
    assert "finetune.labels" in props


def test_labels_and_temperature_travel_with_every_export(run_dir, run):
    test_files = [p for p, _ in run.split_samples("test")]
    on_run = finetune.predict(run_dir, test_files, top_k=3, runtime="keras")
    for fmt, quantize in [
        ("keras", "none"),
        ("saved_model", "none"),
        ("litert", "none"),
        ("onnx", "none"),
    ]:
        report = exported(run_dir, fmt, quantize)
        labels = json.loads(report.labels_path.read_text())
        assert labels["class_names"] == run.class_names
        assert labels["temperature"] == TEMPERATURE
        on_export = finetune.predict(report.path, test_files, top_k=3)
        assert [r.top[0][0] for r in on_export] == [r.top[0][0] for r in on_run], fmt
        for a, b in zip(on_export, on_run, strict=True):
            assert [n for n, _ in a.top] == [n for n, _ in b.top]
            np.testing.assert_allclose([q for _, q in a.top], [q for _, q in b.top], atol=1e-4)
    # The temperature matters here: without it the probabilities would differ.
    images, _, _ = evaluation_images(run)
    uncalibrated = run.predict_proba(images, temperature=1.0).max(1)
    calibrated = np.array([r.top[0][1] for r in on_run])
    assert np.abs(uncalibrated - calibrated).max() > 0.02


def test_labels_inside_saved_model_onnx_and_litert_files(run_dir, run, tmp_path):
    saved = exported(run_dir, "saved_model")
    assert saved.labels_path == saved.path / "assets.extra" / "labels.json"
    onnx_export = exported(run_dir, "onnx")
    onnx_export.labels_path.rename(onnx_export.labels_path.with_suffix(".moved"))
    try:
        assert load_exported(onnx_export.path).class_names == run.class_names
    finally:
        onnx_export.labels_path.with_suffix(".moved").rename(onnx_export.labels_path)
    # A .tflite copied alone keeps its classes and temperature (LiteRT metadata) ...
    for quantize in ("none", "int8"):
        litert = exported(run_dir, "litert", quantize)
        alone = tmp_path / quantize / "model.tflite"
        alone.parent.mkdir()
        shutil.copy(litert.path, alone)
        model = load_exported(alone)
        assert model.class_names == run.class_names and model.temperature == TEMPERATURE
        images, _, _ = evaluation_images(run)
        np.testing.assert_array_equal(
            model.predict_logits(images), load_exported(litert.path).predict_logits(images)
        )
    # ... and one without that metadata (nor a labels file) is refused with a clear message.
    from tensorflow.lite.tools import flatbuffer_utils

    bare = flatbuffer_utils.read_model(str(litert.path))
    bare.metadata = [m for m in bare.metadata if m.name != b"finetune.labels"]
    flatbuffer_utils.write_model(bare, str(tmp_path / "bare.tflite"))
    with pytest.raises(FinetuneError, match="bare.tflite has no labels"):
        load_exported(tmp_path / "bare.tflite")


def test_int8_model_is_integer_inside_and_reports_its_accuracy_change(run_dir, run):
    report = exported(run_dir, "litert", "int8")
    model = load_exported(report.path)
    details = model.interpreter.get_tensor_details()
    dtypes = [d["dtype"] for d in details]
    floats = [d for d in details if d["dtype"] == np.float32]
    # Only the float input and output (and their (de)quantize ops' ends) stay float.
    assert len(floats) <= 2, [d["name"] for d in floats]
    assert dtypes.count(np.int8) > 50
    assert model.input["dtype"] == np.float32 and model.output["dtype"] == np.float32
    p = report.parity
    assert p.min_agreement is None and p.passed
    assert p.accuracy_change == pytest.approx(p.export_accuracy - p.keras_accuracy)
    assert report.calibration_images == len(run.split_samples("train")) == 72
    assert p.export_size_bytes < 0.35 * exported(run_dir, "litert").parity.export_size_bytes


def test_cli_int8_io_export_and_predict(run_dir, run):
    result = CliRunner().invoke(
        app,
        [
            "export",
            str(run_dir),
            "--format",
            "litert",
            "--quantize",
            "int8",
            "--int8-io",
            "--calibration-images",
            "16",
            "--latency-runs",
            "3",
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert "top-1 agreement" in result.output and "latency" in result.output
    path = run_dir / "export" / "model_int8_int8io.tflite"
    model = load_exported(path)
    assert model.input["dtype"] == np.int8 and model.output["dtype"] == np.int8
    assert model.input["quantization"][0] > 0
    assert {d["dtype"] for d in model.interpreter.get_tensor_details()} <= {np.int8, np.int32}
    record = json.loads((run_dir / "export.json").read_text())["exports"]
    entry = next(e for e in record if e["path"] == str(path))
    assert entry["int8_io"] and entry["calibration_images"] == 16 and entry["written"]

    test_files = [str(p) for p, _ in run.split_samples("test")]
    out = CliRunner().invoke(
        app,
        ["predict", str(path), *test_files, "--format", "json", "--top-k", "2"],
        catch_exceptions=False,
    )
    assert out.exit_code == 0, out.output
    predictions = json.loads(out.stdout)
    assert len(predictions) == len(test_files)
    images, _, _ = evaluation_images(run)
    expected = model.predict_logits(images).argmax(1)
    for row, k in zip(predictions, expected, strict=True):
        assert [p["label"] for p in row["predictions"]][0] == run.class_names[k]
        assert len(row["predictions"]) == 2 and row["error"] is None


def test_export_json_holds_each_export(run_dir):
    report = exported(run_dir, "litert")
    record = json.loads((run_dir / "export.json").read_text())["exports"]
    entry = next(e for e in record if e["path"] == str(report.path))
    assert entry["agreement"] == report.parity.agreement
    assert entry["export_size_bytes"] == report.path.stat().st_size
    assert entry["keras_size_bytes"] == (run_dir / "model.keras").stat().st_size
    assert entry["keras_weights_bytes"] == 4 * finetune.Run.load(run_dir).model.count_params()
    assert entry["keras_latency_ms"] > 0 and entry["export_latency_ms"] > 0
    assert entry["runtime"].startswith(("ai-edge-litert", "tf.lite"))


def test_keras_export_is_for_inference_only(run_dir):
    report = exported(run_dir, "keras")
    assert getattr(load_exported(report.path).model, "optimizer", None) is None
    assert report.parity.export_size_bytes < 1.05 * report.parity.keras_weights_bytes


def test_existing_output_needs_overwrite(run_dir):
    report = exported(run_dir, "keras")
    with pytest.raises(FinetuneError, match="already exists; add --overwrite"):
        finetune.export_run(run_dir, "keras", out=report.path)
    with pytest.raises(FinetuneError, match="would replace the run directory"):
        finetune.export_run(run_dir, "saved_model", out=run_dir, overwrite=True)
    with pytest.raises(FinetuneError, match="the run's own model"):
        finetune.export_run(run_dir, "keras", out=run_dir / "model.keras", overwrite=True)


def test_failed_parity_leaves_the_old_artifact_and_no_partial_file(run_dir, monkeypatch):
    report = exported(run_dir, "keras")
    before = report.path.read_bytes()
    monkeypatch.setattr("finetune.export.parity.MIN_FLOAT_AGREEMENT", 1.01)
    with pytest.raises(FinetuneError, match=r"agrees with the Keras model on only 100\.0%"):
        finetune.export_run(run_dir, "keras", overwrite=True, latency_runs=1)
    assert report.path.read_bytes() == before
    assert not [f for f in report.path.parent.iterdir() if "partial" in f.name]
    record = json.loads((run_dir / "export.json").read_text())["exports"]
    entry = next(e for e in record if e["path"] == str(report.path))
    assert entry["written"] is False and entry["passed"] is False


def test_failed_conversion_leaves_no_half_file(run_dir, tmp_path, monkeypatch):
    def half_written(model, path, labels, representative=None):
        path.write_bytes(b"half an onnx file")
        raise RuntimeError("converter crashed")

    monkeypatch.setattr("finetune.export.convert._write_onnx", half_written)
    out = tmp_path / "m.onnx"
    with pytest.raises(FinetuneError, match="onnx converter failed: RuntimeError"):
        finetune.export_run(run_dir, "onnx", out=out)
    assert list(tmp_path.iterdir()) == []
