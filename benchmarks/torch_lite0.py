"""EfficientNet-Lite0 as a plain PyTorch `nn.Module`: the reference of `throughput_vs_torch.py`.

Written for the speed comparison the way a PyTorch user would write the network, with the same
architecture as finetune's Keras model (`finetune.backbones.efficientnet_lite`): a 3x3 stride-2
stem, the 16 MBConv blocks of EfficientNet-B0's seven stages without squeeze-excite, ReLU6
everywhere, a 1x1 convolution to 1280 channels, then global average pooling, dropout 0.2 and a
linear layer. Convolutions pad like TensorFlow's "same" (asymmetric, more at the bottom and right,
for stride 2), so that ported ImageNet weights would give the same outputs; for the even input
sizes used here every stride-2 layer pads 1 pixel more on one side than PyTorch's symmetric
`padding=k // 2` would, and the output sizes and FLOPs are the same. BatchNorm uses Keras'
epsilon 1e-3 and momentum (0.01 in PyTorch's convention). The input is RGB pixels in [0, 255],
normalised inside the model like finetune's `Normalize` layer. Weights are PyTorch's default
random initialisation: speed does not depend on them. Benchmark-only: torch is not a dependency
of the package.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# EfficientNet-B0 stages: (repeats, kernel, stride, expand ratio, filters out); Lite0 keeps them.
STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
STEM, HEAD = 32, 1280


class SameConv2d(nn.Conv2d):
    """`nn.Conv2d` with TensorFlow's "same" padding: symmetric at stride 1, else computed."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1):
        padding = kernel // 2 if stride == 1 else 0
        super().__init__(cin, cout, kernel, stride, padding, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] != 1:
            pads = []
            for size in (x.shape[-1], x.shape[-2]):  # F.pad wants (left, right, top, bottom)
                total = max((math.ceil(size / self.stride[0]) - 1) * self.stride[0]
                            + self.kernel_size[0] - size, 0)  # fmt: skip
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
        return super().forward(x)


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True):
    layers = [SameConv2d(cin, cout, kernel, stride, groups),
              nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01)]  # fmt: skip
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, depthwise kxk, 1x1 project (+ identity)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.expand = conv_bn(cin, mid, 1) if expand != 1 else nn.Identity()
        self.depthwise = conv_bn(mid, mid, kernel, stride, groups=mid)
        self.project = conv_bn(mid, cout, 1, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 features + average pooling + dropout + linear classifier."""

    def __init__(self, num_classes: int = 10, dropout: float = 0.2):
        super().__init__()
        self.stem = conv_bn(3, STEM, 3, 2)
        stages, cin = [], STEM
        for repeats, kernel, stride, expand, cout in STAGES:
            blocks = []
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, kernel, stride if i == 0 else 1, expand))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.top = conv_bn(cin, HEAD, 1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(HEAD, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - 127.0) / 128.0
        return self.top(self.blocks(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.features(x).mean((2, 3))))

    def layer_groups(self) -> list[tuple[str, nn.Module]]:
        """The groups finetune unfreezes by, bottom to top: stem, block1 ... block7, top."""
        stages = [(f"block{i + 1}", stage) for i, stage in enumerate(self.blocks)]
        return [("stem", self.stem), *stages, ("top", self.top)]
