"""Running an exported model with its own runtime, named classes and calibrated probabilities.

`load_exported` opens a `.tflite` file with the LiteRT interpreter (`ai_edge_litert`, or
TensorFlow's `tf.lite.Interpreter` when that is not installed), an `.onnx` file with onnxruntime,
a SavedModel folder through its `serving_default` signature, and a `.keras` file with Keras (safe
mode). Each gives the same interface as a run: `predict_logits` and `predict_proba` on RGB pixels
in [0, 255], `class_names`, `image_size` and `temperature` from the labels file that travels with
the export (see `finetune.export.convert`). Int8 inputs and outputs are quantized and dequantized
here with the model's own scale and zero point, so callers always pass pixels and get logits.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from finetune.errors import FinetuneError
from finetune.export.convert import (
    LABELS_FORMAT,
    ONNX_METADATA_KEY,
    labels_path,
    read_tflite_labels,
)
from finetune.run import softmax
from finetune.untrusted import load_keras_model, read_json

EXPORT_SUFFIXES = (".tflite", ".onnx", ".keras")


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


def is_exported_model(path: str | Path) -> bool:
    """True for a `.tflite`, `.onnx` or `.keras` file, or a SavedModel folder."""
    path = Path(path)
    if path.is_dir():
        return (path / "saved_model.pb").is_file()
    return path.is_file() and path.suffix.lower() in EXPORT_SUFFIXES


def _embedded_labels(artifact: Path) -> str | None:
    """The labels JSON an ONNX or LiteRT file holds in its own metadata, if any."""
    if artifact.suffix.lower() == ".tflite":
        return read_tflite_labels(artifact)
    import onnx

    props = {
        p.key: p.value for p in onnx.load(str(artifact), load_external_data=False).metadata_props
    }
    return props.get(ONNX_METADATA_KEY)


def read_labels(artifact: Path) -> dict[str, Any]:
    """The labels record of an artifact: its labels file, or the model's own metadata.

    Raises:
        FinetuneError: no labels file (and no embedded labels), or a damaged one.
    """
    path = labels_path(artifact)
    if path.is_file():
        record = read_json(path)
    elif artifact.suffix.lower() in (".onnx", ".tflite"):
        embedded = _embedded_labels(artifact)
        if embedded is None:
            raise FinetuneError(
                f"{artifact} has no labels: {path} is missing and the model holds none. "
                "Export it with `finetune export`, which writes them."
            )
        try:
            record = json.loads(embedded)
        except json.JSONDecodeError as err:
            raise FinetuneError(f"{artifact}: its embedded labels are damaged ({err}).") from None
    else:
        hint = (
            " (A run's own model.keras: give the run directory instead.)"
            if artifact.name == "model.keras"
            else ""
        )
        raise FinetuneError(
            f"{artifact} has no labels: {path} is missing. Keep the labels file that "
            f"`finetune export` wrote beside the model.{hint}"
        )
    if not isinstance(record, dict) or record.get("format") != LABELS_FORMAT:
        raise FinetuneError(f"{path} is not a labels file written by `finetune export`.")
    names, size, temperature = (record.get(k) for k in ("class_names", "image_size", "temperature"))
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise FinetuneError(f"{path}: 'class_names' must be a non-empty list of names.")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise FinetuneError(f"{path}: 'image_size' must be a positive whole number, got {size!r}.")
    if temperature is not None and (
        isinstance(temperature, bool)
        or not isinstance(temperature, int | float)
        or not temperature > 0
    ):
        raise FinetuneError(
            f"{path}: 'temperature' must be a positive number, got {temperature!r}."
        )
    return record


class ExportedModel:
    """An exported classifier, run by its own runtime.

    Args:
        path: the artifact.
        labels: its labels record (read from beside the artifact when None).

    Attributes:
        class_names, image_size, temperature: from the labels record.
        runtime: the runtime and its version, e.g. "ai-edge-litert 2.3.0".
    """

    runtime = ""

    def __init__(self, path: str | Path, labels: dict[str, Any] | None = None):
        self.path = Path(path)
        self.labels = labels if labels is not None else read_labels(self.path)
        self.class_names = list(self.labels["class_names"])
        self.image_size = int(self.labels["image_size"])
        self.temperature = float(self.labels.get("temperature", 1.0))

    def _run(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def predict_logits(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Logits for (N, size, size, 3) RGB pixels in [0, 255]."""
        from finetune.inference import predict_batches

        x = np.asarray(images)  # float32 a batch at a time (predict_batches), not all of them
        if x.ndim != 4 or x.shape[1:] != (self.image_size, self.image_size, 3):
            raise FinetuneError(
                f"{self.path} takes images of shape (N, {self.image_size}, {self.image_size}, 3), "
                f"got {x.shape}."
            )
        if not len(x):
            return np.zeros((0, len(self.class_names)), np.float32)
        return predict_batches(self._run, x, batch_size)

    def predict_proba(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Class probabilities, `softmax(logits / temperature)` as for the run."""
        return softmax(self.predict_logits(images, batch_size) / self.temperature)

    def single_image_call(self, image: np.ndarray) -> Callable[[], Any]:
        """A no-argument call that classifies one prepared image, for latency measurements."""
        x = np.asarray(image, np.float32)[None]
        return lambda: self._run(x)


def _quantize(x: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    scale, zero_point = detail["quantization"]
    info = np.iinfo(detail["dtype"])
    return np.clip(np.round(x / scale + zero_point), info.min, info.max).astype(detail["dtype"])


class LiteRTModel(ExportedModel):
    """A `.tflite` file in the LiteRT interpreter (XNNPACK on CPU)."""

    def __init__(self, path: str | Path, labels: dict[str, Any] | None = None):
        super().__init__(path, labels)
        try:
            from ai_edge_litert.interpreter import Interpreter

            self.runtime = f"ai-edge-litert {_package_version('ai-edge-litert')}"
        except ImportError:  # TensorFlow's copy of the same interpreter
            import tensorflow as tf

            Interpreter = tf.lite.Interpreter  # noqa: N806
            self.runtime = f"tf.lite.Interpreter (TensorFlow {tf.__version__})"
        try:
            self.interpreter = Interpreter(model_path=str(self.path))
        except (ValueError, RuntimeError) as err:
            raise FinetuneError(f"cannot open {self.path} as a LiteRT model: {err}") from None
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self._batch = int(self.input["shape"][0])

    def _run(self, batch: np.ndarray) -> np.ndarray:
        if len(batch) != self._batch:
            # The batch dimension was exported as dynamic (-1): size the tensors to this batch.
            shape = [len(batch), *self.input["shape"][1:]]
            self.interpreter.resize_tensor_input(self.input["index"], shape)
            self.interpreter.allocate_tensors()
            self._batch = len(batch)
        x = batch if self.input["dtype"] == np.float32 else _quantize(batch, self.input)
        self.interpreter.set_tensor(self.input["index"], x)
        self.interpreter.invoke()
        out = self.interpreter.get_tensor(self.output["index"])
        if self.output["dtype"] != np.float32:
            scale, zero_point = self.output["quantization"]
            out = (out.astype(np.float32) - zero_point) * scale
        return np.array(out, np.float32)

    def single_image_call(self, image: np.ndarray) -> Callable[[], Any]:
        x = np.asarray(image, np.float32)[None]
        self._run(x)  # sizes the tensors for one image once, outside the timing
        return lambda: self._run(x)


class OnnxModel(ExportedModel):
    """An `.onnx` file in onnxruntime (CPU execution provider)."""

    def __init__(self, path: str | Path, labels: dict[str, Any] | None = None):
        super().__init__(path, labels)
        try:
            import onnxruntime as ort
        except ImportError:
            raise FinetuneError(
                "running an ONNX model needs onnxruntime: pip install onnxruntime"
            ) from None
        self.runtime = f"onnxruntime {ort.__version__}"
        try:
            self.session = ort.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types
            raise FinetuneError(f"cannot open {self.path} as an ONNX model: {err}") from None
        self.input_name = self.session.get_inputs()[0].name

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch})[0]


class SavedModelSignature(ExportedModel):
    """A SavedModel folder, called through its `serving_default` signature."""

    def __init__(self, path: str | Path, labels: dict[str, Any] | None = None):
        super().__init__(path, labels)
        import tensorflow as tf

        self.runtime = f"TensorFlow {tf.__version__} SavedModel"
        self._tf = tf
        self._loaded = tf.saved_model.load(str(self.path))
        if "serving_default" not in self._loaded.signatures:
            raise FinetuneError(f"{self.path} has no serving_default signature.")
        self.signature = self._loaded.signatures["serving_default"]
        self.input_name = next(iter(self.signature.structured_input_signature[1]))

    def _run(self, batch: np.ndarray) -> np.ndarray:
        outputs = self.signature(**{self.input_name: self._tf.constant(batch)})
        return next(iter(outputs.values())).numpy()


class KerasFile(ExportedModel):
    """A `.keras` file, loaded by Keras in safe mode and run as a TensorFlow graph."""

    def __init__(self, path: str | Path, labels: dict[str, Any] | None = None):
        super().__init__(path, labels)
        import keras

        self.runtime = f"Keras {keras.__version__}"
        # Checked before Keras sees it (no Lambda, no code, no outside references), then safe mode.
        self.model = load_keras_model(self.path)
        self._call = graph_call(self.model, self.image_size)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self._call(batch).numpy()


def graph_call(model, image_size: int) -> Callable[[np.ndarray], Any]:
    """The Keras model as one traced TensorFlow function (like `predict`'s step, minus its
    per-call set-up, which costs ~100 ms and would swamp a single-image latency)."""
    import tensorflow as tf

    spec = tf.TensorSpec([None, image_size, image_size, 3], tf.float32)
    return tf.function(lambda x: model(x, training=False), input_signature=[spec], autograph=False)


def load_exported(path: str | Path, labels: dict[str, Any] | None = None) -> ExportedModel:
    """Opens an exported model with its runtime (see the module docstring).

    Args:
        path: a `.tflite`, `.onnx` or `.keras` file, or a SavedModel folder.
        labels: its labels record; by default read from the labels file beside it.

    Raises:
        FinetuneError: not an exported model, no labels, or the runtime cannot open it.

    Example:
        >>> model = load_exported("runs/photos/export/model_int8.tflite")
        >>> model.predict_proba(images).argmax(1)
    """
    path = Path(path)
    if path.is_dir():
        if not (path / "saved_model.pb").is_file():
            raise FinetuneError(f"{path} is not a SavedModel folder (no saved_model.pb).")
        return SavedModelSignature(path, labels)
    if not path.is_file():
        raise FinetuneError(f"{path} does not exist.")
    by_suffix = {".tflite": LiteRTModel, ".onnx": OnnxModel, ".keras": KerasFile}
    cls = by_suffix.get(path.suffix.lower())
    if cls is None:
        raise FinetuneError(
            f"{path} is not an exported model: give a .tflite, .onnx or .keras file, or a "
            "SavedModel folder."
        )
    return cls(path, labels)
