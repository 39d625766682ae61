"""The two discrete networks the experiment trains and prunes, in plain torch, both within what
`inn.convert` supports (odd kernels, square strides, BatchNorm right after its conv, residual
adds of same-channel tensors, flatten after global pooling)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn(c_in: int, c_out: int, k: int = 3,
             stride: int = 1) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    """A bias-free conv ("same" padding) and the BatchNorm after it."""
    return (nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, bias=False),
            nn.BatchNorm2d(c_out))


class CNN(nn.Module):
    """Three conv 3×3 + BN + ReLU blocks (16, 32, 64 channels), 2×2 max pooling after the
    first two (a receptive field of 18 pixels, enough for 28×28 digits), global average
    pooling and a linear classifier: three channel groups."""

    def __init__(self, widths: tuple[int, int, int] = (16, 32, 64), classes: int = 10):
        super().__init__()
        a, b, c = widths
        self.features = nn.Sequential(
            *_conv_bn(1, a), nn.ReLU(), nn.MaxPool2d(2),
            *_conv_bn(a, b), nn.ReLU(), nn.MaxPool2d(2),
            *_conv_bn(b, c), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a shortcut, then ReLU; the shortcut is the identity, or a 1×1
    conv + BN (of the block's stride) where the shape changes. The add merges the channel
    groups of the second conv and of the shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(c_in, c_out, stride=stride)
        self.conv2, self.bn2 = _conv_bn(c_out, c_out)
        self.shortcut = (nn.Sequential(*_conv_bn(c_in, c_out, k=1, stride=stride))
                         if stride != 1 or c_in != c_out else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + self.shortcut(x))


class SmallResNet(nn.Module):
    """A conv stem with 2×2 max pooling, an identity basic block, a stride-2 block with a
    projection shortcut, global average pooling and a linear classifier: four channel groups
    (stem + block 1's output, block 1's hidden, block 2's hidden, block 2's output + shortcut)."""

    def __init__(self, widths: tuple[int, int] = (32, 64), classes: int = 10):
        super().__init__()
        a, b = widths
        self.stem = nn.Sequential(*_conv_bn(1, a), nn.ReLU(), nn.MaxPool2d(2))
        self.block1 = BasicBlock(a, a)
        self.block2 = BasicBlock(a, b, stride=2)
        self.fc = nn.Linear(b, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


MODELS = {"cnn": CNN, "resnet": SmallResNet}
