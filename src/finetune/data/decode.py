"""One hardened image loader for training and prediction alike.

Every image finetune reads goes through `load_image`, so a picture is decoded the same way when a
model is trained and when it is later asked to predict. The loader accepts JPEG, PNG, BMP, GIF and
WebP (identified by content, not by name), refuses decompression bombs, honours the EXIF
orientation, keeps only the first frame of an animation and turns every colour mode into 8-bit RGB.
Transparent pixels are composited on WHITE, the background a viewer usually shows behind a
transparent product photo. Any failure becomes an `ImageDecodeError` carrying the path and a short
reason, so callers can report the file and carry on; `decode_images` does exactly that for a whole
list of files, decoding in a thread pool because Pillow releases the GIL while decoding.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from finetune.errors import ConfigError, DataError, ImageDecodeError

__all__ = [
    "IMAGE_EXTENSIONS",
    "INTERPOLATIONS",
    "MAX_IMAGE_PIXELS",
    "BadFile",
    "decode_images",
    "default_workers",
    "for_each_in_threads",
    "is_image_file",
    "is_text",
    "load_image",
    "shown_path",
]

#: File name endings treated as images when scanning a folder (compared in lower case).
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"})

#: Largest image (width x height, as declared in the file header) the loader accepts. It equals
#: Pillow's own default warning limit: ~89.5 megapixels, 256 MiB once decoded as RGB. Anything
#: bigger is far more than a classifier needs and is treated as a possible decompression bomb.
MAX_IMAGE_PIXELS: int = 89_478_485

#: Interpolation names accepted by `load_image`, mapped to Pillow resampling filters. The Keras
#: names (`area`, `lanczos3`, `lanczos5`) are accepted as aliases of their closest Pillow filter.
INTERPOLATIONS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "lanczos3": Image.Resampling.LANCZOS,
    "lanczos5": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "area": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}

# Pillow can open dozens of formats; most are rarely used and their decoders see little scrutiny.
# Restricting identification to the formats we promise shrinks what a hostile file can reach.
_PILLOW_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP")

# Modes whose pixels may carry transparency that must be composited rather than dropped.
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})

# Serialises `Image.open` (header parsing only, cheap) so that the temporary warnings filter that
# turns Pillow's DecompressionBombWarning into an exception is not raced by our own threads:
# `warnings.catch_warnings` swaps process-global state.
_OPEN_LOCK = threading.Lock()

_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


@dataclass(frozen=True)
class BadFile:
    """A file that could not be decoded, with the reason shown to the user.

    Args:
        path: the file that failed, as shown to people: bytes of its name that are not UTF-8
            appear as `\\xNN` escapes (see `shown_path`), so it can be printed and stored in JSON.
        reason: a short human-readable reason ("truncated or corrupt image data", ...).
    """

    path: Path
    reason: str


def is_text(name: str) -> bool:
    """True when a name (or path) is valid Unicode text, i.e. came from valid UTF-8 bytes.

    Python decodes undecodable bytes in file names to lone surrogates, which cannot be written
    to a UTF-8 file, printed to a UTF-8 terminal or stored in JSON.
    """
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def shown_path(path: str | os.PathLike[str]) -> Path:
    """The path itself when it is text, else the same path with each non-UTF-8 byte as `\\xNN`."""
    text = os.fspath(path)
    if is_text(text):
        return Path(text)
    return Path(os.fsencode(text).decode("utf-8", "backslashreplace"))


def is_image_file(path: str | os.PathLike[str]) -> bool:
    """Tells whether a file name has one of the `IMAGE_EXTENSIONS` (case-insensitive).

    Args:
        path: the file name or path; only its suffix is looked at.

    Returns:
        True if the suffix, in lower case, is an image extension.
    """
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _resampling(interpolation: str) -> Image.Resampling:
    """Maps an interpolation name to a Pillow filter, or raises ConfigError listing valid names."""
    try:
        return INTERPOLATIONS[interpolation.lower()]
    except (KeyError, AttributeError):
        valid = ", ".join(INTERPOLATIONS)
        raise ConfigError(
            f"unknown interpolation {interpolation!r}; choose one of: {valid}"
        ) from None


def _check_size(size: int | None) -> None:
    """Raises ConfigError unless size is None or a positive integer."""
    if size is None:
        return
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1:
        raise ConfigError(f"image size must be a positive integer, got {size!r}")


def _bomb_reason(pixels: int | None) -> str:
    if pixels is None:
        return "image too large, possible decompression bomb"
    return f"image too large ({pixels} pixels), possible decompression bomb"


def _high_bit_depth_to_rgb(img: Image.Image) -> Image.Image:
    """Scales a 16/32-bit integer or float grey image to 8-bit RGB.

    Pillow's own `convert("L")` clips I;16 values above 255 to white instead of scaling them, which
    would turn almost every 16-bit photo into a white square.
    """
    arr = np.asarray(img)
    if img.mode == "F":
        # A float image has no declared range; follow Pillow's convention for "F" -> "L"
        # (values are already 0..255) and clip anything outside.
        grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    else:
        # I;16* holds 0..65535; mode "I" is how older Pillow versions open 16-bit PNGs, so it is
        # read as the same range. round(v * 255 / 65535) maps 0 -> 0, 32768 -> 128, 65535 -> 255.
        wide = np.clip(arr.astype(np.int64), 0, 65535)
        grey = ((wide * 255 + 32767) // 65535).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(grey), mode="L").convert("RGB")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Converts any Pillow mode to RGB, compositing transparency on white."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I") or mode == "F":
        return _high_bit_depth_to_rgb(img)
    if mode in _ALPHA_MODES or "transparency" in img.info:
        # convert("RGBA") applies a palette's or a colour key's transparency; compositing (rather
        # than convert("RGB")) keeps hidden colours under transparent pixels from showing up.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    # L, 1, P, CMYK (Adobe-inverted CMYK is already undone by Pillow's JPEG decoder), YCbCr...
    return img.convert("RGB")


def load_image(
    path: str | os.PathLike[str],
    size: int | None = None,
    interpolation: str = "bilinear",
) -> np.ndarray:
    """Decodes one image file into an RGB array, optionally resized to a square.

    The file is identified by content (JPEG, PNG, BMP, GIF or WebP). Its EXIF orientation is
    applied, only the first frame of an animation is used, any colour mode becomes RGB (transparent
    pixels are composited on white, 16-bit grey is scaled to 8 bits) and the pixel data is decoded
    in full so that a truncated file fails here, not later. With `size` the image is resized to
    exactly `size` x `size` without cropping, as Keras' `image_dataset_from_directory` does; large
    JPEGs are first decoded at a reduced scale (never below `size`), which is much faster.

    Args:
        path: the image file.
        size: side of the square output in pixels, or None to keep the image's own size.
        interpolation: resampling filter used to resize: one of `INTERPOLATIONS`
            (nearest, bilinear, bicubic, lanczos, box, hamming, and Keras' aliases).

    Returns:
        A C-contiguous uint8 array of shape (height, width, 3), RGB.

    Raises:
        ImageDecodeError: the file is missing, empty, not an image of a supported format, too
            large (possible decompression bomb), truncated or otherwise corrupt.
        ConfigError: `size` is not a positive integer or `interpolation` is unknown.
    """
    _check_size(size)
    if size is not None:
        size = int(size)  # a numpy integer would upset Pillow's resize
    resample = _resampling(interpolation)
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ImageDecodeError(path, "file not found") from None
    except PermissionError:
        raise ImageDecodeError(path, "permission denied") from None
    except OSError as exc:
        raise ImageDecodeError(path, f"cannot read file ({exc.strerror or exc})") from None
    if not stat.S_ISREG(info.st_mode):
        raise ImageDecodeError(path, "not a regular file (a folder, device or pipe)")
    if info.st_size == 0:
        raise ImageDecodeError(path, "empty file")

    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            # Pillow warns above its limit and raises above twice the limit; both must refuse.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path, formats=_PILLOW_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        match = _BOMB_PIXELS.search(str(exc))
        raise ImageDecodeError(path, _bomb_reason(int(match[1]) if match else None)) from None
    except UnidentifiedImageError:
        raise ImageDecodeError(
            path, "not an image file (or not JPEG, PNG, BMP, GIF or WebP)"
        ) from None
    except PermissionError:
        raise ImageDecodeError(path, "permission denied") from None
    except Exception:
        # A header that is recognised but malformed (bad chunk, bad dimensions...).
        raise ImageDecodeError(path, "truncated or corrupt image data") from None

    with img:
        width, height = img.size
        pixels = width * height
        # Pillow's limit is a process-wide setting a user or library may have raised or disabled;
        # ours holds regardless.
        if pixels > MAX_IMAGE_PIXELS:
            raise ImageDecodeError(path, _bomb_reason(pixels))
        if width < 1 or height < 1:
            raise ImageDecodeError(path, "truncated or corrupt image data")
        try:
            if size is not None and img.format in ("JPEG", "MPO"):
                # DCT-domain downscaling by 1/2, 1/4 or 1/8, chosen by Pillow so both sides stay
                # >= size: several times faster than decoding a 12 MP photo in full.
                img.draft("RGB", (size, size))
            img.load()
            try:
                # Read the orientation before anything else touches the image; a broken EXIF
                # block must not cost a photo whose pixels decode fine, so it is ignored.
                oriented = ImageOps.exif_transpose(img)
            except Exception:
                oriented = img
            rgb = _to_rgb(oriented)
            if size is not None and rgb.size != (size, size):
                rgb = rgb.resize((size, size), resample=resample)
            array = np.asarray(rgb, dtype=np.uint8)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageDecodeError(path, _bomb_reason(pixels)) from None
        except MemoryError:
            raise ImageDecodeError(path, "not enough memory to decode this image") from None
        except Exception:
            # Pillow reports damaged data through many types (OSError "image file is truncated",
            # SyntaxError, ValueError, EOFError, zlib.error, struct.error...). All mean the same
            # to the user, and one bad file must never stop a run.
            raise ImageDecodeError(path, "truncated or corrupt image data") from None

    if array.ndim != 3 or array.shape[2] != 3:  # defensive: _to_rgb always yields RGB
        raise ImageDecodeError(path, f"unexpected decoded shape {array.shape}")
    return np.ascontiguousarray(array)


def default_workers() -> int:
    """Number of CPUs this process may use (respecting affinity), at most 16."""
    try:
        available = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        available = os.cpu_count() or 1
    return max(1, min(16, available))


def for_each_in_threads(
    work: Callable[[int], None], n: int, workers: int, description: str, progress: bool
) -> None:
    """Calls `work(i)` for i in range(n) in a thread pool, with an optional progress bar.

    Pillow releases the GIL while it decodes, so threads use every core. `work` stores its own
    results; an exception it raises (a bug, not a bad file) is re-raised here, and Ctrl-C or
    such an error cancels the queued calls instead of waiting for them.

    Args:
        work: called once per index.
        n: number of calls.
        workers: threads, at most `n`.
        description: the progress bar's label.
        progress: show a progress bar on stderr.
    """
    bar = None
    if progress and n:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
    executor = ThreadPoolExecutor(max_workers=max(1, min(workers, n)), thread_name_prefix="io")
    try:
        if bar is not None:
            bar.start()
            task = bar.add_task(description, total=n)
        futures: list[Future[None]] = [executor.submit(work, i) for i in range(n)]
        for future in as_completed(futures):
            future.result()
            if bar is not None:
                bar.advance(task)
    except BaseException:
        executor.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        if bar is not None:
            bar.stop()
    executor.shutdown(wait=True)


def decode_images(
    paths: Sequence[str | os.PathLike[str]],
    size: int,
    interpolation: str = "bilinear",
    workers: int | None = None,
    progress: bool = True,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, list[int], list[BadFile]]:
    """Decodes many image files into one array, skipping (and reporting) those that fail.

    Files are decoded with `load_image` in a thread pool; results keep the input order whatever
    order the threads finish in.

    Args:
        paths: the image files.
        size: side of the square each image is resized to.
        interpolation: resampling filter name (see `load_image`).
        workers: number of decoding threads; default: the CPUs available, at most 16.
        progress: show a "Decoding images" progress bar on stderr.
        out: the uint8 array (len(paths), size, size, 3) to decode into (a memory-mapped one,
            say). Defaults to None (a new array).

    Returns:
        `(images, ok_indices, bad)`: `images` is a uint8 array of shape (N_ok, size, size, 3)
        (the first rows of `out`, if given); `ok_indices[i]` is the position in `paths` of
        `images[i]`, ascending; `bad` lists the files that failed, in input order, each with its
        reason.

    Raises:
        ConfigError: `size`, `interpolation` or `workers` is not valid.
        ValueError: `out` is not a uint8 array of that shape.
    """
    if size is None:
        raise ConfigError("decode_images needs an image size to stack images of equal shape")
    _check_size(size)
    size = int(size)
    _resampling(interpolation)
    if workers is None:
        workers = default_workers()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be a positive integer, got {workers!r}")

    n = len(paths)
    if out is None:
        # Preallocated so peak memory is one copy of the dataset, not a list of arrays plus a
        # stack.
        out = np.empty((n, size, size, 3), dtype=np.uint8)
    elif out.shape != (n, size, size, 3) or out.dtype != np.uint8:
        raise ValueError(
            f"out must be a uint8 array of shape {(n, size, size, 3)}, got {out.dtype} {out.shape}"
        )
    ok = np.zeros(n, dtype=bool)
    reasons: dict[int, str] = {}

    def work(index: int) -> None:
        try:
            out[index] = load_image(paths[index], size, interpolation)
            ok[index] = True
        except ImageDecodeError as exc:
            reasons[index] = exc.reason

    for_each_in_threads(work, n, workers, "Decoding images", progress)

    ok_indices = [int(i) for i in np.flatnonzero(ok)]
    if len(ok_indices) < n:
        # Compact in place, keeping order: target slot j never exceeds source slot i.
        for j, i in enumerate(ok_indices):
            if i != j:
                out[j] = out[i]
        # A view: the few failed slots stay allocated, which is cheaper than copying everything.
        out = out[: len(ok_indices)]
    bad = [BadFile(shown_path(paths[i]), reasons[i]) for i in sorted(reasons)]
    return out, ok_indices, bad


def decode_within(
    paths: Sequence[str | Path],
    size: int,
    *,
    interpolation: str = "bilinear",
    progress: bool = True,
    max_memory_gb: float = 8.0,
    spill_dir: str | Path | None = None,
    source: str | Path = "the images",
    limit_name: str = "data.max_memory_gb",
    advice: str = "point TMPDIR to a larger disk, or give fewer images at a time.",
) -> tuple[np.ndarray, list[int], list[BadFile]]:
    """`decode_images`, into a memory-mapped temporary file in `spill_dir` when the decoded
    images would take more than `max_memory_gb` (see `prepare_image_data`).

    `source` names the images and `limit_name` the limit in messages. Raises `DataError`,
    ending with `advice`, when they go to disk and `spill_dir` (`TMPDIR` if None) has no room
    for them.
    """
    shape = (len(paths), size, size, 3)
    spill = None
    if np.prod(shape) > max_memory_gb * 2**30:
        above = f"above {max_memory_gb:g} GiB ({limit_name})"
        spill = _spill_array(source, shape, above, spill_dir, progress, advice)
    return decode_images(paths, size, interpolation=interpolation, progress=progress, out=spill)


def _spill_array(
    source: str | Path,
    shape: tuple[int, ...],
    above: str,
    spill_dir: str | Path | None,
    progress: bool,
    advice: str,
) -> np.memmap:
    """The memory-mapped uint8 array decoded images go to when they are `above` the limit:
    an anonymous temporary file in `spill_dir` (never listed in it on Linux, deleted when its
    mapping closes elsewhere), its space reserved first where the system can (a full disk is
    then a `DataError` here, not a SIGBUS while decoding). `advice` ends the message when there
    is no room.
    """
    needed = int(np.prod(shape))
    where = Path(spill_dir) if spill_dir is not None else Path(tempfile.gettempdir())

    def no_room(free: int, why: str = "") -> DataError:
        return DataError(
            f"{source}: the decoded images take {_size(needed)}, {above}, so they go to a file "
            f"in {where}, but {why or f'it has {_size(free)} free'}. Free space there, {advice}"
        )

    try:
        where.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(where).free
    except OSError as error:  # read-only, say
        raise no_room(0, f"it cannot be written ({error.strerror})") from error
    if needed + _DISK_MARGIN > free:
        raise no_room(free)
    if progress:
        print(
            f"{source}: the decoded images take {_size(needed)}, {above}: they go to a "
            f"memory-mapped file in {where}, not kept, and are read from there.",
            file=sys.stderr,
            flush=True,
        )
    try:  # closed by the `with` below
        file = tempfile.TemporaryFile(prefix="finetune-images-", dir=where)  # noqa: SIM115
    except OSError as error:
        raise no_room(0, f"it cannot be written ({error.strerror})") from error
    with file:
        try:
            _reserve(file, needed)
        except OSError as error:
            if error.errno in _DISK_FULL:
                raise no_room(shutil.disk_usage(where).free) from error
            # a file too large for the file system (FAT32), say
            raise no_room(0, f"it cannot hold a file that large ({error.strerror})") from error
        # The mapping holds the file open on its own once this one is closed.
        return np.memmap(file, dtype=np.uint8, mode="r+", shape=shape)


def _reserve(file: BinaryIO, size: int) -> None:
    """Makes `file` `size` bytes long, its blocks reserved on disk where the system can (a
    full disk or quota then fails here, with `_DISK_FULL`, not when a page is written)."""
    try:
        os.posix_fallocate(file.fileno(), 0, size)
        return
    except AttributeError:  # no posix_fallocate here (Windows, macOS)
        pass
    except OSError as error:
        if error.errno in _DISK_FULL:
            raise
        # a file system that cannot reserve: the length alone
    file.truncate(size)


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.0f} MiB"


# Disk space left free beyond the decoded images when they spill.
_DISK_MARGIN = 256 * 2**20
