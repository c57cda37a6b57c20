"""The two-phase recipe on a real pretrained network and real images.

Phase 1 must leave every backbone weight (BatchNorm statistics included) exactly as pretrained
and train the head; phase 2 must change the unfrozen top groups only, and keep BatchNorm
statistics when `train_batchnorm` is off.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import finetune
from finetune.backbones import get_backbone, load_backbone
from finetune.inference import cpu_has_bfloat16
from finetune.model import backbone_of, is_batchnorm
from tests.helpers import DIGITS, image_subset

SIZE = 32


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return image_subset(DIGITS, tmp_path_factory.mktemp("digits"), classes=4, per_class=40)


@pytest.fixture(scope="module")
def pretrained():
    return load_backbone("efficientnet_lite0", image_size=SIZE)


def changed_layers(model, reference):
    """Names of the layers of `model` whose weights differ from those of `reference`."""
    before = weights_by_layer(reference)
    return {
        layer.name
        for layer in model.layers
        if layer.weights
        and not all(
            np.array_equal(a, b)
            for a, b in zip(layer.get_weights(), before[layer.name], strict=True)
        )
    }


def weights_by_layer(model):
    return {
        layer.name: [np.asarray(w) for w in layer.get_weights()]
        for layer in model.layers
        if layer.weights
    }


@pytest.mark.slow
def test_phase_one_trains_only_the_head(digits, pretrained):
    run = finetune.train(
        digits, image_size=SIZE, head_epochs=2, finetune_epochs=0, schedule="constant",
        progress=False,
    )  # fmt: skip
    # Every backbone weight, BatchNorm moving statistics included, is still the pretrained one.
    assert changed_layers(backbone_of(run.model), pretrained) == set()
    # The head did train: the training loss went down from the first epoch to the second.
    assert run.history[1]["loss"] < run.history[0]["loss"]
    assert [r["phase"] for r in run.history] == ["head", "head"]


@pytest.mark.slow
def test_phase_two_changes_only_the_unfrozen_groups(digits, pretrained):
    run = finetune.train(
        digits,
        image_size=SIZE,
        head_epochs=1,
        finetune_epochs=1,
        unfreeze_groups=2,
        progress=False,
    )
    spec = get_backbone("efficientnet_lite0")
    top_groups = spec.group_names[-2:]
    changed = changed_layers(backbone_of(run.model), pretrained)
    trainable = {
        layer.name
        for layer in backbone_of(run.model).layers
        if layer.weights and spec.group_of(layer.name) in top_groups and not is_batchnorm(layer)
    }
    # Every trainable layer of the unfrozen groups moved; nothing else did (BatchNorm included).
    assert changed == trainable and trainable
    assert [r["phase"] for r in run.history] == ["head", "finetune"]
    assert run.history[1]["learning_rate"] == pytest.approx(run.history[0]["learning_rate"] / 10)


@pytest.mark.slow
def test_run_directory_holds_the_record(digits, tmp_path):
    # A truncated JPEG and a text file named .jpg are reported and left out; the run goes on.
    data = tmp_path / "data"
    shutil.copytree(digits, data)
    photo = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(photo, "JPEG")
    (data / "0" / "truncated.jpg").write_bytes(photo.getvalue()[:300])
    (data / "1" / "notes.jpg").write_text("not an image")
    (data / "2" / "labels.csv").write_text("a,b")
    out = tmp_path / "run"
    # The recipe options that change the optimizer and the loss go through the whole run too,
    # including saving and safe-mode loading of a model compiled with a DiscriminativeFusedAdam.
    run = finetune.train(
        data, out=out, image_size=SIZE, head_epochs=1, finetune_epochs=1, seed=3, progress=False,
        discriminative_lr=0.1, schedule="cosine", class_weight="balanced",
    )  # fmt: skip
    assert type(run.model.optimizer).__name__ == "DiscriminativeFusedAdam"
    for name in (
        "config.toml",
        "split.json",
        "history.json",
        "metrics.json",
        "model.keras",
        "bad_files.json",
        "run.json",
    ):
        assert (out / name).is_file(), name
    report = json.loads((out / "bad_files.json").read_text())
    assert sorted(Path(b["path"]).name for b in report["bad_files"]) == [
        "notes.jpg",
        "truncated.jpg",
    ]
    assert [Path(i["path"]).name for i in report["ignored"]] == ["labels.csv"]
    assert sum(run.info["counts"].values()) == 4 * 40
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"accuracy", "macro_f1", "per_class", "confusion_matrix", "num_images"}
    # Predictions: bfloat16 OpenVINO at any count on a CPU with it (converted here, once);
    # features to train on: Keras below 2,000 images, as for this phase 1's fill (in bfloat16
    # on a CPU with it).
    bf16 = cpu_has_bfloat16()
    assert metrics["runtime"] == ("openvino-bf16" if bf16 else "keras")
    history = json.loads((out / "history.json").read_text())
    fill = "keras-bf16" if bf16 else "keras"
    assert [r.get("features_runtime") for r in history if r["phase"] == "head"] == [fill]
    cm = np.asarray(metrics["confusion_matrix"])
    assert cm.shape == (4, 4) and cm.sum() == metrics["num_images"] > 0
    assert metrics["accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
    config = finetune.load_config(out / "config.toml")
    assert config.seed == 3 and config.data.image_size == SIZE
    assert (config.recipe.discriminative_lr, config.recipe.schedule) == (0.1, "cosine")

    loaded = finetune.Run.load(out)
    images = np.random.default_rng(0).integers(0, 255, (3, SIZE, SIZE, 3)).astype(np.float32)
    np.testing.assert_allclose(loaded.predict_proba(images), run.predict_proba(images), atol=1e-5)
    assert loaded.class_names == run.class_names == ["0", "1", "2", "3"]

    # The same seed gives the same split; evaluate() on the recorded test split agrees.
    again = finetune.evaluate(out)
    assert again["num_images"] == metrics["num_images"]
    assert again["accuracy"] == pytest.approx(metrics["accuracy"])

    with pytest.raises(finetune.FinetuneError, match="--overwrite"):
        finetune.train(data, out=out, image_size=SIZE, head_epochs=1, progress=False)
    assert (out / "model.keras").is_file()


def test_unknown_options_and_backbones_are_named(digits):
    with pytest.raises(finetune.FinetuneError, match="learning_rate"):
        finetune.train(digits, learning_rate=0.1)
    with pytest.raises(finetune.ConfigError, match="resnet5000"):
        finetune.train(digits, backbone="resnet5000")


@pytest.mark.slow
def test_the_same_seed_gives_the_same_weights_with_the_images_in_memory_or_on_disk(
    digits, tmp_path
):
    from finetune.config import Config, with_overrides

    on_disk = with_overrides(Config(), **{"data.max_memory_gb": 1e-4})  # 0.1 MiB: 160 images
    runs = [
        finetune.train(
            digits, image_size=SIZE, head_epochs=1, finetune_epochs=1, seed=11, progress=False,
            **extra,
        )
        for extra in ({}, {"config": on_disk, "out": tmp_path / "run"})
    ]  # fmt: skip
    # The second run's images were memory-mapped from an anonymous file in its folder, which
    # leaves no file there (a named one would show in this glob).
    assert [r.info["images_on_disk"] for r in runs] == [False, True]
    assert not list((tmp_path / "run").glob("finetune-images-*"))
    first, second = (r.model.get_weights() for r in runs)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert runs[0].history == runs[1].history
    assert runs[0].metrics["confusion_matrix"] == runs[1].metrics["confusion_matrix"]


@pytest.mark.slow
def test_gradual_unfreezing_starts_with_the_top_group_only(digits, pretrained):
    run = finetune.train(
        digits,
        image_size=SIZE,
        head_epochs=1,
        finetune_epochs=1,
        unfreeze_groups=2,
        unfreeze="gradual",
        progress=False,
    )
    assert [r["phase"] for r in run.history] == ["head", "finetune_1"]
    spec = get_backbone("efficientnet_lite0")
    changed = {spec.group_of(name) for name in changed_layers(backbone_of(run.model), pretrained)}
    assert changed == {"top"}


def test_a_network_from_random_weights_averages_batchnorm_statistics_over_fewer_steps(digits):
    """`weights = "none"` (the --compare-scratch baseline): BatchNorm momentum 0.9, so the
    statistics that validation and predictions use keep up with fast-changing weights;
    pretrained networks keep their own (0.99)."""
    from finetune.config import Config, ModelConfig
    from finetune.data.pipeline import prepare_image_data
    from finetune.model import sublayers
    from finetune.train import SCRATCH_BATCHNORM_MOMENTUM, build_run_model

    data = prepare_image_data(digits, image_size=SIZE, val_fraction=0.25, test_fraction=0.0)
    for weights, momentum in (("none", SCRATCH_BATCHNORM_MOMENTUM), ("imagenet", 0.99)):
        model = build_run_model(data, Config(model=ModelConfig(weights=weights)))
        momenta = [layer.momentum for layer in sublayers(model) if is_batchnorm(layer)]
        assert len(momenta) == 49 and set(momenta) == {momentum}, weights
