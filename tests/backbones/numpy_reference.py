"""An independent float64 NumPy forward pass of EfficientNet-Lite0, straight from its state dict.

It shares no code with the Keras port: block structure comes from the state dict's keys and
shapes, padding is TensorFlow's "same" rule written out, convolutions are im2col + matmul and
depthwise convolutions a sum of shifted slices. Only the strides, which a state dict does not
record, are stated here from the architecture.
"""

from __future__ import annotations

import numpy as np

# Lite0's stride-2 blocks: the first block of stages 2, 3, 4 and 6 (repeats 1, 2, 2, 3, 3, 4, 1).
LITE0_STRIDE2_BLOCKS = frozenset({1, 3, 5, 11})
BN_EPSILON = 1e-3


def _same_pad(x: np.ndarray, kernel: int, stride: int) -> np.ndarray:
    """Pads NHWC `x` as TensorFlow's "same" does: the odd pixel goes after (bottom/right)."""
    pads = []
    for size in x.shape[1:3]:
        out = -(-size // stride)
        total = max((out - 1) * stride + kernel - size, 0)
        pads.append((total // 2, total - total // 2))
    return np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))


def _shifted(x: np.ndarray, i: int, j: int, stride: int, oh: int, ow: int) -> np.ndarray:
    """The (oh, ow) input pixels that kernel tap (i, j) sees, for every output pixel."""
    return x[:, i : i + stride * oh : stride, j : j + stride * ow : stride]


def _conv(x: np.ndarray, weight: np.ndarray, stride: int = 1) -> np.ndarray:
    """Full convolution; `weight` is PyTorch's (out, in, kh, kw)."""
    out_ch, in_ch, kh, kw = weight.shape
    if kh == kw == 1 and stride == 1:
        return x @ weight[:, :, 0, 0].T
    x = _same_pad(x, kh, stride)
    n, h, w, _ = x.shape
    oh, ow = (h - kh) // stride + 1, (w - kw) // stride + 1
    # im2col: columns ordered (i, j, c) to match the reshaped weight below.
    cols = np.empty((n, oh, ow, kh, kw, in_ch))
    for i in range(kh):
        for j in range(kw):
            cols[:, :, :, i, j, :] = _shifted(x, i, j, stride, oh, ow)
    flat_weight = weight.transpose(2, 3, 1, 0).reshape(kh * kw * in_ch, out_ch)
    return cols.reshape(n, oh, ow, -1) @ flat_weight


def _depthwise(x: np.ndarray, weight: np.ndarray, stride: int) -> np.ndarray:
    """Depthwise convolution; `weight` is PyTorch's (channels, 1, kh, kw)."""
    _, _, kh, kw = weight.shape
    x = _same_pad(x, kh, stride)
    n, h, w, c = x.shape
    oh, ow = (h - kh) // stride + 1, (w - kw) // stride + 1
    out = np.zeros((n, oh, ow, c))
    for i in range(kh):
        for j in range(kw):
            out += _shifted(x, i, j, stride, oh, ow) * weight[:, 0, i, j]
    return out


def _bn(x: np.ndarray, sd: dict[str, np.ndarray], prefix: str) -> np.ndarray:
    scale = sd[f"{prefix}.weight"] / np.sqrt(sd[f"{prefix}.running_var"] + BN_EPSILON)
    return (x - sd[f"{prefix}.running_mean"]) * scale + sd[f"{prefix}.bias"]


def _relu6(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 0.0, 6.0)


def lite0_logits(state_dict: dict[str, np.ndarray], images: np.ndarray) -> np.ndarray:
    """Computes EfficientNet-Lite0's ImageNet logits in float64.

    Args:
        state_dict: the lukemelas-style state dict (name -> array).
        images: (N, H, W, 3) normalised pixels, (x - 127) / 128.

    Returns:
        (N, 1000) logits.
    """
    sd = {k: np.asarray(v, dtype=np.float64) for k, v in state_dict.items()}
    x = _relu6(_bn(_conv(np.asarray(images, np.float64), sd["_conv_stem.weight"], 2), sd, "_bn0"))
    index = 0
    while f"_blocks.{index}._depthwise_conv.weight" in sd:
        p = f"_blocks.{index}."
        stride = 2 if index in LITE0_STRIDE2_BLOCKS else 1
        shortcut = x
        if f"{p}_expand_conv.weight" in sd:
            x = _relu6(_bn(_conv(x, sd[f"{p}_expand_conv.weight"]), sd, f"{p}_bn0"))
        x = _relu6(_bn(_depthwise(x, sd[f"{p}_depthwise_conv.weight"], stride), sd, f"{p}_bn1"))
        x = _bn(_conv(x, sd[f"{p}_project_conv.weight"]), sd, f"{p}_bn2")
        if stride == 1 and x.shape == shortcut.shape:
            x = x + shortcut
        index += 1
    assert index == 16, f"Lite0 has 16 blocks, the state dict has {index}"
    x = _relu6(_bn(_conv(x, sd["_conv_head.weight"]), sd, "_bn1"))
    pooled = x.mean(axis=(1, 2))
    return pooled @ sd["_fc.weight"].T + sd["_fc.bias"]
