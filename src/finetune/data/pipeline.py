"""From an image folder to batched tf.data pipelines at the backbone's input size.

`prepare_image_data` scans the folder, decodes every image once (in parallel) at the training
size with the hardened loader, leaves out files that fail (reported by path), completes the splits
with a seeded stratified split, and keeps the decoded uint8 images in memory (or, above
`max_memory_gb`, in a memory-mapped file). `image_dataset`
turns one split into batches: shuffled and augmented for training, plain for evaluation, always
prefetched, so the pipeline is never what the training waits on.

Given a first epoch, a training dataset runs through the epochs from it on (`fit` with
`steps_per_epoch`), and the training order, the augmentation and the MixUp/CutMix draws of an
epoch depend only on (seed, epoch), not on how many epochs the process ran before:
`epoch_permutation` gives the order again (which files a batch held, for an error message), and
a resumed run replays an epoch exactly.

Size and interpolation come from the backbone's registry entry; normalisation is the model's
first layer.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from finetune.data.augment import Mixing, augment
from finetune.data.decode import BadFile, decode_within
from finetune.data.scan import IgnoredFile, Sample, check_classes, scan_image_folder
from finetune.data.split import complete_splits

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
        on_disk: the images are memory-mapped from a file (above `max_memory_gb`); each split
            is a slice of one array either way.
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
    on_disk: bool = False
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
    spill_dir: str | Path | None = None,
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
        max_memory_gb: the most memory the decoded images may take; above it, they are decoded
            into a memory-mapped file in `spill_dir` instead (checked for room first). Defaults
            to 8.
        spill_dir: the folder that file goes to (an anonymous temporary file, not kept).
            Defaults to None (the system's temporary folder, `TMPDIR`).

    Returns:
        A `PreparedData`.

    Raises:
        DataError: no images, a single class, a class without any decodable image, or decoded
            images above `max_memory_gb` and too little room for them in `spill_dir`.
    """
    folder = scan_image_folder(data_dir)
    all_samples = [s for samples in folder.samples.values() for s in samples]
    elsewhere = "give --out on a larger disk" if spill_dir else "point TMPDIR to a larger disk"
    arrays, ok, bad = decode_within(
        [s.path for s in all_samples],
        image_size,
        interpolation=interpolation,
        progress=progress,
        max_memory_gb=max_memory_gb,
        spill_dir=spill_dir,
        source=data_dir,
        advice=f"{elsewhere}, use a smaller --image-size, or raise max_memory_gb in the [data] "
        "section of the config if this machine has the memory.",
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
    # The rows put in split order where they are, each split then a slice of them: taking each
    # split's rows (`arrays[rows]`) would hold the images twice, in memory or on disk.
    rows = {
        split: np.asarray([index_of[s.path] for s in splits.get(split, [])], dtype=np.int64)
        for split in SPLITS
    }
    used = np.concatenate(list(rows.values()))
    unused = np.setdiff1d(np.arange(len(arrays)), used)
    permute_rows(arrays, np.concatenate([used, unused]))
    images, labels, start = {}, {}, 0
    for split in SPLITS:
        images[split] = arrays[start : start + len(rows[split])]
        start += len(rows[split])
        labels[split] = np.asarray([s.label for s in splits.get(split, [])], dtype=np.int64)
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
        on_disk=isinstance(arrays, np.memmap),
    )


def permute_rows(array: np.ndarray, order: np.ndarray) -> None:
    """Reorders `array`'s rows in place: row i becomes the old row `order[i]`.

    One row is held aside at a time (following the permutation's cycles), so a memory-mapped
    array is reordered on disk without a second copy. `order` must be a permutation of
    0 ... len(array) - 1.
    """
    order = np.asarray(order, dtype=np.int64)
    if len(order) != len(array) or not np.array_equal(np.sort(order), np.arange(len(array))):
        raise ValueError(f"order is not a permutation of the {len(array)} rows")
    done = order == np.arange(len(order))
    for first in np.flatnonzero(~done):
        if done[first]:
            continue
        held, at = array[first].copy(), first
        while True:
            done[at] = True
            source = order[at]
            if source == first:
                array[at] = held
                break
            array[at] = array[source]
            at = source


class _Reads:
    """The reads `rows_reader` functions make, and whether Python is exiting (`stop`)."""

    lock = threading.Lock()
    in_flight = 0
    last = 0.0  # time.monotonic() of the last read started
    exiting = False
    registered = False


# How long reads must have been quiet at exit, and the longest the exit waits for that.
_QUIET_S, _MAX_WAIT_S = 0.05, 2.0


def _stop_reading() -> None:
    """At interpreter exit, before finalisation: every read from then on fails at once, and the
    exit waits (releasing the GIL) until no read has run for `_QUIET_S`, at most `_MAX_WAIT_S`.

    A tf.data thread still waiting for the GIL in a read when Python finalises never returns,
    and deleting an iterator left alive (a global of the user's script) then waits for it
    forever (5 of 6 such scripts hung without this). Failing, not returning blank rows: a
    batch read now (by a daemon thread still training, say) cannot be used by mistake, and the
    pipeline's buffers fill with the error at once, so it stops asking for reads.
    """
    _Reads.exiting = True
    deadline = time.monotonic() + _MAX_WAIT_S
    while time.monotonic() < deadline:
        with _Reads.lock:
            quiet = _Reads.in_flight == 0 and time.monotonic() - _Reads.last >= _QUIET_S
        if quiet:
            return
        time.sleep(0.01)


def rows_reader(array: np.ndarray | tf.Tensor) -> Callable[[tf.Tensor], tf.Tensor]:
    """A function of a batch of row indices (int64) returning those rows of `array`, for a
    tf.data map.

    A NumPy array (a memory-mapped one too; anything else is taken as `np.asarray` of it) is
    read where it is, one batch at a time: taking it into the graph as a tensor would copy all
    of it (the decoded training images: 147 KB an image at 224 px), and a memory-mapped one
    into memory. Reading rows changes nothing, so the read is stateless and tf.data still runs
    the map in parallel and prefetches under op determinism. A tensor (or variable) is gathered
    from as it is. Reads fail once Python exits (`_stop_reading`).
    """
    if tf.is_tensor(array) or isinstance(array, tf.Variable):
        return lambda index: tf.gather(array, index)
    array = np.asarray(array)
    dtype, shape = tf.as_dtype(array.dtype), (None, *array.shape[1:])
    with _Reads.lock:
        if not _Reads.registered:
            atexit.register(_stop_reading)
            _Reads.registered = True

    def take(index: np.ndarray) -> np.ndarray:
        with _Reads.lock:
            if _Reads.exiting:
                raise RuntimeError("Python is exiting: the batch is not read.")
            _Reads.in_flight += 1
            _Reads.last = time.monotonic()
        try:
            return np.ascontiguousarray(array[index])
        finally:
            with _Reads.lock:
                _Reads.in_flight -= 1

    def read(index: tf.Tensor) -> tf.Tensor:
        rows = tf.numpy_function(take, [index], dtype, stateful=False)
        rows.set_shape(shape)
        return rows

    return read


def index_batches(n: int, batch_size: int) -> tf.data.Dataset:
    """Batches of the row indices 0 ... n - 1 in order (int64)."""
    return tf.data.Dataset.range(n).batch(batch_size)


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
    first_epoch: int | None = None,
) -> tf.data.Dataset:
    """Batches of (float32 pixels in [0, 255], one-hot labels).

    Args:
        images: uint8 array (N, H, W, 3) (or a tensor of one).
        labels: int array (N,).
        num_classes: width of the one-hot labels.
        batch_size: images per batch.
        training: shuffle every epoch (seeded) and apply `augmentation`. Defaults to False.
        augmentation: layers applied to training batches (keyed, see
            `finetune.data.augment.augment`). Defaults to None.
        mixing: MixUp/CutMix step applied to training batches after `augmentation` (see
            `finetune.data.augment.build_mixing`). Defaults to None.
        seed: shuffle seed. Defaults to 0.
        first_epoch: with `training`, the batches of epochs `first_epoch`, `first_epoch + 1`,
            ... without end (see `epoch_batches`): each epoch's order is
            `epoch_permutation(N, seed, epoch)` and its augmentation and mixing draws depend on
            (seed, epoch) only. `fit` it with `steps_per_epoch=steps_per_epoch(N,
            batch_size)` and `initial_epoch=first_epoch`. Defaults to None (one epoch per
            iteration, with tf.data's own reshuffle and draws every time).

    Returns:
        A prefetched `tf.data.Dataset`.
    """
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels: give one label an image.")
    pixels, classes = rows_reader(images), tf.constant(np.asarray(labels))
    if not training:  # evaluation: the batches in order, as they are
        ds = index_batches(len(labels), batch_size).map(
            lambda index: (
                tf.cast(pixels(index), tf.float32),
                tf.one_hot(tf.gather(classes, index), num_classes),
            ),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        return ds.prefetch(tf.data.AUTOTUNE)
    if first_epoch is not None:
        ds = epoch_batches(len(labels), batch_size, seed, first_epoch)
    else:
        order = tf.data.Dataset.range(len(labels))
        order = order.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
        draws = [
            tf.data.Dataset.random(seed=seed + offset, rerandomize_each_iteration=True)
            for offset in _DRAW_OFFSETS
        ]
        ds = tf.data.Dataset.zip(order.batch(batch_size), *draws)
    ds = ds.map(
        lambda index, coin, draw: (pixels(index), tf.gather(classes, index), coin, draw),
        num_parallel_calls=tf.data.AUTOTUNE,
    )

    def to_model_input(x, y, coin, draw):
        x, y = tf.cast(x, tf.float32), tf.one_hot(y, num_classes)
        if augmentation is not None:
            # Keyed by the batch's draw: no state in the map, which runs in parallel even
            # under op determinism (see `finetune.data.augment.augment`).
            x = augment(augmentation, x, tf.stack([draw, tf.constant(0, tf.int64)]))
        if mixing is not None:
            x, y = mixing(x, y, coin)
        return x, y

    return ds.map(to_model_input, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


# The seed offsets of the per-batch draws: MixUp/CutMix's coin, the augmentation's key.
_DRAW_OFFSETS = (9, 10)
_ENDLESS = 2**62


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Batches in an epoch of `n` samples (the last one may be smaller)."""
    return -(-n // batch_size)


def _permutation(n: int, seed: int, epoch: tf.Tensor) -> tf.Tensor:
    key = tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)])
    return tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int64), seed=key)


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which epoch `epoch` (0-based) visits `n` training samples, given `seed`.

    It is the order of `image_dataset(..., first_epoch=...)` and of the cached-feature datasets
    (`finetune.recipes.feature_cache`): batch k of the epoch holds samples
    `epoch_permutation(n, seed, epoch)[k * batch_size:(k + 1) * batch_size]`.
    """
    return _permutation(n, seed, tf.constant(epoch, tf.int64)).numpy()


def epoch_batches(n: int, batch_size: int, seed: int, first_epoch: int) -> tf.data.Dataset:
    """(sample indices, mixing coin, augmentation draw) of every batch of the epochs
    `first_epoch`, `first_epoch + 1`, ... without end.

    Batch k of epoch e holds `epoch_permutation(n, seed, e)[k * batch_size:(k + 1) *
    batch_size]`, and its two int64 draws depend on (seed, e, k) only. Nothing here reads a
    variable: with op determinism on, tf.data would otherwise run every map of the pipeline on
    one thread and drop its prefetching (its `make_deterministic` rewrite), so the epoch is a
    number in the stream and `fit` goes through it with `steps_per_epoch` (Keras then keeps
    one iterator for all the epochs of a `fit`).
    """
    if n < 1:
        raise ValueError("no training samples: an epoch of none would never end")
    steps = steps_per_epoch(n, batch_size)

    def draws(offset: int, key: tf.Tensor) -> tf.data.Dataset:
        key = tf.stack([tf.constant(seed + offset, tf.int64), key])
        values = tf.random.stateless_uniform(
            [steps], seed=key, minval=None, maxval=None, dtype=tf.int64
        )
        return tf.data.Dataset.from_tensor_slices(values)

    def one_epoch(epoch):
        order = tf.data.Dataset.from_tensor_slices(_permutation(n, seed, epoch)).batch(batch_size)
        return tf.data.Dataset.zip(order, *(draws(offset, epoch) for offset in _DRAW_OFFSETS))

    return tf.data.Dataset.range(first_epoch, _ENDLESS).flat_map(one_epoch)


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
