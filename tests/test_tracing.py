"""Every `fit` traces its train step once: the optimizer is built before, not inside, the trace.

Keras' TensorFlow trainer builds an unbuilt optimizer inside the first traced train step, and
TensorFlow traces a function again when its first trace created variables, so the whole step
was traced twice (2.3-2.6 s more on the first batch of a fine-tuning phase of
EfficientNet-Lite0). `compile_phase` and the range test build the optimizer first.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras.src.backend.tensorflow.trainer import TensorFlowTrainer

from finetune.backbones.registry import get_backbone
from finetune.config import RecipeConfig
from finetune.data.pipeline import image_dataset, prepare_image_data
from finetune.model import build_classifier
from finetune.recipes import PhaseData, fit_phases, two_phase_plan
from finetune.recipes.lr_finder import find_learning_rate
from finetune.train import seed_everything
from tests.helpers import DIGITS, image_subset

SPEC = get_backbone("efficientnet_lite0")


@pytest.fixture
def traces(monkeypatch):
    """Counts `fit` calls, traces of the train step, and variables created inside a trace."""
    counts = {"fit": 0, "train_step": 0, "created_in_trace": []}
    fit, train_step = TensorFlowTrainer.fit, TensorFlowTrainer.train_step

    def counting_fit(self, *args, **kwargs):
        counts["fit"] += 1
        return fit(self, *args, **kwargs)

    def counting_train_step(self, data):
        counts["train_step"] += 1  # Python runs only while TensorFlow traces
        return train_step(self, data)

    def creator(next_creator, **kwargs):
        if tf.inside_function():
            counts["created_in_trace"].append(kwargs.get("name"))
        return next_creator(**kwargs)

    monkeypatch.setattr(TensorFlowTrainer, "fit", counting_fit)
    monkeypatch.setattr(TensorFlowTrainer, "train_step", counting_train_step)
    with tf.variable_creator_scope(creator):
        yield counts


@pytest.mark.parametrize("unfreeze_groups", [None, 3])
def test_each_phase_traces_its_train_step_once(tmp_path, traces, unfreeze_groups):
    folder = image_subset(DIGITS, tmp_path / "digits", classes=3, per_class=12)
    data = prepare_image_data(folder, image_size=32, val_fraction=0.25, test_fraction=0.0)
    seed_everything(0)
    model = build_classifier(SPEC, data.num_classes, image_size=32)
    # Phase 1 on cached features; phase 2 every group (through the folded network) or the top
    # 3 (on their input cached at the cut); with the run's checkpoints and resume state.
    recipe = RecipeConfig(head_epochs=1, finetune_epochs=1, unfreeze_groups=unfreeze_groups)
    phase_data = PhaseData(
        data.images["train"], data.labels["train"], data.num_classes, batch_size=8,
        val_images=data.images["val"], val_labels=data.labels["val"],
    )  # fmt: skip
    records = fit_phases(
        model, SPEC, recipe, two_phase_plan(recipe), phase_data, run_dir=tmp_path / "run", verbose=0
    )
    assert [r["phase"] for r in records] == ["head", "finetune"]
    assert traces["created_in_trace"] == []
    assert traces["fit"] == 2
    assert traces["train_step"] == traces["fit"]


def test_the_range_test_traces_its_train_step_once(traces):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (32, 4, 4, 3), dtype=np.uint8)
    labels = (images[:, 0, 0, 0] > 127).astype(np.int64)
    model = keras.Sequential(
        [keras.Input((4, 4, 3)), keras.layers.Flatten(), keras.layers.Dense(2)]
    )
    find_learning_rate(
        model,
        image_dataset(images, labels, 2, batch_size=16, training=True),
        optimizer=keras.optimizers.Adam(),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True),
        num_steps=4,
    )
    assert traces["created_in_trace"] == []
    assert (traces["fit"], traces["train_step"]) == (1, 1)
