"""Plain CNN reference models: DenseNet, VGG (two flatten styles), U-Net, 1D conv.

* ``densenet``: dense blocks whose layers (bn-relu-conv1x1-bn-relu-conv3x3)
  concatenate their output onto their input, transition layers
  (bn-relu-conv1x1-avgpool), final bn-relu, global pool, linear.
* ``vgg_bn`` / ``vgg_view``: conv-bn-relu stacks with max pooling, then a
  flatten that folds ``[64, 4, 4]`` into 1024 features (``torch.flatten`` vs
  ``x.view(x.size(0), -1)``), Linear-ReLU-Dropout-Linear.
* ``unet``: two-level encoder/decoder with skip concatenations; one
  ``ConvTranspose2d`` upsampling and one bilinear ``F.interpolate``
  upsampling; output ``1x2x32x32``.
* ``conv1d``: Conv1d/BatchNorm1d/ReLU, a depthwise Conv1d, MaxPool1d,
  AdaptiveAvgPool1d(1), Linear; input ``1x4x64``.
"""

from __future__ import annotations

import torch
from torch import nn

from models._common import conv_bn_act, finalize

_IMAGE = (3, 32, 32)
_SEQ = (4, 64)

__all__ = [
    "VGG",
    "Conv1dNet",
    "DenseNet",
    "UNet",
    "conv1d",
    "densenet",
    "unet",
    "vgg_bn",
    "vgg_view",
]


# --------------------------------------------------------------------- DenseNet


class DenseLayer(nn.Module):
    """Pre-activation bottleneck layer; returns ``cat([x, new_features])``."""

    def __init__(self, cin: int, growth: int, bn_size: int = 2) -> None:
        super().__init__()
        mid = growth * bn_size
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, growth, 3, padding=1, bias=False)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        return torch.cat([x, out], dim=1)


class Transition(nn.Module):
    """bn-relu-conv1x1-avgpool2."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(self.relu(self.bn(x))))


class DenseNet(nn.Module):
    """Three dense blocks of ``layers_per_block`` layers, two transitions."""

    def __init__(
        self,
        growth: int = 8,
        layers_per_block: int = 3,
        stem_width: int = 16,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, stem_width, 3, padding=1, bias=False)
        layers: list[nn.Module] = []
        c = stem_width
        for b in range(3):
            for _ in range(layers_per_block):
                layers.append(DenseLayer(c, growth))
                c += growth
            if b < 2:
                layers.append(Transition(c, c // 2))
                c //= 2
        self.features = nn.Sequential(*layers)
        self.norm = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.norm(self.features(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


# -------------------------------------------------------------------------- VGG


class VGG(nn.Module):
    """VGG-style net; ``flatten="flatten"`` or ``"view"`` selects the reshape."""

    CONFIG: tuple[int | str, ...] = (16, 16, "M", 32, 32, "M", 64, 64, "M")

    def __init__(self, flatten: str = "flatten", hidden: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        if flatten not in ("flatten", "view"):
            raise ValueError(f"flatten must be 'flatten' or 'view', got {flatten!r}")
        self.flatten_mode = flatten
        layers: list[nn.Module] = []
        c = 3
        for v in self.CONFIG:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                assert isinstance(v, int)
                layers.append(conv_bn_act(c, v, 3))
                c = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(c * 4 * 4, hidden),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        if self.flatten_mode == "view":
            x = x.view(x.size(0), -1)
        else:
            x = torch.flatten(x, 1)
        return self.classifier(x)


# ------------------------------------------------------------------------- UNet


class UNet(nn.Module):
    """Two-level U-Net; decoder uses ConvTranspose2d then bilinear interpolate."""

    def __init__(self, base: int = 8, num_classes: int = 2) -> None:
        super().__init__()
        c1, c2, c3 = base, base * 2, base * 4
        self.enc1 = nn.Sequential(conv_bn_act(3, c1), conv_bn_act(c1, c1))
        self.enc2 = nn.Sequential(conv_bn_act(c1, c2), conv_bn_act(c2, c2))
        self.bottleneck = nn.Sequential(conv_bn_act(c2, c3), conv_bn_act(c3, c3))
        self.pool = nn.MaxPool2d(2)
        self.up2 = nn.ConvTranspose2d(c3, c2, 2, stride=2)
        self.dec2 = nn.Sequential(conv_bn_act(c2 + c2, c2), conv_bn_act(c2, c2))
        self.dec1 = nn.Sequential(conv_bn_act(c2 + c1, c1), conv_bn_act(c1, c1))
        self.head = nn.Conv2d(c1, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)  # c1 x 32 x 32
        e2 = self.enc2(self.pool(e1))  # c2 x 16 x 16
        b = self.bottleneck(self.pool(e2))  # c3 x 8 x 8
        d2 = self.dec2(torch.cat([self.up2(b), e2], dim=1))  # c2 x 16 x 16
        up1 = nn.functional.interpolate(d2, scale_factor=2.0, mode="bilinear", align_corners=False)
        d1 = self.dec1(torch.cat([up1, e1], dim=1))  # c1 x 32 x 32
        return self.head(d1)


# ----------------------------------------------------------------------- Conv1d


class Conv1dNet(nn.Module):
    """1D conv net: conv-bn-relu, depthwise conv-bn-relu, pointwise, pool, fc."""

    def __init__(self, cin: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(cin, 16, 5, padding=2, bias=False),
            nn.BatchNorm1d(16),
            nn.ReLU(),
            nn.MaxPool1d(2),
            nn.Conv1d(16, 16, 3, padding=1, groups=16, bias=False),  # depthwise
            nn.BatchNorm1d(16),
            nn.ReLU(),
            nn.Conv1d(16, 32, 1, bias=False),
            nn.BatchNorm1d(32),
            nn.ReLU(),
            nn.Conv1d(32, 32, 3, padding=1, groups=4, bias=False),  # grouped
            nn.BatchNorm1d(32),
            nn.ReLU(),
            nn.MaxPool1d(2),
        )
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.fc(torch.flatten(x, 1))


# --------------------------------------------------------------------- builders


def densenet(seed: int = 0) -> nn.Module:
    """DenseNet with growth 8, three blocks of three layers."""
    torch.manual_seed(seed)
    return finalize(DenseNet(), _IMAGE)


def vgg_bn(seed: int = 0) -> nn.Module:
    """VGG with BN; ``torch.flatten(x, 1)`` folds [64, 4, 4] into 1024."""
    torch.manual_seed(seed)
    return finalize(VGG("flatten"), _IMAGE)


def vgg_view(seed: int = 0) -> nn.Module:
    """Same weights as :func:`vgg_bn` but flattens with ``x.view(x.size(0), -1)``."""
    torch.manual_seed(seed)
    return finalize(VGG("view"), _IMAGE)


def unet(seed: int = 0) -> nn.Module:
    """Two-level U-Net producing a ``1x2x32x32`` segmentation map."""
    torch.manual_seed(seed)
    return finalize(UNet(), _IMAGE)


def conv1d(seed: int = 0) -> nn.Module:
    """1D conv net on ``1x4x64`` inputs."""
    torch.manual_seed(seed)
    return finalize(Conv1dNet(), _SEQ)
