"""ResNet-family reference models: BasicBlock, Bottleneck and ResNeXt.

All three share the same skeleton: a 3x3 stem (conv-bn-relu), three stages
of two blocks; the first block of stages 2 and 3 downsamples by 2 with a 1x1
conv-bn projection shortcut (stage 1 keeps stride 1; with bottlenecks its
first block still changes width, so it also has a projection shortcut),
the other blocks use identity residual adds; then global average pooling,
flatten and a linear classifier. Input ``1x3x32x32``, 10 classes.
"""

from __future__ import annotations

import torch
from torch import nn

from models._common import conv_bn_act, finalize

_IMAGE = (3, 32, 32)

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "resnet_basic",
    "resnet_bottleneck",
    "resnext",
]


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
        nn.BatchNorm2d(cout),
    )


class BasicBlock(nn.Module):
    """3x3 conv-bn-relu, 3x3 conv-bn, residual add, relu."""

    expansion = 1

    def __init__(
        self,
        cin: int,
        planes: int,
        stride: int = 1,
        groups: int = 1,
        width_per_group: int = 0,
    ) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut = _shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (optionally grouped), 1x1 expand (x4), residual add.

    With ``groups > 1`` the middle width is ``groups * width_per_group``
    (ResNeXt); otherwise it is ``planes``.
    """

    expansion = 4

    def __init__(
        self,
        cin: int,
        planes: int,
        stride: int = 1,
        groups: int = 1,
        width_per_group: int = 0,
    ) -> None:
        super().__init__()
        width = groups * width_per_group if groups > 1 else planes
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut = _shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Small CIFAR-style ResNet with three stages."""

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        planes: tuple[int, int, int] = (16, 32, 64),
        blocks_per_stage: int = 2,
        stem_width: int = 16,
        groups: int = 1,
        width_per_group: int = 0,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.stem = conv_bn_act(3, stem_width, 3)
        layers: list[nn.Module] = []
        cin = stem_width
        for i, p in enumerate(planes):
            for j in range(blocks_per_stage):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(block(cin, p, stride, groups, width_per_group))
                cin = p * block.expansion
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(x)


def resnet_basic(seed: int = 0) -> nn.Module:
    """ResNet with BasicBlocks, widths 16/32/64, two blocks per stage."""
    torch.manual_seed(seed)
    return finalize(ResNet(BasicBlock, (16, 32, 64)), _IMAGE)


def resnet_bottleneck(seed: int = 0) -> nn.Module:
    """ResNet with Bottleneck blocks, planes 8/16/32 (outputs 32/64/128)."""
    torch.manual_seed(seed)
    return finalize(ResNet(Bottleneck, (8, 16, 32)), _IMAGE)


def resnext(seed: int = 0) -> nn.Module:
    """ResNeXt: bottlenecks whose 3x3 conv has 8 groups of width 4 (32 ch)."""
    torch.manual_seed(seed)
    return finalize(ResNet(Bottleneck, (8, 16, 32), groups=8, width_per_group=4), _IMAGE)
