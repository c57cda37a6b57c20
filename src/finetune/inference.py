"""Batch inference in the fastest correct runtime: Keras, or OpenVINO.

`predict`, `evaluate` and the frozen phase's feature-cache fill call a Keras model on many
images. Keras runs it batch by batch with every BatchNorm folded into its convolution and, for
256 images or more, the weights compiled in (`finetune.fold`, `snapshot=True`). OpenVINO runs
the same network 1.1-1.6x as fast again in float32 on a small CPU (EfficientNet-Lite0, 224 to
64 px), and 2.5-3.2x as fast in bfloat16 where the CPU has it (AMX, AVX512-BF16); converting
the model first takes about 1 s (1.2-3.7 s more per call end to end, the first-batch check
included), which pays back from 15,000 images in float32 and from 2,000 in bfloat16
(benchmarks/inference_runtimes.py --end-to-end; benchmarks/RESULTS.md, tenth slice). A
conversion kept from before loads in about 0.1 s and answers 3.4-5.7x as fast as Keras even for
one image (eleventh slice; thirteenth for repeated calls in one process). ONNX Runtime
(converting: 4-6 s) runs at 0.85-0.98x float32 OpenVINO, and stays available by name.

So the runtime is chosen per call:
- `"keras"`: the folded Keras model.
- `"openvino"`, `"openvino-bf16"`, `"onnxruntime"`: the model converted (once: see below) and
  run by OpenVINO in float32 or bfloat16, or by ONNX Runtime.
- `"auto"` (the default), on a CPU with bfloat16: OpenVINO in bfloat16 for predictions, at
  any count: a trained model converts once, at the end of `finetune train` (its evaluation),
  and every later `predict` or `evaluate` of the run loads that conversion. For the features
  a head trains on (the head's feature-cache fill, a streamed `--head-augment` phase), which
  convert once per phase, bfloat16 from `AUTO_BF16_MIN_IMAGES` images (counting the images
  times the epochs) and Keras below, in bfloat16 too (`frozen_in_bfloat16`). On a CPU
  without bfloat16: Keras below `AUTO_MIN_IMAGES` images (counting each test-time
  augmentation view) and OpenVINO in float32 from there. Logits to fit a temperature on,
  and the cached input of the top layer groups (whose accuracy in bfloat16 is not
  measured), stay float32 (`float32=True`).

The choice can be given per call (`runtime=`, `--runtime` on the command line) or for the
whole process with the environment variable `FINETUNE_RUNTIME`.

Every converted model is guarded: its outputs on the first batch are compared with the Keras
model's (`GuardedForward`). In float32 they differ by rounding only (about 1e-5 in the logits),
so a prediction's class never depends on the choice except for a near tie. In bfloat16 the
logits moved by 1.6-3.2% of their size (the median image) for two of the accuracy
benchmark's recipes: 0.75-1.9% of the predicted classes changed, and the accuracy by -0.09
and -0.04 points on average (3 seeds each), within the 0.3 points issue 7 allows for a
bfloat16 default. Some models move far more (13% for one trained with BatchNorm in training
mode, 5.8% of the classes changed): where the median image moves by more than
`BF16_TOLERANCE`, OpenVINO computes in float32 instead. A pretrained backbone's features move
by 5-6% in bfloat16 (relative to their length, the median image); heads trained on them scored
-0.03 to +0.17 points against float32 features on average over 3 seeds, for four recipes
(cached and streamed features; benchmarks/RESULTS.md, eleventh slice). Features are held to
`BF16_FEATURE_TOLERANCE` of that measure. A conversion that fails, or float32 outputs that
differ by more than rounding (`TOLERANCE`), mean Keras computes everything, and a warning says
so.

A conversion that passed that check is kept in the user cache (`finetune.cache`, folders
`openvino/` and `onnx/`), named by a hash of the model's architecture (not how it is compiled
for training) and weights, of the runtime asked for, and of the converter's and runtime's
versions; a `Run` also holds its converted model while its weights stay the same
(`Run.prediction_forward`). The same model converts only once: later calls (another `finetune
predict` of the same run, the feature-cache fill of another run with the same backbone and
image size) load the verified file in a fraction of a second, without checking it again (its
name binds it to those exact weights and versions, finetune's included). The `KEEP_CONVERSIONS`
most recently used conversions of each folder are kept (OpenVINO's two precisions share one),
older ones deleted. A folder that cannot be written only means converting every time. Whether a
conversion is cached never changes which runtime "auto" chooses, so results do not depend on
what ran before, up to a fallback: to Keras, which says so; or to float32 for a model whose
bfloat16 outputs were found too far from Keras' on some first batch, which is kept as such (a
model near the bound might have passed with another first batch).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import os
import tempfile
import warnings
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from finetune.errors import ConfigError

if TYPE_CHECKING:  # imported where used: `finetune predict` from a kept conversion needs no Keras
    import keras

RUNTIMES = ("auto", "keras", "openvino", "openvino-bf16", "onnxruntime")
# The runtimes that run a converted copy of the model (checked against Keras first).
CONVERTED = ("openvino", "openvino-bf16", "onnxruntime")
ENV_VAR = "FINETUNE_RUNTIME"
# Where converting pays, measured end to end on a 2-core Xeon (EfficientNet-Lite0, against
# Keras with the weights compiled in; benchmarks/RESULTS.md, tenth and eleventh slices). "auto"
# converts to OpenVINO in float32 from AUTO_MIN_IMAGES images on; on a CPU with bfloat16, in
# bfloat16 for predictions at any count (a trained model converts once, and later calls load
# it) and for the features a head trains on from AUTO_BF16_MIN_IMAGES (once per phase).
AUTO_MIN_IMAGES = 15000
AUTO_BF16_MIN_IMAGES = 2000
# Largest allowed difference from Keras on the first batch, relative to the outputs' largest
# magnitude (at least 1). Measured differences are below 1e-5 in float32.
TOLERANCE = 1e-3
# For bfloat16 (8 bits of mantissa), the median over a batch's images of each one's largest
# difference relative to its largest output (see `GuardedForward`). Measured on models trained
# by the accuracy benchmark (10,000 test images): 1.6% (`default` recipe; 0.75% of the
# predicted classes changed), 3.2% (`linear_probe`; 1.9%), 13% (`fastai`, BatchNorm trained;
# 5.8%): the last computes in float32.
BF16_TOLERANCE = 0.05
# For features to train on (`features=True`), the median over a batch's images of the length
# of each one's difference relative to the length of its features: 5.4-5.9% measured for
# EfficientNet-Lite0's pooled features and 3.7-5.5% for the activations below its top two
# groups (64 and 224 px), against 104-108% for features of the wrong images. (Below its top
# three groups, where an augmented partial phase streams them by default, not measured apart:
# the check measures them on every first batch.)
BF16_FEATURE_TOLERANCE = 0.15
# Conversions kept in the cache (the most recently used; about 13 MB each for Lite0).
KEEP_CONVERSIONS = 16

Forward = Callable[[np.ndarray], np.ndarray]


def requested_runtime(runtime: str | None) -> str:
    """The runtime asked for: one of `RUNTIMES`.

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
            f"{where} is {runtime!r}; use one of {', '.join(RUNTIMES)} (auto: OpenVINO in "
            "bfloat16 where the CPU has it, else Keras for few images and OpenVINO for many; "
            "see `finetune predict --help`)."
        )
    return name


def resolve_runtime(
    runtime: str | None, num_images: int, *, float32: bool = False, features: bool = False
) -> str:
    """The runtime to use for `num_images` images: "keras", "openvino", "openvino-bf16" or
    "onnxruntime".

    "auto", on a CPU with bfloat16 (unless `float32`): OpenVINO in bfloat16 for predictions
    whatever their number, and for `features` from `AUTO_BF16_MIN_IMAGES` images. Otherwise
    Keras below `AUTO_MIN_IMAGES` images and OpenVINO in float32 from there.

    Args:
        runtime: a name from `RUNTIMES`; None takes `FINETUNE_RUNTIME` from the environment,
            or "auto".
        num_images: how many images the call will run. Only the request, this, `float32`,
            `features` and the CPU decide, not whether a conversion is cached: the same call
            on the same machine always gives the same numbers.
        float32: never bfloat16 under "auto": for logits to fit a temperature on. Defaults to
            False (predictions, and features to train on).
        features: the outputs are features to train on, computed for one training phase
            (its converted model serves only that phase and the next run with the same
            backbone): converting pays from `AUTO_BF16_MIN_IMAGES` images. Predictions
            (False, the default) convert once per trained model, at the end of
            `finetune train` (its evaluation), and every later call loads that conversion.

    Raises:
        ConfigError: an unknown runtime name.
    """
    name = requested_runtime(runtime)
    if name != "auto":
        return name
    converting_pays = not features or num_images >= AUTO_BF16_MIN_IMAGES
    if not float32 and converting_pays and cpu_has_bfloat16():
        return "openvino-bf16"
    return "openvino" if num_images >= AUTO_MIN_IMAGES else "keras"


def frozen_in_bfloat16(runtime: str | None) -> bool:
    """Whether Keras computes what cannot change while a training phase runs in bfloat16: the
    frozen layers below everything that trains when the phase goes through them, and the
    head's feature-cache fill when Keras makes it (`fold_batchnorm(..., bfloat16=True)`); and
    where a phase trains through the network, the layers that train as well, in mixed
    precision (`train_in_bfloat16=True`; twentieth slice: a step 1.26-1.82x as fast, two
    runs). Under "auto" on a CPU with bfloat16 only; any runtime named (`keras` included)
    keeps Keras in float32.

    On EfficientNet-Lite0 a step through the frozen backbone was 1.17-1.98x as fast, and one
    of the top three groups 1.06-1.50x (two runs on an AMD EPYC; benchmarks/RESULTS.md,
    seventeenth slice). The first batch is checked as bfloat16 features from a converted
    model are (`BF16_FEATURE_TOLERANCE`); further off, the phase computes in float32.

    Args:
        runtime: a name from `RUNTIMES`; None takes `FINETUNE_RUNTIME` from the environment,
            or "auto".

    Raises:
        ConfigError: an unknown runtime name.
    """
    return requested_runtime(runtime) == "auto" and cpu_has_bfloat16()


def _intra_op_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def model_digest(model: keras.Model) -> str:
    """A hash of `model`'s architecture (its JSON, without how it is compiled for training)
    and of every weight's name, shape and values: the trained model and the same model
    loaded from its run for inference (`Run.load(compile=False)`) hash alike."""
    config = json.loads(model.to_json())
    config.pop("compile_config", None)
    architecture = json.dumps(config, sort_keys=True)
    return weights_digest(model, hashlib.sha256(architecture.encode()))


def weights_digest(model: keras.Model, h: Any = None) -> str:
    """A hash of every weight's name, shape and values (sha256, or `h` updated with them):
    about 30 ms for EfficientNet-Lite0's 3.4 million on 2 cores."""
    import keras

    h = hashlib.sha256() if h is None else h
    for variable in model.weights:
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(variable))
        h.update(f"{variable.path}|{value.dtype}|{value.shape}".encode())
        h.update(value.tobytes())
    return h.hexdigest()


def weights_checksum(model: keras.Model) -> int:
    """A CRC-32 of every weight's bytes, in order: the same while the weights stay the same.

    For noticing, within one process, that weights changed since a converted copy was made
    (about 12 ms for EfficientNet-Lite0's 3.4 million, reading each weight on its own; see
    `WeightsWatch` for repeated checks); not for naming files (see `conversion_file`)."""
    return _crc32(_numpy(variable) for variable in model.weights)


def _numpy(variable: Any) -> np.ndarray:
    import keras

    value = getattr(variable, "value", variable)
    return value.numpy() if hasattr(value, "numpy") else keras.ops.convert_to_numpy(value)


def _crc32(arrays: Iterable[np.ndarray]) -> int:
    import zlib

    crc = 0
    for array in arrays:
        crc = zlib.crc32(np.ascontiguousarray(array), crc)
    return crc


class WeightsWatch:
    """`weights_checksum` of one model, called again and again (a `Run` predicting in a loop).

    The first call reads each weight on its own (about 12 ms for Lite0); from the second on,
    one TensorFlow function reads them all (traced then, once: about 0.3 s; about 5 ms a call
    after that), with the same result. Weights replaced by other variables (a layer rebuilt,
    quantized in place) are read anew: the function is traced again for them.
    """

    def __init__(self, model: keras.Model):
        self.model, self._calls = model, 0
        self._read: tuple[tuple[int, ...], Callable[[], Any]] | None = None

    def __call__(self) -> int:
        import keras

        self._calls += 1
        if self._calls == 1 or keras.backend.backend() != "tensorflow":
            return weights_checksum(self.model)
        variables = [getattr(v, "value", v) for v in self.model.weights]
        ids = tuple(id(v) for v in variables)
        if self._read is None or self._read[0] != ids:
            self._read = ids, own_function(_read_all, variables)  # one per watch, per run
        return _crc32(tensor.numpy() for tensor in self._read[1]())


def own_function(python_function: Callable[..., Any], *args: Any, **options: Any) -> Any:
    """`tf.function(functools.partial(python_function, *args), **options)`: a TensorFlow
    function of its own for each call. TensorFlow counts traces by the Python code they come
    from, so one nested function or lambda traced for many models, runs or phases in one
    process (each once) is taken for a function traced again and again, and warned about;
    each `partial` is counted on its own."""
    import tensorflow as tf

    return tf.function(functools.partial(python_function, *args), **options)


def _read_all(variables: list) -> list:
    import tensorflow as tf

    return [tf.identity(v) for v in variables]


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def conversion_label(runtime: str = "onnxruntime", *, features: bool = False) -> tuple[str, str]:
    """The cache folder's name and what, besides the model, names a conversion for `runtime`
    on this machine: the packages' versions, the runtime and thread count (and for bfloat16
    whether the CPU has it), and whether it was checked as features (see `conversion_file`)."""
    if runtime == "onnxruntime":
        packages = ("keras-finetune", "keras", "tensorflow-cpu", "tf2onnx", "onnxruntime")
        folder, tag = "onnx", "v1"
    else:
        packages = ("keras-finetune", "keras", "tensorflow-cpu", "openvino")
        folder, tag = "openvino", f"{runtime} {_intra_op_threads()} threads"
        # What "openvino-bf16" gives depends on the CPU: a cache shared by two machines keeps
        # one conversion for each kind (float32 is the same on both).
        if runtime == "openvino-bf16":
            tag += " bf16 cpu" if cpu_has_bfloat16() else " no bf16 cpu"
    if features:  # what passed the looser check for features is never loaded for logits
        tag += " checked as features"
    versions = "|".join(f"{p} {_version(p)}" for p in packages)
    return folder, f"{versions}|{tag}"


def conversion_file(
    model: keras.Model, runtime: str = "onnxruntime", *, features: bool = False
) -> Path:
    """Where a verified conversion of `model` for `runtime` is kept (it may not exist yet):
    an ONNX file for "onnxruntime", a compiled OpenVINO model for "openvino" and
    "openvino-bf16"; `features`: checked as features to train on (see `GuardedForward`),
    another file than one checked as outputs."""
    from finetune.cache import cache_dir

    folder, label = conversion_label(runtime, features=features)
    suffix = ".onnx" if runtime == "onnxruntime" else ".blob"
    key = hashlib.sha256(f"{model_digest(model)}|{label}".encode()).hexdigest()
    return cache_dir(folder) / f"{key[:40]}{suffix}"


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

    runtime = "onnxruntime"

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


def import_openvino() -> Any:
    """`import openvino`, with its usage-data sender off.

    Importing OpenVINO starts Intel's usage-data collection (the `openvino_telemetry`
    package; on by default unless the user opted out or a CI variable is set) and sends an
    event. finetune sends nothing anywhere: when OpenVINO is first imported here, the sender's
    package is hidden for the length of the import, so that OpenVINO's tools bind to their own
    no-op stand-in (`openvino.tools.ovc.telemetry_stub`), which they use when it is not
    installed. The package is importable again afterwards. A process that imported OpenVINO
    before keeps what it chose.
    """
    import sys

    if "openvino" in sys.modules or "openvino_telemetry" in sys.modules:
        import openvino

        return openvino
    sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]  # import -> ImportError
    try:
        import openvino
    finally:
        del sys.modules["openvino_telemetry"]
    return openvino


@functools.cache
def cpu_has_bfloat16() -> bool:
    """Whether OpenVINO can run bfloat16 on this CPU (AVX512-BF16 or AMX); False without
    OpenVINO."""
    try:
        ov = import_openvino()
        return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # not installed, or no CPU plugin
        return False


def openvino_model(model: keras.Model) -> Any:
    """`model`'s forward pass (inference mode, float32 images of any batch size) as an
    OpenVINO model, read by OpenVINO's TensorFlow front end from a traced function.

    The front end is called directly, not through `openvino.convert_model`: that tool sends
    usage data to Intel unless the user opted out, and finetune sends nothing anywhere.
    """
    import tensorflow as tf

    import_openvino()
    from openvino.frontend import FrontEndManager
    from openvino.frontend.tensorflow.utils import create_tf_graph_iterator

    spec = tf.TensorSpec([None, *model.inputs[0].shape[1:]], tf.float32)
    function = tf.function(lambda x: model(x, training=False), autograph=False)
    graph = create_tf_graph_iterator(function.get_concrete_function(spec), None, None, None, False)
    frontend = FrontEndManager().load_by_framework("tf")
    return frontend.convert(frontend.load(graph))


class OpenVinoForward:
    """A Keras model converted to OpenVINO and run by its CPU plugin on float32 batches.

    Converting takes about 1 s for EfficientNet-Lite0 (tracing the model and OpenVINO's
    TensorFlow front end), against 4-6 s to ONNX. In float32 the outputs differ from Keras'
    by rounding (about 1e-5); bfloat16 (AMX and AVX512-BF16 on recent Xeons) is 2.5-3.2x as
    fast as Keras, and moved the logits by 1.6-3.2% of their size (the median image) for two
    of the accuracy benchmark's recipes, by 13% for a third (benchmarks/RESULTS.md, tenth
    slice): `GuardedForward` checks it.

    Args:
        model: a single-input, single-output Keras model (not modified).
        cached: a verified compiled model (`serialized` of an earlier one for the same model,
            precision and thread count) to load instead of converting, or None. Defaults to
            None.
        bfloat16: compute in bfloat16 where the CPU has it (`cpu_has_bfloat16`); float32
            otherwise, with a warning. Defaults to False (float32).

    Attributes:
        runtime: "openvino-bf16" when it computes in bfloat16, "openvino" otherwise (a loaded
            model: whichever it was compiled for).
        serialized: the compiled model's bytes when converted here, None when loaded.

    Raises:
        Exception: whatever OpenVINO or TensorFlow raise for a model they cannot convert or a
            file they cannot load.
    """

    def __init__(self, model: keras.Model, cached: Path | None = None, *, bfloat16: bool = False):
        import io
        import threading

        ov = import_openvino()
        if bfloat16 and not cpu_has_bfloat16():
            warnings.warn(
                "this CPU has no bfloat16 support (AVX512-BF16 or AMX); OpenVINO runs in float32.",
                RuntimeWarning,
                stacklevel=3,
            )
            bfloat16 = False
        self._core = ov.Core()
        self._converted: Any = None  # the OpenVINO model, to compile again in float32
        if cached is not None:
            # The precision is not part of OpenVINO's compiled model (importing sets it): it
            # is kept on the file's first line.
            tag, _, blob = cached.read_bytes().partition(b"\n")
            if tag not in (b"bf16", b"f32"):
                raise ValueError(f"{cached} is not a kept OpenVINO model")
            bf16 = tag == b"bf16" and cpu_has_bfloat16()
            self._compiled(self._core.import_model(io.BytesIO(blob), "CPU", self._config(bf16)))
        else:
            self._converted = openvino_model(model)
            self._compile(bfloat16)
        self.lock = threading.Lock()  # an infer request runs one batch at a time

    @staticmethod
    def _config(bfloat16: bool) -> dict[str, Any]:
        return {
            "PERFORMANCE_HINT": "LATENCY",  # one batch at a time on every core
            "INFERENCE_NUM_THREADS": _intra_op_threads(),
            # Always given: OpenVINO's default on a CPU with bfloat16 is bfloat16.
            "INFERENCE_PRECISION_HINT": "bf16" if bfloat16 else "f32",
        }

    def _compile(self, bfloat16: bool) -> None:
        self._compiled(self._core.compile_model(self._converted, "CPU", self._config(bfloat16)))

    @property
    def serialized(self) -> bytes | None:
        """The compiled model's bytes, its precision on the first line, when converted here
        (made when asked for: about 13 MB for Lite0); None when loaded."""
        if self._converted is None:
            return None
        tag = b"bf16" if self.runtime == "openvino-bf16" else b"f32"
        return tag + b"\n" + self.compiled.export_model().getvalue()

    def _compiled(self, compiled: Any) -> None:
        ov = import_openvino()
        self.compiled = compiled
        precision = compiled.get_property("INFERENCE_PRECISION_HINT")
        self.runtime = "openvino-bf16" if precision == ov.Type.bf16 else "openvino"
        self.request = compiled.create_infer_request()

    @property
    def can_use_float32(self) -> bool:
        """Whether `use_float32` can recompile it (it was converted here, not loaded)."""
        return self._converted is not None

    def use_float32(self) -> None:
        """Compiles the same model again in float32 (0.05-0.06 s for Lite0) and computes in it
        from now on."""
        self._compile(False)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, np.float32)
        with self.lock:
            # Copied: the request's output buffer is reused by the next call.
            return np.array(self.request.infer([x])[0], np.float32)


def converted_forward(
    model: keras.Model, runtime: str, cached: Path | None = None, *, spin: bool = False
) -> OnnxForward | OpenVinoForward:
    """`model` converted for `runtime` (one of `CONVERTED`), or loaded from `cached`."""
    if runtime == "onnxruntime":
        return OnnxForward(model, cached, spin=spin)
    return OpenVinoForward(model, cached, bfloat16=runtime == "openvino-bf16")


def _made(fast: keras.Model | Callable[[], keras.Model]) -> keras.Model:
    import keras

    return fast if isinstance(fast, keras.Model) else fast()


def keras_forward(model: keras.Model) -> Forward:
    """Calls `model` (typically folded) in inference mode on one batch, as NumPy.

    On TensorFlow, through a function traced once per model for any batch size and kept
    while the model lives (`traced_inference`, an `own_function`): Keras' `predict_on_batch`
    traces one that shares its code with every other model's, so a process that predicts
    with many models (runs trained or loaded in a loop) got TensorFlow's warning that one
    function keeps retracing. The same computation either way.
    """
    import keras

    call = traced_inference(model)
    if call is None:

        def forward(batch: np.ndarray) -> np.ndarray:
            return keras.ops.convert_to_numpy(model.predict_on_batch(np.asarray(batch, np.float32)))

        return forward

    def traced(batch: np.ndarray) -> np.ndarray:
        return keras.ops.convert_to_numpy(call(np.asarray(batch, np.float32)))

    return traced


# One traced inference function per model, dropped with the model (the function holds the
# model only weakly, so the entry does not keep its own key alive).
_TRACED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def traced_inference(model: keras.Model) -> Any:
    """`model(x, training=False)` as a TensorFlow function of its own for float32 batches of
    any size, made once per model (later calls with the same model return it); None off the
    TensorFlow backend or for a model without exactly one float32 input."""
    import keras

    inputs = getattr(model, "inputs", None)
    if keras.backend.backend() != "tensorflow" or not inputs or len(inputs) != 1:
        return None
    if str(getattr(inputs[0], "dtype", "float32")) != "float32":
        return None
    call = _TRACED.get(model)
    if call is None:
        import tensorflow as tf

        spec = tf.TensorSpec([None, *inputs[0].shape[1:]], tf.float32)
        call = own_function(
            _inference_call, weakref.ref(model), input_signature=[spec], autograph=False
        )
        _TRACED[model] = call
    return call


def _inference_call(model_ref: Callable[[], keras.Model | None], x: Any) -> Any:
    live = model_ref()
    if live is None:
        raise RuntimeError("the model of this traced function was deleted")
    return live(x, training=False)


class GuardedForward:
    """A converted copy of the model checked against Keras on its first batch, or Keras alone.

    Args:
        model: the Keras model to convert (the plain one; the runtimes fold BatchNorm
            themselves).
        fast: the Keras model to compare with and to fall back on (the folded one), or a
            function that makes it, called only when it is needed (the first batch's check,
            a fallback): a loaded conversion usually needs it never.
        runtime: "keras", or one of `CONVERTED` (see `resolve_runtime`).
        cache: where the verified conversion of `model` is kept (`conversion_file(model,
            runtime)`): loaded without a new check when it exists, written once the first
            batch has passed the check otherwise; None converts every time. Defaults to None.
        spin: see `OnnxForward`. Defaults to False.
        quiet: bfloat16 outputs too far from Keras' switch OpenVINO to float32 without a
            warning (`runtime` says so): for "auto", which chose bfloat16 itself. Defaults to
            False (asked for by name: a warning says why it computes in float32).
        features: the outputs are features a head trains on, not logits: bfloat16 is held to
            `BF16_FEATURE_TOLERANCE` (see below). Defaults to False.

    The check on the first batch: in float32, the largest difference from Keras' outputs
    must be rounding (`TOLERANCE`, relative to their largest magnitude); in bfloat16, the
    median over the images of each one's largest difference, relative to its largest output,
    must stay within `BF16_TOLERANCE` (for `features`: of the length of each one's
    difference, relative to the length of its features, within `BF16_FEATURE_TOLERANCE`),
    else OpenVINO computes in float32 and is checked again. Outputs that fail the check are
    replaced by Keras', which computes from then on.

    Attributes:
        runtime: what computes the outputs now: "openvino", "openvino-bf16", "onnxruntime",
            or "keras" (asked for, or fallen back to; `reason` then says why).
        from_cache: the converted model was loaded from the cache.
    """

    def __init__(
        self,
        model: keras.Model,
        fast: keras.Model | Callable[[], keras.Model],
        runtime: str,
        cache: Path | None = None,
        *,
        spin: bool = False,
        quiet: bool = False,
        features: bool = False,
    ):
        self._fast, self._keras_forward = fast, None
        self.runtime, self.reason, self.quiet = runtime, "", quiet
        self.features = features
        self.converted: OnnxForward | OpenVinoForward | None = None
        self.cache, self.from_cache = cache, False
        self._checked = False
        if runtime not in CONVERTED:
            return
        if cache is not None and cache.is_file():
            try:
                self.converted = converted_forward(model, runtime, cache, spin=spin)
                self.runtime = self.converted.runtime
                self.from_cache = self._checked = True  # it passed the check when written
                _touch(cache)
                if runtime != self.runtime and not quiet:
                    warn_kept_in_float32(model.name, stacklevel=2)
                return
            except Exception:  # unreadable (damaged): convert again and replace it
                cache.unlink(missing_ok=True)
        try:
            self.converted = converted_forward(model, runtime, spin=spin)
            self.runtime = self.converted.runtime
        except Exception as error:  # any conversion failure: Keras is always correct
            target = "ONNX" if runtime == "onnxruntime" else "OpenVINO"
            self._fall_back(f"converting {model.name} to {target} failed ({error})")

    def keras(self, batch: np.ndarray) -> np.ndarray:
        """`batch` through the Keras model (made on first use when `fast` is a function)."""
        if self._keras_forward is None:
            self._keras_forward = keras_forward(_made(self._fast))
        return self._keras_forward(batch)

    @property
    def _name(self) -> str:
        return "ONNX Runtime" if self.runtime == "onnxruntime" else "OpenVINO"

    def _fall_back(self, reason: str) -> None:
        self.runtime, self.reason, self.converted = "keras", reason, None
        warnings.warn(f"{reason}; running it with Keras instead.", RuntimeWarning, stacklevel=3)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if self.converted is None:
            return self.keras(batch)
        try:
            out = self.converted(batch)
        except Exception as error:  # a model that converts but does not run: Keras runs it
            self._fall_back(f"{self._name} failed on a batch of shape {batch.shape} ({error})")
            return self.keras(batch)
        if not self._checked:
            self._checked = True
            reference = self.keras(batch)
            problem = self._disagreement(out, reference)
            if problem and self.runtime == "openvino-bf16" and self.converted.can_use_float32:
                if not self.quiet:
                    warnings.warn(
                        f"OpenVINO's bfloat16 {problem}; computing in float32 instead.",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                try:
                    self.converted.use_float32()
                    self.runtime = self.converted.runtime
                    out = self.converted(batch)
                except Exception as error:  # as above: Keras runs it
                    self._fall_back(f"OpenVINO failed in float32 ({error})")
                    return reference
                problem = self._disagreement(out, reference)
            if problem:
                self._fall_back(f"{self._name}'s {problem}")
                return reference
            self._keep()
        return out

    def _disagreement(self, out: np.ndarray, reference: np.ndarray) -> str:
        """What is wrong with `out` as `reference` computed by this runtime, or ""."""
        if out.shape != reference.shape:
            return f"outputs have shape {out.shape}, Keras' {reference.shape}"
        if not out.size:
            return ""
        if self.runtime == "openvino-bf16":
            relative = bfloat16_difference(out, reference, features=self.features)
            allowed = BF16_FEATURE_TOLERANCE if self.features else BF16_TOLERANCE
            if not relative <= allowed:
                what = "features" if self.features else "outputs"
                return (
                    f"{what} differ from Keras' by {relative:.1%} of their size (the median "
                    f"over the first batch; allowed: {allowed:.0%})"
                )
            return ""
        scale = max(1.0, float(np.max(np.abs(reference))))
        difference = float(np.max(np.abs(out - reference)))
        if not difference <= TOLERANCE * scale:
            return (
                f"outputs differ from Keras' by up to {difference:.3g} on the first batch "
                f"(allowed: {TOLERANCE * scale:.3g})"
            )
        return ""

    def _keep(self) -> None:
        """Writes the verified conversion to the cache; a cache that cannot be written costs
        only time next call."""
        if self.cache is None or self.converted is None or self.converted.serialized is None:
            return
        from finetune.atomic import DiskFullError, write_file_atomic

        data = self.converted.serialized
        try:
            write_file_atomic(self.cache, lambda tmp: tmp.write_bytes(data))
        except (OSError, DiskFullError) as error:
            warnings.warn(
                f"could not keep the conversion in {self.cache} ({error}); it will be "
                "converted again next time",
                RuntimeWarning,
                stacklevel=3,
            )
            return
        prune_conversions(self.cache.parent)


def warn_kept_in_float32(name: str, stacklevel: int = 2) -> None:
    """Warns, on a CPU with bfloat16, that the conversion kept for `name` computes in float32:
    its bfloat16 outputs failed the check when it was kept. For bfloat16 asked for by name;
    "auto" chose it itself and says nothing."""
    if cpu_has_bfloat16():
        warnings.warn(
            f"OpenVINO's bfloat16 outputs for {name} were found too far from Keras' before; "
            "computing in float32 (kept so in the cache).",
            RuntimeWarning,
            stacklevel=stacklevel + 1,
        )


def bfloat16_difference(out: np.ndarray, reference: np.ndarray, *, features: bool = False) -> float:
    """How far `out` is from `reference` (one row per image), as `GuardedForward` checks
    bfloat16: the median over the images of each one's largest difference relative to its
    largest magnitude (at least 1), what changes a predicted class; or, for `features`, of the
    length of each one's difference relative to the length of its reference, where every
    feature counts, as for the head that learns from them."""
    rows = out.reshape(len(out), -1), reference.reshape(len(reference), -1)
    if features:
        size = np.maximum(1e-6, np.linalg.norm(rows[1], axis=1))
        difference = np.linalg.norm(rows[0] - rows[1], axis=1)
    else:
        size = np.maximum(1.0, np.max(np.abs(rows[1]), axis=1))
        difference = np.max(np.abs(rows[0] - rows[1]), axis=1)
    return float(np.median(difference / size))


def _touch(path: Path) -> None:
    with contextlib.suppress(OSError):  # a read-only cache: it is only the eviction order
        os.utime(path)


def prune_conversions(folder: Path, keep: int | None = None) -> list[Path]:
    """Deletes all but the `keep` most recently used conversions in `folder`, and the links
    to conversions no longer there (`finetune.kept`).

    Args:
        folder: the conversion cache (`conversion_file(...).parent`).
        keep: how many to keep. Defaults to `KEEP_CONVERSIONS`.

    Returns:
        The files deleted.
    """
    keep = KEEP_CONVERSIONS if keep is None else keep
    files = []
    for f in (*folder.glob("*.onnx"), *folder.glob("*.blob")):
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
    from finetune.kept import LINK_SUFFIX, linked_conversion

    for link in folder.glob(f"*{LINK_SUFFIX}"):  # a run's link to a conversion deleted here
        if linked_conversion(link) is None:
            with contextlib.suppress(OSError):  # a read-only cache: only a dead link stays
                link.unlink(missing_ok=True)
    return gone


def progress_bar(total: int) -> keras.utils.Progbar:
    """Keras' progress bar over `total` images (live in a terminal, one line in logs)."""
    import keras

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
    fast: keras.Model | Callable[[], keras.Model],
    runtime: str | None,
    num_images: int,
    *,
    spin: bool = False,
    float32: bool = False,
    features: bool = False,
) -> Forward:
    """The forward pass for `num_images` images of `model` in the runtime chosen for them.

    Args:
        model: the plain Keras model (what is converted, and what the cache is keyed on).
        fast: the same function for Keras to run (its folded form), or a function that makes
            it when it is needed (see `GuardedForward`).
        runtime: a name from `RUNTIMES`, or None (see `resolve_runtime`).
        num_images: how many images will go through it.
        spin: ONNX Runtime's threads spin between calls (see `OnnxForward`): for inference
            with nothing else running. Defaults to False.
        float32: never bfloat16 under "auto" (see `resolve_runtime`). Defaults to False.
        features: the outputs are features a head trains on (see `GuardedForward`). Defaults
            to False.

    Returns:
        `keras_forward` of `fast`, or a `GuardedForward` (with the conversion cache) when another
        runtime is chosen; its `runtime` attribute says which one computes.
    """
    chosen = resolve_runtime(runtime, num_images, float32=float32, features=features)
    if chosen == "keras":
        return keras_forward(_made(fast))
    cache = usable_conversion_file(model, chosen, features=features)
    quiet = requested_runtime(runtime) == "auto"  # it chose bfloat16 itself
    return GuardedForward(model, fast, chosen, cache, spin=spin, quiet=quiet, features=features)


def usable_conversion_file(
    model: keras.Model, runtime: str = "onnxruntime", *, features: bool = False
) -> Path | None:
    """`conversion_file(model, runtime)`, or None without a usable cache folder (read-only, no
    home): then nothing is kept and every call converts."""
    try:
        return conversion_file(model, runtime, features=features)
    except (OSError, RuntimeError):
        return None
