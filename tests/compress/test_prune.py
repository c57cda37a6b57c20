"""Magnitude pruning: the schedule, the masks inside the compiled train step, and whole runs."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import keras
import numpy as np
import pytest
from typer.testing import CliRunner

import finetune
from finetune.cli import app
from finetune.compress.prune import (
    MagnitudePruning,
    choose_layers,
    gzipped_weights_size,
    kernel_sparsity,
    polynomial_sparsity,
)
from finetune.config import PruneConfig
from finetune.errors import FinetuneError
from finetune.export import load_exported
from tests.helpers import FASHION, image_subset


def test_polynomial_schedule_rises_from_zero_to_the_target_and_stays():
    values = [polynomial_sparsity(t, 0.75, 100) for t in range(0, 130)]
    assert values[0] == 0.0 and values[100] == pytest.approx(0.75) and values[129] == 0.75
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))
    # Power 3 prunes fast early: half the ramp reaches 7/8 of the target.
    assert values[50] == pytest.approx(0.75 * (1 - 0.5**3))


def _small_model() -> keras.Model:
    inputs = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(16, 3, name="conv")(inputs)
    x = keras.layers.DepthwiseConv2D(3, name="depthwise")(x)
    x = keras.layers.Conv2D(4, 1, name="tiny")(x)  # 64 weights: below min_weights
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(5, name="dense")(keras.layers.Dense(64, name="hidden")(x))
    return keras.Model(inputs, outputs)


def test_choose_layers_by_type_size_and_pattern():
    model = _small_model()
    choice = choose_layers(model, PruneConfig(min_weights=100, exclude=["hid*"], depthwise=True))
    assert set(choice.pruned) == {"conv", "depthwise", "dense"}
    assert choice.skipped["hidden"] == "excluded"
    assert "64 weights" in choice.skipped["tiny"]
    default = choose_layers(model, PruneConfig(min_weights=100))
    assert "depthwise" in default.skipped["depthwise"] and "depthwise" not in default.pruned


class _CheckZerosAfterEveryStep(keras.callbacks.Callback):
    """Records, after each optimizer step, the largest |weight| where the mask is 0."""

    def __init__(self, pruning: MagnitudePruning):
        super().__init__()
        self.pruning = pruning
        self.worst: list[float] = []
        self.shares: list[float] = []

    def on_train_batch_end(self, batch, logs=None):
        worst, pruned, total = 0.0, 0, 0
        for path, layer in self.pruning.layers.items():
            w = keras.ops.convert_to_numpy(layer.kernel.value)
            mask = keras.ops.convert_to_numpy(self.pruning.masks[path].value)
            if (mask == 0).any():
                worst = max(worst, float(np.abs(w[mask == 0]).max()))
            pruned, total = pruned + int((mask == 0).sum()), total + mask.size
        self.worst.append(worst)
        self.shares.append(pruned / total)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_pruned_weights_stay_zero_through_every_optimizer_step(optimizer, tmp_path):
    keras.utils.set_random_seed(0)
    model = _small_model()
    choice = choose_layers(model, PruneConfig(min_weights=100, depthwise=True))
    assert "depthwise" in choice.pruned
    pruning = MagnitudePruning(choice.pruned, 0.6, ramp_steps=12, frequency=3)
    check = _CheckZerosAfterEveryStep(pruning)
    pruning.install()
    opt = keras.optimizers.Adam(1e-2) if optimizer == "adam" else keras.optimizers.SGD(0.1, 0.9)
    model.compile(opt, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(160, 12, 12, 3)).astype("float32"), rng.integers(0, 5, 160)
    model.fit(x, y, batch_size=8, epochs=1, callbacks=[pruning, check], verbose=0)
    # Momentum keeps pushing pruned weights, yet after every step they are exactly zero.
    assert max(check.worst) == 0.0
    assert check.shares[0] == 0.0 and check.shares[-1] == pytest.approx(0.6, abs=0.01)
    assert all(b >= a for a, b in zip(check.shares, check.shares[1:], strict=False))
    pruning.strip()
    for path, layer in choice.pruned.items():
        assert kernel_sparsity(layer) == pytest.approx(0.6, abs=1 / np.prod(layer.kernel.shape)), (
            path
        )
        assert layer.kernel.constraint is None
    # Stripped: a plain Keras model that saves, loads in safe mode and keeps its zeros.
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    assert kernel_sparsity(loaded.get_layer("conv")) == kernel_sparsity(model.get_layer("conv"))
    assert kernel_sparsity(loaded.get_layer("tiny")) == 0.0  # 64 weights: left dense


def test_each_update_zeros_exactly_the_smallest_magnitudes():
    keras.utils.set_random_seed(1)
    model = _small_model()
    model.build((None, 12, 12, 3))
    layer = model.get_layer("dense")
    before = keras.ops.convert_to_numpy(layer.kernel.value).copy()
    pruning = MagnitudePruning({"dense": layer}, 0.3, ramp_steps=1)
    pruning.set_sparsity(0.3)
    after = keras.ops.convert_to_numpy(layer.kernel.value)
    k = round(0.3 * before.size)
    cut = np.sort(np.abs(before).ravel())[k - 1]
    assert (after == 0).sum() == k
    assert np.all(np.abs(before[after == 0]) <= cut)
    np.testing.assert_array_equal(after[after != 0], before[after != 0])
    pruning.strip()


def test_gzipped_size_shrinks_with_zeros():
    model = _small_model()
    model.build((None, 12, 12, 3))
    dense = gzipped_weights_size(model)
    choice = choose_layers(model, PruneConfig(min_weights=0, depthwise=True))
    pruning = MagnitudePruning(choice.pruned, 0.75, ramp_steps=1)
    pruning.set_sparsity(0.75)
    pruning.strip()
    assert gzipped_weights_size(model) < 0.6 * dense


# --- whole runs (a real EfficientNet-Lite0, small images) ---------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return image_subset(FASHION, tmp_path_factory.mktemp("fashion"), classes=3, per_class=30)


@pytest.fixture(scope="module")
def run_dir(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "dense"
    finetune.train(
        data_dir,
        out=out,
        image_size=32,
        head_epochs=2,
        finetune_epochs=0,
        check_data=False,
        progress=False,
    )
    return out


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def pruned(run_dir, tmp_path_factory):
    model_digest = _digest(run_dir / "model.keras")
    out = tmp_path_factory.mktemp("runs") / "pruned"
    run = finetune.prune(run_dir, out=out, sparsity=0.5, epochs=2, depthwise=True, progress=False)
    assert _digest(run_dir / "model.keras") == model_digest  # the source run is untouched
    return run


@pytest.mark.slow
def test_prune_reaches_the_target_in_every_layer_and_saves_a_plain_model(pruned):
    record = pruned.info["pruning"]
    assert record["target_sparsity"] == 0.5 and len(record["layers"]) > 40
    for path, layer in record["layers"].items():
        assert layer["sparsity"] == pytest.approx(0.5, abs=1 / layer["weights"]), path
    # Read back from disk: the zeros are in the saved model's kernels.
    loaded = finetune.Run.load(pruned.path)
    choice = choose_layers(loaded.model, PruneConfig(min_weights=1024, depthwise=True))
    assert any("dwconv" in path for path in choice.pruned)
    assert set(choice.pruned) == set(record["layers"]) and set(choice.skipped) == set(
        record["skipped"]
    )
    for path, layer in choice.pruned.items():
        assert kernel_sparsity(layer) == pytest.approx(0.5, abs=1 / np.prod(layer.kernel.shape)), (
            path
        )
    assert record["gzip_bytes_after"] < 0.8 * record["gzip_bytes_before"]
    phases = [r["phase"] for r in pruned.history]
    assert phases == ["head", "head", "prune", "prune"]
    assert pruned.history[-1]["sparsity"] == 0.5
    assert 0 < pruned.history[-2]["sparsity"] <= 0.5
    assert record["accuracy_before"] is not None and "accuracy" in loaded.metrics
    assert (pruned.path / "report.html").is_file() and (pruned.path / "predictions.csv").is_file()


@pytest.mark.slow
def test_pruned_then_int8_keeps_the_zeros_in_the_integer_weights(pruned):
    report = finetune.export_run(pruned.path, "litert", quantize="int8", latency_runs=2)
    model = load_exported(report.path)
    interpreter = model.interpreter
    zero_shares = []
    for detail in interpreter.get_tensor_details():
        if detail["dtype"] != np.int8 or len(detail["shape"]) != 4:
            continue
        try:
            values = interpreter.get_tensor(detail["index"])
        except ValueError:  # activations: no data outside an invocation
            continue
        if values.size >= 1024:
            zero_shares.append(float(np.mean(values == 0)))
    # The pruned conv kernels are int8 and still at least half zeros.
    assert len(zero_shares) > 20
    assert np.median(zero_shares) >= 0.5
    assert report.parity.agreement is not None


@pytest.mark.slow
def test_prune_refuses_changed_data_and_its_own_folder(run_dir, data_dir, tmp_path):
    with pytest.raises(FinetuneError, match="run being pruned"):
        finetune.prune(run_dir, out=run_dir, progress=False)
    extra = next((data_dir).iterdir())
    victim = sorted(extra.glob("*.png"))[0]
    saved = victim.read_bytes()
    victim.write_bytes(saved[:-1] + bytes([saved[-1] ^ 1]))  # one byte changed
    try:
        with pytest.raises(FinetuneError, match="not what .* was trained on"):
            finetune.prune(run_dir, out=tmp_path / "p", progress=False)
    finally:
        victim.write_bytes(saved)
    assert not (tmp_path / "p" / "model.keras").exists()


@pytest.mark.slow
def test_cli_prune_rejects_a_bad_sparsity(run_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "finetune", "prune", str(run_dir), "--sparsity", "1.5",
         "--out", str(tmp_path / "p")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "prune.sparsity" in result.stderr and "[0, 1)" in result.stderr
    assert not (tmp_path / "p").exists()


@pytest.mark.slow
def test_cli_prune_prints_before_and_after(pruned, tmp_path):
    # The pruned run pruned again (to a higher target) through the command line.
    out = tmp_path / "p75"
    result = CliRunner().invoke(
        app,
        ["prune", str(pruned.path), "--sparsity", "0.75", "--epochs", "1", "--out", str(out),
         "--exclude", "logits", "--quiet"],
        catch_exceptions=False,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "weights, gzip" in result.output and "75.0%" in result.output
    record = json.loads((out / "run.json").read_text())["pruning"]
    assert record["accuracy_before"] == pruned.metrics["accuracy"]
    assert all(abs(v["sparsity"] - 0.75) < 1e-3 for v in record["layers"].values())
    assert record["skipped"]["logits"] == "excluded"


@pytest.mark.slow
def test_prune_section_in_the_config_prunes_at_the_end_of_training(data_dir, tmp_path):
    config = tmp_path / "prune.toml"
    config.write_text("[prune]\nsparsity = 0.75\nepochs = 1\nexclude = ['*project*']\n")
    run = finetune.train(
        data_dir,
        config=config,
        out=tmp_path / "run",
        image_size=32,
        head_epochs=1,
        finetune_epochs=0,
        check_data=False,
        progress=False,
    )
    record = json.loads((tmp_path / "run" / "run.json").read_text())["pruning"]
    assert record["target_sparsity"] == 0.75
    assert all(abs(v["sparsity"] - 0.75) < 1e-3 for v in record["layers"].values())
    assert any("project" in p for p in record["skipped"])
    assert any("dwconv" in p for p in record["skipped"])  # depthwise left dense by default
    assert not any("project" in p for p in record["layers"])
    assert [r["phase"] for r in run.history] == ["head", "prune"]
