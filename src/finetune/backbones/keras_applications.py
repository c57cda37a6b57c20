"""Keras Applications backbones (VGG16, ResNet50, MobileNetV2, MobileNetV3Small, EfficientNetB0).

Their ImageNet weights are the files Keras itself downloads into its cache
(`$KERAS_HOME/models`, by default `~/.keras/models`). We look there first, under Keras' own file
names, so weights a user already has are found; only when the file is absent do we ask Keras to
download it (`keras.utils.get_file`), unless `FINETUNE_OFFLINE=1` forbids the network. A user can
also give a local weights file. A missing file gives an error naming the file and where to put it.
Every file is checked with `finetune.untrusted.check_h5_file` before Keras opens it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras

from finetune.backbones.registry import (
    BackboneSpec,
    Preprocessing,
    WeightsStatus,
    register_backbone,
)
from finetune.errors import WeightsError
from finetune.untrusted import check_h5_file

_GCS = "https://storage.googleapis.com/"


def keras_models_dir() -> Path:
    """The folder where Keras caches downloaded application weights."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "models"


def downloads_allowed() -> bool:
    """False when `FINETUNE_OFFLINE` is set to a true value."""
    return os.environ.get("FINETUNE_OFFLINE", "").lower() not in ("1", "true", "yes")


@dataclass(frozen=True)
class KerasApplicationWeights:
    """ImageNet weights of one Keras Applications model, in Keras' HDF5 format and cache.

    Args:
        top_file: Keras' file name of the weights with the ImageNet head.
        notop_file: Keras' file name of the weights without the head.
        base_url: where Keras downloads both files from.
    """

    top_file: str
    notop_file: str
    base_url: str
    description: str = "Keras Applications ImageNet weights (Keras cache or download)"

    def _file(self, include_top: bool) -> str:
        return self.top_file if include_top else self.notop_file

    def status(self, include_top: bool = False) -> WeightsStatus:
        path = keras_models_dir() / self._file(include_top)
        return WeightsStatus(
            available=path.is_file(),
            location=str(path),
            how_to_get=self._how_to_get(include_top),
        )

    def _how_to_get(self, include_top: bool) -> str:
        name = self._file(include_top)
        return (
            f"download {self.base_url}{name} and place it at {keras_models_dir() / name}, "
            "or pass the path of a weights file with --weights PATH"
        )

    def load_into(self, model: keras.Model, include_top: bool = False) -> None:
        name = self._file(include_top)
        path = keras_models_dir() / name
        if not path.is_file():
            if not downloads_allowed():
                raise WeightsError(
                    f"ImageNet weights for {model.name} are not on this machine: {path} is "
                    f"missing and downloads are off (FINETUNE_OFFLINE). To fix it, "
                    f"{self._how_to_get(include_top)}."
                )
            try:
                path = Path(keras.utils.get_file(name, self.base_url + name, cache_subdir="models"))
            except Exception as err:  # any network failure becomes one clear message
                raise WeightsError(
                    f"could not download the ImageNet weights {name} ({err}). To fix it, "
                    f"{self._how_to_get(include_top)}."
                ) from None
        self.load_file(model, str(path), include_top)

    def load_file(self, model: keras.Model, path: str, include_top: bool = False) -> None:
        if not Path(path).is_file():
            raise WeightsError(f"weights file {path} does not exist.")
        if not str(path).endswith(".h5"):
            raise WeightsError(
                f"weights file {path} is not a Keras HDF5 weights file (.h5 or .weights.h5)."
            )
        # Before Keras opens it: no links or datasets in other files, no whole (legacy) model.
        check_h5_file(path, f"weights file {path}")
        try:
            model.load_weights(path)
        except Exception as err:  # h5py and Keras raise many types for a bad file
            raise WeightsError(
                f"weights file {path} does not fit {model.name} "
                f"({'with' if include_top else 'without'} the ImageNet head): {err}"
            ) from None


def _builder(app: Callable[..., keras.Model], **kwargs) -> Callable[[int, bool], keras.Model]:
    def build(image_size: int, include_top: bool) -> keras.Model:
        extra = {"classifier_activation": None} if include_top else {}
        return app(
            include_top=include_top,
            weights=None,
            input_shape=(image_size, image_size, 3),
            **kwargs,
            **extra,
        )

    return build


_CAFFE = Preprocessing(mean=(103.939, 116.779, 123.68), std=(1.0, 1.0, 1.0), channel_order="bgr")
# These two Keras models normalise inside themselves and take raw [0, 255] pixels.
_RAW = Preprocessing()
_EFFICIENTNET_GROUPS = (
    ("stem", r"(rescaling|normalization|stem_)"),
    *((f"block{i}", rf"block{i}[a-z]_") for i in range(1, 8)),
    ("top", r"top_"),
)
_APPLICATIONS = _GCS + "tensorflow/keras-applications/"

register_backbone(
    BackboneSpec(
        name="vgg16",
        family="keras_applications",
        description="VGG16 (Keras Applications)",
        build=_builder(keras.applications.VGG16),
        weights=KerasApplicationWeights(
            "vgg16_weights_tf_dim_ordering_tf_kernels.h5",
            "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
            _APPLICATIONS + "vgg16/",
        ),
        input_size=224,
        preprocessing=_CAFFE,
        layer_groups=tuple((f"block{i}", rf"block{i}_") for i in range(1, 6)),
    )
)
register_backbone(
    BackboneSpec(
        name="resnet50",
        family="keras_applications",
        description="ResNet50 (Keras Applications)",
        build=_builder(keras.applications.ResNet50),
        weights=KerasApplicationWeights(
            "resnet50_weights_tf_dim_ordering_tf_kernels.h5",
            "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
            _APPLICATIONS + "resnet/",
        ),
        input_size=224,
        preprocessing=_CAFFE,
        layer_groups=(
            ("conv1", r"(conv1|pool1)_"),
            *((f"conv{i}", rf"conv{i}_") for i in range(2, 6)),
        ),
    )
)
register_backbone(
    BackboneSpec(
        name="mobilenet_v2",
        family="keras_applications",
        description="MobileNetV2 1.0 (Keras Applications)",
        build=_builder(keras.applications.MobileNetV2),
        weights=KerasApplicationWeights(
            "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224.h5",
            "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
            _APPLICATIONS + "mobilenet_v2/",
        ),
        input_size=224,
        preprocessing=Preprocessing(mean=(127.5,) * 3, std=(127.5,) * 3),
        layer_groups=(
            ("stem", r"(Conv1|bn_Conv1|expanded_conv_)"),
            ("stage2", r"block_[12]_"),
            ("stage3", r"block_[345]_"),
            ("stage4", r"block_[6789]_"),
            ("stage5", r"block_1[012]_"),
            ("stage6", r"block_1[345]_"),
            ("stage7", r"block_16_"),
            ("top", r"(Conv_1|out_relu)"),
        ),
    )
)
register_backbone(
    BackboneSpec(
        name="mobilenet_v3_small",
        family="keras_applications",
        description="MobileNetV3Small 1.0 (Keras Applications)",
        build=_builder(keras.applications.MobileNetV3Small, include_preprocessing=True),
        weights=KerasApplicationWeights(
            "weights_mobilenet_v3_small_224_1.0_float.h5",
            "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5",
            _APPLICATIONS + "mobilenet_v3/",
        ),
        input_size=224,
        preprocessing=_RAW,
        layer_groups=(
            ("stem", r"(rescaling|conv$|conv_bn$|expanded_conv_[a-z])"),
            ("stage2", r"expanded_conv_[12]_"),
            ("stage3", r"expanded_conv_[345]_"),
            ("stage4", r"expanded_conv_[67]_"),
            ("stage5", r"expanded_conv_(8|9|10)_"),
            ("top", r"conv_1"),
        ),
    )
)
register_backbone(
    BackboneSpec(
        name="efficientnet_b0",
        family="keras_applications",
        description="EfficientNetB0 (Keras Applications)",
        build=_builder(keras.applications.EfficientNetB0),
        weights=KerasApplicationWeights(
            "efficientnetb0.h5",
            "efficientnetb0_notop.h5",
            _GCS + "keras-applications/",
        ),
        input_size=224,
        preprocessing=_RAW,
        layer_groups=_EFFICIENTNET_GROUPS,
    )
)
