"""Writing a run's Keras model as a deployable artifact, and the labels file that travels with it.

`.keras` is `model.save`; LiteRT and ONNX go through Keras' own exporters (`model.export`), which
trace the model's `call` into a TensorFlow graph: LiteRT uses TensorFlow's `TFLiteConverter` on
that graph, ONNX uses tf2onnx. The SavedModel is written with `tf.saved_model.save` from the same
traced call, not with `model.export(format="tf_saved_model")`: Keras 3.15's archive stores every
weight twice (29 MB instead of 15 MB for EfficientNet-Lite0). The LiteRT converter is limited
to LiteRT's built-in operators (Keras' default also allows TensorFlow "Flex" operators, which the
standalone LiteRT runtime cannot run); a model that needs more fails to convert, loudly.

The exported model keeps the Keras model's contract: RGB pixels in [0, 255] as float32 of shape
(N, size, size, 3) in, logits out. Class names, the input size and the run's temperature are not
part of any of these formats' signatures, so they are written to a JSON labels file: beside a file
artifact as `<file name>.labels.json`, inside a SavedModel folder as `assets.extra/labels.json`
(TensorFlow Serving's place for files the graph does not use), and, for ONNX and LiteRT, also in
the model's own metadata (ONNX `metadata_props` and a LiteRT metadata buffer, both named
`finetune.labels`), so the model file alone still knows its classes.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import keras
import numpy as np

from finetune.atomic import write_json
from finetune.errors import ConfigError, FinetuneError

# format -> (file extension, "" for a folder; quantizations it supports)
FORMATS: dict[str, tuple[str, tuple[str, ...]]] = {
    "keras": (".keras", ("none", "int8")),
    "saved_model": ("", ("none",)),
    "litert": (".tflite", ("none", "float16", "dynamic", "int8")),
    "onnx": (".onnx", ("none", "int8")),
}
QUANTIZATIONS = ("none", "float16", "dynamic", "int8")
LABELS_FORMAT = "finetune-export-labels"
ONNX_METADATA_KEY = "finetune.labels"
TFLITE_METADATA_NAME = "finetune.labels"
DEFAULT_CALIBRATION_IMAGES = 200


def check_options(fmt: str, quantize: str, int8_io: bool, calibration_images: int | None) -> None:
    """Refuses a format, quantization or option combination that cannot be exported.

    Raises:
        ConfigError: naming the bad option and what is allowed.
    """
    if fmt not in FORMATS:
        renamed = " (TensorFlow Lite is now LiteRT: --format litert writes model.tflite)"
        raise ConfigError(
            f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}."
            + (renamed if fmt.lower().replace("-", "_") in ("tflite", "tf_lite") else "")
        )
    if quantize not in QUANTIZATIONS:
        raise ConfigError(
            f"unknown quantization {quantize!r}; choose one of: {', '.join(QUANTIZATIONS)}."
        )
    allowed = FORMATS[fmt][1]
    if quantize not in allowed:
        raise ConfigError(
            f"--quantize {quantize} is not available for --format {fmt} (it allows: "
            f"{', '.join(allowed)}); convolutions are quantized with --format litert."
        )
    if int8_io and not (fmt == "litert" and quantize == "int8"):
        raise ConfigError("--int8-io needs --format litert --quantize int8.")
    if calibration_images is not None:
        if not calibrated(fmt, quantize):
            raise ConfigError(
                "--calibration-images applies to --quantize int8 with --format litert or onnx only."
            )
        if isinstance(calibration_images, bool) or int(calibration_images) < 1:
            raise ConfigError(
                f"--calibration-images must be 1 or more, got {calibration_images!r}."
            )


def calibrated(fmt: str, quantize: str) -> bool:
    """Whether the export quantizes activations, calibrated on representative images."""
    return quantize == "int8" and fmt in ("litert", "onnx")


def default_output(run_dir: Path, fmt: str, quantize: str, int8_io: bool) -> Path:
    """`RUN_DIR/export/model[_<quantize>][_int8io].<ext>`, or `RUN_DIR/export/saved_model`."""
    if fmt == "saved_model":
        return run_dir / "export" / "saved_model"
    name = "model" + ("" if quantize == "none" else f"_{quantize}") + ("_int8io" if int8_io else "")
    return run_dir / "export" / (name + FORMATS[fmt][0])


def labels_path(artifact: Path) -> Path:
    """Where the labels file of an artifact lives (see the module docstring)."""
    artifact = Path(artifact)
    if artifact.is_dir() or artifact.suffix == "":
        return artifact / "assets.extra" / "labels.json"
    return artifact.with_name(artifact.name + ".labels.json")


def labels_record(
    class_names: list[str],
    image_size: int,
    temperature: float,
    fmt: str,
    quantize: str,
    int8_io: bool,
    run_dir: Path | None,
    backbone: str,
) -> dict[str, Any]:
    """The content of a labels file: what a runtime needs to turn outputs into named classes."""
    return {
        "format": LABELS_FORMAT,
        "version": 1,
        "class_names": list(class_names),
        "image_size": int(image_size),
        "temperature": float(temperature),
        "input": f"RGB pixels in [0, 255], shape (N, {image_size}, {image_size}, 3)"
        + (", int8 (quantized by the model's input scale and zero point)" if int8_io else ""),
        "output": "logits; probabilities = softmax(logits / temperature)",
        "model_format": fmt,
        "quantize": quantize,
        "int8_io": bool(int8_io),
        "backbone": backbone,
        "run": None if run_dir is None else str(Path(run_dir).resolve()),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _litert_options(
    quantize: str, int8_io: bool, representative: np.ndarray | None
) -> dict[str, Any]:
    """Keyword arguments for Keras' LiteRT exporter, passed on to `tf.lite.TFLiteConverter`."""
    import tensorflow as tf

    builtins = tf.lite.OpsSet.TFLITE_BUILTINS
    if quantize == "none":
        return {"target_spec": {"supported_ops": [builtins]}}
    options: dict[str, Any] = {"optimizations": [tf.lite.Optimize.DEFAULT]}
    if quantize == "float16":
        options["target_spec"] = {"supported_ops": [builtins], "supported_types": [tf.float16]}
    elif quantize == "dynamic":
        options["target_spec"] = {"supported_ops": [builtins]}
    else:  # int8: every operator integer-only, calibrated on the representative images
        if representative is None or not len(representative):
            raise FinetuneError("int8 quantization needs representative training images.")

        def samples() -> Iterator[list[np.ndarray]]:
            for image in representative:
                yield [np.asarray(image[None], np.float32)]

        options["representative_dataset"] = samples
        options["target_spec"] = {"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]}
        if int8_io:
            options["inference_input_type"] = tf.int8
            options["inference_output_type"] = tf.int8
    return options


def _input_spec(model: keras.Model):
    import tensorflow as tf

    return tf.TensorSpec([None, *model.inputs[0].shape[1:]], tf.float32, name="image")


def _write_saved_model(model: keras.Model, path: Path) -> None:
    import tensorflow as tf

    def serve(image):
        return model(image, training=False)

    module = tf.Module()
    module.weights = [v.value for v in model.weights]  # the tf.Variables, tracked once
    module.serve = tf.function(serve, input_signature=[_input_spec(model)], autograph=False)
    tf.saved_model.save(
        module, str(path), signatures={"serving_default": module.serve.get_concrete_function()}
    )


def _write_litert(
    model: keras.Model,
    path: Path,
    labels: dict[str, Any],
    quantize: str,
    int8_io: bool,
    representative: np.ndarray | None,
) -> None:
    """Keras' LiteRT exporter, then the labels record into the file's own metadata."""
    model.export(
        str(path),
        format="litert",
        verbose=False,
        **_litert_options(quantize, int8_io, representative),
    )
    embed_tflite_labels(path, labels)


def embed_tflite_labels(path: Path, labels: dict[str, Any]) -> None:
    """Adds the labels record to a `.tflite` file as metadata `TFLITE_METADATA_NAME`.

    LiteRT models carry named metadata buffers (the converter's own `min_runtime_version` and
    `CONVERSION_METADATA` are two); the interpreter ignores names it does not know, so the file
    runs as before and a copied `.tflite` alone still knows its classes. The model is read and
    written with TensorFlow's flatbuffer tools, in place.
    """
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(path))
    model.metadata = [m for m in (model.metadata or []) if _name(m.name) != TFLITE_METADATA_NAME]
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(json.dumps(labels).encode("utf-8"), np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = TFLITE_METADATA_NAME
    entry.buffer = len(model.buffers) - 1
    model.metadata.append(entry)
    flatbuffer_utils.write_model(model, str(path))


def _name(name: str | bytes | None) -> str:
    return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)


def read_tflite_labels(path: Path) -> str | None:
    """The labels JSON text embedded by `embed_tflite_labels`, or None if the file has none."""
    from tensorflow.lite.python import schema_py_generated as schema

    data = Path(path).read_bytes()
    try:
        model = schema.Model.GetRootAs(data, 0)
        for i in range(model.MetadataLength()):
            entry = model.Metadata(i)
            if _name(entry.Name()) == TFLITE_METADATA_NAME:
                return model.Buffers(entry.Buffer()).DataAsNumpy().tobytes().decode("utf-8")
    except Exception:  # noqa: BLE001  (not a flatbuffer, or a damaged one: no embedded labels)
        return None
    return None


def _write_keras(model: keras.Model, path: Path, quantize: str) -> None:
    """`model.save`; with "int8", Keras' own `quantize("int8")` first.

    Keras quantizes Dense (and EinsumDense, Embedding) layers only: int8 weights with a scale
    per output unit, activations quantized on the fly. In a classifier that is the head; the
    convolutions stay float32 (LiteRT's int8 export quantizes those). The model is changed in
    place, so it must be a copy loaded for the export.
    """
    if quantize == "int8":
        with warnings.catch_warnings():
            # One warning per layer Keras cannot quantize: every convolution, pooling, ...
            warnings.filterwarnings("ignore", message=".*does not have a `quantize` method")
            model.quantize("int8")
    model.save(str(path))


def export_onnx(model: keras.Model, path: Path) -> None:
    """Keras' ONNX exporter (tf2onnx), float32 images of any batch size in."""
    # The input signature is given: a model just loaded from disk has never been called, and
    # Keras refuses to infer one then.
    with warnings.catch_warnings():  # Keras' tf2onnx patch for NumPy 2 sets np.object
        warnings.simplefilter("ignore", FutureWarning)
        model.export(str(path), format="onnx", verbose=False, input_signature=[_input_spec(model)])


def _write_onnx(
    model: keras.Model,
    path: Path,
    labels: dict[str, Any],
    representative: np.ndarray | None = None,
) -> None:
    """Keras' ONNX exporter (tf2onnx); with `representative` images, int8 by onnxruntime.

    Int8 is onnxruntime's static quantization in QDQ form: int8 weights per output channel,
    int8 activations with ranges calibrated (min-max) on the representative images, inputs
    and outputs float. The labels record goes into the model's metadata last.
    """
    try:
        import onnx
    except ImportError:
        raise FinetuneError(
            "ONNX export needs the packages onnx, tf2onnx and onnxruntime: "
            "pip install onnx tf2onnx onnxruntime"
        ) from None
    export_onnx(model, path)
    if representative is not None:
        _quantize_onnx(path, representative)
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = ONNX_METADATA_KEY, json.dumps(labels, ensure_ascii=False)
    onnx.save(proto, str(path))


def _quantize_onnx(path: Path, representative: np.ndarray) -> None:
    """Replaces the float ONNX model at `path` by its int8 (QDQ) quantization."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    input_name = onnx.load(str(path), load_external_data=False).graph.input[0].name

    class Images(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(
                np.array_split(representative.astype(np.float32), max(1, len(representative) // 16))
            )

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {input_name: batch}

    float_path = path.with_name(f".float-{path.name}")
    prepared = path.with_name(f".prepared-{path.name}")
    path.replace(float_path)
    try:
        # onnxruntime's recommended first step: shape inference and graph optimisation. Its
        # symbolic shape inference (for dynamic shapes in transformers) needs sympy, which
        # onnxruntime does not install; a convolutional classifier's shapes are static and
        # ONNX's own shape inference resolves them.
        quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(path),
            Images(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
        )
    finally:
        remove(float_path)
        remove(prepared)


def write_artifact(
    model: keras.Model,
    fmt: str,
    path: Path,
    labels: dict[str, Any],
    quantize: str = "none",
    int8_io: bool = False,
    representative: np.ndarray | None = None,
) -> None:
    """Writes `model` in format `fmt` at `path` (a file, or a folder for SavedModel).

    The caller picks a temporary `path` and renames it into place; the labels file is written
    inside a SavedModel folder here, and beside file artifacts by the caller (its name follows
    the final file name).

    Args:
        model: the run's classifier (pixels in [0, 255] -> logits).
        fmt: one of `FORMATS`.
        path: where to write; must not exist.
        labels: the labels record (see `labels_record`).
        quantize: one of the format's quantizations. Defaults to "none".
        int8_io: int8 input and output tensors (LiteRT int8 only). Defaults to False.
        representative: (N, size, size, 3) calibration images for int8.

    Raises:
        FinetuneError: the converter failed (its message is kept).
    """
    writers: dict[str, Callable[[], None]] = {
        "keras": lambda: _write_keras(model, path, quantize),
        "saved_model": lambda: _write_saved_model(model, path),
        "litert": lambda: _write_litert(model, path, labels, quantize, int8_io, representative),
        "onnx": lambda: _write_onnx(model, path, labels, representative),
    }
    try:
        writers[fmt]()
    except FinetuneError:
        raise
    except Exception as err:  # converters raise many types; the user needs the message
        remove(path)
        raise FinetuneError(f"the {fmt} converter failed: {type(err).__name__}: {err}") from err
    if fmt == "saved_model":
        write_json(labels_path(path), labels)


def remove(path: Path) -> None:
    """Deletes a file or folder if it exists."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
