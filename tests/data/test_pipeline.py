"""The tf.data pipeline and augmentation: what training and evaluation batches look like."""

from __future__ import annotations

import threading
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from tensorflow.python.framework import op_def_registry

from finetune.config import AugmentConfig, augment_preset, load_config
from finetune.data.augment import RandomGeometry, augment, build_augmentation, build_mixing
from finetune.data.decode import load_image
from finetune.data.pipeline import image_dataset, permute_rows, prepare_image_data
from tests.helpers import DIGITS, EXAMPLES, image_subset


def batches(ds):
    return [(np.asarray(x), np.asarray(y)) for x, y in ds]


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (10, 16, 16, 3), dtype=np.uint8)
    return x, np.arange(10) % 3


def test_evaluation_batches_are_the_images_in_order_with_one_hot_labels(images):
    x, y = images
    out = batches(image_dataset(x, y, 3, batch_size=4))
    assert [b[0].shape[0] for b in out] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([b[0] for b in out]), x.astype(np.float32))
    np.testing.assert_array_equal(np.concatenate([b[1] for b in out]), np.eye(3)[y])


def test_training_batches_are_shuffled_reproducibly(images):
    x, y = images
    first = np.concatenate(
        [
            b[1].argmax(1)
            for b in batches(image_dataset(x, y, 3, batch_size=4, training=True, seed=1))
        ]
    )
    again = np.concatenate(
        [
            b[1].argmax(1)
            for b in batches(image_dataset(x, y, 3, batch_size=4, training=True, seed=1))
        ]
    )
    np.testing.assert_array_equal(first, again)
    assert sorted(first.tolist()) == sorted(y.tolist())


def test_augmentation_changes_training_images_only(images):
    x, y = images
    augmentation = build_augmentation(AugmentConfig(rotation=30, zoom=0.2), seed=0)
    train = np.concatenate(
        [
            b[0]
            for b in batches(
                image_dataset(x, y, 3, batch_size=10, training=True, augmentation=augmentation)
            )
        ]
    )
    assert train.shape == (10, 16, 16, 3)
    assert train.min() >= 0 and train.max() <= 255
    # Shuffled and transformed: no training image equals any original one.
    originals = x.astype(np.float32)
    assert not any(np.array_equal(t, o) for t in train for o in originals)
    evaluation = np.concatenate(
        [b[0] for b in batches(image_dataset(x, y, 3, batch_size=10, augmentation=augmentation))]
    )
    np.testing.assert_array_equal(evaluation, originals)


def test_augmentation_off_or_empty_gives_none():
    assert build_augmentation(AugmentConfig(enabled=False)) is None
    nothing = AugmentConfig(
        horizontal_flip=False, rotation=0, zoom=0, width_shift=0, height_shift=0
    )
    assert build_augmentation(nothing) is None


def test_seed_augmentations_are_expressible():
    seed000 = build_augmentation(load_config(EXAMPLES / "seed000_resnet50_augment.toml").augment)
    (geometry,) = seed000.layers
    assert isinstance(geometry, RandomGeometry)
    assert (geometry.horizontal_flip, geometry.vertical_flip) == (True, True)
    assert geometry.rotation == 36.0  # RandomRotation(0.1): a tenth of a turn
    assert (geometry.zoom, geometry.width_shift, geometry.shear) == (0.1, 0.0, 0.0)
    seed001 = build_augmentation(
        load_config(EXAMPLES / "seed001_freeze_then_unfreeze.toml").augment
    )
    (geometry,) = seed001.layers
    assert (geometry.rotation, geometry.width_shift, geometry.height_shift) == (40, 0.2, 0.2)
    assert (geometry.shear, geometry.zoom, geometry.fill_mode) == (0.2, 0.2, "nearest")


def blob(size: int, centre: tuple[float, float], sigma: float) -> np.ndarray:
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
    spot = np.exp(-((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2) / (2 * sigma**2))
    return np.repeat((255 * spot)[None, :, :, None], 3, axis=-1)


def moments(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centre of mass (row, column) and spread of each image's first channel."""
    mass = images[..., 0]
    rows, cols = np.mgrid[0 : mass.shape[1], 0 : mass.shape[2]]
    total = mass.sum(axis=(1, 2))
    row = (mass * rows).sum(axis=(1, 2)) / total
    col = (mass * cols).sum(axis=(1, 2)) / total
    spread = (mass * ((rows - row[:, None, None]) ** 2 + (cols - col[:, None, None]) ** 2)).sum(
        axis=(1, 2)
    ) / total
    return row, col, np.sqrt(spread)


def geometry_of(images: np.ndarray, **bounds) -> np.ndarray:
    layer = RandomGeometry(fill_mode="constant", **bounds)
    return np.asarray(layer.transform(tf.constant(images), tf.constant([4, 2], tf.int64)))


def test_geometry_shifts_and_zooms_about_the_centre_within_the_bounds():
    size, n = 48, 64
    images = np.repeat(blob(size, (23.5, 23.5), 3.0), n, axis=0)
    row, col, spread = moments(images)
    for across, along in (("width_shift", 1), ("height_shift", 0)):
        shifted = moments(geometry_of(images, **{across: 0.125}))
        np.testing.assert_allclose(shifted[1 - along], (row, col)[1 - along], atol=1e-3)
        moved = shifted[along] - (row, col)[along]  # along its own axis only
        assert np.abs(moved).max() <= 0.125 * size + 1e-3
        assert moved.min() < -2 and moved.max() > 2  # both ways
        np.testing.assert_allclose(shifted[2], spread, rtol=0.02)  # moved, not resized
    zoom_row, zoom_col, zoom_spread = moments(geometry_of(images, zoom=0.25))
    np.testing.assert_allclose(zoom_row, row, atol=1e-2)  # about the centre
    np.testing.assert_allclose(zoom_col, col, atol=1e-2)
    ratio = zoom_spread / spread  # scale s samples the input s times wider: 1/s the size
    assert ratio.min() >= 1 / 1.25 - 0.02 and ratio.max() <= 1 / 0.75 + 0.02
    assert ratio.min() < 0.9 and ratio.max() > 1.1


def test_geometry_rotates_about_the_centre_within_the_bound():
    size, n = 48, 64
    images = np.repeat(blob(size, (23.5, 35.5), 2.5), n, axis=0)  # 12 px right of the centre
    row, col, _ = moments(geometry_of(images, rotation=30.0))
    angle = np.degrees(np.arctan2(row - 23.5, col - 23.5))
    np.testing.assert_allclose(np.hypot(row - 23.5, col - 23.5), 12.0, atol=0.1)
    assert np.abs(angle).max() <= 30.0 + 0.5
    assert angle.min() < -10 and angle.max() > 10


def test_geometry_shears_about_the_centre_within_the_bound():
    size, n, bound = 48, 64, 0.25
    centred = np.repeat(blob(size, (23.5, 23.5), 2.5), n, axis=0)
    row, col, _ = moments(geometry_of(centred, shear=bound))
    np.testing.assert_allclose(row, 23.5, atol=0.05)  # the centre stays
    np.testing.assert_allclose(col, 23.5, atol=0.05)
    right = np.repeat(blob(size, (23.5, 35.5), 2.5), n, axis=0)  # 12 px right of the centre
    row, col, _ = moments(geometry_of(right, shear=bound))
    # Sampling at centre + [[1, sx], [sy, 1]] (p - centre): the spot moves across by about
    # -sy times its distance, never more than the bound allows.
    across = row - 23.5
    assert np.abs(across).max() <= bound * 12 / (1 - bound**2) + 0.1
    assert across.min() < -1 and across.max() > 1


def test_geometry_flips_mirror_exactly_and_the_layer_round_trips_its_config(images):
    x = images[0].astype(np.float32)
    for flip, mirror in (("horizontal_flip", x[:, :, ::-1]), ("vertical_flip", x[:, ::-1])):
        out = geometry_of(x, **{flip: True})
        mirrored = [np.array_equal(o, m) for o, m in zip(out, mirror, strict=True)]
        kept = [np.array_equal(o, i) for o, i in zip(out, x, strict=True)]
        assert all(m or k for m, k in zip(mirrored, kept, strict=True))
        assert any(mirrored) and any(kept)
    layer = RandomGeometry(rotation=12.0, shear=0.1, fill_mode="wrap", seed=3)
    again = RandomGeometry.from_config(layer.get_config())
    assert again.get_config() == layer.get_config()


def test_prepare_image_data_splits_and_decodes_at_the_size(tmp_path):
    data = image_subset(DIGITS, tmp_path / "d", classes=3, per_class=20)
    prepared = prepare_image_data(data, image_size=40, seed=1, progress=False)
    assert prepared.counts() == {"train": 48, "val": 6, "test": 6}
    assert prepared.images["train"].shape == (48, 40, 40, 3)
    assert prepared.images["train"].dtype == np.uint8
    assert np.bincount(prepared.labels["test"]).tolist() == [2, 2, 2]
    again = prepare_image_data(data, image_size=40, seed=1, progress=False)
    assert [s.path for s in again.splits["test"]] == [s.path for s in prepared.splits["test"]]


def test_images_above_the_memory_limit_are_decoded_to_disk_and_read_from_there(tmp_path):
    data = image_subset(DIGITS, tmp_path / "d", classes=3, per_class=12)
    (data / "0" / "broken.png").write_bytes(b"not a png")  # a failed slot among the rows
    spill = tmp_path / "run"
    in_memory = prepare_image_data(data, image_size=24, seed=3, progress=False)
    on_disk = prepare_image_data(
        data, image_size=24, seed=3, progress=False, max_memory_gb=1e-5, spill_dir=spill
    )
    assert not in_memory.on_disk and on_disk.on_disk
    assert [b.path.name for b in on_disk.bad_files] == ["broken.png"]
    assert [b.path for b in on_disk.bad_files] == [b.path for b in in_memory.bad_files]
    for split in ("train", "val", "test"):
        # Each split's rows are its own files' pixels, in its order, whatever the reordering.
        assert len(in_memory.images[split]) == len(in_memory.splits[split]) > 0
        for row, sample in zip(in_memory.images[split], in_memory.splits[split], strict=True):
            np.testing.assert_array_equal(row, load_image(sample.path, 24, "bilinear"))
        assert [s.path for s in on_disk.splits[split]] == [s.path for s in in_memory.splits[split]]
        np.testing.assert_array_equal(on_disk.images[split], in_memory.images[split])
        np.testing.assert_array_equal(on_disk.labels[split], in_memory.labels[split])
        # Read from the mapped file, not a copy in memory.
        assert isinstance(on_disk.images[split], np.memmap)
        assert not isinstance(in_memory.images[split], np.memmap)
    # The file is never listed in the folder (an anonymous temporary file; the mapping keeps
    # the data): nothing is left behind, even by a killed process.
    assert list(spill.iterdir()) == []
    # A training pipeline reads the mapped rows.
    x, y = in_memory.images["train"], in_memory.labels["train"]
    want = batches(image_dataset(x, y, 3, batch_size=5, training=True, first_epoch=0).take(3))
    got = image_dataset(on_disk.images["train"], y, 3, batch_size=5, training=True, first_epoch=0)
    for (a, b), (c, d) in zip(want, batches(got.take(3)), strict=True):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)


def test_each_split_is_a_slice_of_one_array_not_a_second_copy(tmp_path):
    data = image_subset(DIGITS, tmp_path / "d", classes=2, per_class=10)
    prepared = prepare_image_data(data, image_size=16, progress=False)
    train, val, test = (prepared.images[s] for s in ("train", "val", "test"))
    assert train.base is not None and train.base is val.base is test.base
    assert train.base.nbytes == train.nbytes + val.nbytes + test.nbytes


@settings(max_examples=60, deadline=None)
@given(st.permutations(list(range(9))))
def test_rows_are_reordered_in_place_like_taking_them(order):
    array = np.arange(9 * 4, dtype=np.uint8).reshape(9, 2, 2)
    want = array[np.asarray(order)]
    before = array.__array_interface__["data"][0]
    permute_rows(array, np.asarray(order))
    np.testing.assert_array_equal(array, want)
    assert array.__array_interface__["data"][0] == before


def test_a_reorder_that_is_not_a_permutation_is_refused():
    with pytest.raises(ValueError, match="not a permutation of the 3 rows"):
        permute_rows(np.zeros((3, 2)), np.array([0, 0, 2]))


def test_a_folder_too_large_for_memory_and_the_disk_is_refused_before_decoding(
    tmp_path, monkeypatch
):
    import shutil

    from finetune.data import decode
    from finetune.errors import DataError

    data = image_subset(DIGITS, tmp_path / "d", classes=2, per_class=10)
    decoded = []
    monkeypatch.setattr(decode, "decode_images", lambda *a, **k: decoded.append(1))
    # The disk is as full as it says: 20 images at 1024 px take 60 MiB; leave it 10 MiB.
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=10 * 2**20))
    with pytest.raises(DataError, match="max_memory_gb") as caught:
        prepare_image_data(
            data, image_size=1024, max_memory_gb=0.01, progress=False, spill_dir=tmp_path / "run"
        )
    message = str(caught.value)
    assert str(data) in message and str(tmp_path / "run") in message
    assert "take 60 MiB" in message and "10 MiB free" in message and "--image-size" in message
    assert decoded == []  # refused before decoding


def test_a_disk_that_fills_before_the_images_are_written_is_an_error_not_a_crash(
    tmp_path, monkeypatch
):
    """Space is reserved before decoding: a disk filled by someone else since the check fails
    there, with the same message, instead of a SIGBUS when a decoded page is written."""
    import errno
    import os

    from finetune.errors import DataError

    data = image_subset(DIGITS, tmp_path / "d", classes=2, per_class=10)

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    with pytest.raises(DataError, match="max_memory_gb") as caught:
        prepare_image_data(
            data, image_size=64, max_memory_gb=1e-5, progress=False, spill_dir=tmp_path / "run"
        )
    assert "free" in str(caught.value) and str(tmp_path / "run") in str(caught.value)
    assert list((tmp_path / "run").iterdir()) == []


def test_presets_match_the_seed_examples_and_unknown_names_are_refused():
    from finetune.config import augment_preset
    from finetune.errors import ConfigError

    for seed in ("seed000", "seed001"):
        (example,) = EXAMPLES.glob(f"{seed}_*.toml")
        assert load_config(example).augment == augment_preset(seed)
    assert augment_preset("light") == AugmentConfig()
    assert build_augmentation(augment_preset("none")) is None
    with pytest.raises(ConfigError, match="'heavy' is not one of: light, strong, none"):
        augment_preset("heavy")


def test_strong_preset_adds_randaugment_and_keeps_the_pixel_range(images):
    from finetune.config import augment_preset
    from finetune.train import resolve_config

    assert resolve_config(augment="strong").augment == augment_preset("strong")
    assert resolve_config(augment=False).augment.enabled is False
    strong = build_augmentation(augment_preset("strong"), seed=0)
    assert isinstance(strong.layers[-1], keras.layers.RandAugment)
    x, _ = images
    out = np.asarray(strong(x.astype(np.float32), training=True))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 255
    assert not np.array_equal(out, x.astype(np.float32))


def stateful_ops(fn, *specs) -> set[str]:
    """The stateful ops of `fn` traced as a tf.function, its nested functions included."""
    graph = tf.function(fn).get_concrete_function(*specs).graph.as_graph_def()
    ops = [n.op for n in graph.node] + [n.op for f in graph.library.function for n in f.node_def]
    return {op for op in ops if (d := op_def_registry.get(op)) is not None and d.is_stateful}


@pytest.mark.parametrize("preset", ["light", "strong"])
def test_keyed_augmentation_holds_no_state_so_tf_data_can_run_it_in_parallel(preset):
    # Under op determinism tf.data runs a map holding a stateful op on one thread; the layers
    # called the usual way read and write their seed generator's variable.
    augmentation = build_augmentation(augment_preset(preset), seed=0)
    spec = tf.TensorSpec([None, 16, 16, 3], tf.float32)
    assert {"ReadVariableOp", "AssignVariableOp"} <= stateful_ops(
        lambda x: augmentation(x, training=True), spec
    )
    keyed = stateful_ops(
        lambda x, k: augment(augmentation, x, k), spec, tf.TensorSpec([2], tf.int64)
    )
    assert keyed == set()


@pytest.mark.parametrize("preset", ["light", "strong"])
def test_the_same_key_augments_the_same_way_and_another_key_otherwise(images, preset):
    x = tf.constant(images[0], tf.float32)
    augmentation = build_augmentation(augment_preset(preset), seed=0)

    def run(key):
        return np.asarray(augment(augmentation, x, tf.constant(key, tf.int64)))

    first, again, other = run([1, 0]), run([1, 0]), run([2, 0])
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert not np.array_equal(first, images[0].astype(np.float32))
    assert first.min() >= 0 and first.max() <= 255


def test_keyed_flips_mirror_some_images_and_keep_the_others(images):
    # The keyed path keeps each layer's meaning: a flip layer mirrors an image or leaves it.
    x = images[0].astype(np.float32)
    flip = build_augmentation(
        AugmentConfig(horizontal_flip=True, rotation=0, zoom=0, width_shift=0, height_shift=0)
    )
    out = np.asarray(augment(flip, tf.constant(x), tf.constant([3, 0], tf.int64)))
    mirrored = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, x, strict=True)]
    kept = [np.array_equal(o, i) for o, i in zip(out, x, strict=True)]
    assert all(m or k for m, k in zip(mirrored, kept, strict=True))
    assert any(mirrored) and any(kept)


def test_an_epochs_augmentation_depends_on_the_seed_and_epoch_only(images):
    # What lets a resumed run replay an epoch without saving any augmentation state: epoch 1
    # of a stream that starts there is epoch 1 of one that ran epoch 0 first.
    x, y = images
    augmentation = build_augmentation(AugmentConfig(rotation=30, zoom=0.2), seed=0)

    def epochs(first_epoch, count, seed=0):
        ds = image_dataset(
            x, y, 3, batch_size=4, training=True, augmentation=augmentation, seed=seed,
            first_epoch=first_epoch,
        )  # fmt: skip
        return np.split(np.concatenate([b[0] for b in batches(ds.take(3 * count))]), count)

    first, second = epochs(0, 2)
    np.testing.assert_array_equal(epochs(1, 1)[0], second)
    np.testing.assert_array_equal(epochs(0, 1)[0], first)
    assert not np.array_equal(first, second)
    assert not np.array_equal(epochs(0, 1, seed=5)[0], first)


def map_concurrency(ds: tf.data.Dataset) -> int:
    """The most calls of a parallel map appended to `ds` that ran at once (each takes 20 ms)."""
    lock, running, most = threading.Lock(), [0], [0]

    def note(x):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.02)
        with lock:
            running[0] -= 1
        return x

    def probe(x, *rest):
        return (tf.numpy_function(note, [x], x.dtype, stateful=False), *rest)

    for _ in ds.take(8).map(probe, num_parallel_calls=4):
        pass
    return most[0]


def test_the_augmentation_key_changes_with_the_epoch_and_the_seed():
    # Ten copies of one image: the order cannot tell epochs apart, only the augmentation can.
    x = np.repeat(np.random.default_rng(1).integers(0, 256, (1, 16, 16, 3), np.uint8), 10, 0)
    y = np.zeros(10, int)
    augmentation = build_augmentation(AugmentConfig(rotation=30, zoom=0.2), seed=0)

    def epoch(first_epoch, seed=0):
        ds = image_dataset(
            x, y, 3, batch_size=10, training=True, augmentation=augmentation, seed=seed,
            first_epoch=first_epoch,
        )  # fmt: skip
        return np.asarray(next(iter(ds))[0])

    np.testing.assert_array_equal(epoch(1), epoch(1))
    assert not np.array_equal(epoch(0), epoch(1))
    assert not np.array_equal(epoch(0), epoch(0, seed=5))


def test_the_epoch_ordered_pipeline_keeps_its_parallelism_under_op_determinism(images):
    # With op determinism on (finetune's default), tf.data's make_deterministic rewrite runs
    # every map of a pipeline that reads a variable on one thread and drops its prefetching.
    # The epoch-ordered training pipeline reads none, so its maps stay parallel.
    tf.config.experimental.enable_op_determinism()  # process-wide, as `finetune train` does
    x, y = images
    epoch = tf.Variable(0, dtype=tf.int64)
    reads_a_variable = tf.data.Dataset.range(1).flat_map(
        lambda _: tf.data.Dataset.from_tensor_slices(tf.range(16, dtype=tf.int64) + epoch)
    )
    assert map_concurrency(reads_a_variable) == 1  # the rewrite, as measured
    augmentation = build_augmentation(augment_preset("strong"), seed=0)
    mix = build_mixing(AugmentConfig(mixup=0.2, cutmix=1.0))
    ds = image_dataset(
        x, y, 3, batch_size=2, training=True, augmentation=augmentation, mixing=mix,
        first_epoch=2,
    )  # fmt: skip
    assert map_concurrency(ds) > 1


@pytest.mark.parametrize("training", [False, True])
def test_batches_are_read_from_the_array_not_a_copy_of_it_in_the_graph(images, tmp_path, training):
    # A copy of the training images in the graph doubled their memory (150 KB an image at
    # 224 px). Read batch by batch, a change to the array after the dataset was made shows in
    # the batches, and a memory-mapped array is read from its file.
    x, y = images
    mapped = np.lib.format.open_memmap(tmp_path / "x.npy", "w+", np.uint8, x.shape)
    mapped[:] = x
    ds = image_dataset(mapped, y, 3, batch_size=4, training=training, first_epoch=0)
    mapped[:] = 255 - x
    rows = np.concatenate([np.asarray(b[0]) for b in ds.take(3)])
    seen = np.asarray(sorted(rows.reshape(len(rows), -1).tolist()))
    expected = np.asarray(sorted((255 - x).astype(np.float32).reshape(len(x), -1).tolist()))
    np.testing.assert_array_equal(seen, expected)


EXIT_WITH_A_LIVE_ITERATOR = """
import numpy as np
from finetune.data.pipeline import image_dataset
x = np.zeros((512, 224, 224, 3), np.uint8)
batches = iter(image_dataset(x, np.arange(512) % 3, 3, batch_size=32, training=True, first_epoch=0))
for _ in range(5):
    next(batches)
"""


@pytest.mark.slow
def test_a_script_leaving_a_training_iterator_alive_exits():
    # Batches are read by Python functions in tf.data's threads. Without `_stop_reading`, 5 of
    # 6 such scripts hung at exit (a read waiting for the GIL while Python finalised).
    import os
    import subprocess
    import sys
    from pathlib import Path

    import finetune

    src = str(Path(finetune.__file__).parents[1])  # this tree's code, not an installed one
    env = os.environ | {"PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    for _ in range(3):
        done = subprocess.run(
            [sys.executable, "-c", EXIT_WITH_A_LIVE_ITERATOR],
            timeout=120, capture_output=True, env=env,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr.decode()[-2000:]


def test_reads_fail_once_python_exits(images, monkeypatch):
    # A batch read after `_stop_reading` (a daemon thread still training at exit) fails
    # instead of handing blank or stale rows to the model.
    from finetune.data import pipeline

    x, y = images
    ds = pipeline.index_batches(len(x), 4).map(pipeline.rows_reader(x))
    np.testing.assert_array_equal(np.concatenate(list(ds.as_numpy_iterator())), x)
    monkeypatch.setattr(pipeline._Reads, "exiting", True)
    with pytest.raises(tf.errors.OpError, match="exiting"):
        list(ds)


def test_images_and_labels_of_different_lengths_are_refused(images):
    x, y = images
    with pytest.raises(ValueError, match="10 images but 9 labels"):
        image_dataset(x, y[:9], 3, batch_size=4)


def test_each_data_file_is_hashed_once_per_prepared_data(tmp_path):
    import hashlib

    from finetune.train import data_files

    data = prepare_image_data(
        image_subset(DIGITS, tmp_path / "d", classes=2, per_class=5), image_size=32, progress=False
    )
    first = data_files(data)
    path = data.root / first[0]["path"]
    expected = hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()
    assert first[0]["blake2b_128"] == expected
    path.write_bytes(b"changed after it was read")
    # The fingerprint, the resume check and the manifest see the bytes that were decoded.
    assert data_files(data) == first
