"""The two model architectures trained on the digits benchmark (:mod:`.digits`).

* :class:`ResNetDigits` -- a small ResNet: 3x3 stem (conv-bn-relu) at 32x32, three
  stages of :class:`BasicBlock` (widths 32/64/128, each starting with stride 2, so at
  16x16, 8x8 and 4x4; ``blocks`` per stage), 1x1 conv-bn projection shortcuts where the
  shape changes, global average pooling and a linear classifier. (The digits are 8x8
  images upsampled, so nothing is lost by leaving 32x32 early; it keeps training fast.)
* :class:`ViTDigits` -- a small pre-norm Vision Transformer in the timm layout of
  ``models/vit.py``: ``Conv2d`` patch embedding (patch 4 -> 64 tokens), a CLS token,
  learned position embeddings, ``depth`` blocks of fused-qkv multi-head attention
  (hand-written ``softmax(q k^T / sqrt(d)) v``) and a GELU MLP, a final LayerNorm and a
  linear head on the CLS token.

Both take ``N x 3 x 32 x 32`` and return ``N x 10`` logits. The default constructor
arguments are the ones the committed weights were trained with;
:func:`build` rebuilds a model by name and optionally loads a saved state dict.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = ["MODEL_NAMES", "BasicBlock", "ResNetDigits", "ViTDigits", "build"]


class BasicBlock(nn.Module):
    """conv3x3-bn-relu, conv3x3-bn, plus the (projected) input, relu."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetDigits(nn.Module):
    """Stem, three BasicBlock stages (``widths``, ``strides``), GAP, linear."""

    def __init__(
        self,
        widths: tuple[int, int, int] = (32, 64, 128),
        blocks: int = 1,
        strides: tuple[int, int, int] = (2, 2, 2),
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        )
        stages: list[nn.Module] = []
        cin = widths[0]
        for i, width in enumerate(widths):
            layers = [BasicBlock(cin if j == 0 else width, width, 1 if j else strides[i])
                      for j in range(blocks)]
            stages.append(nn.Sequential(*layers))
            cin = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv Linear (timm layout)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))``, ``x + mlp(ln(x))``."""

    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTDigits(nn.Module):
    """Patch-4 ViT on 32x32 inputs: 64 patch tokens plus CLS, ``depth`` blocks."""

    def __init__(
        self,
        image: int = 32,
        patch: int = 4,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp: int = 128,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        tokens = (image // patch) ** 2 + 1
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


#: Names accepted by :func:`build` (also the stems of the files in ``models/``).
MODEL_NAMES = ("resnet_digits", "vit_digits")


def build(name: str, state_dict: str | Path | None = None) -> nn.Module:
    """Build ``resnet_digits`` or ``vit_digits`` (eval mode), loading ``state_dict`` if given."""
    if name == "resnet_digits":
        model: nn.Module = ResNetDigits()
    elif name == "vit_digits":
        model = ViTDigits()
    else:
        raise ValueError(f"unknown digits model {name!r}; choose from {MODEL_NAMES}")
    if state_dict is not None:
        model.load_state_dict(torch.load(state_dict, map_location="cpu", weights_only=True))
    return model.eval()
