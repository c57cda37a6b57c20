"""The registry of pretrained backbones, keyed by name.

Each entry (`BackboneSpec`) carries everything the rest of the package derives from the backbone,
so nothing is typed twice: how to build the architecture, where its pretrained weights come from,
its native input size and normalisation, and its layer groups (bottom to top) used for freezing and
for per-group learning rates. Families register their entries with `register_backbone`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import keras

from finetune.errors import ConfigError


@dataclass(frozen=True)
class Preprocessing:
    """How raw RGB pixels in [0, 255] become the backbone's input.

    The classifier applies `(x[..., order] - mean) / std` as its first layer, so a saved model takes
    plain RGB pixels and the data pipeline only resizes.

    Args:
        mean: per-channel mean, in the channel order given by `channel_order`.
            Defaults to zeros (the backbone normalises inside itself).
        std: per-channel standard deviation. Defaults to ones.
        channel_order: "rgb", or "bgr" for Caffe-style networks. Defaults to "rgb".
        interpolation: resize method used by the data pipeline. Defaults to "bilinear".
    """

    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    channel_order: str = "rgb"
    interpolation: str = "bilinear"


@dataclass(frozen=True)
class WeightsStatus:
    """Whether pretrained weights can be loaded on this machine right now.

    Args:
        available: True when loading will not need the network.
        location: the file the weights come from (or would be expected at).
        how_to_get: what a user does to make them available, when they are not.
    """

    available: bool
    location: str
    how_to_get: str = ""


class WeightsSource(Protocol):
    """Where a backbone's pretrained weights come from."""

    description: str

    def status(self, include_top: bool = False) -> WeightsStatus:
        """Tells whether the weights are on this machine, without loading them."""
        ...

    def load_into(self, model: keras.Model, include_top: bool = False) -> None:
        """Loads the pretrained weights into a freshly built `model`.

        Raises:
            WeightsError: when the weights are missing, unreadable or refused as unsafe.
        """
        ...

    def load_file(self, model: keras.Model, path: str, include_top: bool = False) -> None:
        """Loads weights from a local file given by the user, in this family's format.

        Raises:
            WeightsError: when the file is missing, unreadable, refused as unsafe, or does not
                match the architecture; the message names the file.
        """
        ...


# build(image_size, include_top) -> keras.Model with random weights. With include_top the model
# ends in the 1000-class ImageNet logits (no softmax); without it, in the last feature map.
Builder = Callable[[int, bool], keras.Model]


@dataclass(frozen=True)
class BackboneSpec:
    """One registry entry.

    Args:
        name: registry key, e.g. "efficientnet_lite0".
        family: a short family name, e.g. "efficientnet_lite" or "keras_applications".
        build: `build(image_size, include_top)` returning the architecture with random weights.
        weights: the `WeightsSource` of the ImageNet weights.
        input_size: the resolution the weights were trained at.
        preprocessing: the input normalisation the weights expect.
        layer_groups: ordered (bottom to top) pairs `(group_name, regex)`; a layer belongs to the
            first group whose regex matches its name with `re.match`.
        min_input_size: the smallest input side the architecture accepts. Defaults to 32.
        top_is_logits: True when the ImageNet head returns logits, False for probabilities.
            Defaults to True.
    """

    name: str
    family: str
    build: Builder
    weights: WeightsSource
    input_size: int
    preprocessing: Preprocessing
    layer_groups: tuple[tuple[str, str], ...]
    min_input_size: int = 32
    top_is_logits: bool = True
    description: str = field(default="")

    @property
    def group_names(self) -> list[str]:
        """The layer group names, bottom to top."""
        return [name for name, _ in self.layer_groups]

    def group_of(self, layer_name: str) -> str | None:
        """Returns the group a backbone layer belongs to, or None when no pattern matches."""
        for group, pattern in self.layer_groups:
            if re.match(pattern, layer_name):
                return group
        return None


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Adds `spec` to the registry under `spec.name`.

    Raises:
        ValueError: if the name is already registered.
    """
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def _ensure_families_loaded() -> None:
    # Importing the family modules registers their entries; done lazily so that importing
    # `finetune` stays cheap.
    from finetune.backbones import efficientnet_lite, keras_applications  # noqa: F401


def list_backbones() -> list[BackboneSpec]:
    """Returns every registered backbone, in registration order."""
    _ensure_families_loaded()
    return list(_REGISTRY.values())


def has_backbone(name: str) -> bool:
    """True when `name` is a registered backbone."""
    _ensure_families_loaded()
    return name in _REGISTRY


def get_backbone(name: str) -> BackboneSpec:
    """Returns the registry entry called `name`.

    Raises:
        ConfigError: if no backbone has that name; the message lists the known names.
    """
    _ensure_families_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise ConfigError(
            f"unknown backbone {name!r}. Known backbones: {known}. "
            "Run `finetune backbones` to see them with their weights status."
        ) from None


def load_backbone(
    name: str,
    *,
    image_size: int | None = None,
    weights: str | None = "imagenet",
    include_top: bool = False,
) -> keras.Model:
    """Builds a registered backbone and loads its weights.

    Args:
        name: the registry key.
        image_size: input side in pixels. Defaults to the backbone's native size.
        weights: "imagenet" for the pretrained weights, None for random initialisation, or the
            path of a local weights file in the family's format. Defaults to "imagenet".
        include_top: keep the 1000-class ImageNet head. Defaults to False.

    Returns:
        A `keras.Model`. Its input takes normalised pixels (see `BackboneSpec.preprocessing`).

    Raises:
        ConfigError: unknown name, or an image size below the backbone's minimum.
        WeightsError: pretrained weights missing or unreadable.

    Example:
        >>> backbone = load_backbone("efficientnet_lite0", image_size=128)  # doctest: +SKIP
    """
    spec = get_backbone(name)
    size = image_size or spec.input_size
    if size < spec.min_input_size:
        raise ConfigError(
            f"image_size {size} is too small for backbone {name!r}: "
            f"use at least {spec.min_input_size} pixels."
        )
    model = spec.build(size, include_top)
    if weights == "imagenet":
        spec.weights.load_into(model, include_top=include_top)
    elif weights is not None:
        spec.weights.load_file(model, str(weights), include_top=include_top)
    return model
