"""Mobile reference models: MobileNetV2 and an EfficientNet-style MBConv net.

Both use inverted-residual blocks (1x1 expand -> 3x3 depthwise -> 1x1
linear projection) with a residual add whenever input and output shapes
match. MobileNetV2 uses ReLU6 and has a first block with expansion 1 (no
expand conv); the EfficientNet variant uses SiLU and a squeeze-and-excite
gate ``x * sigmoid(fc2(silu(fc1(avgpool(x)))))`` built from 1x1 convs.
Input ``1x3x32x32``, 10 classes.
"""

from __future__ import annotations

import torch
from torch import nn

from models._common import conv_bn_act, finalize

_IMAGE = (3, 32, 32)

__all__ = [
    "EfficientNet",
    "InvertedResidual",
    "MBConv",
    "MobileNetV2",
    "SqueezeExcite",
    "efficientnet",
    "mobilenetv2",
]


class InvertedResidual(nn.Module):
    """MobileNetV2 block; ``expand_ratio == 1`` skips the expand conv."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = cin * expand_ratio
        self.use_residual = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(conv_bn_act(cin, hidden, 1, act=nn.ReLU6))
        layers.append(conv_bn_act(hidden, hidden, 3, stride=stride, groups=hidden, act=nn.ReLU6))
        layers.append(conv_bn_act(hidden, cout, 1, act=None))
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_residual:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """Tiny MobileNetV2: stem, 6 inverted residual blocks, 1x1 head, classifier."""

    # (expand_ratio, out_channels, num_blocks, first_stride)
    CONFIG: tuple[tuple[int, int, int, int], ...] = (
        (1, 8, 1, 1),
        (4, 16, 2, 2),
        (4, 24, 2, 2),
        (4, 32, 1, 1),
    )

    def __init__(self, num_classes: int = 10, stem_width: int = 16, head_width: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = [conv_bn_act(3, stem_width, 3, act=nn.ReLU6)]
        cin = stem_width
        for t, c, n, s in self.CONFIG:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(conv_bn_act(cin, head_width, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(head_width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


class SqueezeExcite(nn.Module):
    """``x * sigmoid(fc2(silu(fc1(avgpool(x)))))`` with 1x1 convs as fc."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.act = nn.SiLU()
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.fc2(self.act(self.fc1(self.pool(x))))
        return x * self.gate(s)


class MBConv(nn.Module):
    """EfficientNet MBConv: expand, depthwise kxk, SE, project, residual add."""

    def __init__(
        self, cin: int, cout: int, kernel_size: int, stride: int, expand_ratio: int
    ) -> None:
        super().__init__()
        hidden = cin * expand_ratio
        self.use_residual = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(conv_bn_act(cin, hidden, 1, act=nn.SiLU))
        layers.append(
            conv_bn_act(hidden, hidden, kernel_size, stride=stride, groups=hidden, act=nn.SiLU)
        )
        layers.append(SqueezeExcite(hidden, max(1, cin // 4)))
        layers.append(conv_bn_act(hidden, cout, 1, act=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_residual:
            return x + self.block(x)
        return self.block(x)


class EfficientNet(nn.Module):
    """Tiny EfficientNet-B0-like network."""

    # (expand_ratio, kernel, out_channels, num_blocks, first_stride)
    CONFIG: tuple[tuple[int, int, int, int, int], ...] = (
        (1, 3, 8, 1, 1),
        (4, 3, 16, 2, 2),
        (4, 5, 24, 2, 2),
        (4, 3, 32, 1, 1),
    )

    def __init__(self, num_classes: int = 10, stem_width: int = 16, head_width: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = [conv_bn_act(3, stem_width, 3, stride=1, act=nn.SiLU)]
        cin = stem_width
        for t, k, c, n, s in self.CONFIG:
            for i in range(n):
                layers.append(MBConv(cin, c, k, s if i == 0 else 1, t))
                cin = c
        layers.append(conv_bn_act(cin, head_width, 1, act=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(head_width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def mobilenetv2(seed: int = 0) -> nn.Module:
    """MobileNetV2 (ReLU6, expansion-1 first block, Dropout+Linear head)."""
    torch.manual_seed(seed)
    return finalize(MobileNetV2(), _IMAGE)


def efficientnet(seed: int = 0) -> nn.Module:
    """EfficientNet-style MBConv net with SE and SiLU."""
    torch.manual_seed(seed)
    return finalize(EfficientNet(), _IMAGE)
