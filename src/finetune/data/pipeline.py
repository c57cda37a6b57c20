"""From an image folder to batched tf.data pipelines at the backbone's input size.

`prepare_image_data` scans the folder, decodes every image once (in parallel) at the training
size with the hardened loader, leaves out files that fail (reported by path), completes the splits
with a seeded stratified split, and keeps the decoded uint8 images in memory. `image_dataset`
turns one split into batches: shuffled and augmented for training, plain for evaluation, always
prefetched, so the pipeline is never what the training waits on.

Given an epoch variable (`TrainingEpoch` sets it at the start of every epoch of a `fit`), the
training order, the augmentation and the MixUp/CutMix draws of an epoch depend only on (seed,
epoch), not on how many epochs the process ran before: `epoch_permutation` gives the order again
(which files a batch held, for an error message), and a resumed run replays an epoch exactly.

Size and interpolation come from the backbone's registry entry; normalisation is the model's
first layer.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from finetune.data.augment import Mixing, augment
from finetune.data.decode import BadFile, decode_images
from finetune.data.scan import IgnoredFile, Sample, check_classes, scan_image_folder
from finetune.data.split import complete_splits
from finetune.errors import DataError

SPLITS = ("train", "val", "test")


@dataclass
class PreparedData:
    """Decoded images of every split, ready for `image_dataset`.

    Args:
        root: the data folder.
        class_names: class names, index order.
        image_size: side of the decoded square images.
        splits: the samples of each split ("train", "val", "test"); val or test may be empty.
        images: uint8 arrays (N, size, size, 3) per split, aligned with `splits`.
        labels: int arrays (N,) per split.
        bad_files: files that could not be decoded, with the reason, left out.
        ignored: files that are not images, left out.
        fractions: the split fractions used to complete missing splits.
        seed: the split seed.
    """

    root: Path
    class_names: list[str]
    image_size: int
    splits: dict[str, list[Sample]]
    images: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    bad_files: list[BadFile] = field(default_factory=list)
    ignored: list[IgnoredFile] = field(default_factory=list)
    fractions: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    _digests: dict[Path, str] = field(default_factory=dict, init=False, repr=False, compare=False)

    def file_digest(self, path: Path) -> str:
        """BLAKE2b-128 of a file's bytes, read once per `PreparedData` ("unreadable" if gone).

        The resume check, the data fingerprint and the manifest all need it; each file is read
        for it only the first time.
        """
        if path not in self._digests:
            try:
                with open(path, "rb") as f:
                    digest = hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16))
                self._digests[path] = digest.hexdigest()
            except OSError:  # gone or unreadable since it was decoded
                self._digests[path] = "unreadable"
        return self._digests[path]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def counts(self) -> dict[str, int]:
        """Number of images per split."""
        return {name: len(samples) for name, samples in self.splits.items()}


def prepare_image_data(
    data_dir: str | Path,
    *,
    image_size: int,
    interpolation: str = "bilinear",
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    progress: bool = True,
    max_memory_gb: float = 8.0,
) -> PreparedData:
    """Scans, decodes and splits an image folder.

    Args:
        data_dir: class folders, or `train/` (+ optional `val/`, `test/`) holding class folders.
        image_size: side of the square images the model takes.
        interpolation: resize method. Defaults to "bilinear".
        val_fraction: validation share when there is no `val/`. Defaults to 0.1.
        test_fraction: test share when there is no `test/`. Defaults to 0.1.
        seed: seed of the stratified split. Defaults to 0.
        progress: show a progress bar while decoding. Defaults to True.
        max_memory_gb: refuse, before decoding, a folder whose decoded images would take more
            memory than this. Defaults to 8.

    Returns:
        A `PreparedData`.

    Raises:
        DataError: no images, a single class, a class without any decodable image, or more
            decoded pixels than `max_memory_gb`.
    """
    folder = scan_image_folder(data_dir)
    all_samples = [s for samples in folder.samples.values() for s in samples]
    needed_gb = len(all_samples) * image_size * image_size * 3 / 2**30
    if needed_gb > max_memory_gb:
        # Images are decoded once and kept in memory (streaming from disk is not built yet):
        # say so before spending minutes decoding into a swap storm.
        raise DataError(
            f"{data_dir}: {len(all_samples)} images at {image_size}x{image_size} take "
            f"{needed_gb:.1f} GiB decoded, above data.max_memory_gb = {max_memory_gb:g}. "
            "Use a smaller --image-size, raise max_memory_gb in the [data] section of the "
            "config if this machine has the memory, or train on a subset."
        )
    arrays, ok, bad = decode_images(
        [s.path for s in all_samples], image_size, interpolation=interpolation, progress=progress
    )
    index_of = {all_samples[i].path: row for row, i in enumerate(ok)}
    decodable = {
        split: [s for s in samples if s.path in index_of]
        for split, samples in folder.samples.items()
    }
    check_classes(folder.class_names, decodable)
    fractions = {
        "train": 1.0 - val_fraction - test_fraction,
        "val": val_fraction,
        "test": test_fraction,
    }
    splits = complete_splits(dataclasses.replace(folder, samples=decodable), fractions, seed)
    images, labels = {}, {}
    for split in SPLITS:
        samples = splits.get(split, [])
        rows = np.asarray([index_of[s.path] for s in samples], dtype=np.int64)
        images[split] = (
            arrays[rows] if len(rows) else np.zeros((0, image_size, image_size, 3), np.uint8)
        )
        labels[split] = np.asarray([s.label for s in samples], dtype=np.int64)
    return PreparedData(
        root=folder.root,
        class_names=folder.class_names,
        image_size=image_size,
        splits={split: list(splits.get(split, [])) for split in SPLITS},
        images=images,
        labels=labels,
        bad_files=bad,
        ignored=folder.ignored,
        fractions=fractions,
        seed=seed,
    )


def image_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    batch_size: int,
    training: bool = False,
    augmentation: keras.Sequential | None = None,
    mixing: Mixing | None = None,
    seed: int = 0,
    epoch: tf.Variable | None = None,
) -> tf.data.Dataset:
    """Batches of (float32 pixels in [0, 255], one-hot labels).

    Args:
        images: uint8 array (N, H, W, 3).
        labels: int array (N,).
        num_classes: width of the one-hot labels.
        batch_size: images per batch.
        training: shuffle every epoch (seeded) and apply `augmentation`. Defaults to False.
        augmentation: layers applied to training batches. Defaults to None.
        mixing: MixUp/CutMix step applied to training batches after `augmentation` (see
            `finetune.data.augment.build_mixing`). Defaults to None.
        seed: shuffle seed. Defaults to 0.
        epoch: an int64 variable holding the epoch about to run (see `TrainingEpoch`): each
            epoch's order is `epoch_permutation(N, seed, epoch)` and its augmentation and
            mixing draws depend on (seed, epoch) only. Defaults to None (tf.data's own reshuffle
            and draws on every iteration).

    Returns:
        A prefetched `tf.data.Dataset`.
    """
    if training and epoch is not None:
        pixels, classes = tf.constant(images), tf.constant(labels)
        ds = epoch_index_batches(len(images), batch_size, seed, epoch).map(
            lambda index: (tf.gather(pixels, index), tf.gather(classes, index))
        )
    else:
        ds = tf.data.Dataset.from_tensor_slices((images, labels))
        if training:
            ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
        ds = ds.batch(batch_size)

    def to_model_input(x, y):
        return tf.cast(x, tf.float32), tf.one_hot(y, num_classes)

    def batch_draws(offset: int) -> tf.data.Dataset:
        """One seeded int64 per batch: of (seed, epoch) only when there is an epoch."""
        if epoch is not None:
            return epoch_coins(-(-len(images) // batch_size), seed + offset, epoch)
        return tf.data.Dataset.random(seed=seed + offset, rerandomize_each_iteration=True)

    ds = ds.map(to_model_input, num_parallel_calls=tf.data.AUTOTUNE)
    if training and augmentation is not None:
        # Keyed by a draw per batch, the map holds no state and runs in parallel even under
        # op determinism (see `finetune.data.augment.augment`).
        def augmented(batch, draw):
            key = tf.stack([draw, tf.constant(0, tf.int64)])
            return augment(augmentation, batch[0], key), batch[1]

        ds = tf.data.Dataset.zip(ds, batch_draws(10)).map(
            augmented, num_parallel_calls=tf.data.AUTOTUNE
        )
    if training and mixing is not None:
        ds = tf.data.Dataset.zip(ds, batch_draws(9)).map(
            lambda batch, coin: mixing(*batch, coin), num_parallel_calls=tf.data.AUTOTUNE
        )
    return ds.prefetch(tf.data.AUTOTUNE)


def _permutation(n: int, seed: int, epoch: tf.Tensor) -> tf.Tensor:
    key = tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)])
    return tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int64), seed=key)


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which epoch `epoch` (0-based) visits `n` training samples, given `seed`.

    It is the order of `image_dataset(..., epoch=...)` and of the cached-feature datasets
    (`finetune.recipes.feature_cache`): batch k of the epoch holds samples
    `epoch_permutation(n, seed, epoch)[k * batch_size:(k + 1) * batch_size]`.
    """
    return _permutation(n, seed, tf.constant(epoch, tf.int64)).numpy()


def epoch_index_batches(n: int, batch_size: int, seed: int, epoch: tf.Variable) -> tf.data.Dataset:
    """Batches of sample indices in the order of the epoch `epoch` holds when iteration starts."""

    def one_epoch(_):
        return tf.data.Dataset.from_tensor_slices(_permutation(n, seed, epoch.read_value()))

    ds = tf.data.Dataset.range(1).flat_map(one_epoch)
    return ds.apply(tf.data.experimental.assert_cardinality(n)).batch(batch_size)


def epoch_coins(steps: int, seed: int, epoch: tf.Variable) -> tf.data.Dataset:
    """One int64 per batch of the epoch `epoch` holds, for `Mixing` (MixUp or CutMix, and how)."""

    def one_epoch(_):
        key = tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch.read_value(), tf.int64)])
        draws = tf.random.stateless_uniform(
            [steps], seed=key, minval=None, maxval=None, dtype=tf.int64
        )
        return tf.data.Dataset.from_tensor_slices(draws)

    ds = tf.data.Dataset.range(1).flat_map(one_epoch)
    return ds.apply(tf.data.experimental.assert_cardinality(steps))


def new_epoch_variable() -> tf.Variable:
    """The variable an epoch-ordered pipeline reads (set by `TrainingEpoch`)."""
    return tf.Variable(0, dtype=tf.int64, trainable=False, name="training_epoch")


class TrainingEpoch(keras.callbacks.Callback):
    """Sets a pipeline's epoch variable as each epoch of `fit` begins.

    Keras makes a new iterator over the training dataset for every epoch, after
    `on_epoch_begin`, so the epoch's order and mixing draws are those of `epoch_permutation`
    for that epoch number, however many epochs ran before in this process.
    """

    def __init__(self, variable: tf.Variable):
        super().__init__()
        self.variable = variable

    def on_epoch_begin(self, epoch, logs=None):
        self.variable.assign(epoch)


def with_class_weights(
    ds: tf.data.Dataset, class_weight: dict[int, float], num_classes: int
) -> tf.data.Dataset:
    """Adds a per-sample loss weight `labels @ weights` to batches of (inputs, labels).

    For one-hot labels this is exactly Keras' `fit(class_weight=...)`. For labels mixed by
    MixUp or CutMix it weights each sample by its classes in the proportion they were mixed,
    where Keras' `class_weight` would take the class with the largest share only.

    Args:
        ds: batches of (inputs, one-hot or soft labels).
        class_weight: weight per class index; classes not named weigh 1.
        num_classes: width of the labels.
    """
    weights = tf.constant([float(class_weight.get(c, 1.0)) for c in range(num_classes)])

    def weigh(x, y):
        return x, y, tf.linalg.matvec(tf.cast(y, tf.float32), weights)

    return ds.map(weigh)
