"""Tiny Vision Transformer (timm-style) reference model.

``Conv2d(3, 32, 8, stride=8)`` patch embedding on a ``1x3x32x32`` image
(16 patches), ``flatten(2).transpose(1, 2)``, a learned CLS token
concatenated in front (``torch.cat``), learned position embeddings added,
two pre-norm blocks and a final LayerNorm; the CLS token (``x[:, 0]``) goes
through a linear head to 10 classes. Hidden 32, 4 heads of 8, MLP 64.

Each block: ``x + attn(ln1(x))``, ``x + mlp(ln2(x))``. Attention uses ONE
fused ``qkv`` Linear, ``reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4)``,
``q, k, v = qkv.unbind(0)``; then either hand-written softmax attention or
``F.scaled_dot_product_attention`` (``sdpa=True``, registry name
``vit_sdpa``), ``transpose(1, 2).reshape(B, N, C)`` and an output Linear.
The MLP is ``Linear -> GELU -> Linear``. ``vit`` and ``vit_sdpa`` have
identical weights.
"""

from __future__ import annotations

import torch
from torch import nn

from models.attention import attend, finalize_transformer

__all__ = ["ViT", "ViTAttention", "ViTBlock", "vit", "vit_sdpa"]


class ViTAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm layout)."""

    def __init__(self, dim: int, heads: int, sdpa: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5
        self.sdpa = sdpa
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.sdpa:
            out = attend(q, k, v, sdpa=True)
        else:
            attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
            out = attn @ v
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class ViTBlock(nn.Module):
    """Pre-norm transformer block: attention and GELU MLP, each residual."""

    def __init__(self, dim: int, heads: int, mlp: int, sdpa: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ViTAttention(dim, heads, sdpa)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Patch embedding, CLS token, position embeddings, blocks, CLS head."""

    def __init__(
        self,
        image: int = 32,
        patch: int = 8,
        dim: int = 32,
        depth: int = 2,
        heads: int = 4,
        mlp: int = 64,
        num_classes: int = 10,
        sdpa: bool = False,
    ) -> None:
        super().__init__()
        tokens = (image // patch) ** 2 + 1
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))
        self.blocks = nn.Sequential(*(ViTBlock(dim, heads, mlp, sdpa) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def _build(seed: int, sdpa: bool) -> nn.Module:
    torch.manual_seed(seed)
    model = ViT(sdpa=sdpa)
    finalize_transformer(model)
    with torch.no_grad():
        model.cls_token.normal_(0.0, 1.0)
        model.pos_embed.normal_(0.0, 0.5)
    return model


def vit(seed: int = 0) -> nn.Module:
    """ViT: conv patches, CLS token, 2 pre-norm blocks, hand-written attention."""
    return _build(seed, sdpa=False)


def vit_sdpa(seed: int = 0) -> nn.Module:
    """ViT (same weights as ``vit``) with F.scaled_dot_product_attention."""
    return _build(seed, sdpa=True)
