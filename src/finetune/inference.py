"""Batch inference in the fastest correct runtime: Keras, or ONNX Runtime for many images.

`predict`, `evaluate` and the frozen phase's feature-cache fill call a Keras model on many
images. Keras runs it batch by batch with every BatchNorm folded into its convolution and, for
256 images or more, the weights compiled in (`finetune.fold`, `snapshot=True`); ONNX Runtime
runs the same network 1.03-1.6x as fast again on a small CPU (EfficientNet-Lite0, 224 to 64
px), but converting the model to ONNX first (tf2onnx) takes 4-5 s, which pays back only over
tens of thousands of images (benchmarks/inference_runtimes.py --end-to-end; figures in
benchmarks/RESULTS.md, ninth slice).

So the runtime is chosen per call:
- `"keras"`: the folded Keras model.
- `"onnxruntime"`: the model converted to ONNX (once: see below) and run by ONNX Runtime.
- `"auto"` (the default): ONNX Runtime from `AUTO_MIN_IMAGES` images on (counting each
  test-time augmentation view, and for training the images times the epochs), Keras below.

The choice can be given per call (`runtime=`, `--runtime` on the command line) or for the
whole process with the environment variable `FINETUNE_RUNTIME`.

ONNX Runtime is guarded: its outputs on the first batch are compared with the Keras model's,
and if they differ by more than rounding (`TOLERANCE`), or the conversion fails, a warning
says so and Keras computes everything. The results of the two runtimes differ by rounding
only (about 1e-5 in the logits), so a prediction's class never depends on the choice except
for a near tie.

A conversion that passed that check is kept in the user cache (`finetune.cache`, folder
`onnx/`), named by a hash of the model's architecture and weights and of the converter's and
runtime's versions. The same model converts only once: later calls (another `finetune predict`
of the same run, the feature-cache fill of another run with the same backbone and image size)
load the verified file in a fraction of a second, without checking it again (its name binds it
to those exact weights and versions, finetune's included). The `KEEP_CONVERSIONS` most
recently used conversions are kept, older ones deleted. A folder that cannot be written only
means converting every time. Whether a conversion is cached never changes which runtime "auto"
chooses, so results do not depend on what ran before (up to the rare fallback to Keras, which
says so).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import keras
import numpy as np

from finetune.errors import ConfigError

RUNTIMES = ("auto", "keras", "onnxruntime")
ENV_VAR = "FINETUNE_RUNTIME"
# Where converting pays, measured end to end on a 2-core Xeon (EfficientNet-Lite0, against
# Keras with the weights compiled in): not yet at 30,000 images at 64 px (0.93x), even at
# 30,000 at 128 px (1.00x), not yet at 15,000 at 224 px (0.96x). (Against Keras reading its
# weights on every call, as before the ninth slice, it paid from 5,000-8,500.)
AUTO_MIN_IMAGES = 40000
# Largest allowed difference from Keras on the first batch, relative to the outputs' largest
# magnitude (at least 1). Measured differences are below 1e-5.
TOLERANCE = 1e-3
# Conversions kept in the cache (the most recently used; about 13 MB each for Lite0).
KEEP_CONVERSIONS = 16

Forward = Callable[[np.ndarray], np.ndarray]


def requested_runtime(runtime: str | None) -> str:
    """The runtime asked for: "auto", "keras" or "onnxruntime".

    Args:
        runtime: a name; None takes `FINETUNE_RUNTIME` from the environment, or "auto".

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
    return name


def resolve_runtime(runtime: str | None, num_images: int) -> str:
    """The runtime to use for `num_images` images: "keras" or "onnxruntime".

    Args:
        runtime: "auto", "keras" or "onnxruntime"; None takes `FINETUNE_RUNTIME` from the
            environment, or "auto".
        num_images: how many images the call will run. Only the request and this decide, not
            whether a conversion is cached: the same call always gives the same numbers.

    Raises:
        ConfigError: an unknown runtime name.
    """
    name = requested_runtime(runtime)
    if name == "auto":
        return "onnxruntime" if num_images >= AUTO_MIN_IMAGES else "keras"
    return name


def _intra_op_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def model_digest(model: keras.Model) -> str:
    """A hash of `model`'s architecture (its JSON) and of every weight's name, shape and values."""
    return weights_digest(model, hashlib.sha256(model.to_json().encode()))


def weights_digest(model: keras.Model, h: Any = None) -> str:
    """A hash of every weight's name, shape and values (sha256, or `h` updated with them):
    about 30 ms for EfficientNet-Lite0's 3.4 million on 2 cores."""
    h = hashlib.sha256() if h is None else h
    for variable in model.weights:
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(variable))
        h.update(f"{variable.path}|{value.dtype}|{value.shape}".encode())
        h.update(value.tobytes())
    return h.hexdigest()


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def conversion_file(model: keras.Model) -> Path:
    """Where a verified ONNX conversion of `model` is kept (the file may not exist yet)."""
    from finetune.cache import cache_dir

    packages = ("keras-finetune", "keras", "tensorflow-cpu", "tf2onnx", "onnxruntime")
    versions = "|".join(f"{p} {_version(p)}" for p in packages)
    key = hashlib.sha256(f"{model_digest(model)}|{versions}|v1".encode()).hexdigest()
    return cache_dir("onnx") / f"{key[:40]}.onnx"


class OnnxForward:
    """A Keras model converted to ONNX and run by ONNX Runtime on float32 batches.

    Args:
        model: a single-input, single-output Keras model (not modified).
        cached: a verified conversion of this very model to load instead of converting, or
            None. Defaults to None.
        spin: let ONNX Runtime's worker threads spin between calls instead of sleeping: 8-21%
            faster per call, 2-14% on whole `predict` calls (benchmarks/RESULTS.md, fifth
            slice), when nothing else needs the CPU between batches (`predict`, `evaluate`),
            CPU taken from TensorFlow when it trains between them (the cache fill, a streamed
            phase). Defaults to False.

    Attributes:
        serialized: the ONNX model's bytes when converted here, None when loaded.

    Raises:
        Exception: whatever tf2onnx or ONNX Runtime raise for a model they cannot convert or a
            file they cannot load.
    """

    def __init__(self, model: keras.Model, cached: Path | None = None, *, spin: bool = False):
        import onnxruntime as ort

        from finetune.export.convert import export_onnx

        self.serialized: bytes | None = None
        if cached is not None:
            source: bytes | str = str(cached)
        else:
            with tempfile.TemporaryDirectory(prefix="finetune-onnx-") as folder:
                path = Path(folder) / "model.onnx"
                export_onnx(model, path)
                source = self.serialized = path.read_bytes()
        options = ort.SessionOptions()
        options.intra_op_num_threads = _intra_op_threads()
        options.inter_op_num_threads = 1
        # Without `spin`, worker threads sleep between calls, so they do not take the CPU from
        # TensorFlow when training goes on after (or between) ONNX Runtime's batches.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        self.session = ort.InferenceSession(source, options, ["CPUExecutionProvider"])
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
        cache: where the verified conversion of `model` is kept (`conversion_file(model)`):
            loaded without a new check when it exists, written once the first batch has
            passed the check otherwise; None converts every time. Defaults to None.
        spin: see `OnnxForward`. Defaults to False.

    Attributes:
        runtime: what computes the outputs now: "onnxruntime", or "keras" (asked for, or fallen
            back to; `reason` then says why).
        from_cache: the ONNX model was loaded from the cache.
    """

    def __init__(
        self,
        model: keras.Model,
        fast: keras.Model,
        runtime: str,
        cache: Path | None = None,
        *,
        spin: bool = False,
    ):
        self.keras = keras_forward(fast)
        self.runtime, self.reason = runtime, ""
        self.onnx: OnnxForward | None = None
        self.cache, self.from_cache = cache, False
        self._checked = False
        if runtime != "onnxruntime":
            return
        if cache is not None and cache.is_file():
            try:
                self.onnx = OnnxForward(model, cached=cache, spin=spin)
                self.from_cache = self._checked = True  # it passed the check when written
                _touch(cache)
                return
            except Exception:  # unreadable (damaged): convert again and replace it
                cache.unlink(missing_ok=True)
        try:
            self.onnx = OnnxForward(model, spin=spin)
        except Exception as error:  # any conversion failure: Keras is always correct
            self._fall_back(f"converting {model.name} to ONNX failed ({error})")

    def _fall_back(self, reason: str) -> None:
        self.runtime, self.reason, self.onnx = "keras", reason, None
        warnings.warn(f"{reason}; running it with Keras instead.", RuntimeWarning, stacklevel=3)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if self.onnx is None:
            return self.keras(batch)
        try:
            out = self.onnx(batch)
        except Exception as error:  # a model that converts but does not run: Keras runs it
            self._fall_back(f"ONNX Runtime failed on a batch of shape {batch.shape} ({error})")
            return self.keras(batch)
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
            self._keep()
        return out

    def _keep(self) -> None:
        """Writes the verified conversion to the cache; a cache that cannot be written costs
        only time next call."""
        if self.cache is None or self.onnx is None or self.onnx.serialized is None:
            return
        from finetune.atomic import DiskFullError, write_file_atomic

        data = self.onnx.serialized
        try:
            write_file_atomic(self.cache, lambda tmp: tmp.write_bytes(data))
        except (OSError, DiskFullError) as error:
            warnings.warn(
                f"could not keep the ONNX conversion in {self.cache} ({error}); it will be "
                "converted again next time",
                RuntimeWarning,
                stacklevel=3,
            )
            return
        prune_conversions(self.cache.parent)


def _touch(path: Path) -> None:
    with contextlib.suppress(OSError):  # a read-only cache: it is only the eviction order
        os.utime(path)


def prune_conversions(folder: Path, keep: int | None = None) -> list[Path]:
    """Deletes all but the `keep` most recently used conversions in `folder`.

    Args:
        folder: the conversion cache (`conversion_file(...).parent`).
        keep: how many to keep. Defaults to `KEEP_CONVERSIONS`.

    Returns:
        The files deleted.
    """
    keep = KEEP_CONVERSIONS if keep is None else keep
    files = []
    for f in folder.glob("*.onnx"):
        if f.name.startswith("."):  # another writer's file, not renamed into place yet
            continue
        try:
            files.append((f.stat().st_mtime, f))
        except OSError:  # removed meanwhile by another process
            continue
    files.sort(reverse=True)
    gone = []
    for _, f in files[keep:]:
        try:
            f.unlink()
            gone.append(f)
        except OSError:
            pass
    return gone


def progress_bar(total: int) -> keras.utils.Progbar:
    """Keras' progress bar over `total` images (live in a terminal, one line in logs)."""
    from finetune.run import keras_verbosity

    return keras.utils.Progbar(total, verbose=keras_verbosity(True))


def predict_batches(
    forward: Forward,
    images: np.ndarray | Iterable[Any],
    batch_size: int,
    progress: bool = False,
    bar: keras.utils.Progbar | None = None,
) -> np.ndarray:
    """`forward` over `images` in batches of `batch_size` (each converted to float32 alone).

    Args:
        forward: computes one float32 batch.
        images: an array of images, or an iterable of batches (e.g. a `tf.data.Dataset`).
        batch_size: images per call when `images` is an array.
        progress: show a progress bar over these images. Defaults to False.
        bar: a progress bar to advance instead (shared by several calls). Defaults to None.
    """
    if progress and bar is None:
        bar = progress_bar(len(images))
    if isinstance(images, np.ndarray | list | tuple):
        if len(images) == 0:
            raise ValueError("no images to predict")
        batches: Iterable[Any] = (
            images[start : start + batch_size] for start in range(0, len(images), batch_size)
        )
    else:
        batches = images
    outs = []
    for batch in batches:
        x = np.asarray(batch, np.float32)
        outs.append(forward(x))
        if bar is not None:
            bar.add(len(x))
    return np.concatenate(outs)


def guarded_forward(
    model: keras.Model,
    fast: keras.Model,
    runtime: str | None,
    num_images: int,
    *,
    spin: bool = False,
) -> Forward:
    """The forward pass for `num_images` images of `model` in the runtime chosen for them.

    Args:
        model: the plain Keras model (what is converted, and what the cache is keyed on).
        fast: the same function for Keras to run (its folded form).
        runtime: "auto", "keras", "onnxruntime" or None (see `resolve_runtime`).
        num_images: how many images will go through it.
        spin: ONNX Runtime's threads spin between calls (see `OnnxForward`): for inference
            with nothing else running. Defaults to False.

    Returns:
        `keras_forward(fast)`, or a `GuardedForward` (with the conversion cache) when ONNX
        Runtime is chosen; its `runtime` attribute says which one computes.
    """
    if resolve_runtime(runtime, num_images) == "keras":
        return keras_forward(fast)
    return GuardedForward(model, fast, "onnxruntime", usable_conversion_file(model), spin=spin)


def usable_conversion_file(model: keras.Model) -> Path | None:
    """`conversion_file(model)`, or None without a usable cache folder (read-only, no home):
    then nothing is kept and every call converts."""
    try:
        return conversion_file(model)
    except (OSError, RuntimeError):
        return None
