"""The classifier: a pretrained backbone under a new head, and freezing by layer group.

`build_classifier` returns a plain `keras.Model` that takes RGB pixels in [0, 255] at the training
size and returns class logits: `Normalize` (the backbone's own preprocessing) -> the backbone
(a nested model called "backbone") -> pooling -> optional hidden ReLU Dense layers -> dropout ->
a Dense output layer without activation (the loss is built `from_logits=True`). Because the
normalisation is the model's first layer, a saved or exported model needs no preprocessing code
beside it.
"""

from __future__ import annotations

import warnings

import keras
from keras import ops

from finetune.backbones.registry import BackboneSpec, Preprocessing, load_backbone
from finetune.config import ModelConfig

BACKBONE_LAYER = "backbone"


@keras.saving.register_keras_serializable(package="finetune")
class Normalize(keras.layers.Layer):
    """Turns RGB pixels in [0, 255] into a backbone's input: `(x[..., order] - mean) / std`.

    Args:
        mean: per-channel mean, in the output channel order.
        std: per-channel standard deviation.
        channel_order: "rgb" keeps the channels, "bgr" reverses them (Caffe-style networks).
            Defaults to "rgb".

    Example:
        >>> Normalize(mean=(127.0,) * 3, std=(128.0,) * 3)(np.full((1, 2, 2, 3), 255.0))
    """

    def __init__(self, mean, std, channel_order: str = "rgb", **kwargs):
        super().__init__(**kwargs)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.channel_order = channel_order

    @classmethod
    def from_preprocessing(cls, pre: Preprocessing, **kwargs) -> Normalize:
        """Builds the layer from a registry entry's `Preprocessing`."""
        return cls(pre.mean, pre.std, pre.channel_order, **kwargs)

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        if self.channel_order == "bgr":
            x = ops.flip(x, axis=-1)
        mean = ops.convert_to_tensor(self.mean, dtype=self.compute_dtype)
        std = ops.convert_to_tensor(self.std, dtype=self.compute_dtype)
        return (x - mean) / std

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "mean": list(self.mean),
            "std": list(self.std),
            "channel_order": self.channel_order,
        }


def build_classifier(
    spec: BackboneSpec,
    num_classes: int,
    *,
    image_size: int,
    head: ModelConfig | None = None,
    weights: str | None = "imagenet",
) -> keras.Model:
    """Builds backbone + new head as one `keras.Model` returning logits.

    Args:
        spec: the backbone's registry entry.
        num_classes: number of output classes.
        image_size: input side in pixels.
        head: pooling, hidden units and dropout. Defaults to `ModelConfig()`.
        weights: "imagenet", None for random initialisation, or a local weights file path.
            Defaults to "imagenet".

    Returns:
        A `keras.Model` mapping (batch, size, size, 3) RGB pixels in [0, 255] to logits.

    Raises:
        WeightsError: pretrained weights are missing or unreadable.
    """
    head = head or ModelConfig()
    backbone = load_backbone(spec.name, image_size=image_size, weights=weights)
    backbone.name = BACKBONE_LAYER
    inputs = keras.Input(shape=(image_size, image_size, 3), name="image")
    x = Normalize.from_preprocessing(spec.preprocessing, name="normalize")(inputs)
    x = backbone(x)
    if head.pooling == "avg":
        x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    elif head.pooling == "max":
        x = keras.layers.GlobalMaxPooling2D(name="pool")(x)
    else:
        x = keras.layers.Flatten(name="pool")(x)
    for i, units in enumerate(head.hidden_units):
        x = keras.layers.Dense(units, activation="relu", name=f"head_dense_{i}")(x)
    x = keras.layers.Dropout(head.dropout, name="head_dropout")(x)
    outputs = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=f"{spec.name}_classifier")


def backbone_of(model: keras.Model) -> keras.Model:
    """Returns the nested backbone model of a classifier made by `build_classifier`."""
    return model.get_layer(BACKBONE_LAYER)


def sublayers(model: keras.layers.Layer) -> list[keras.layers.Layer]:
    """Every layer inside `model`, nested models included (depth first)."""
    found = []
    for layer in getattr(model, "layers", []):
        found.append(layer)
        found.extend(sublayers(layer))
    return found


def is_batchnorm(layer: keras.layers.Layer) -> bool:
    """True for BatchNormalization layers (whose statistics fine-tuning must protect)."""
    return isinstance(layer, keras.layers.BatchNormalization)


def freeze_backbone(model: keras.Model) -> None:
    """Freezes the whole backbone; its BatchNorm layers then run in inference mode.

    In Keras 3 a layer with `trainable=False` also runs BatchNorm in inference mode, even inside
    `fit`, so the pretrained statistics are kept. Compile again after calling this.
    """
    backbone_of(model).trainable = False


def unfreeze_top_groups(
    model: keras.Model, spec: BackboneSpec, count: int, *, train_batchnorm: bool = False
) -> list[str]:
    """Makes the top `count` layer groups of the backbone trainable; the rest stay frozen.

    Args:
        model: a classifier made by `build_classifier`.
        spec: its backbone's registry entry (which defines the groups).
        count: how many groups from the top; -1 means all of them.
        train_batchnorm: let BatchNorm layers of unfrozen groups train (and update their
            statistics). Defaults to False: they stay frozen, in inference mode.

    Returns:
        The names of the unfrozen groups, bottom to top. Compile again after calling this.
    """
    groups = spec.group_names
    chosen = groups if count == -1 else groups[len(groups) - min(count, len(groups)) :]
    backbone = backbone_of(model)
    backbone.trainable = True
    for layer in backbone.layers:
        in_group = spec.group_of(layer.name) in chosen
        layer.trainable = in_group and (train_batchnorm or not is_batchnorm(layer))
    return list(chosen)


def trainable_weight_count(model: keras.Model) -> int:
    """Number of scalar weights the optimizer will update."""
    return int(sum(ops.size(w) for w in model.trainable_weights))


class BatchNormWarning(UserWarning):
    """A BatchNorm layer would update its statistics inside a frozen part of a model."""


def _is_container(layer: keras.layers.Layer) -> bool:
    return isinstance(layer, keras.Model) or bool(getattr(layer, "layers", None))


def _nearest_weighted_parents(layer: keras.layers.Layer) -> list[keras.layers.Layer]:
    """The closest layers with weights upstream of `layer`, looking through weightless ones.

    Nested models are boundaries: a layer fed by a whole (frozen) backbone is new, not part of
    it, so the backbone does not count as its parent.
    """
    found, seen = [], set()
    stack = [p.operation for node in layer._inbound_nodes for p in node.parent_nodes]
    while stack:
        op = stack.pop()
        if id(op) in seen:
            continue
        seen.add(id(op))
        if _is_container(op):
            continue
        if op.weights:
            found.append(op)
        else:
            stack.extend(p.operation for node in op._inbound_nodes for p in node.parent_nodes)
    return found


def frozen_batchnorm_layers(model: keras.Model) -> list[str]:
    """Trainable BatchNorm layers inside a frozen part of `model` or of the models it nests.

    In Keras 3 a BatchNorm layer with `trainable=False` runs in inference mode, but a trainable
    one runs in training mode inside `fit`: it replaces its pretrained moving statistics with
    those of the current batches. Inside a frozen part of a network (for example after freezing
    a backbone and then unfreezing its BatchNorm layers, or freezing it layer by layer and
    skipping them) that is almost never intended, and on small batches it can ruin the
    pretrained features. A BatchNorm layer counts as inside a frozen part when the model
    holding it is frozen, or when the nearest layers with weights feeding it (looking through
    activations, additions and padding) are frozen. A new BatchNorm layer placed after a whole
    frozen backbone is not flagged.

    Returns:
        The paths ("backbone/block6a_bn", ...) of such layers; empty when there are none.
    """
    found = []

    def visit(container: keras.layers.Layer, prefix: str) -> None:
        for layer in getattr(container, "layers", []):
            path = f"{prefix}{layer.name}"
            if is_batchnorm(layer) and layer.trainable:
                parents = _nearest_weighted_parents(layer)
                frozen_container = container is not model and not container.trainable
                if frozen_container or any(not p.trainable for p in parents):
                    found.append(path)
            if _is_container(layer):
                visit(layer, f"{path}/")

    visit(model, "")
    return found


def check_batchnorm(model: keras.Model) -> list[str]:
    """Warns (`BatchNormWarning`) about `frozen_batchnorm_layers(model)` and returns them.

    Example:
        >>> base.trainable = False
        >>> for layer in base.layers:
        ...     if isinstance(layer, keras.layers.BatchNormalization):
        ...         layer.trainable = True        # BatchNorm would now train in a frozen base
        >>> finetune.check_batchnorm(model)       # warns, naming the layers
    """
    found = frozen_batchnorm_layers(model)
    if found:
        shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        warnings.warn(
            f"{len(found)} BatchNorm layer(s) of {model.name} are trainable while the layers "
            f"feeding them are frozen: {shown}. In fit() they run in training mode and replace "
            "their pretrained statistics with those of your batches. Set their trainable = False "
            "(inference mode) unless you mean to train BatchNorm alone.",
            BatchNormWarning,
            stacklevel=2,
        )
    return found


class BatchNormCheck(keras.callbacks.Callback):
    """Callback that runs `check_batchnorm` on the model when `fit` starts.

    Example:
        >>> model.fit(data, callbacks=[finetune.BatchNormCheck()])
    """

    def on_train_begin(self, logs=None):
        check_batchnorm(self.model)
