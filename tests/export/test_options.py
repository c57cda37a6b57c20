"""Export options and files refused with a clear message, before any conversion starts."""

from __future__ import annotations

import pytest

import finetune
from finetune.errors import ConfigError, FinetuneError
from finetune.export import is_exported_model, load_exported


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"format": "tflite"}, "unknown export format 'tflite'; choose one of: keras, "),
        ({"format": "tflite"}, r"now LiteRT: --format litert writes model\.tflite"),
        ({"format": "pdf"}, r"litert, onnx\.$"),  # no LiteRT hint for other names
        ({"format": "litert", "quantize": "int4"}, "unknown quantization 'int4'"),
        ({"format": "onnx", "quantize": "float16"}, "not available for --format onnx"),
        ({"format": "onnx", "quantize": "int8", "int8_io": True}, "--int8-io needs --format"),
        ({"format": "keras", "quantize": "float16"}, "not available for --format keras"),
        ({"format": "saved_model", "quantize": "dynamic"}, "allows: none"),
        ({"format": "litert", "int8_io": True}, "--int8-io needs --format litert --quantize"),
        ({"format": "litert", "calibration_images": 10}, "applies to --quantize int8 with"),
        ({"format": "keras", "quantize": "int8", "int8_io": True}, "--int8-io needs --format lit"),
        (
            {"format": "keras", "quantize": "int8", "calibration_images": 10},
            "applies to --quantize int8 with --format litert or onnx only",
        ),
        (
            {"format": "litert", "quantize": "int8", "calibration_images": 0},
            "must be 1 or more",
        ),
    ],
)
def test_bad_options_are_refused(tmp_path, options, message):
    with pytest.raises(ConfigError, match=message):
        finetune.export_run(tmp_path / "no_run", **options)


def test_missing_run_directory(tmp_path):
    with pytest.raises(FinetuneError, match="is not a run directory: model.keras is missing"):
        finetune.export_run(tmp_path / "nowhere", "litert")


def test_files_that_are_not_exports(tmp_path):
    image = tmp_path / "cat.png"
    image.write_bytes(b"not really")
    assert not is_exported_model(image) and not is_exported_model(tmp_path)
    with pytest.raises(FinetuneError, match="not an exported model"):
        load_exported(image)
    with pytest.raises(FinetuneError, match="not a SavedModel folder"):
        load_exported(tmp_path)
    broken = tmp_path / "m.tflite"
    broken.write_bytes(b"garbage")
    (tmp_path / "m.tflite.labels.json").write_text(
        '{"format": "finetune-export-labels", "class_names": ["a", "b"], "image_size": 32}'
    )
    with pytest.raises(FinetuneError, match="cannot open .* as a LiteRT model"):
        load_exported(broken)
    (tmp_path / "m.tflite.labels.json").write_text("{not json")
    with pytest.raises(FinetuneError, match="is damaged"):
        load_exported(broken)
