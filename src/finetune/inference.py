"""Batch inference in the fastest correct runtime: Keras, or ONNX Runtime for many images.

`predict`, `evaluate` and the frozen phase's feature-cache fill call a Keras model on many
images. Keras runs it with every BatchNorm folded into its convolution (`finetune.fold`);
ONNX Runtime runs the same network 1.2-2.7x as fast again on a small CPU, but converting the
model to ONNX first (tf2onnx) takes a few seconds, which pays back only over a few thousand
images (benchmarks/inference_runtimes.py; figures in benchmarks/RESULTS.md).

So the runtime is chosen per call:
- `"keras"`: the folded Keras model.
- `"onnxruntime"`: the model converted to ONNX once and run by ONNX Runtime.
- `"auto"` (the default): ONNX Runtime from `AUTO_MIN_IMAGES` images on, Keras below.

The choice can be given per call (`runtime=`, `--runtime` on the command line) or for the
whole process with the environment variable `FINETUNE_RUNTIME`.

ONNX Runtime is guarded: its outputs on the first batch are compared with the Keras model's,
and if they differ by more than rounding (`TOLERANCE`), or the conversion fails, a warning
says so and Keras computes everything. The results of the two runtimes differ by rounding
only (about 1e-5 in the logits), so a prediction's class never depends on the choice except
for a near tie.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np

from finetune.errors import ConfigError

RUNTIMES = ("auto", "keras", "onnxruntime")
ENV_VAR = "FINETUNE_RUNTIME"
# Where converting pays: 3.4-3.8 s of conversion against 0.7-1.3 ms saved per image on this
# 2-core machine (EfficientNet-Lite0, 64-224 px) breaks even at about 3,000-5,000 images.
AUTO_MIN_IMAGES = 4000
# Largest allowed difference from Keras on the first batch, relative to the outputs' largest
# magnitude (at least 1). Measured differences are below 1e-5.
TOLERANCE = 1e-3

Forward = Callable[[np.ndarray], np.ndarray]


def resolve_runtime(runtime: str | None, num_images: int) -> str:
    """The runtime to use for `num_images` images: "keras" or "onnxruntime".

    Args:
        runtime: "auto", "keras" or "onnxruntime"; None takes `FINETUNE_RUNTIME` from the
            environment, or "auto".
        num_images: how many images the call will run.

    Raises:
        ConfigError: an unknown runtime name.
    """
    where = "runtime (--runtime)"
    if runtime is None:
        runtime, where = os.environ.get(ENV_VAR) or "auto", f"the environment variable {ENV_VAR}"
    name = runtime.strip().lower()
    if name not in RUNTIMES:
        raise ConfigError(
            f"{where} is {runtime!r}; use one of {', '.join(RUNTIMES)} "
            f"(auto: ONNX Runtime from {AUTO_MIN_IMAGES} images on, Keras below)."
        )
    if name == "auto":
        return "onnxruntime" if num_images >= AUTO_MIN_IMAGES else "keras"
    return name


def _intra_op_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class OnnxForward:
    """A Keras model converted to ONNX and run by ONNX Runtime on float32 batches.

    Args:
        model: a single-input, single-output Keras model (not modified).

    Raises:
        Exception: whatever tf2onnx or ONNX Runtime raise for a model they cannot convert.
    """

    def __init__(self, model: keras.Model):
        import onnxruntime as ort

        from finetune.export.convert import _input_spec

        with tempfile.TemporaryDirectory(prefix="finetune-onnx-") as folder:
            path = Path(folder) / "model.onnx"
            with warnings.catch_warnings():  # Keras' tf2onnx patch for NumPy 2 sets np.object
                warnings.simplefilter("ignore", FutureWarning)
                model.export(
                    str(path), format="onnx", verbose=False, input_signature=[_input_spec(model)]
                )
            serialized = path.read_bytes()
        options = ort.SessionOptions()
        options.intra_op_num_threads = _intra_op_threads()
        options.inter_op_num_threads = 1
        # Worker threads sleep instead of spinning between calls, so they do not take the CPU
        # from TensorFlow when training goes on after a cache fill.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(serialized, options, ["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, np.float32)
        return self.session.run(None, {self.input_name: x})[0]


def keras_forward(model: keras.Model) -> Forward:
    """Calls `model` (typically folded) on one batch, as NumPy."""

    def forward(batch: np.ndarray) -> np.ndarray:
        return keras.ops.convert_to_numpy(model.predict_on_batch(np.asarray(batch, np.float32)))

    return forward


class GuardedForward:
    """ONNX Runtime checked against Keras on its first batch, or Keras alone.

    Args:
        model: the Keras model to convert (the plain one; ONNX Runtime folds BatchNorm itself).
        fast: the Keras model to compare with and to fall back on (the folded one).
        runtime: "keras" or "onnxruntime" (see `resolve_runtime`).

    Attributes:
        runtime: what computes the outputs now: "onnxruntime", or "keras" (asked for, or fallen
            back to; `reason` then says why).
    """

    def __init__(self, model: keras.Model, fast: keras.Model, runtime: str):
        self.keras = keras_forward(fast)
        self.runtime, self.reason = runtime, ""
        self.onnx: OnnxForward | None = None
        self._checked = False
        if runtime == "onnxruntime":
            try:
                self.onnx = OnnxForward(model)
            except Exception as error:  # any conversion failure: Keras is always correct
                self._fall_back(f"converting {model.name} to ONNX failed ({error})")

    def _fall_back(self, reason: str) -> None:
        self.runtime, self.reason, self.onnx = "keras", reason, None
        warnings.warn(f"{reason}; running it with Keras instead.", RuntimeWarning, stacklevel=3)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if self.onnx is None:
            return self.keras(batch)
        out = self.onnx(batch)
        if not self._checked:
            self._checked = True
            reference = self.keras(batch)
            scale = max(1.0, float(np.max(np.abs(reference))) if reference.size else 1.0)
            if out.shape != reference.shape:
                self._fall_back(
                    f"ONNX Runtime's outputs have shape {out.shape}, Keras' {reference.shape}"
                )
                return reference
            difference = float(np.max(np.abs(out - reference))) if out.size else 0.0
            if not difference <= TOLERANCE * scale:
                self._fall_back(
                    f"ONNX Runtime's outputs differ from Keras' by up to {difference:.3g} on the "
                    f"first batch (allowed: {TOLERANCE * scale:.3g})"
                )
                return reference
        return out


def predict_batches(
    forward: Forward, images: np.ndarray, batch_size: int, progress: bool = False
) -> np.ndarray:
    """`forward` over `images` in batches of `batch_size` (converted to float32 per batch)."""
    if len(images) == 0:
        raise ValueError("no images to predict")
    from finetune.run import keras_verbosity

    bar = keras.utils.Progbar(len(images), verbose=keras_verbosity(True)) if progress else None
    outs = []
    for start in range(0, len(images), batch_size):
        batch = np.asarray(images[start : start + batch_size], np.float32)
        outs.append(forward(batch))
        if bar is not None:
            bar.add(len(batch))
    return np.concatenate(outs)
