"""TensorFlow's native INFO lines while it loads stay out of the terminal; nothing else does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune._startup import is_startup_noise, quiet_native_startup

INFO = (
    "I0000 00:00:1795493733.928816   23689 port.cc:153] oneDNN custom operations are on. "
    "You may see slightly different numerical results.\n"
)
ABSL = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"


def test_info_lines_are_dropped_and_everything_else_is_written_back(capfd, monkeypatch):
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    with quiet_native_startup():
        os.write(2, INFO.encode())
        os.write(2, ABSL.encode())
        os.write(2, b"W0000 00:00:1795493733.9   23689 x.cc:1] a real warning\n")
        print("python's own stderr", file=sys.stderr)
    err = capfd.readouterr().err
    assert "port.cc" not in err and "absl::InitializeLog" not in err
    assert "a real warning" in err and "python's own stderr" in err


def test_everything_is_written_back_when_the_import_fails(capfd, monkeypatch):
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    with pytest.raises(ImportError), quiet_native_startup():
        os.write(2, INFO.encode())
        raise ImportError("libsomething.so: cannot open shared object file")
    assert "port.cc:153" in capfd.readouterr().err


def test_level_0_asks_for_the_info_lines(capfd, monkeypatch):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    with quiet_native_startup():
        os.write(2, INFO.encode())
    assert "port.cc:153" in capfd.readouterr().err


def test_a_process_without_stderr_is_left_as_it_is():
    saved = os.dup(2)
    os.close(2)  # e.g. a daemon started with its stderr closed
    ran = []
    try:
        with quiet_native_startup():
            assert os.environ is not None  # the body runs
            ran.append(True)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    assert ran


def test_patterns():
    assert is_startup_noise(INFO) and is_startup_noise(ABSL)
    assert is_startup_noise(
        "To enable the following instructions: AVX2 AVX512F FMA, in other operations, "
        "rebuild TensorFlow with the appropriate compiler flags.\n"
    )
    assert not is_startup_noise("E0000 00:00:1795493733.928816   23689 x.cc:1] an error\n")
    assert not is_startup_noise("error: data folder not found\n")


# `python -m finetune` imports everything at once; the `finetune` script defers TensorFlow to
# the command (`finetune.cli._start`), which must load it through the same filter.
@pytest.mark.parametrize(
    "command",
    [[sys.executable, "-m", "finetune"], [str(Path(sys.executable).with_name("finetune"))]],
    ids=["python -m finetune", "finetune script"],
)
def test_a_command_prints_no_tensorflow_start_up_lines(command):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_CPP")}
    done = subprocess.run(
        [*command, "backbones"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "efficientnet_lite0" in done.stdout
    assert done.stderr == ""


MANY_MODELS = """
import numpy as np, keras
from finetune.backbones.registry import get_backbone
from finetune.gradcam import grad_cam
from finetune.inference import WeightsWatch, keras_forward, traced_inference
from finetune.model import build_classifier
from finetune.recipes.two_phase import _finite_check

for seed in range(6):
    keras.utils.set_random_seed(seed)
    small = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    assert bool(_finite_check(small.trainable_variables)())
    watch = WeightsWatch(small)
    assert watch() == watch() == watch()
    keras_forward(small)(np.ones((2, 4), "float32"))
    keras_forward(small)(np.ones((3, 4), "float32"))
    assert traced_inference(small).experimental_get_tracing_count() == 1
    model = build_classifier(get_backbone("efficientnet_lite0"), 3, image_size=32, weights=None)
    assert grad_cam(model, np.zeros((1, 32, 32, 3))).shape == (1, 32, 32)
print("done")
"""


def test_many_models_in_one_process_raise_no_retracing_warning():
    # Runs trained or loaded in a loop (a notebook comparing settings): each has its own
    # finite-weights check, weights watch, Keras inference function and Grad-CAM backbone,
    # and TensorFlow must not take them for one function traced again and again. In a fresh
    # process: TensorFlow warns at most twice per function, so earlier tests could hide it.
    done = subprocess.run(
        [sys.executable, "-c", MANY_MODELS], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0 and "done" in done.stdout, done.stderr
    assert "retracing" not in done.stderr, done.stderr
