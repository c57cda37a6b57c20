"""Keras Applications weights: Keras' cache, a local file, and clear errors when absent.

No weights can be downloaded here, so the tests write weights files in Keras' legacy HDF5 layout
(the format of the files Keras downloads) from a randomly initialised model, and check that the
loader finds them in the Keras cache under Keras' own file name, or at a path the user gives.
"""

from __future__ import annotations

import h5py
import keras
import numpy as np
import pytest

from finetune.backbones import get_backbone, list_backbones, load_backbone
from finetune.backbones.keras_applications import keras_models_dir
from finetune.errors import WeightsError

FAMILY = [s.name for s in list_backbones() if s.family == "keras_applications"]


def write_legacy_h5_weights(model: keras.Model, path) -> None:
    """Writes `model`'s weights the way Keras' downloadable application weights are laid out."""
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [layer.name.encode() for layer in model.layers]
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.2.4"
        for layer in model.layers:
            group = f.create_group(layer.name)
            names = [
                f"{layer.name}/{w.path.split('/')[-1]}_{i}:0" for i, w in enumerate(layer.weights)
            ]
            group.attrs["weight_names"] = [n.encode() for n in names]
            for name, value in zip(names, layer.get_weights(), strict=True):
                group.create_dataset(name, data=value)


def first_kernel(model: keras.Model) -> np.ndarray:
    layer = next(layer for layer in model.layers if layer.weights and "conv" in layer.name.lower())
    return np.asarray(layer.get_weights()[0])


@pytest.fixture
def keras_home(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    monkeypatch.setenv("FINETUNE_OFFLINE", "1")
    return tmp_path / "keras_home"


def test_the_seed_families_are_registered():
    assert set(FAMILY) == {
        "vgg16",
        "resnet50",
        "mobilenet_v2",
        "mobilenet_v3_small",
        "efficientnet_b0",
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILY)
def test_imagenet_weights_are_read_from_the_keras_cache(name, keras_home):
    spec = get_backbone(name)
    reference = spec.build(32, False)
    status = spec.weights.status()
    assert not status.available
    path = keras_models_dir() / spec.weights.notop_file
    path.parent.mkdir(parents=True)
    write_legacy_h5_weights(reference, path)
    assert spec.weights.status().available
    assert spec.weights.status().location == str(path)

    loaded = load_backbone(name, image_size=32, weights="imagenet")
    np.testing.assert_array_equal(first_kernel(loaded), first_kernel(reference))
    for ref, got in zip(reference.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(ref), np.asarray(got))


@pytest.mark.parametrize("name", FAMILY)
def test_every_weighted_layer_is_in_a_layer_group(name):
    spec = get_backbone(name)
    model = spec.build(64, False)
    ungrouped = [
        layer.name for layer in model.layers if layer.weights and spec.group_of(layer.name) is None
    ]
    assert ungrouped == []
    # Groups are ordered bottom to top: the first weighted layer is in the first group.
    weighted = [layer.name for layer in model.layers if layer.weights]
    assert spec.group_of(weighted[0]) == spec.group_names[0]
    assert spec.group_of(weighted[-1]) == spec.group_names[-1]


def test_missing_weights_name_the_file_and_how_to_get_it(keras_home):
    with pytest.raises(WeightsError) as err:
        load_backbone("mobilenet_v3_small", image_size=32)
    message = str(err.value)
    expected = keras_models_dir() / "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5"
    assert str(expected) in message
    assert "--weights" in message and "download" in message


def test_a_local_weights_file_is_loaded(tmp_path, keras_home):
    spec = get_backbone("mobilenet_v3_small")
    reference = spec.build(32, False)
    path = tmp_path / "my_weights.h5"
    write_legacy_h5_weights(reference, path)
    loaded = load_backbone("mobilenet_v3_small", image_size=32, weights=str(path))
    np.testing.assert_array_equal(first_kernel(loaded), first_kernel(reference))


def test_weights_of_another_network_are_refused_with_the_file_name(tmp_path, keras_home):
    other = get_backbone("mobilenet_v3_small").build(32, False)
    path = tmp_path / "wrong.h5"
    write_legacy_h5_weights(other, path)
    with pytest.raises(WeightsError, match="wrong.h5"):
        load_backbone("mobilenet_v2", image_size=32, weights=str(path))


def test_a_missing_local_file_is_named(tmp_path, keras_home):
    with pytest.raises(WeightsError, match="nope.h5"):
        load_backbone("mobilenet_v2", image_size=32, weights=str(tmp_path / "nope.h5"))
