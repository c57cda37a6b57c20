"""Folding BatchNormalization into the convolution before it, for a faster forward pass; and
BatchNorm layers that train, run on TensorFlow's fused kernels.

A BatchNormalization layer in inference mode is an affine map per channel,
`y = gamma * (z - mean) / sqrt(var + eps) + beta`. After a convolution `z = W * x (+ b)` it can
be folded into that convolution: `y = (W * s) * x + s * (b - mean) + beta` with
`s = gamma / sqrt(var + eps)`. TensorFlow then runs one convolution with a bias (fused with the
activation after it) instead of a convolution followed by a multiply and an add over the whole
feature map; on EfficientNet-Lite0 the forward pass is about 1.6x as fast (see
`benchmarks/RESULTS.md`).

`fold_batchnorm` returns a new `keras.Model` that **shares** every layer and weight of the
original; each folded pair is run by a `FoldedConv` layer that computes `W * s` and the bias
from the pair's own variables on every call, by default (a few thousand numbers against
millions of activations; a `snapshot` view, below, reads them once). So the folded model is
never stale, and it can be trained: the variables are still `W` (and `b`), and the gradient
reaching them is the same as through the unfolded pair, so fitting the folded model trains the
original exactly as fitting the original would (up to float rounding).

With `snapshot=True` (TensorFlow backend), the pairs that cannot change while the view runs
(every pair of an inference view; in a training view, those whose convolution and BatchNorm
are both frozen) are read once instead, when Keras traces the view's function (`predict`,
`fit`...), and compiled into it as constants. TensorFlow then computes the folded kernel
and bias once, and oneDNN converts each kernel to its own layout once and keeps it, instead of
on every call (49 conversions per Lite0 forward pass: 4-5 ms of a 64 px batch of 32, more
than the convolutions of many layers). On EfficientNet-Lite0 inference is 1.45 / 1.15 /
1.11x as fast at 64 / 128 / 224 px, a head step through the frozen backbone 1.47 / 1.14 /
1.09x, a step of the top 3 groups 1.01-1.05x (RESULTS, ninth slice). The price: such a view
does not follow later changes to those weights. finetune makes one where it is used (a phase,
a cache fill, a predict call) and `Run.inference_model` makes a new one when the weights have
changed.

With `bfloat16=True` as well, the compiled-in pairs below everything that trains (all of an
inference view's; a training view's frozen part under its trained layers) compute in
bfloat16, with the weightless elementwise layers between them (ReLU, Add...; `_BF16_LAYERS`):
one cast of their input, bfloat16 convolutions on oneDNN's bfloat16 kernels (AVX512-BF16,
AMX), and a cast back to float32 where a layer with weights, a pooling or the output reads
them. No gradient goes through that part, and what trains computes in float32 as before.
Keras' own `mixed_bfloat16` policy was slower than float32 here (0.45-0.71x: it casts every
variable on every call); with the weights cast once, as constants, a step through the frozen
backbone of EfficientNet-Lite0 was 1.17-1.98x as fast, one of its top 3 groups over the
frozen rest 1.06-1.50x (two runs on an AMD EPYC; RESULTS, seventeenth slice). finetune uses
it where "auto" computes in bfloat16 (`finetune.inference.frozen_in_bfloat16`), after a check
of the first batch against float32 (`finetune.recipes.two_phase.bfloat16_stays_close`).

With `train_in_bfloat16=True` (a training view), the folded pairs whose convolution trains
compute in bfloat16 too, and so do the weightless elementwise layers between them: mixed
precision. Their variables stay float32; each call reads them, folds in float32 and casts the
folded kernel once (a few thousand numbers), and the gradients reaching the variables are
float32. The gradients themselves are computed in bfloat16, as with PyTorch's bfloat16
autocast: through Lite0's 49 layers they end about 16% (median over its variables) from
float32's, for the pretrained network on real images. Keras' `mixed_bfloat16` policy trained
0.36-0.40x as fast as float32 on this path; not because of the casts but because oneDNN runs
two of a depthwise convolution's bfloat16 gradients on generic kernels (up to 56 ms a step for
three calls on 2 x 2 maps): `_depthwise_conv` computes those another way
(`_strided_input_gradient`, `_swapped_filter_gradient`). `fit_phases` trains so under "auto"
on a CPU with bfloat16, after the first-batch check (benchmarks/RESULTS.md, twentieth slice).

With `train_in_bfloat16=True`, a convolution followed by a BatchNorm layer that trains
(`--train-batchnorm`) computes in bfloat16 as well, as one `MixedTrainingPair`: the
convolution in bfloat16, the normalisation and its gradient on TensorFlow's fused kernels over
the bfloat16 map, given the batch's statistics computed in float32 as Keras computes them
(the kernel's own statistics, though faster, lost accuracy here too, as in float32: below).
Casting the map to float32 around a float32 BatchNorm instead made the step no faster. On
Lite0 with every BatchNorm training a step was 1.04-1.37x as fast as in float32 at 64 and 128
px, and no faster at 224 px (0.91-1.07x; not profiled, likely the float32 copy of each map
the statistics read; RESULTS, twenty-second slice). The pretrained Lite0's training-mode
logits ended 32-34% from float64's at 64 px (5.2-5.7% with BatchNorm frozen), while the
accuracy benchmark's two recipes that train BatchNorm lost nothing measurable. The
first-batch check compares inference-mode outputs only.

A pair folds when its BatchNorm runs in inference mode:

- `frozen_only=True` (for training): the BatchNorm layer is frozen (its own `trainable`, or
  a model holding it), which in Keras 3 runs it in inference mode inside `fit`. The convolution
  may train or not.
- `frozen_only=False` (for inference: predict, evaluate, the feature cache): every pair, since
  every BatchNorm layer runs in inference mode there. The result must not be trained.

A pair is a `Conv2D` or `DepthwiseConv2D` without activation whose output goes to a
`BatchNormalization` over the last axis. Anything else (other layers, channels-first or
quantized layers) is left as it is. A convolution whose output also goes elsewhere is folded
(or paired) and kept for the other reader too: computed twice.

A BatchNorm layer that trains cannot fold: its statistics come from each batch. In a training
view (`fuse_training_batchnorm=True`, the default; TensorFlow backend, CPUs only; float32
variables) it is run by a `FusedTrainingBatchNorm` layer instead (with `train_in_bfloat16`,
together with the convolution before it, by a `MixedTrainingPair`: above): the same layer and
variables, the batch's statistics
computed as Keras computes them (`tf.nn.moments`, so the moving statistics are Keras' own), the
normalisation and its gradient by TensorFlow's fused kernels (oneDNN's on x86) given those
statistics, rather than Keras' element-wise normalisation and the autodiff of both (about a
dozen ops over the whole feature map going back). This is what `--train-batchnorm` trains: on
EfficientNet-Lite0 with every BatchNorm training a step is 1.2-1.4x as fast, with gradients as
close to float64's as Keras' own at the median (`benchmarks/RESULTS.md`, seventh slice). The
kernel's own training mode, which also computes the statistics, would be faster still
(1.2-1.8x), but oneDNN's statistics are less precise: gradients about twice as far from
float64's, and 3.3 points lower test accuracy over 8 seeds of the accuracy benchmark's least
stable recipe (RESULTS, sixth and seventh slices). It is not used in float32.

Depthwise convolutions with 5 x 5 kernels (or larger) on small maps, in a training view, get
their filter gradient another way (TensorFlow backend, CPUs only): oneDNN computes it with a
generic kernel there: 2.9-7.4 ms a call on Lite0's 16 x 16 to 2 x 2 maps at 64 px, 40% of
oneDNN's time in a whole training step. The same sum computed as one depthwise
convolution's forward pass (batch and channels swapped, `_swapped_filter_gradient`) runs on
oneDNN's fast depthwise kernel and is closer to float64. Folded pairs compute it so in
`FoldedConv`; a depthwise convolution that trains before a BatchNorm that trains is run by a
`SwappedGradientDepthwiseConv` (in float32; with `train_in_bfloat16`, `MixedTrainingPair`
computes its bfloat16 gradients by `_depthwise_conv`). Forward pass and input gradient are
TensorFlow's own. On Lite0 a whole-network step is 1.22 / 1.09 / 1.04x as fast at 64 / 128 /
224 px, a step of the top 3 groups 1.31 / 1.11 / 1.01x, one with every BatchNorm training 1.12
/ 1.03 / 1.02x (`benchmarks/depthwise_gradient.py`; RESULTS, eighth slice).
"""

from __future__ import annotations

import inspect
from typing import Any

import keras
from keras import ops
from keras.src import tree
from keras.src.backend.common.variables import AutocastScope
from keras.src.models.functional import Functional  # what clone_model's call_function needs

_CONVS = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)


def _is_foldable_conv(layer: Any) -> bool:
    if type(layer) not in _CONVS:  # subclasses (e.g. SeparableConv2D) compute something else
        return False
    return (
        layer.activation in (None, keras.activations.linear)
        and layer.data_format == "channels_last"
        and getattr(layer, "quantization_mode", None) is None
    )


def _is_foldable_batchnorm(layer: Any) -> bool:
    return type(layer) is keras.layers.BatchNormalization and layer.axis in (-1, 3)


def _frozen_layers(model: keras.Model) -> set[int]:
    """ids of the layers of `model` (nested ones included) that do not train."""
    frozen: set[int] = set()

    def visit(container: keras.layers.Layer, inherited: bool) -> None:
        for layer in getattr(container, "layers", []):
            is_frozen = inherited or not layer.trainable
            if is_frozen:
                frozen.add(id(layer))
            visit(layer, is_frozen)

    visit(model, not model.trainable)
    return frozen


# Depthwise convolutions whose filter gradient is computed as a depthwise convolution's
# forward pass (`_swapped_filter_gradient`): kernels of at least 5 x 5 taps on maps of at most
# this many pixels a side (counted on the input grid: output side times stride). Measured per
# layer on EfficientNet-Lite0 (benchmarks/RESULTS.md, eighth slice): 1.1-2.6x as fast as
# oneDNN's filter gradient there, slower for 3 x 3 kernels (except on 2 x 2 maps) and larger
# maps.
SWAPPED_GRADIENT_MAX_SIDE = 28


def _is_plain_depthwise(conv: Any, input_shape: tuple) -> bool:
    """Whether `conv` is a depthwise convolution `_depthwise_conv` can compute the gradients of
    its own way, on `input_shape`: TensorFlow backend, channels last, multiplier 1, the same
    stride both ways, no dilation, a known map size."""
    return (
        keras.backend.backend() == "tensorflow"
        and isinstance(conv, keras.layers.DepthwiseConv2D)
        and len(input_shape) == 4
        and conv.data_format == "channels_last"
        and conv.depth_multiplier == 1
        and tuple(conv.dilation_rate) == (1, 1)
        and conv.strides[0] == conv.strides[1]
        and all(d is not None for d in input_shape[1:])
    )


def _uses_swapped_gradient(conv: Any, input_shape: tuple) -> bool:
    """Whether `_depthwise_conv` computes `conv`'s float32 filter gradient by
    `_swapped_filter_gradient`."""
    if not _is_plain_depthwise(conv, input_shape):
        return False
    kh, kw = conv.kernel_size
    if kh * kw < 25 or keras.backend.standardize_dtype(conv.compute_dtype) != "float32":
        return False
    stride = conv.strides[0]
    out_h, out_w = conv.compute_output_shape(input_shape)[1:3]
    return (
        out_h * stride <= SWAPPED_GRADIENT_MAX_SIDE
        and out_w * stride <= SWAPPED_GRADIENT_MAX_SIDE
        and _only_cpus()  # last: asked of qualifying convolutions only
    )


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's "SAME" padding before and after, along one axis."""
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _swapped_filter_gradient(x: Any, dy: Any, kernel_size: tuple, stride: int, padding: str) -> Any:
    """The gradient of a depthwise convolution's (multiplier 1) filter, as a depthwise
    convolution's forward pass.

    `dW[p, q, c] = sum over n, i, j of dy[n, i, j, c] * x[n, s*i + p, s*j + q, c]` (x padded).
    With the batch moved next to the channels, that is one depthwise convolution of the padded
    input (1, H, W, N*C) by dy as the filter (h_out, w_out, N*C, 1), dilated by the stride,
    summed over the batch. oneDNN runs that forward pass on its fast depthwise kernel, while its
    own filter gradient for 5 x 5 kernels falls back to a generic one (benchmarks/RESULTS.md,
    eighth slice).
    """
    import tensorflow as tf

    kh, kw = kernel_size
    if padding == "same":
        (t, b), (le, r) = (
            _same_padding(x.shape[1], kh, stride),
            _same_padding(x.shape[2], kw, stride),
        )
        x = tf.pad(x, [[0, 0], [t, b], [le, r], [0, 0]])
    height, width, channels = x.shape[1], x.shape[2], x.shape[3]
    n = tf.shape(x)[0]
    z = tf.reshape(tf.transpose(x, (1, 2, 0, 3)), (1, height, width, n * channels))
    out_h, out_w = dy.shape[1], dy.shape[2]
    f = tf.reshape(tf.transpose(dy, (1, 2, 0, 3)), (out_h, out_w, n * channels, 1))
    taps = tf.nn.depthwise_conv2d(
        z, f, strides=[1, 1, 1, 1], padding="VALID", dilations=[stride, stride]
    )[0, :kh, :kw, :]
    # Summed over the batch in float32 (bfloat16 inputs too), returned in the inputs' dtype.
    taps = tf.cast(tf.reshape(taps, (kh, kw, n, channels)), "float32")
    return tf.cast(tf.reduce_sum(taps, axis=2)[..., None], x.dtype)


def _strided_input_gradient(dy: Any, w: Any, input_shape: tuple, stride: int, padding: str) -> Any:
    """The input gradient of a depthwise convolution (multiplier 1) with `stride` above 1, as a
    stride-1 depthwise convolution's forward pass: `dy` with `stride - 1` zeros between its
    values (each axis), padded, by the kernel flipped in both spatial axes.

    `dx[h] = sum over i, p with s*i + p - top = h of dy[i] * w[p]`: with `u` the zero-spaced
    `dy`, `dx[h] = sum over q of u[h + top - (k - 1) + q] * w[k - 1 - q]`. In bfloat16 oneDNN
    runs TensorFlow's own input gradient of a strided depthwise convolution on a generic
    strided kernel, 16-36 ms a call on Lite0's maps at 64 px (profiled); this runs on its
    depthwise one (benchmarks/RESULTS.md, twentieth slice).
    """
    import tensorflow as tf

    (kh, kw), (height, width) = w.shape[:2], input_shape[1:3]
    n, out_h, out_w, channels = tf.shape(dy)[0], dy.shape[1], dy.shape[2], dy.shape[3]
    # Zeros after each column, then after each row; the trailing ones dropped.
    spaced_w, spaced_h = (out_w - 1) * stride + 1, (out_h - 1) * stride + 1
    u = tf.stack([dy] + [tf.zeros_like(dy)] * (stride - 1), axis=3)
    u = tf.reshape(u, (n, out_h, out_w * stride, channels))[:, :, :spaced_w]
    u = tf.stack([u] + [tf.zeros_like(u)] * (stride - 1), axis=2)
    u = tf.reshape(u, (n, out_h * stride, spaced_w, channels))[:, :spaced_h]
    top = left = 0
    if padding == "same":
        top, left = _same_padding(height, kh, stride)[0], _same_padding(width, kw, stride)[0]
    u = tf.pad(
        u,
        [
            [0, 0],
            [kh - 1 - top, height + top - spaced_h],
            [kw - 1 - left, width + left - spaced_w],
            [0, 0],
        ],
    )
    return tf.nn.depthwise_conv2d(u, w[::-1, ::-1], strides=[1, 1, 1, 1], padding="VALID")


def _bfloat16_gradients_apply(conv: Any, input_shape: tuple) -> bool:
    """Whether `_depthwise_conv` computes a bfloat16 depthwise convolution's gradients its own
    way (`_strided_input_gradient`, `_swapped_filter_gradient`): a plain depthwise convolution
    (`_is_plain_depthwise`), on CPUs only."""
    return _is_plain_depthwise(conv, input_shape) and _only_cpus()


def _depthwise_conv(conv: Any, inputs: Any, kernel: Any, gradient: bool = True) -> Any:
    """`conv`'s depthwise convolution of `inputs` by `kernel` (no bias), with its gradients
    computed faster where `gradient` says one is needed:

    - float32: the filter gradient by `_swapped_filter_gradient` where that is faster
      (`_uses_swapped_gradient`); the input gradient is TensorFlow's own.
    - bfloat16 (`_bfloat16_gradients_apply`): oneDNN's bfloat16 filter gradient runs on a
      generic kernel for 5 x 5 kernels (and 3 x 3 on 2 x 2 maps), its input gradient of a
      strided convolution likewise; there the filter gradient is `_swapped_filter_gradient`,
      the strided input gradient `_strided_input_gradient`. For 5 x 5 kernels at any map size:
      timed on Lite0's maps up to 224 px only (56 x 56), not on larger ones.

    The forward pass is TensorFlow's own either way."""
    spec = {
        "strides": conv.strides,
        "padding": conv.padding,
        "dilation_rate": conv.dilation_rate,
        "data_format": conv.data_format,
    }
    # The inputs' dtype too: a FoldedConv computes in the global policy's, whatever the layer's.
    dtype = keras.backend.standardize_dtype(inputs.dtype)
    shape = tuple(inputs.shape)
    if dtype == "float32":
        faster = gradient and _uses_swapped_gradient(conv, shape)
        swapped, strided = faster, False
    else:
        faster = gradient and dtype == "bfloat16" and _bfloat16_gradients_apply(conv, shape)
        kh, kw = conv.kernel_size
        swapped = faster and (kh * kw >= 25 or max(shape[1:3]) <= 2)
        strided = faster and conv.strides[0] > 1
    if not faster:
        return ops.depthwise_conv(inputs, kernel, **spec)
    import tensorflow as tf

    stride = conv.strides[0]
    tf_padding = conv.padding.upper()

    @tf.custom_gradient
    def run(x, w):
        y = tf.nn.depthwise_conv2d(x, w, strides=[1, stride, stride, 1], padding=tf_padding)

        def grad(dy):
            if strided:
                dx = _strided_input_gradient(dy, w, shape, stride, conv.padding)
            else:
                dx = tf.raw_ops.DepthwiseConv2dNativeBackpropInput(
                    input_sizes=tf.shape(x),
                    filter=w,
                    out_backprop=dy,
                    strides=[1, stride, stride, 1],
                    padding=tf_padding,
                )
            if swapped:
                dw = _swapped_filter_gradient(x, dy, conv.kernel_size, stride, conv.padding)
            else:
                dw = tf.raw_ops.DepthwiseConv2dNativeBackpropFilter(
                    input=x,
                    filter_sizes=tf.shape(w),
                    out_backprop=dy,
                    strides=[1, stride, stride, 1],
                    padding=tf_padding,
                )
            return dx, dw

        return y, grad

    # A tensor, not the variable: the custom gradient is for values, not variables.
    return run(inputs, tf.identity(kernel))


def _convolve(conv: Any, inputs: Any, kernel: Any, gradient: bool = True) -> Any:
    """`conv`'s convolution of `inputs` by `kernel` (no bias): `_depthwise_conv` for a
    depthwise one (its faster gradients where `gradient`), the layer's own otherwise."""
    if isinstance(conv, keras.layers.DepthwiseConv2D):
        return _depthwise_conv(conv, inputs, kernel, gradient=gradient)
    return conv.convolution_op(inputs, kernel)


def _folded_weights(conv: Any, bn: Any) -> tuple[Any, Any]:
    """The kernel and bias of `conv` followed by `bn` in inference mode, folded into one
    convolution, as tensors in the variables' dtype."""
    scale = ops.rsqrt(bn.moving_variance + bn.epsilon)
    if bn.scale:
        scale = scale * bn.gamma
    bias = -bn.moving_mean * scale
    if conv.use_bias:
        bias = bias + conv.bias * scale
    if bn.center:
        bias = bias + bn.beta
    kernel = conv.kernel
    if isinstance(conv, keras.layers.DepthwiseConv2D):
        # (h, w, in, multiplier): output channel c * multiplier + m is [..., c, m].
        shape = ops.shape(kernel)
        kernel = ops.reshape(ops.reshape(kernel, (shape[0], shape[1], -1)) * scale, shape)
    else:
        kernel = kernel * scale
    return kernel, bias


class _LayerView(keras.layers.Layer):
    """A layer that computes with layers of another model (held, not copied). Made by
    `fold_batchnorm`; never saved: the original model is."""

    # The attributes holding the layers it runs as layers (see `layers`).
    _runs: tuple[str, ...] = ()

    @property
    def layers(self) -> list[keras.layers.Layer]:
        """The layers it runs, as a model lists its own (`finetune.model.sublayers` finds them
        through it: e.g. the BatchNorm layers whose statistics averaging recomputes on a
        training view)."""
        return [getattr(self, name) for name in self._runs]

    def get_config(self):
        raise NotImplementedError(
            f"{type(self).__name__} is a fast view of another model's layers for training and "
            "inference; save the original model instead."
        )


class FoldedConv(_LayerView):
    """A convolution followed by an inference-mode BatchNorm, computed as one convolution.

    Holds the two layers themselves (shared, not copied): their variables are its variables.
    Made by `fold_batchnorm`; not meant to be saved (save the original model).

    Args:
        conv: a `Conv2D` or `DepthwiseConv2D` without activation, channels last.
        batchnorm: the `BatchNormalization` layer over its output channels.
        snapshot: read the folded kernel and bias when the calling function is traced and
            compile them into it as constants (TensorFlow backend; elsewhere, or in eager
            mode, they are read on every call): only for a pair whose weights do not change
            while that function is used (see the module docstring). Defaults to False.
    """

    # The convolution only: the BatchNorm layer does not run as a layer here (its statistics
    # are folded in), so walks for BatchNorm layers that train or update their statistics
    # (`finetune.recipes.averaging`) must not find it.
    _runs = ("conv",)

    def __init__(
        self,
        conv: keras.layers.Layer,
        batchnorm: keras.layers.BatchNormalization,
        snapshot: bool = False,
        **kwargs,
    ):
        super().__init__(name=f"{conv.name}_{batchnorm.name}_folded", **kwargs)
        self.conv = conv
        self.batchnorm = batchnorm
        self.snapshot = snapshot

    def folded(self) -> tuple[Any, Any]:
        """The folded kernel and bias, as tensors in the variables' dtype."""
        return _folded_weights(self.conv, self.batchnorm)

    def call(self, inputs):
        if self.snapshot and keras.backend.backend() == "tensorflow":
            return self._call_snapshot(inputs)
        with AutocastScope(None):  # folded in the variables' dtype, then cast
            kernel, bias = self.folded()
        outputs = _convolve(self.conv, inputs, ops.cast(kernel, inputs.dtype))
        return outputs + ops.cast(bias, outputs.dtype)

    def _call_snapshot(self, inputs):
        import tensorflow as tf

        # Out of the function being traced (the values now), in the variables' own dtype.
        with tf.init_scope(), AutocastScope(None):
            kernel, bias = (ops.convert_to_numpy(t) for t in self.folded())
        # Constants of the traced graph: TensorFlow folds them, oneDNN caches the kernel's
        # layout. A constant needs no filter gradient.
        kernel = tf.constant(kernel, dtype=inputs.dtype)
        outputs = _convolve(self.conv, inputs, kernel, gradient=False)
        return tf.nn.bias_add(outputs, tf.constant(bias, dtype=outputs.dtype))

    def compute_output_shape(self, input_shape):
        return self.conv.compute_output_shape(input_shape)


class _InBfloat16(_LayerView):
    """A weightless layer run on bfloat16 inputs as they are (its own policy would cast them
    back to float32): inside the bfloat16 part of a `fold_batchnorm(..., bfloat16=True)` or
    `train_in_bfloat16=True` view."""

    _runs = ("layer",)

    def __init__(self, layer: keras.layers.Layer, **kwargs):
        # Named by Keras: a layer called twice in that part gets two of these.
        super().__init__(dtype="mixed_bfloat16", **kwargs)
        self.layer = layer
        self._passes_training = "training" in inspect.signature(layer.call).parameters

    def call(self, *args, training=None, **kwargs):
        if self._passes_training:  # a frozen Dropout layer still drops out in training
            kwargs["training"] = training
        return self.layer.call(*args, **kwargs)


class _ToFloat32(_LayerView):
    """Casts a bfloat16 output of a `fold_batchnorm(..., bfloat16=True)` (or
    `train_in_bfloat16=True`) view to float32."""

    def call(self, inputs):
        return ops.cast(inputs, "float32")

    def compute_output_shape(self, input_shape):
        return input_shape


# Weightless layers the bfloat16 part of a view runs in bfloat16 (elementwise, no sums over
# many values: pooling and the like cast back to float32).
_BF16_LAYERS = (
    keras.layers.ReLU,
    keras.layers.Activation,  # of an elementwise function (`_ELEMENTWISE_ACTIVATIONS`)
    keras.layers.Add,
    keras.layers.Multiply,
    keras.layers.ZeroPadding2D,
    keras.layers.Dropout,
)


_ELEMENTWISE_ACTIVATIONS = frozenset(
    {"relu", "relu6", "silu", "swish", "sigmoid", "hard_sigmoid", "hard_silu", "hard_swish",
     "tanh", "gelu", "elu", "selu", "leaky_relu", "softplus", "linear"}
)  # fmt: skip


class SwappedGradientDepthwiseConv(_LayerView):
    """A `DepthwiseConv2D` (without activation) whose filter gradient is computed by
    `_swapped_filter_gradient`: the same outputs and the same gradients up to rounding, faster
    for 5 x 5 kernels on small maps (`_uses_swapped_gradient`).

    Holds the layer itself (shared, not copied). Made by `fold_batchnorm` in a training view
    for every such convolution that trains; where a frozen BatchNorm follows, the pair folds
    into a `FoldedConv` (which computes the gradient the same way) and this layer drops out,
    as it does before a `MixedTrainingPair`. Not meant to be saved.

    Args:
        conv: the `DepthwiseConv2D` layer.
    """

    _runs = ("conv",)

    def __init__(self, conv: keras.layers.DepthwiseConv2D, **kwargs):
        super().__init__(name=f"{conv.name}_swapped", dtype=conv.dtype_policy, **kwargs)
        self.conv = conv

    def call(self, inputs):
        conv = self.conv
        outputs = _depthwise_conv(conv, inputs, conv.kernel)
        if conv.use_bias:
            outputs = outputs + conv.bias
        return outputs

    def compute_output_shape(self, input_shape):
        return self.conv.compute_output_shape(input_shape)


def _only_cpus() -> bool:
    """True when TensorFlow sees no device but CPUs. The fused gradient kernel reads its saved
    statistics as the variance on CPUs (Eigen's and oneDNN's kernels) but as the inverted
    variance with cuDNN, so elsewhere the layer is left to Keras."""
    import tensorflow as tf

    return all(device.device_type == "CPU" for device in tf.config.list_logical_devices())


def _is_fusable_batchnorm(layer: Any, inputs: Any) -> bool:
    return (
        keras.backend.backend() == "tensorflow"
        and _is_foldable_batchnorm(layer)
        and len(inputs.shape) == 4
        and not layer.renorm
        and not layer.synchronized
        # The kernel takes float16, bfloat16 and float32; Keras keeps float64 in float64.
        and keras.backend.standardize_dtype(inputs.dtype) in ("float16", "bfloat16", "float32")
        # Float32 statistics and weights (any policy but a pure float16 or bfloat16 one).
        and keras.backend.standardize_dtype(layer.variable_dtype) == "float32"
        and _only_cpus()  # last: asked of BatchNorm layers only
    )


def _training_batchnorm(x: Any, scale: Any, offset: Any, epsilon: float) -> tuple[Any, Any, Any]:
    """Training-mode BatchNorm of float32 or bfloat16 NHWC `x`: the output (in `x`'s dtype),
    the batch mean and the biased batch variance (float32), with a hand-made gradient.

    The batch's statistics come from `tf.nn.moments` of `x` in float32, as in Keras' own layer
    (so the same values, and the same moving statistics); the normalisation runs as
    TensorFlow's fused kernel given those statistics, and the gradient as its fused gradient
    kernel. The kernel's own training mode computes the statistics too, but less precisely on
    oneDNN: measured on the pretrained Lite0, gradients 4.8% from float64 at the median against
    Keras' 2.7%, and 2.8-3.3 points lower test accuracy on the accuracy benchmark's `seed_docs`
    recipe (`benchmarks/RESULTS.md`, sixth and seventh slices); over bfloat16 maps, 2.1 points
    lower than these statistics over 6 seeds (twenty-second slice).
    """
    import tensorflow as tf  # only called on the TensorFlow backend (`_is_fusable_batchnorm`)

    @tf.custom_gradient
    def run(x, scale, offset):
        mean, variance = tf.nn.moments(tf.cast(x, "float32"), [0, 1, 2])  # float32: no-op
        y, *_ = tf.raw_ops.FusedBatchNormV3(
            x=x,
            scale=scale,
            offset=offset,
            mean=mean,
            variance=variance,
            epsilon=epsilon,
            exponential_avg_factor=1.0,
            data_format="NHWC",
            is_training=False,  # normalise with the statistics given
        )

        def grad(dy, *_statistics):  # the statistics feed only the moving averages
            dx, dscale, doffset, *_ = tf.raw_ops.FusedBatchNormGradV3(
                y_backprop=dy,
                x=x,
                scale=scale,
                reserve_space_1=mean,
                reserve_space_2=variance,  # the biased variance: what the CPU kernels save
                reserve_space_3=tf.constant([], "float32"),
                epsilon=epsilon,
                data_format="NHWC",
                is_training=True,  # the statistics depend on x
            )
            return dx, dscale, doffset

        return (y, mean, variance), grad

    return run(x, scale, offset)


class FusedTrainingBatchNorm(_LayerView):
    """A BatchNormalization layer (NHWC) whose training-mode pass runs on TensorFlow's fused
    kernels.

    Holds the layer itself (shared, not copied): its variables are this layer's variables. In
    training, normalises with the batch's statistics and updates the moving ones as Keras does
    (`moving = moving * momentum + batch * (1 - momentum)`, biased variance, both computed as
    Keras computes them); otherwise the layer runs as it is. Made by `fold_batchnorm`; not
    meant to be saved (save the original).

    Args:
        batchnorm: a `BatchNormalization` layer over the last axis of 4-D inputs, without renorm
            or synchronisation.
    """

    _runs = ("batchnorm",)

    def __init__(self, batchnorm: keras.layers.BatchNormalization, **kwargs):
        super().__init__(name=f"{batchnorm.name}_fused", dtype=batchnorm.dtype_policy, **kwargs)
        self.batchnorm = batchnorm

    def call(self, inputs, training=None):
        bn = self.batchnorm
        if not (training and bn.trainable):
            return bn(inputs, training=training)
        import tensorflow as tf  # only built on the TensorFlow backend (`_is_fusable_batchnorm`)

        x = tf.cast(inputs, "float32")  # as Keras: statistics in float32 whatever the policy
        y, mean, variance = _training_batchnorm(x, *_scale_and_offset(bn), bn.epsilon)
        _update_moving_statistics(bn, mean, variance)
        return tf.cast(y, bn.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape


def _scale_and_offset(bn: keras.layers.BatchNormalization) -> tuple[Any, Any]:
    """`bn`'s gamma and beta as float32 tensors (ones and zeros where it has none)."""
    import tensorflow as tf

    ones = tf.ones_like(bn.moving_mean)
    scale = tf.cast(bn.gamma, "float32") if bn.scale else ones
    offset = tf.cast(bn.beta, "float32") if bn.center else tf.zeros_like(ones)
    return scale, offset


def _update_moving_statistics(bn: keras.layers.BatchNormalization, mean: Any, variance: Any):
    """`moving = moving * momentum + batch * (1 - momentum)`, as Keras' own layer updates them,
    with the momentum read when called (or traced), as Keras reads it."""
    import tensorflow as tf

    momentum = bn.momentum
    bn.moving_mean.assign(bn.moving_mean * momentum + tf.stop_gradient(mean) * (1.0 - momentum))
    bn.moving_variance.assign(
        bn.moving_variance * momentum + tf.stop_gradient(variance) * (1.0 - momentum)
    )


class MixedTrainingPair(_LayerView):
    """A convolution followed by a BatchNorm layer that trains, computed in bfloat16 (mixed
    precision) with the batch's statistics in float32.

    Holds the two layers themselves (shared, not copied): their float32 variables are its
    variables. The convolution computes in bfloat16 (its kernel cast on each call, depthwise
    gradients by `_depthwise_conv`). In training, the batch's statistics are computed in
    float32 from the bfloat16 map as Keras computes them (`tf.nn.moments`), and the
    normalisation and its gradient run on TensorFlow's fused kernels over the bfloat16 map
    given them (`_training_batchnorm`, as `FusedTrainingBatchNorm` in float32); the moving
    statistics move as Keras moves them (biased variance). Otherwise (validation, or the
    BatchNorm frozen since) it computes the pair folded, as a `FoldedConv` does. Made by
    `fold_batchnorm(..., train_in_bfloat16=True)`; not meant to be saved.

    Args:
        conv: a `Conv2D` or `DepthwiseConv2D` without activation, channels last.
        batchnorm: the `BatchNormalization` layer over its output channels (fusable:
            `_is_fusable_batchnorm`).
    """

    _runs = ("conv", "batchnorm")

    def __init__(
        self, conv: keras.layers.Layer, batchnorm: keras.layers.BatchNormalization, **kwargs
    ):
        super().__init__(
            name=f"{conv.name}_{batchnorm.name}_mixed", dtype="mixed_bfloat16", **kwargs
        )
        self.conv = conv
        self.batchnorm = batchnorm

    def call(self, inputs, training=None):
        conv, bn = self.conv, self.batchnorm
        if not (training and bn.trainable):
            # Inference mode (validation, a frozen BatchNorm): the pair folded, as `FoldedConv`
            # computes it, read on every call.
            with AutocastScope(None):
                kernel, bias = _folded_weights(conv, bn)
            outputs = _convolve(conv, inputs, ops.cast(kernel, inputs.dtype))
            return outputs + ops.cast(bias, outputs.dtype)
        with AutocastScope(None):  # the float32 variables, cast here once a call
            kernel = ops.cast(conv.kernel, inputs.dtype)
            bias = conv.bias if conv.use_bias else None
        x = _convolve(conv, inputs, kernel)
        if bias is not None:
            x = x + ops.cast(bias, x.dtype)
        # The batch's statistics in float32 from the bfloat16 map, as Keras computes them.
        y, mean, variance = _training_batchnorm(x, *_scale_and_offset(bn), bn.epsilon)
        _update_moving_statistics(bn, mean, variance)
        return y

    def compute_output_shape(self, input_shape):
        return self.conv.compute_output_shape(input_shape)


def fold_batchnorm(
    model: keras.Model,
    *,
    frozen_only: bool = True,
    fuse_training_batchnorm: bool = True,
    snapshot: bool = False,
    bfloat16: bool = False,
    train_in_bfloat16: bool = False,
) -> keras.Model:
    """A model computing `model`'s function with BatchNorm folded into the convolutions.

    See the module docstring for which pairs fold and what is shared. Functional models only
    (nested functional models, such as `build_classifier`'s backbone, are folded inside).

    Args:
        model: a functional `keras.Model`.
        frozen_only: fold only pairs whose BatchNorm is frozen (for training the result); False
            folds every pair (for inference only). Defaults to True.
        fuse_training_batchnorm: with `frozen_only`, run the BatchNorm layers that train by
            `FusedTrainingBatchNorm` (the same training, faster; see the module docstring), or
            with `train_in_bfloat16` by a `MixedTrainingPair` with their convolution.
            False leaves them to Keras' own layer, in float32 (5 x 5 depthwise convolutions
            that train still get the swapped filter gradient). Defaults to True.
        snapshot: compile the weights of the pairs that cannot change while the view runs
            into its traced functions as constants: faster, but the view then does not
            follow later changes to those weights (see the module docstring). Defaults to
            False.
        bfloat16: with `snapshot`, compute those pairs in bfloat16 where nothing below them
            trains, and the weightless elementwise layers between them; the view's outputs
            stay float32 (see the module docstring). Without `snapshot` it changes nothing.
            Defaults to False.
        train_in_bfloat16: with `frozen_only`, the folded pairs that train (a convolution that
            trains before a frozen BatchNorm) compute in bfloat16 too, and the weightless
            elementwise layers between them: mixed precision, the variables and the gradients
            reaching them float32, the view's outputs float32 (see the module docstring).
            With `fuse_training_batchnorm`, a convolution followed by a BatchNorm layer that
            trains is computed so as well, by a `MixedTrainingPair` (the batch's statistics
            in float32). Defaults to False.

    Returns:
        A new, uncompiled functional model with the same inputs and outputs and name, sharing
        every layer with `model`; `model` itself when nothing folds (or fuses, or gets the
        swapped filter gradient) or it is not functional.

    Raises:
        ValueError: with `bfloat16` (and not `train_in_bfloat16`, where gradients may pass
            through bfloat16), a nested model that would compute in bfloat16 has an input
            that depends on layers that train (`fit_phases` never makes one).

    Example:
        >>> fast = fold_batchnorm(model, frozen_only=False)
        >>> fast.predict(images)  # the same as model.predict(images), about 1.6x as fast
    """
    if not isinstance(model, Functional):  # Sequential and subclassed models are left alone
        return model
    frozen = _frozen_layers(model)
    folded = 0
    any_bfloat16 = bfloat16 or train_in_bfloat16
    made: dict[int, tuple[keras.layers.Layer, Any]] = {}  # id(conv output) -> (conv, its input)
    # ids of the tensors that depend on something that trains (the rest is fixed while the
    # view runs). A nested model's inputs count as fixed (checked where it is called).
    varying: set[int] = set()

    def depends(*values: Any) -> bool:
        return any(id(t) in varying for t in tree.flatten(values))

    def call(layer, *args, **kwargs):
        output = _call(layer, *args, **kwargs)
        # (Training in bfloat16, gradients may go through bfloat16 anywhere.)
        nested = bfloat16 and not train_in_bfloat16 and isinstance(layer, Functional)
        if nested and depends(args, kwargs) and computes_in_bfloat16(layer):
            raise ValueError(
                f"fold_batchnorm(bfloat16=True): the nested model {layer.name!r} computes in "
                "bfloat16 but its input depends on layers that train; bfloat16 is only for "
                "the part of a model below everything that trains."
            )
        # (Raw operations, such as `x + 3.0` in MobileNetV3, have no weights.)
        weights = getattr(layer, "trainable_weights", ())
        trains = frozen_only and id(layer) not in frozen and bool(weights)
        if trains or depends(args, kwargs):
            varying.update(id(t) for t in tree.flatten(output))
        return output

    def _call(layer, *args, **kwargs):
        nonlocal folded
        # One input and no mask (Keras passes mask=None): a pair to fold or a layer to fuse.
        plain = len(args) == 1 and all(value is None for value in kwargs.values())
        if (
            plain
            and _is_foldable_batchnorm(layer)
            and id(args[0]) in made
            and (not frozen_only or id(layer) in frozen)
        ):
            conv, conv_input = made[id(args[0])]
            folded += 1
            # Fixed while the view runs: an inference view's pairs, a training view's frozen ones.
            fixed = not frozen_only or id(conv) in frozen
            # The unfolded convolution's output is now unused (unless something else reads it);
            # a functional model keeps only what its outputs depend on, so it drops out.
            if bfloat16 and snapshot and fixed and not depends(conv_input):
                # Nothing below it trains either: no gradient goes through it.
                return FoldedConv(conv, layer, snapshot=True, dtype="mixed_bfloat16")(conv_input)
            if train_in_bfloat16 and frozen_only and not fixed:
                # Its convolution trains: bfloat16 convolutions, float32 variables.
                return FoldedConv(conv, layer, dtype="mixed_bfloat16")(conv_input)
            return FoldedConv(conv, layer, snapshot=snapshot and fixed)(conv_input)
        if (
            frozen_only
            and fuse_training_batchnorm
            and id(layer) not in frozen
            and plain
            and _is_fusable_batchnorm(layer, args[0])
        ):
            # It trains: the fused kernels run it.
            folded += 1
            if train_in_bfloat16 and id(args[0]) in made:
                # After a convolution: both in bfloat16, the statistics in float32. The
                # unfolded convolution's output drops out as a folded one's does.
                conv, conv_input = made[id(args[0])]
                return MixedTrainingPair(conv, layer)(conv_input)
            return FusedTrainingBatchNorm(layer)(args[0])
        conv = _is_foldable_conv(layer) and len(args) == 1 and not any(kwargs.values())
        if (
            conv
            and frozen_only
            and id(layer) not in frozen
            and _uses_swapped_gradient(layer, tuple(args[0].shape))
        ):
            # It trains: its filter gradient the faster way. If its BatchNorm folds below,
            # this output drops out as the unfolded one does.
            folded += 1
            output = SwappedGradientDepthwiseConv(layer)(args[0])
        elif any_bfloat16 and _runs_in_bfloat16(layer, args, kwargs):
            folded += 1
            output = _InBfloat16(layer)(*args, **kwargs)
        elif any_bfloat16 and not isinstance(layer, keras.layers.Layer):
            # A raw operation (`ops.mean(x)`...) computes in its inputs' dtype: float32 here.
            args, kwargs = tree.map_structure(_as_float32, (args, kwargs))
            output = layer(*args, **kwargs)
        else:
            output = layer(*args, **kwargs)
        if conv:
            made[id(output)] = (layer, args[0])
        return output

    clone = keras.models.clone_model(
        model, clone_function=lambda layer: layer, call_function=call, recursive=True
    )
    if not folded:
        return model
    if any_bfloat16 and any(o.dtype == "bfloat16" for o in clone.outputs):
        # What the view returns is float32, as the model's (in the same structure).
        outputs = tree.map_structure(
            lambda o: _ToFloat32()(o) if o.dtype == "bfloat16" else o, clone.output
        )
        clone = keras.Model(clone.input, outputs, name=clone.name)
    return clone


def bfloat16_parts(model: keras.Model) -> tuple[bool, bool]:
    """What a view made by `fold_batchnorm` computes in bfloat16 (nested models included):
    `(frozen, training)`, whether any compiled-in pair does (`bfloat16`), and whether any pair
    that trains does (`train_in_bfloat16`: a folded pair whose convolution trains, or a
    `MixedTrainingPair`)."""
    frozen = training = False
    for layer in getattr(model, "layers", []):
        if isinstance(layer, Functional):
            below = bfloat16_parts(layer)
            frozen, training = frozen or below[0], training or below[1]
        elif isinstance(layer, MixedTrainingPair):
            training = True
        elif (
            isinstance(layer, FoldedConv)
            and keras.backend.standardize_dtype(layer.compute_dtype) == "bfloat16"
        ):
            frozen, training = frozen or layer.snapshot, training or not layer.snapshot
    return frozen, training


def describe_bfloat16(frozen: bool, training: bool) -> str:
    """How a phase trained through the network computed, for the phase's line and the report,
    from `bfloat16_parts` (or the history's `frozen_bfloat16`, `trained_bfloat16`); "" when in
    float32."""
    if frozen and training:
        return "frozen layers in bfloat16, trained ones in mixed precision"
    if training:
        return "in bfloat16: mixed precision"
    return "its frozen layers in bfloat16" if frozen else ""


def computes_in_bfloat16(model: keras.Model) -> bool:
    """Whether a view made by `fold_batchnorm(..., bfloat16=True)` (or `train_in_bfloat16=True`)
    computes anything in bfloat16 (nested models included)."""
    return any(
        keras.backend.standardize_dtype(layer.compute_dtype) == "bfloat16"
        or (isinstance(layer, Functional) and computes_in_bfloat16(layer))
        for layer in getattr(model, "layers", [])
    )


def _as_float32(value: Any) -> Any:
    if getattr(value, "dtype", None) is not None and str(value.dtype) == "bfloat16":
        return ops.cast(value, "float32")
    return value


def _runs_in_bfloat16(layer: Any, args: tuple, kwargs: dict) -> bool:
    """Whether the bfloat16 part of a view runs `layer` as it is: a weightless elementwise layer
    (`_BF16_LAYERS`; an `Activation` of an elementwise function) whose floating inputs are
    all bfloat16 (all fixed, then, unless the view trains in bfloat16)."""
    if type(layer) not in _BF16_LAYERS or layer.weights:
        return False
    if isinstance(layer, keras.layers.Activation) and (
        getattr(layer.activation, "__name__", "") not in _ELEMENTWISE_ACTIVATIONS
    ):
        return False  # softmax and the like: sums over values
    floats = [
        t for t in tree.flatten((args, kwargs)) if hasattr(t, "dtype") and "float" in str(t.dtype)
    ]
    return bool(floats) and all(str(t.dtype) == "bfloat16" for t in floats)
