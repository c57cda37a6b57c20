"""The frozen-phase fast path trains the same head as training through the frozen backbone."""

from __future__ import annotations

import os
from types import SimpleNamespace

import keras
import numpy as np
import pytest

from finetune.backbones.registry import get_backbone
from finetune.config import AugmentConfig, ModelConfig, RecipeConfig
from finetune.data.augment import build_augmentation
from finetune.data.pipeline import prepare_image_data
from finetune.model import build_classifier
from finetune.recipes import PhaseData, fit_phases
from finetune.recipes.two_phase import Phase
from finetune.train import seed_everything
from tests.helpers import DIGITS, image_subset

SIZE = 32
SPEC = get_backbone("efficientnet_lite0")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    folder = image_subset(DIGITS, tmp_path_factory.mktemp("digits"), classes=4, per_class=40)
    return prepare_image_data(folder, image_size=SIZE, val_fraction=0.25, test_fraction=0.0)


def digits_phase_data(data, seed: int, **options) -> PhaseData:
    """The digits' training and validation splits in batches of 16, augmentation on (used only
    by phases that augment), seeded with `seed`; `options` go to `PhaseData`."""
    return PhaseData(
        train_images=data.images["train"],
        train_labels=data.labels["train"],
        num_classes=data.num_classes,
        batch_size=16,
        val_images=data.images["val"],
        val_labels=data.labels["val"],
        augmentation=build_augmentation(AugmentConfig(), seed=seed),
        seed=seed,
        **options,
    )


def head_phase_run(
    data,
    *,
    feature_cache: bool,
    max_gb: float = 2.0,
    run_dir=None,
    epochs=3,
    runtime=None,
    augment=False,
):
    """One model, seeded the same way every time, through a 3-epoch frozen head phase."""
    seed_everything(3)
    model = build_classifier(
        SPEC, data.num_classes, image_size=SIZE, head=ModelConfig(hidden_units=[16], dropout=0.3)
    )
    phase_data = digits_phase_data(
        data, 3, feature_cache=feature_cache, feature_cache_max_memory_gb=max_gb, runtime=runtime
    )
    recipe = RecipeConfig(early_stopping_patience=0)
    phase = Phase("head", epochs=epochs, learning_rate=3e-3, augment=augment)
    records = fit_phases(model, SPEC, recipe, [phase], phase_data, run_dir=run_dir, verbose=0)
    return model, records


def head_weights(model):
    layers = [model.get_layer(name) for name in ("head_dense_0", "logits")]
    return [w.numpy() for layer in layers for w in layer.weights]


def test_cached_features_train_the_same_head_as_the_frozen_backbone(digits, tmp_path):
    # In float32 ("auto" computes both in bfloat16 on a CPU with it: below).
    through, slow_records = head_phase_run(digits, feature_cache=False, runtime="keras")
    cached, fast_records = head_phase_run(
        digits, feature_cache=True, run_dir=tmp_path, runtime="keras"
    )

    assert [r["features_cached"] for r in fast_records] == [True] * 3
    assert [r["features_cached"] for r in slow_records] == [False] * 3
    # The head moved from its initial weights (a real training run) and moved the same way on
    # both paths (measured: bit-identical; a different shuffle order changes them by ~0.05).
    seed_everything(3)
    initial = build_classifier(
        SPEC, 4, image_size=SIZE, head=ModelConfig(hidden_units=[16], dropout=0.3)
    )
    paths = (head_weights(initial), head_weights(through), head_weights(cached))
    for before, a, b in zip(*paths, strict=True):
        assert np.abs(a - before).max() > 1e-2
        np.testing.assert_allclose(a, b, atol=1e-5)
    for slow, fast in zip(slow_records, fast_records, strict=True):
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            assert fast[key] == pytest.approx(slow[key], abs=1e-5), key
    # The backbone is untouched.
    backbones = (through.get_layer("backbone"), cached.get_layer("backbone"))
    for a, b in zip(*(b.weights for b in backbones), strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_the_checkpoint_of_a_cached_phase_holds_the_whole_classifier(digits, tmp_path):
    # One epoch, so the best epoch's checkpoint is the final state.
    model, _ = head_phase_run(digits, feature_cache=True, run_dir=tmp_path, epochs=1)
    restored = build_classifier(
        SPEC, 4, image_size=SIZE, head=ModelConfig(hidden_units=[16], dropout=0.3), weights=None
    )
    restored.load_weights(tmp_path / "checkpoints" / "head.weights.h5")
    for a, b in zip(restored.weights, model.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    assert not any((tmp_path).glob("finetune-features-*"))  # no spill left behind


def test_features_above_the_memory_limit_go_to_disk_with_the_same_result(digits, monkeypatch):
    from finetune.recipes import feature_cache

    made = []
    original = feature_cache.FeatureStore.compute

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        made.append((type(out), self._tmp))
        return out

    monkeypatch.setattr(feature_cache.FeatureStore, "compute", spy)
    in_memory, _ = head_phase_run(digits, feature_cache=True)
    on_disk, _ = head_phase_run(digits, feature_cache=True, max_gb=0.0)

    assert [kind for kind, _ in made] == [np.ndarray, np.ndarray, np.memmap, np.memmap]
    spill_dir = made[-1][1]
    assert spill_dir is not None and not spill_dir.exists()  # deleted after the phases
    for a, b in zip(head_weights(in_memory), head_weights(on_disk), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["openvino", "onnxruntime"])
def test_features_computed_by_a_float32_runtime_train_the_same_head(digits, runtime):
    """The cache fill in float32 OpenVINO (what "auto" picks for many images on a CPU without
    bfloat16) or ONNX Runtime is the same head."""
    with_keras, keras_records = head_phase_run(digits, feature_cache=True, runtime="keras")
    with_onnx, onnx_records = head_phase_run(digits, feature_cache=True, runtime=runtime)

    assert [r["features_runtime"] for r in keras_records] == ["keras"] * 3
    assert [r["features_runtime"] for r in onnx_records] == [runtime] * 3
    # The features differ by rounding only (~1e-6), and so do the trained heads.
    for a, b in zip(head_weights(with_keras), head_weights(with_onnx), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)
    for k, o in zip(keras_records, onnx_records, strict=True):
        assert o["val_loss"] == pytest.approx(k["val_loss"], abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["openvino", "onnxruntime"])
def test_an_augmented_frozen_phase_streams_converted_features_to_the_same_head(digits, runtime):
    """`--head-augment` with a converted model chosen (float32): the frozen backbone runs
    there, batch by batch as the augmentation makes them, and the head trains as through the
    backbone."""
    through, slow_records = head_phase_run(
        digits, feature_cache=True, runtime="keras", augment=True
    )
    streamed, fast_records = head_phase_run(
        digits, feature_cache=True, runtime=runtime, augment=True
    )
    assert [r.get("features_streamed") for r in slow_records] == [None] * 3
    assert [r["features_cached"] for r in slow_records] == [False] * 3
    assert [r.get("features_streamed") for r in fast_records] == [True] * 3
    assert [r["features_runtime"] for r in fast_records] == [runtime] * 3
    assert [r["features_cached"] for r in fast_records] == [False] * 3
    for a, b in zip(head_weights(through), head_weights(streamed), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)
    for slow, fast in zip(slow_records, fast_records, strict=True):
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            assert fast[key] == pytest.approx(slow[key], abs=1e-4), key
    # The augmentation really ran: an unaugmented phase trains another head.
    plain, _ = head_phase_run(digits, feature_cache=True, runtime="keras")
    assert (
        max(
            np.abs(a - b).max()
            for a, b in zip(head_weights(plain), head_weights(through), strict=True)
        )
        > 1e-3
    )


@pytest.mark.slow
@pytest.mark.parametrize("augment", [False, True])
def test_auto_trains_the_head_on_bfloat16_features_where_the_cpu_has_it(
    digits, monkeypatch, tmp_path, augment
):
    """From `AUTO_BF16_MIN_IMAGES` features on such a CPU, the cache fill or the streamed
    phase computes in bfloat16: a head near the float32 one, not the same."""
    import finetune.inference as inference

    if not inference.cpu_has_bfloat16():
        pytest.skip("this CPU has no bfloat16: auto computes features in float32")
    monkeypatch.delenv(inference.ENV_VAR, raising=False)
    monkeypatch.setattr(inference, "AUTO_BF16_MIN_IMAGES", len(digits.images["train"]))
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path))  # checked, not loaded
    monkeypatch.setattr(inference, "BF16_TOLERANCE", 0.0)  # features have their own bound
    exact, exact_records = head_phase_run(
        digits, feature_cache=True, runtime="keras", augment=augment
    )
    auto, auto_records = head_phase_run(digits, feature_cache=True, augment=augment)

    assert [r["features_runtime"] for r in auto_records] == ["openvino-bf16"] * 3
    assert [r.get("features_streamed") for r in auto_records] == [augment or None] * 3
    pairs = list(zip(head_weights(exact), head_weights(auto), strict=True))
    assert max(np.abs(a - b).max() for a, b in pairs) > 1e-4  # really bfloat16
    for a, b in pairs:  # measured: 0.3-10% (a bias)
        assert np.linalg.norm(b - a) < 0.2 * np.linalg.norm(a)
    for e, f in zip(exact_records, auto_records, strict=True):
        assert f["val_loss"] == pytest.approx(e["val_loss"], rel=0.03)  # measured: <1%
    # The same run again, its conversion loaded from the cache: the same head, exactly.
    (kept,) = (tmp_path / "openvino").glob("*.blob")
    os.utime(kept, (1e9, 1e9))
    again, _ = head_phase_run(digits, feature_cache=True, augment=augment)
    assert kept.stat().st_mtime > 1e9  # loaded (used), not converted again
    assert list((tmp_path / "openvino").glob("*.blob")) == [kept]
    for a, b in zip(head_weights(auto), head_weights(again), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("augment", [False, True])
def test_below_the_conversion_auto_computes_the_frozen_backbone_in_bfloat16_in_keras(
    digits, monkeypatch, augment
):
    """Below `AUTO_BF16_MIN_IMAGES` on a CPU with bfloat16, Keras itself computes the frozen
    backbone in bfloat16: the cache fill ("keras-bf16"), or the augmented phase through it
    (`frozen_bfloat16`). A head near the float32 one, not the same; the float32 one where the
    first batch's check refuses bfloat16."""
    import finetune.inference as inference

    monkeypatch.delenv(inference.ENV_VAR, raising=False)
    monkeypatch.setattr(inference, "cpu_has_bfloat16", lambda: True)  # any CPU runs bfloat16
    exact, exact_records = head_phase_run(
        digits, feature_cache=True, runtime="keras", augment=augment
    )
    auto, auto_records = head_phase_run(digits, feature_cache=True, augment=augment)

    runtime = None if augment else "keras"
    assert [r.get("features_runtime") for r in exact_records] == [runtime] * 3
    assert [r.get("frozen_bfloat16") for r in exact_records] == [None] * 3
    assert [r.get("features_runtime") for r in auto_records] == [
        None if augment else "keras-bf16"
    ] * 3
    assert [r.get("frozen_bfloat16") for r in auto_records] == [augment or None] * 3
    assert [r.get("trained_bfloat16") for r in auto_records] == [None] * 3  # only Dense layers
    assert [r["features_cached"] for r in auto_records] == [not augment] * 3
    pairs = list(zip(head_weights(exact), head_weights(auto), strict=True))
    assert max(np.abs(a - b).max() for a, b in pairs) > 1e-4  # really bfloat16
    for a, b in pairs:  # measured: 0.2-8%
        assert np.linalg.norm(b - a) < 0.2 * np.linalg.norm(a)
    for e, f in zip(exact_records, auto_records, strict=True):
        assert f["val_loss"] == pytest.approx(e["val_loss"], rel=0.03)  # measured: <0.5%
    # Where the first batch moves further than features may, all of it in float32.
    monkeypatch.setattr(inference, "BF16_FEATURE_TOLERANCE", 0.0)
    kept, kept_records = head_phase_run(digits, feature_cache=True, augment=augment)
    assert [r.get("features_runtime") for r in kept_records] == [runtime] * 3
    assert [r.get("frozen_bfloat16") for r in kept_records] == [None] * 3
    for a, b in zip(head_weights(exact), head_weights(kept), strict=True):
        np.testing.assert_array_equal(a, b)


def partial_phase_run(
    data, *, feature_cache: bool, runtime=None, augment=False, train_batchnorm=False, average=0
):
    """One model, seeded the same way every time, through 3 epochs with the top 3 layer groups
    unfrozen (BatchNorm frozen, as by default, unless `train_batchnorm`) and discriminative
    rates, the last `average` epochs averaged."""
    seed_everything(5)
    model = build_classifier(SPEC, data.num_classes, image_size=SIZE, head=ModelConfig())
    phase_data = digits_phase_data(data, 5, feature_cache=feature_cache, runtime=runtime)
    recipe = RecipeConfig(early_stopping_patience=0, average_last_epochs=average)
    phase = Phase(
        "finetune", epochs=3, learning_rate=1e-3, unfreeze_groups=3, lowest_group_lr=0.1,
        augment=augment, train_batchnorm=train_batchnorm,
    )  # fmt: skip
    records = fit_phases(model, SPEC, recipe, [phase], phase_data, verbose=0)
    return model, records


def trained_batchnorm(model) -> list:
    """The backbone's BatchNorm layers that train."""
    return [
        layer
        for layer in model.get_layer("backbone").layers
        if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable
    ]


def weights_by_group(model) -> dict[str, list[np.ndarray]]:
    grouped: dict[str, list[np.ndarray]] = {}
    for layer in model.get_layer("backbone").layers:
        group = SPEC.group_of(layer.name) or "none"
        if layer.weights:
            grouped.setdefault(group, []).extend(w.numpy() for w in layer.weights)
    grouped["head"] = [w.numpy() for w in model.get_layer("logits").weights]
    return grouped


def test_a_partial_phase_trains_the_same_top_groups_on_cached_activations(digits, monkeypatch):
    """No augmentation, top 3 groups unfrozen: the groups below run once, the top groups and
    the head train on their stored output exactly as through the whole network in float32;
    in float32 even where "auto" would compute a head's features, and the frozen groups under
    the top ones trained through, in bfloat16."""
    import finetune.inference as inference

    monkeypatch.delenv(inference.ENV_VAR, raising=False)
    monkeypatch.setattr(inference, "cpu_has_bfloat16", lambda: True)
    monkeypatch.setattr(inference, "AUTO_BF16_MIN_IMAGES", 1)
    through, slow_records = partial_phase_run(digits, feature_cache=False, runtime="keras")
    cached, fast_records = partial_phase_run(digits, feature_cache=True)

    assert [r["features_cached"] for r in slow_records] == [False] * 3
    assert [r["features_cached"] for r in fast_records] == [True] * 3
    assert [r["features_layer"] for r in fast_records] == ["block5c_add"] * 3
    assert [r["features_runtime"] for r in fast_records] == ["keras"] * 3
    seed_everything(5)
    initial = weights_by_group(build_classifier(SPEC, 4, image_size=SIZE, head=ModelConfig()))
    slow, fast = weights_by_group(through), weights_by_group(cached)
    for group in initial:
        moved = max(np.abs(a - b).max() for a, b in zip(slow[group], initial[group], strict=True))
        if group in ("block6", "block7", "top", "head"):
            assert moved > 1e-4, group  # trained
        else:
            assert moved == 0, group  # frozen
        for a, b in zip(slow[group], fast[group], strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5, err_msg=group)
    for s, f in zip(slow_records, fast_records, strict=True):
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            assert f[key] == pytest.approx(s[key], abs=1e-5), key
    assert cached.optimizer is not None  # the classifier compiled as what trained it


def test_through_the_network_auto_trains_in_bfloat16_on_a_cpu_with_it(digits, monkeypatch):
    """The top groups trained through the network (no cache), under "auto" on a CPU with
    bfloat16: the frozen groups below compiled in bfloat16, the groups that train in mixed
    precision (`frozen_bfloat16`, `trained_bfloat16`). The frozen groups stay as they were,
    the trained ones end near the float32 run's, not the same (the frozen part alone in
    bfloat16 moves them too: `trained_bfloat16` is what says the trained layers were); exactly
    the float32 run where the first batch's check refuses bfloat16. The float32 run is the
    runtime "keras" named."""
    import finetune.inference as inference

    monkeypatch.delenv(inference.ENV_VAR, raising=False)
    monkeypatch.setattr(inference, "cpu_has_bfloat16", lambda: True)  # any CPU runs bfloat16
    exact, exact_records = partial_phase_run(digits, feature_cache=False, runtime="keras")
    low, low_records = partial_phase_run(digits, feature_cache=False)

    for r in exact_records:
        assert (r.get("frozen_bfloat16"), r.get("trained_bfloat16")) == (None, None)
    for r in low_records:
        assert (r.get("frozen_bfloat16"), r.get("trained_bfloat16")) == (True, True)
        assert r["features_cached"] is False
    seed_everything(5)
    initial = weights_by_group(build_classifier(SPEC, 4, image_size=SIZE, head=ModelConfig()))
    slow, fast = weights_by_group(exact), weights_by_group(low)
    for group in initial:
        pairs = list(zip(slow[group], fast[group], strict=True))
        if group in ("block6", "block7", "top", "head"):
            assert max(np.abs(a - b).max() for a, b in pairs) > 1e-5, group  # really bfloat16
            starts = zip(slow[group], initial[group], strict=True)
            moved = sum(np.linalg.norm(a - i) for a, i in starts)
            apart = sum(np.linalg.norm(b - a) for a, b in pairs)
            # (measured: 19-31% of how far training moved them: any rounding change sends
            # such a run elsewhere; the accuracy benchmark weighs what that costs)
            assert apart < 0.6 * moved, group
        else:
            for (a, b), i in zip(pairs, initial[group], strict=True):
                np.testing.assert_array_equal(a, i, err_msg=group)
                np.testing.assert_array_equal(b, i, err_msg=group)
    for e, f in zip(exact_records, low_records, strict=True):
        assert f["val_loss"] == pytest.approx(e["val_loss"], rel=0.1)  # measured: 1.3-5.6%
    monkeypatch.setattr(inference, "BF16_FEATURE_TOLERANCE", 0.0)
    kept, kept_records = partial_phase_run(digits, feature_cache=False)
    assert [r.get("trained_bfloat16") for r in kept_records] == [None] * 3
    for a, b in zip(exact.get_weights(), kept.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_trained_batchnorm_trains_in_bfloat16_through_the_network_under_auto(digits, monkeypatch):
    """BatchNorm training in the top groups, under "auto" on a CPU with bfloat16: the pairs
    that train in mixed precision (`trained_bfloat16`), the moving statistics and weights near
    the float32 run's, and the last 2 epochs' average gets its statistics recomputed through
    the bfloat16 view."""
    import finetune.inference as inference

    monkeypatch.delenv(inference.ENV_VAR, raising=False)
    monkeypatch.setattr(inference, "cpu_has_bfloat16", lambda: True)
    exact, exact_records = partial_phase_run(
        digits, feature_cache=False, train_batchnorm=True, average=2, runtime="keras"
    )
    low, low_records = partial_phase_run(
        digits, feature_cache=False, train_batchnorm=True, average=2
    )
    assert [r.get("trained_bfloat16") for r in exact_records] == [None] * 3
    assert [r.get("trained_bfloat16") for r in low_records] == [True] * 3
    top_bn = trained_batchnorm(low)
    assert low_records[-1]["batchnorm_recomputed"] == len(top_bn) > 0
    seed_everything(5)
    initial = weights_by_group(build_classifier(SPEC, 4, image_size=SIZE, head=ModelConfig()))
    slow, fast = weights_by_group(exact), weights_by_group(low)
    for group in ("block6", "block7", "top", "head"):
        pairs = list(zip(slow[group], fast[group], strict=True))
        assert max(np.abs(a - b).max() for a, b in pairs) > 1e-5, group  # really bfloat16
        moved = sum(np.linalg.norm(a - i) for a, i in zip(slow[group], initial[group], strict=True))
        apart = sum(np.linalg.norm(b - a) for a, b in pairs)
        assert apart < 0.6 * moved, group  # measured: 3-33% of how far training moved them
    for e, f in zip(exact_records, low_records, strict=True):
        assert f["val_loss"] == pytest.approx(e["val_loss"], rel=0.05)  # measured: <0.3%


def test_cached_top_groups_with_trained_batchnorm_and_averaging_end_as_through_the_network(
    digits,
):
    """BatchNorm training in the top groups, the last 2 epochs averaged: the statistics are
    recomputed for the average from the cached features, as through the network from images
    (in float32: "auto" computes the frozen groups in bfloat16 there on a CPU with it)."""
    through, slow_records = partial_phase_run(
        digits, feature_cache=False, train_batchnorm=True, average=2, runtime="keras"
    )
    cached, records = partial_phase_run(digits, feature_cache=True, train_batchnorm=True, average=2)
    assert [r["features_cached"] for r in records] == [True] * 3
    top_bn = trained_batchnorm(cached)
    assert top_bn  # BatchNorm layers of the top groups trained, and were recomputed
    # Found inside the folded training view that fit (`FusedTrainingBatchNorm` holds them).
    assert slow_records[-1]["batchnorm_recomputed"] == len(top_bn)
    assert records[-1]["batchnorm_recomputed"] == len(top_bn)
    slow, fast = weights_by_group(through), weights_by_group(cached)
    for group in slow:
        for a, b in zip(slow[group], fast[group], strict=True):
            # Moving variances reach ~100 here: 1e-5 of them is rounding.
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=group)


def test_the_cut_is_below_the_trained_groups_where_one_tensor_crosses():
    from dataclasses import replace

    from finetune.recipes.feature_cache import cut_layer, split_at_cut

    model = build_classifier(SPEC, 4, image_size=SIZE, weights=None)
    assert cut_layer(model, SPEC, ["block6", "block7", "top"]) == "block5c_add"
    assert cut_layer(model, SPEC, ["block7", "top"]) == "block6d_add"
    assert cut_layer(model, SPEC, SPEC.group_names) is None  # nothing below
    # block5c_add's output (2 x 2 x 112 float32 at 32 px: 1,792 bytes) against a limit below it.
    assert cut_layer(model, SPEC, ["block6", "block7", "top"], max_bytes=1791) is None
    assert cut_layer(model, SPEC, ["block6", "block7", "top"], max_bytes=1792) == "block5c_add"
    # Groups that split a block: its residual connection crosses the cut.
    inside = replace(SPEC, layer_groups=(("low", "stem_|block[1-4]|block5[ab]|block5c_expand"),
                                         ("high", "block5c|block[67]|top_")))  # fmt: skip
    assert cut_layer(model, inside, ["high"]) is None
    # The two parts compose to the classifier.
    lower, top = split_at_cut(model, "block5c_add")
    x = np.random.default_rng(0).uniform(0, 255, (5, SIZE, SIZE, 3)).astype(np.float32)
    features = np.asarray(lower.predict_on_batch(x)).reshape(5, -1)
    np.testing.assert_allclose(
        top.predict_on_batch(features), model.predict_on_batch(x), rtol=1e-5, atol=1e-5
    )
    # A Keras Applications backbone cuts at its own group boundary too.
    mobilenet = get_backbone("mobilenet_v2")
    other = build_classifier(mobilenet, 4, image_size=SIZE, weights=None)
    name = cut_layer(other, mobilenet, mobilenet.group_names[-2:])
    assert name is not None
    lower, top = split_at_cut(other, name)
    features = np.asarray(lower.predict_on_batch(x)).reshape(5, -1)
    np.testing.assert_allclose(
        top.predict_on_batch(features), other.predict_on_batch(x), rtol=1e-4, atol=1e-4
    )


def test_an_augmented_partial_phase_trains_through_the_whole_network(digits):
    """Streaming the frozen groups from ONNX Runtime was measured not to pay (RESULTS.md): an
    augmented partial phase trains through the network even when ONNX Runtime is chosen."""
    _, records = partial_phase_run(digits, feature_cache=True, runtime="onnxruntime", augment=True)
    assert [r["features_cached"] for r in records] == [False] * 3
    assert [r.get("features_streamed") for r in records] == [None] * 3
    assert [r.get("features_layer") for r in records] == [None] * 3


def test_the_top_groups_stream_from_bfloat16_openvino_counted_in_224_px_images(monkeypatch):
    """An augmented phase streams the head's features from any converted runtime "auto" picks
    for its image-epochs, the top groups' input from bfloat16 OpenVINO only, named, counted in
    images of 224 x 224 pixels; under "auto" the top groups train through the network in
    bfloat16 instead (twentieth slice), with BatchNorm training too (twenty-second)."""
    import finetune.inference as inference
    from finetune.recipes.two_phase import POOL_LAYER, STREAM_CUT_PIXELS

    monkeypatch.delenv(inference.ENV_VAR, raising=False)
    monkeypatch.setattr(inference, "cpu_has_bfloat16", lambda: True)
    images = np.zeros((100, 64, 64, 3), np.uint8)
    labels = np.zeros(100, np.int64)

    def at_224(epochs):
        return 100 * epochs * 64 * 64 // STREAM_CUT_PIXELS

    def counted(epochs, cut, runtime=None, augment=True, train_batchnorm=False):
        data = digits_phase_data(
            SimpleNamespace(
                images={"train": images, "val": None},
                labels={"train": labels, "val": None},
                num_classes=2,
            ),
            0,
            runtime=runtime,
        )
        phase = Phase(
            "finetune", epochs=epochs, learning_rate=1e-3, augment=augment,
            train_batchnorm=train_batchnorm,
        )  # fmt: skip
        return data.stream_images(phase, cut)

    # Where the bfloat16 threshold falls for the top groups: its count of 224 px images.
    least = -(-inference.AUTO_BF16_MIN_IMAGES * STREAM_CUT_PIXELS // (100 * 64 * 64))  # epochs
    assert at_224(least) >= inference.AUTO_BF16_MIN_IMAGES > at_224(least - 1)
    # Under "auto" on a CPU with bfloat16 the top groups train through the network in
    # bfloat16 instead (faster than streamed), at any count; the head still streams.
    assert counted(100 * least, "block5c_add") == 0
    assert counted(100 * least, "block5c_add", train_batchnorm=True) == 0
    # The head counts every image, and streams from float32 runtimes too.
    assert counted(20, POOL_LAYER) == 2000
    assert counted(19, POOL_LAYER, runtime="onnxruntime") == 1900
    for runtime in ("onnxruntime", "openvino", "keras"):
        assert counted(10 * least, "block5c_add", runtime=runtime) == 0, runtime
    assert counted(least, "block5c_add", runtime="openvino-bf16") == at_224(least)
    named = counted(least, "block5c_add", runtime="openvino-bf16", train_batchnorm=True)
    assert named == at_224(least)
    # A CPU without bfloat16: not at a cut, even where it is asked for by name.
    monkeypatch.setattr(inference, "cpu_has_bfloat16", lambda: False)
    for runtime in (None, "openvino-bf16"):
        assert counted(100 * least, "block5c_add", runtime=runtime) == 0, runtime
    assert counted(200, POOL_LAYER) == 20000  # the head: float32 OpenVINO from 15,000
    monkeypatch.setattr(inference, "cpu_has_bfloat16", lambda: True)
    # Nothing streams without augmentation, or without a cut.
    assert counted(10 * least, "block5c_add", augment=False) == 0
    assert counted(10 * least, None) == 0


@pytest.mark.slow
def test_an_augmented_partial_phase_streams_the_frozen_groups_from_bfloat16_openvino(digits):
    """bfloat16 OpenVINO chosen: the frozen groups below the cut run there batch by batch as
    the augmentation makes them; the top groups train near as through the network, the groups
    below stay as they were. With BatchNorm training and averaging, the statistics are
    recomputed from the frozen groups' output of unaugmented images."""
    import finetune.inference as inference

    if not inference.cpu_has_bfloat16():
        pytest.skip("this CPU has no bfloat16: the top groups train through the network")
    through, slow_records = partial_phase_run(
        digits, feature_cache=True, runtime="keras", augment=True
    )
    streamed, fast_records = partial_phase_run(
        digits, feature_cache=True, runtime="openvino-bf16", augment=True
    )
    assert [r.get("features_streamed") for r in slow_records] == [None] * 3
    assert [r.get("features_streamed") for r in fast_records] == [True] * 3
    assert [r["features_cached"] for r in fast_records] == [False] * 3
    assert [r["features_layer"] for r in fast_records] == ["block5c_add"] * 3
    assert [r["features_runtime"] for r in fast_records] == ["openvino-bf16"] * 3
    slow, fast = weights_by_group(through), weights_by_group(streamed)
    seed_everything(5)
    initial = weights_by_group(build_classifier(SPEC, 4, image_size=SIZE, head=ModelConfig()))
    differences = []
    for group in initial:
        pairs = list(zip(slow[group], fast[group], strict=True))
        if group in ("block6", "block7", "top", "head"):
            # Measured: at most 0.4% in the groups, 9.5% in the head.
            bound = 0.2 if group == "head" else 0.02
            for a, b in pairs:
                assert np.linalg.norm(b - a) < bound * np.linalg.norm(a), group
                differences.append(np.abs(b - a).max())
        else:
            for a, b in zip(initial[group], fast[group], strict=True):
                np.testing.assert_array_equal(a, b, err_msg=group)  # frozen
    assert max(differences) > 1e-4  # really bfloat16
    for s, f in zip(slow_records, fast_records, strict=True):
        assert f["val_loss"] == pytest.approx(s["val_loss"], rel=0.05)  # measured: <2%
    assert streamed.optimizer is not None  # the classifier compiled as what trained it

    averaged, records = partial_phase_run(
        digits, feature_cache=True, runtime="openvino-bf16", augment=True,
        train_batchnorm=True, average=2,
    )  # fmt: skip
    assert [r.get("features_streamed") for r in records] == [True] * 3
    top_bn = trained_batchnorm(averaged)
    assert records[-1]["batchnorm_recomputed"] == len(top_bn) > 0
    reference, _ = partial_phase_run(
        digits, feature_cache=True, runtime="keras", augment=True, train_batchnorm=True, average=2
    )
    # Measured: means within 1.5%, variances within 5.9% of those recomputed through the
    # network; recomputed from augmented batches instead, 7.1% and 20%.
    for layer in top_bn:
        other = reference.get_layer("backbone").get_layer(layer.name)
        for a, b, bound in (
            (other.moving_mean, layer.moving_mean, 0.035),
            (other.moving_variance, layer.moving_variance, 0.12),
        ):
            a, b = a.numpy(), b.numpy()
            assert np.linalg.norm(b - a) < bound * np.linalg.norm(a), layer.name
