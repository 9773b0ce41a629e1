"""Tiny Llama-style causal decoder reference model.

Input ``input_ids`` (int64 ``[B, S]``, values ``< 100``, ``S <= 16``); output
logits ``[B, S, 100]``. Token embedding (vocab 100), two pre-norm decoder
layers, final RMSNorm and an untied, bias-free LM head. Hidden 32, 4 query
heads and 2 key/value heads of 8 (grouped-query attention), MLP 64.

Each layer: ``x + attn(rms1(x))``, ``x + mlp(rms2(x))``, all Linears without
bias. Attention: separate ``q_proj``/``k_proj``/``v_proj``, heads via
``view(B, S, H, d).transpose(1, 2)``, rotary position embeddings
(rotate-half, ``cos``/``sin`` sliced from precomputed ``[16, d]`` buffers),
K/V expanded with HF's ``repeat_kv`` (``x[:, :, None].expand(...).reshape``),
causal mask (``masked_fill`` of ``q @ k^T * scale`` with a triangular
boolean buffer), softmax, ``@ v``, ``o_proj``. MLP:
``down(silu(gate(x)) * up(x))``. RMSNorm is written out by hand
(``x * rsqrt(mean(x^2) + eps) * weight``).

``gpt_sdpa`` (same weights) replaces the masked softmax by
``F.scaled_dot_product_attention(q, repeat_kv(k), repeat_kv(v), is_causal=True)``
(HF's SDPA path); at opset 23 the dynamo exporter turns it into the fused
ONNX ``Attention`` op (``is_causal=1``). In both models the hand-written
RMSNorm becomes ``RMSNormalization`` with dynamo at opset 23 (onnxscript
optimizer fusion), and stays decomposed otherwise.
"""

from __future__ import annotations

import torch
from torch import nn

from models.attention import (
    RMSNorm,
    apply_rotary,
    attend,
    finalize_transformer,
    repeat_kv,
    rotary_tables,
)

__all__ = ["Gpt", "GptAttention", "GptLayer", "gpt", "gpt_sdpa"]

VOCAB = 100
MAX_POSITIONS = 16


class GptAttention(nn.Module):
    """Causal grouped-query attention with rotary embeddings, no biases."""

    def __init__(
        self, dim: int, heads: int, kv_heads: int, max_positions: int, sdpa: bool = False
    ) -> None:
        super().__init__()
        self.heads = heads
        self.kv_heads = kv_heads
        self.head_dim = dim // heads
        self.sdpa = sdpa
        self.q_proj = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, dim, bias=False)
        cos, sin = rotary_tables(max_positions, self.head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        causal = torch.ones(max_positions, max_positions, dtype=torch.bool).tril()
        self.register_buffer("causal", causal, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        d = self.head_dim
        q = self.q_proj(x).view(B, S, self.heads, d).transpose(1, 2)
        k = self.k_proj(x).view(B, S, self.kv_heads, d).transpose(1, 2)
        v = self.v_proj(x).view(B, S, self.kv_heads, d).transpose(1, 2)
        cos, sin = self.cos[:S], self.sin[:S]
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        n_rep = self.heads // self.kv_heads
        k = repeat_kv(k, n_rep)
        v = repeat_kv(v, n_rep)
        if self.sdpa:
            out = attend(q, k, v, sdpa=True, is_causal=True)
        else:
            scores = q @ k.transpose(-2, -1) * d**-0.5
            scores = scores.masked_fill(~self.causal[:S, :S], torch.finfo(scores.dtype).min)
            out = scores.softmax(dim=-1) @ v
        return self.o_proj(out.transpose(1, 2).reshape(B, S, self.heads * d))


class GptLayer(nn.Module):
    """Pre-norm decoder layer: attention and gated SiLU MLP, each residual."""

    def __init__(
        self,
        dim: int,
        heads: int,
        kv_heads: int,
        mlp: int,
        max_positions: int,
        sdpa: bool = False,
    ) -> None:
        super().__init__()
        self.input_norm = RMSNorm(dim)
        self.attn = GptAttention(dim, heads, kv_heads, max_positions, sdpa)
        self.post_attention_norm = RMSNorm(dim)
        self.gate_proj = nn.Linear(dim, mlp, bias=False)
        self.up_proj = nn.Linear(dim, mlp, bias=False)
        self.down_proj = nn.Linear(mlp, dim, bias=False)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.input_norm(x))
        h = self.post_attention_norm(x)
        return x + self.down_proj(self.act(self.gate_proj(h)) * self.up_proj(h))


class Gpt(nn.Module):
    """Token embedding, decoder layers, final RMSNorm, untied LM head."""

    def __init__(
        self,
        vocab: int = VOCAB,
        max_positions: int = MAX_POSITIONS,
        dim: int = 32,
        depth: int = 2,
        heads: int = 4,
        kv_heads: int = 2,
        mlp: int = 64,
        sdpa: bool = False,
    ) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.Sequential(
            *(GptLayer(dim, heads, kv_heads, mlp, max_positions, sdpa) for _ in range(depth))
        )
        self.norm = RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.embed_tokens(input_ids))
        return self.lm_head(self.norm(x))


def _build(seed: int, sdpa: bool) -> nn.Module:
    torch.manual_seed(seed)
    return finalize_transformer(Gpt(sdpa=sdpa))


def gpt(seed: int = 0) -> nn.Module:
    """GPT: Llama-style causal decoder, GQA, rotary, hand-written attention/RMSNorm."""
    return _build(seed, sdpa=False)


def gpt_sdpa(seed: int = 0) -> nn.Module:
    """GPT (same weights as ``gpt``) with F.scaled_dot_product_attention (is_causal)."""
    return _build(seed, sdpa=True)
