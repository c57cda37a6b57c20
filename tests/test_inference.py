"""Batch inference in Keras, OpenVINO or ONNX Runtime: the same outputs, the choice, and the
guard."""

from __future__ import annotations

import contextlib
import json
import os
import warnings

import keras
import numpy as np
import pytest

import finetune.inference as inference
from finetune.backbones.registry import get_backbone
from finetune.config import Config
from finetune.data.decode import decode_images
from finetune.errors import ConfigError, FinetuneError
from finetune.fold import fold_batchnorm
from finetune.inference import (
    AUTO_BF16_MIN_IMAGES,
    AUTO_MIN_IMAGES,
    BF16_FEATURE_TOLERANCE,
    BF16_TOLERANCE,
    ENV_VAR,
    GuardedForward,
    OnnxForward,
    OpenVinoForward,
    WeightsWatch,
    bfloat16_difference,
    conversion_file,
    cpu_has_bfloat16,
    guarded_forward,
    keras_forward,
    model_digest,
    predict_batches,
    prune_conversions,
    resolve_runtime,
    traced_inference,
    usable_conversion_file,
    weights_checksum,
)
from finetune.model import build_classifier
from finetune.recipes.feature_cache import split_at_pool
from finetune.run import Run
from tests.helpers import FASHION

SIZE = 32
SPEC = get_backbone("efficientnet_lite0")


def classifier(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    model = build_classifier(SPEC, 3, image_size=SIZE, weights=None)
    # Non-trivial BatchNorm statistics, so folding and ONNX Runtime's own fusion matter.
    rng = np.random.default_rng(seed)
    for layer in model.get_layer("backbone").layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.1, n).astype(np.float32))
            layer.moving_variance.assign(rng.uniform(0.5, 1.5, n).astype(np.float32))
    return model


@contextlib.contextmanager
def runtime_warnings():
    """Collects the messages of the RuntimeWarnings raised inside the block, every one."""
    said: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield said
    said.extend(str(w.message) for w in caught if issubclass(w.category, RuntimeWarning))


def fashion_images(n: int, size: int) -> np.ndarray:
    """`n` bundled Fashion-MNIST images (real pictures, every class), RGB at `size` px."""
    files = sorted(FASHION.glob("*/*.png"))
    decoded, _, _ = decode_images(files[:: max(1, len(files) // n)][:n], size, progress=False)
    return decoded.astype(np.float32)


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


@pytest.mark.parametrize("bf16", [True, False])
def test_auto_picks_openvino_from_the_thresholds_on(monkeypatch, bf16):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(inference, "cpu_has_bfloat16", lambda: bf16)  # either kind of CPU
    assert AUTO_BF16_MIN_IMAGES < AUTO_MIN_IMAGES
    # Predictions: bfloat16 at any count on a CPU with it; else Keras below the float32 bound.
    below = "openvino-bf16" if bf16 else "keras"
    for count in (1, AUTO_BF16_MIN_IMAGES - 1, AUTO_BF16_MIN_IMAGES, AUTO_MIN_IMAGES - 1):
        assert resolve_runtime(None, count) == below
    assert resolve_runtime(None, AUTO_MIN_IMAGES) == ("openvino-bf16" if bf16 else "openvino")
    # Features to train on: bfloat16 from its threshold (one phase's conversion must pay).
    assert resolve_runtime(None, 1, features=True) == "keras"
    assert resolve_runtime(None, AUTO_BF16_MIN_IMAGES - 1, features=True) == "keras"
    assert resolve_runtime(None, AUTO_BF16_MIN_IMAGES, features=True) == below
    assert resolve_runtime(None, AUTO_MIN_IMAGES - 1, features=True) == below
    assert resolve_runtime(None, AUTO_MIN_IMAGES, features=True) == (
        "openvino-bf16" if bf16 else "openvino"
    )
    # Logits to fit a temperature on stay in float32.
    assert resolve_runtime(None, AUTO_MIN_IMAGES - 1, float32=True) == "keras"
    assert resolve_runtime(None, AUTO_MIN_IMAGES, float32=True) == "openvino"
    assert resolve_runtime("openvino-bf16", 1, float32=True) == "openvino-bf16"  # asked for
    assert resolve_runtime("auto", 10) == below
    assert resolve_runtime("auto", 10, features=True) == "keras"
    assert resolve_runtime("ONNXRuntime", 10) == "onnxruntime"
    assert resolve_runtime(" OpenVINO-bf16", 10) == "openvino-bf16"
    assert resolve_runtime("keras", 10**6) == "keras"
    monkeypatch.setenv(ENV_VAR, "keras")
    assert resolve_runtime(None, 10**6) == "keras"
    assert resolve_runtime("onnxruntime", 1) == "onnxruntime"  # the argument wins


def test_an_unknown_runtime_is_named_with_the_choices(monkeypatch):
    named = r"runtime \(--runtime\) is 'tflite'.*auto, keras, openvino, openvino-bf16, onnxruntime"
    with pytest.raises(ConfigError, match=named):
        resolve_runtime("tflite", 1)
    monkeypatch.setenv(ENV_VAR, "gpu")
    with pytest.raises(ConfigError, match=f"environment variable {ENV_VAR} is 'gpu'"):
        resolve_runtime(None, 1)


@pytest.mark.slow
@pytest.mark.parametrize("convert", [OnnxForward, OpenVinoForward])
def test_a_float32_runtime_computes_the_keras_models_function(convert):
    model = classifier(0)
    x = images(20).astype(np.float32)
    expected = model.predict_on_batch(x)
    forward = convert(model)
    # Float32, whatever the CPU.
    assert forward.runtime == ("onnxruntime" if convert is OnnxForward else "openvino")
    got = forward(x)
    assert got.shape == expected.shape == (20, 3)
    np.testing.assert_allclose(got, expected, atol=1e-4 * max(1.0, np.abs(expected).max()))
    np.testing.assert_allclose(forward(x[:3]), expected[:3], atol=1e-4)  # any batch size
    # A different network gives different outputs: the comparison above can fail.
    assert np.abs(convert(classifier(1))(x) - expected).max() > 1e-2


@pytest.mark.slow
def test_openvino_bf16_is_near_float32_where_the_cpu_has_it():
    model = classifier(0)
    x = images(20).astype(np.float32)
    expected = model.predict_on_batch(x)
    scale = max(1.0, float(np.abs(expected).max()))
    if cpu_has_bfloat16():
        forward = OpenVinoForward(model, bfloat16=True)
        assert forward.runtime == "openvino-bf16"
        difference = float(np.abs(forward(x) - expected).max())
        # Really bfloat16 (float32 rounds to ~1e-5), and within the guard's bound.
        assert 1e-3 * scale < difference < BF16_TOLERANCE * scale
    else:
        with pytest.warns(RuntimeWarning, match="no bfloat16 support.*float32"):
            forward = OpenVinoForward(model, bfloat16=True)
        assert forward.runtime == "openvino"
        np.testing.assert_allclose(forward(x), expected, atol=1e-4 * scale)


@pytest.mark.slow
@pytest.mark.parametrize("asked", ["openvino-bf16", "auto"])
def test_bfloat16_too_far_from_keras_computes_in_float32(tmp_path, monkeypatch, asked):
    if not cpu_has_bfloat16():
        pytest.skip("this CPU has no bfloat16: OpenVINO computes in float32 from the start")
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(inference, "BF16_TOLERANCE", 0.0)  # as a model bfloat16 does not suit
    model = classifier(0)
    fast = fold_batchnorm(model, frozen_only=False)
    x = images(16).astype(np.float32)
    n = AUTO_BF16_MIN_IMAGES if asked == "auto" else 16
    with runtime_warnings() as said:
        forward = guarded_forward(model, fast, asked, n)
        out = forward(x)
    # Float32 OpenVINO, not Keras: as precise, and still faster.
    assert forward.runtime == "openvino" and isinstance(forward, GuardedForward)
    np.testing.assert_allclose(out, fast.predict_on_batch(x), atol=1e-4)
    if asked == "auto":
        assert said == []  # auto chose bfloat16 itself: no warning
    else:
        assert len(said) == 1 and "bfloat16 outputs differ" in said[0] and "float32" in said[0]
    # What was kept for this request is the float32 model, loaded as such next time (with a
    # warning again when bfloat16 was asked for by name).
    with runtime_warnings() as said:
        again = guarded_forward(model, fast, asked, n)
    assert again.from_cache and again.runtime == "openvino"
    assert len(said) == (0 if asked == "auto" else 1)
    np.testing.assert_allclose(again(x), out, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["openvino", "onnxruntime"])
def test_a_run_predicts_the_same_in_keras_and_a_float32_runtime_tta_included(runtime):
    model = classifier(0)
    run = Run(model=model, config=Config(), class_names=["a", "b", "c"], image_size=SIZE)
    x = images(40)
    with_keras = run.predict_view_logits(x, batch_size=16, tta=2, runtime="keras")
    assert run.last_runtime == "keras"
    with_onnx = run.predict_view_logits(x, batch_size=16, tta=2, runtime=runtime)
    assert run.last_runtime == runtime
    assert with_onnx.shape == (2, 40, 3)
    np.testing.assert_allclose(with_onnx, with_keras, atol=1e-4)
    # The augmented view really is another view, in both runtimes alike.
    assert np.abs(with_keras[1] - with_keras[0]).max() > 1e-3
    np.testing.assert_allclose(
        run.predict_proba(x, runtime=runtime), run.predict_proba(x, runtime="keras"), atol=1e-5
    )


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["openvino", "openvino-bf16", "onnxruntime"])
def test_outputs_that_disagree_with_keras_fall_back_to_keras_with_a_warning(tmp_path, runtime):
    # The runtime is given another network than the Keras reference: the first batch shows it
    # (in bfloat16 too: its looser bound still catches another network, then in float32).
    fast = fold_batchnorm(classifier(0), frozen_only=False)
    other = classifier(1)
    cache = tmp_path / "other.conversion"
    forward = GuardedForward(other, fast, runtime, cache)
    computes = "openvino" if runtime == "openvino-bf16" and not cpu_has_bfloat16() else runtime
    assert forward.runtime == computes  # "openvino" for bfloat16: a CPU without it
    x = images(24).astype(np.float32)
    with runtime_warnings() as said:
        out = predict_batches(forward, x, batch_size=8)
    if runtime == "openvino-bf16" and cpu_has_bfloat16():
        assert len(said) == 2 and "bfloat16 outputs differ" in said[0]
    assert "differ from Keras' by up to" in said[-1] and "running it with Keras" in said[-1]
    assert forward.runtime == "keras" and "differ" in forward.reason
    np.testing.assert_allclose(out, fast.predict_on_batch(x), atol=1e-5)
    assert not cache.exists()  # a conversion that failed the check is not kept


def test_the_bfloat16_measures_of_outputs_and_of_features():
    reference = np.ones((5, 100), np.float32)  # 5 images, 100 features of 1 (length 10)
    out = reference.copy()
    out[:, 7] += 0.5  # one feature of each image moves by half
    # Logits: the largest difference, relative to the largest output (at least 1).
    assert bfloat16_difference(out, reference) == pytest.approx(0.5)
    # Features: the difference's length relative to the features' (0.5 / 10).
    assert bfloat16_difference(out, reference, features=True) == pytest.approx(0.05)
    assert BF16_TOLERANCE < 0.5 and BF16_FEATURE_TOLERANCE > 0.05  # refused as logits only
    # The median image decides: two images far off do not, three do.
    out[:2] = -reference[:2]
    assert bfloat16_difference(out, reference, features=True) == pytest.approx(0.05)
    out[:3] = -reference[:3]
    assert bfloat16_difference(out, reference, features=True) == pytest.approx(2.0)
    # Any output shape: one row per image (not per last axis, where 9 rows in 10 are exact).
    cube = reference.reshape(5, 10, 10)
    moved = cube.copy()
    moved[:, 0, :] += 1.0  # the first of each image's 10 rows: length sqrt(10) of 10
    assert bfloat16_difference(moved, cube, features=True) == pytest.approx(10**-0.5)


@pytest.mark.slow
def test_bfloat16_features_are_held_to_their_length_not_their_largest_value():
    """A pretrained backbone's features move by about 10% of their largest value in bfloat16
    (too far for logits) but by about 5% of their length: features to train on compute in
    bfloat16; another network's features still fail the check."""
    if not cpu_has_bfloat16():
        pytest.skip("this CPU has no bfloat16: OpenVINO computes in float32 from the start")
    keras.utils.set_random_seed(0)
    model = build_classifier(SPEC, 3, image_size=64)  # ImageNet weights
    extractor, _ = split_at_pool(model)
    fast = fold_batchnorm(extractor, frozen_only=False, snapshot=True)
    x = fashion_images(32, 64)
    reference = fast.predict_on_batch(x)

    as_logits = GuardedForward(extractor, fast, "openvino-bf16", quiet=True)
    as_logits(x)
    assert as_logits.runtime == "openvino"  # float32: the logits' bound is 5% of the largest
    as_features = GuardedForward(extractor, fast, "openvino-bf16", quiet=True, features=True)
    out = as_features(x)
    assert as_features.runtime == "openvino-bf16"
    length = np.linalg.norm(out - reference, axis=1) / np.linalg.norm(reference, axis=1)
    assert 1e-3 < np.median(length) < BF16_FEATURE_TOLERANCE  # really bfloat16, within bound

    keras.utils.set_random_seed(1)
    scratch, _ = split_at_pool(build_classifier(SPEC, 3, image_size=64, weights=None))
    with runtime_warnings() as said:
        wrong = GuardedForward(scratch, fast, "openvino-bf16", features=True)
        np.testing.assert_allclose(wrong(x), reference, atol=1e-5)  # Keras' answer
    assert len(said) == 2 and "bfloat16 features differ from Keras'" in said[0]
    assert wrong.runtime == "keras"  # and float32 did not agree either


def test_the_digest_follows_architecture_and_weights():
    a, b = classifier(0), classifier(0)
    assert model_digest(a) == model_digest(b)
    b.get_layer("logits").bias.assign(np.full(3, 1e-7, np.float32))
    assert model_digest(a) != model_digest(b)
    keras.utils.set_random_seed(0)
    wider = build_classifier(SPEC, 4, image_size=SIZE, weights=None)
    assert model_digest(wider) != model_digest(a)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("runtime", "folder"),
    [("openvino", "openvino"), ("openvino-bf16", "openvino"), ("onnxruntime", "onnx")],
)
def test_a_verified_conversion_is_kept_and_reused(tmp_path, monkeypatch, runtime, folder):
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(ENV_VAR, raising=False)
    model = classifier(0)
    fast = fold_batchnorm(model, frozen_only=False)
    x = images(16).astype(np.float32)
    cache = conversion_file(model, runtime)
    assert cache.parent == tmp_path / folder and not cache.exists()

    first = guarded_forward(model, fast, runtime, 16)
    assert isinstance(first, GuardedForward) and not first.from_cache
    assert not cache.exists()  # kept only once the first batch has passed the check
    expected = first(x)
    assert cache.is_file()

    computes = "openvino" if runtime == "openvino-bf16" and not cpu_has_bfloat16() else runtime
    assert first.runtime == computes
    os.utime(cache, (1e9, 1e9))
    made: list[keras.Model] = []  # the Keras view, made only when needed

    def making() -> keras.Model:
        made.append(fast)
        return fast

    again = guarded_forward(model, making, runtime, 16)
    assert again.from_cache and again.runtime == computes  # a bfloat16 model loads as such
    assert cache.stat().st_mtime > 1e9  # used: the last to be evicted
    np.testing.assert_array_equal(again(x), expected)
    assert made == []  # a kept conversion is not checked again: no Keras view made
    # A cached conversion does not change what "auto" picks: for features to train on below
    # their threshold, Keras.
    assert not isinstance(guarded_forward(model, fast, None, 16, features=True), GuardedForward)
    # Another model's conversion, or another runtime's, is another file.
    assert conversion_file(classifier(1), runtime) != cache
    other = "openvino" if runtime == "openvino-bf16" else "openvino-bf16"
    assert conversion_file(model, other) != cache
    # One checked as features to train on (a looser bound in bfloat16) is another file too.
    assert conversion_file(model, runtime, features=True) != cache

    # A damaged file is converted again and replaced.
    cache.write_bytes(b"not a converted model")
    repaired = guarded_forward(model, fast, runtime, 16)
    assert not repaired.from_cache and repaired.runtime == computes
    np.testing.assert_allclose(repaired(x), expected, atol=1e-5)
    assert guarded_forward(model, fast, runtime, 16).from_cache


def test_the_weights_checksum_notices_any_change_and_nothing_else():
    model = classifier(0)
    before = weights_checksum(model)
    assert weights_checksum(model) == before
    watch = WeightsWatch(model)  # each weight read on its own, then all in one function
    assert [watch(), watch(), watch()] == [before] * 3 and watch._read is not None
    assert weights_checksum(classifier(0)) == before  # the same weights, another model
    assert weights_checksum(classifier(1)) != before
    # One value of one BatchNorm statistic: inference changes, so must the checksum.
    variance = next(
        layer.moving_variance
        for layer in model.get_layer("backbone").layers
        if isinstance(layer, keras.layers.BatchNormalization)
    )
    value = keras.ops.convert_to_numpy(variance).copy()
    value[-1] *= 1.0 + 2.0**-20
    variance.assign(value)
    assert weights_checksum(model) != before
    assert watch() == weights_checksum(model)  # the traced reader sees the change too


def test_the_watch_reads_weights_that_replaced_others():
    # `quantize` replaces a Dense layer's float kernel with int8 variables in place.
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    watch = WeightsWatch(model)
    before = [watch(), watch(), watch()]  # the last two through the traced reader
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "InputLayer has no quantize method"
        model.quantize("int8")
    assert watch() == weights_checksum(model) != before[-1]


def test_keras_forward_is_keras_predict_traced_once_per_model():
    model = classifier(0)
    x = np.random.default_rng(0).uniform(0, 255, (5, 32, 32, 3)).astype(np.float32)
    forward = keras_forward(model)
    np.testing.assert_allclose(forward(x), model.predict_on_batch(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(forward(x[:2]), model.predict_on_batch(x[:2]), atol=1e-5)
    # A run predicting again and again (each call makes a forward) traces once.
    keras_forward(model)(x[:3])
    assert traced_inference(model).experimental_get_tracing_count() == 1


def test_a_trained_model_and_the_same_loaded_for_inference_name_one_conversion(tmp_path):
    # The end of training converts the trained model (compiled, with its optimizer); a later
    # `finetune predict` loads the run with compile=False and must find that conversion.
    from finetune.run import save_model_atomic
    from finetune.untrusted import load_keras_model

    model = classifier(0)
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    save_model_atomic(model, tmp_path / "model.keras")
    loaded = load_keras_model(tmp_path / "model.keras", compile=False)
    compiled = [json.loads(m.to_json()).get("compile_config") for m in (model, loaded)]
    assert compiled[0] and not compiled[1]  # the JSON differs there
    assert model_digest(loaded) == model_digest(model)
    assert model_digest(classifier(1)) != model_digest(model)


@pytest.mark.slow
def test_a_run_keeps_its_converted_model_while_its_weights_stay_the_same(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path))
    model = classifier(0)
    run = Run(model=model, config=Config(), class_names=["a", "b", "c"], image_size=SIZE)
    x = images(8)
    before = run.predict_logits(x, runtime="openvino")
    kept = run.prediction_forward(8, "openvino")
    assert kept.runtime == "openvino" and kept.from_cache is False  # the one made above
    assert run.prediction_forward(1, "openvino") is kept  # any count, the same weights
    np.testing.assert_array_equal(run.predict_logits(x, runtime="openvino"), before)
    # One changed value (the head's bias) is noticed: the predictions follow the weights.
    bias = model.layers[-1].bias
    bias.assign(keras.ops.convert_to_numpy(bias) + np.array([5.0, 0.0, 0.0], np.float32))
    after = run.predict_logits(x, runtime="openvino")
    assert run.prediction_forward(8, "openvino") is not kept
    np.testing.assert_allclose(after[:, 0] - before[:, 0], 5.0, atol=1e-3)
    np.testing.assert_allclose(after, run.predict_logits(x, runtime="keras"), atol=1e-4)


def _spinning(forward: OnnxForward) -> str:
    options = forward.session.get_session_options()
    return options.get_session_config_entry("session.intra_op.allow_spinning")


@pytest.mark.slow
def test_predict_lets_onnx_runtimes_threads_spin_and_training_does_not(tmp_path, monkeypatch):
    # Spinning between batches is faster when nothing else computes (predict, evaluate); it
    # would take the CPU from TensorFlow in training (the cache fill, a streamed phase).
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path))
    made: list[OnnxForward] = []
    original = OnnxForward.__init__

    def recording(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(OnnxForward, "__init__", recording)
    model = classifier(0)
    run = Run(model=model, config=Config(), class_names=["a", "b", "c"], image_size=SIZE)
    run.predict_logits(images(8), runtime="onnxruntime")  # converts and keeps it
    run.predict_logits(images(8), runtime="onnxruntime")  # the run holds it: nothing made
    assert [_spinning(f) for f in made] == ["1"]
    again = Run(model=model, config=Config(), class_names=["a", "b", "c"], image_size=SIZE)
    again.predict_logits(images(8), runtime="onnxruntime")  # loads the kept conversion
    assert [_spinning(f) for f in made] == ["1", "1"]
    fast = fold_batchnorm(model, frozen_only=False)
    assert _spinning(guarded_forward(model, fast, "onnxruntime", 8).converted) == "0"  # training
    assert _spinning(GuardedForward(model, fast, "onnxruntime").converted) == "0"  # streamed


class _NumpyOp(keras.layers.Layer):
    """A layer whose op (a Python function) no ONNX converter can express."""

    def call(self, x):
        import tensorflow as tf

        y = tf.numpy_function(lambda a: a * 2.0, [x], tf.float32)
        y.set_shape(x.shape)
        return y


@pytest.mark.slow
@pytest.mark.parametrize(("runtime", "target"), [("openvino", "OpenVINO"), ("onnxruntime", "ONNX")])
def test_a_model_that_cannot_be_converted_runs_in_keras_with_a_warning(runtime, target):
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(_NumpyOp()(inputs)))
    with pytest.warns(RuntimeWarning, match=f"converting .* to {target} failed"):
        forward = GuardedForward(model, model, runtime)
    assert forward.runtime == "keras"
    x = np.ones((3, 4), np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning per batch
        np.testing.assert_allclose(predict_batches(forward, x, 2), model.predict_on_batch(x))


def test_a_run_whose_conversion_fell_back_predicts_in_keras_without_trying_again():
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(_NumpyOp()(inputs)))
    run = Run(model=model, config=Config(), class_names=["a", "b"], image_size=SIZE)
    with pytest.warns(RuntimeWarning, match="converting .* to OpenVINO failed"):
        first = run.prediction_forward(3, "openvino")
    x = np.ones((3, 4), np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second attempt, no second warning
        again = run.prediction_forward(3, "openvino")
    assert first.runtime == "keras" and again is not first
    np.testing.assert_allclose(again(x), first(x))
    np.testing.assert_allclose(again(x), model.predict_on_batch(x))


def test_only_the_most_recently_used_conversions_are_kept(tmp_path):
    names = ["newest.onnx", "middle.blob", "old.onnx", "oldest.blob"]
    for age, name in enumerate(names):
        f = tmp_path / name
        f.write_bytes(b"x")
        os.utime(f, (1e9 - age * 100, 1e9 - age * 100))
    (tmp_path / "notes.txt").write_text("not a conversion")
    gone = prune_conversions(tmp_path, keep=2)
    assert sorted(f.name for f in gone) == ["old.onnx", "oldest.blob"]
    assert sorted(f.name for f in tmp_path.iterdir()) == ["middle.blob", "newest.onnx", "notes.txt"]


class _Broken:  # an injected fault: the runtime fails at run time
    def run(self, *args, **kwargs):  # ONNX Runtime's session
        raise RuntimeError("injected failure")

    infer = run  # OpenVINO's infer request


@pytest.mark.slow
@pytest.mark.parametrize(
    ("runtime", "name", "attribute"),
    [("onnxruntime", "ONNX Runtime", "session"), ("openvino", "OpenVINO", "request")],
)
def test_a_runtime_failing_on_a_batch_falls_back_to_keras(tmp_path, runtime, name, attribute):
    model = classifier(0)
    fast = fold_batchnorm(model, frozen_only=False)
    forward = GuardedForward(model, fast, runtime, tmp_path / "m.conversion")
    x = images(8).astype(np.float32)
    forward(x)  # checked, kept
    assert (tmp_path / "m.conversion").is_file()

    setattr(forward.converted, attribute, _Broken())
    with pytest.warns(RuntimeWarning, match=f"{name} failed on a batch .*injected failure"):
        out = forward(x)
    assert forward.runtime == "keras"
    np.testing.assert_allclose(out, fast.predict_on_batch(x), atol=1e-5)


def test_no_usable_cache_folder_means_converting_every_time(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "file"))
    (tmp_path / "file").write_text("a file where the cache folder would be")
    model = classifier(0)
    forward = guarded_forward(model, model, "keras", 10)  # Keras: the cache is not looked at
    assert not isinstance(forward, GuardedForward)
    with pytest.raises(OSError):
        conversion_file(model)


@pytest.mark.slow
def test_no_usable_cache_folder_still_runs_onnx_runtime(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "file"))
    (tmp_path / "file").write_text("a file where the cache folder would be")
    model = classifier(0)
    forward = guarded_forward(model, fold_batchnorm(model, frozen_only=False), "onnxruntime", 8)
    assert isinstance(forward, GuardedForward) and forward.cache is None
    assert usable_conversion_file(model) is None
    x = images(8).astype(np.float32)
    np.testing.assert_allclose(forward(x), model.predict_on_batch(x), atol=1e-4)
    assert forward.runtime == "onnxruntime"


def test_a_run_predicts_a_list_of_images_and_refuses_none():
    run = Run(model=classifier(0), config=Config(), class_names=["a", "b", "c"], image_size=SIZE)
    x = images(5)
    np.testing.assert_allclose(
        run.predict_logits(list(x), runtime="keras"), run.predict_logits(x, runtime="keras")
    )
    with pytest.raises(FinetuneError, match="no images to predict"):
        run.predict_logits(x[:0], runtime="onnxruntime")


def test_a_bad_runtime_in_the_environment_stops_train_before_any_work(tmp_path, monkeypatch):
    import finetune

    monkeypatch.setenv(ENV_VAR, "gpu")
    with pytest.raises(ConfigError, match=f"{ENV_VAR} is 'gpu'"):
        finetune.train(tmp_path / "photos", out=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["finetune", "plain"])
def test_openvino_is_imported_with_its_usage_data_sender_off(how):
    # Importing OpenVINO starts Intel's usage-data collection (on unless the user opted out);
    # finetune sends nothing anywhere. Checked in a fresh process: after finetune's conversion,
    # OpenVINO's tools hold their no-op stand-in, and the sender's package still imports; a
    # plain `import openvino` (the check that this one can fail) holds the sender.
    import subprocess
    import sys

    script = (
        "import keras, numpy as np\n"
        "if '" + how + "' == 'finetune':\n"
        "    from finetune.inference import OpenVinoForward\n"
        "    inputs = keras.Input((8, 8, 3))\n"
        "    flat = keras.layers.Flatten()(inputs)\n"
        "    model = keras.Model(inputs, keras.layers.Dense(2)(flat))\n"
        "    assert OpenVinoForward(model)(np.ones((2, 8, 8, 3), np.float32)).shape == (2, 2)\n"
        "else:\n"
        "    import openvino\n"
        "import openvino.tools.ovc.telemetry_utils as used, openvino_telemetry\n"
        "print(used.tm.__name__)\n"
    )
    # CI=true: the sender declines to send even where it is bound (the plain import's case).
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "CI": "true"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    expected = "openvino.tools.ovc.telemetry_stub" if how == "finetune" else "openvino_telemetry"
    assert done.stdout.strip().splitlines()[-1] == expected


@pytest.mark.slow
def test_the_temperature_is_fitted_on_float32_logits(tmp_path, monkeypatch):
    # "auto" would pick bfloat16 for these many images on a CPU with it; the logits a
    # temperature is fitted on stay float32 (Keras, below the float32 threshold).
    from pathlib import Path

    from finetune.data.pipeline import PreparedData
    from finetune.train import _calibrate

    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(inference, "AUTO_BF16_MIN_IMAGES", 16)
    monkeypatch.setattr(inference, "cpu_has_bfloat16", lambda: True)
    run = Run(model=classifier(0), config=Config(), class_names=["a", "b", "c"], image_size=SIZE)
    x = images(24)
    y = np.arange(24) % 3
    none = np.zeros((0, SIZE, SIZE, 3), np.uint8)
    data = PreparedData(
        root=Path("x"), class_names=["a", "b", "c"], image_size=SIZE,
        splits={"train": [], "val": [], "test": []},
        images={"train": none, "val": x, "test": none},
        labels={"train": y[:0], "val": y, "test": y[:0]}, seed=0,
    )  # fmt: skip
    assert resolve_runtime(None, len(x)) == "openvino-bf16"  # what predictions would use
    record = _calibrate(run, data, progress=False)
    assert run.last_runtime == "keras" and record["temperature"] > 0
