"""Tiny BERT-style encoder reference model (post-norm, padding mask).

Inputs ``input_ids`` (int64 ``[B, S]``, values ``< 100``) and
``attention_mask`` (int64 ``[B, S]``, 1 = token, 0 = padding). Token
embedding (vocab 100) + learned position embedding (``arange(S)`` sliced
from a 16-row table), LayerNorm; two post-norm encoder layers; a pooler
(``Linear + Tanh`` on the first token) and a linear classifier (10 classes).
Hidden 32, 4 heads of 8, MLP 64.

Each layer has SEPARATE ``query``/``key``/``value`` Linears, heads split with
``view(B, S, H, d).transpose(1, 2)``, the additive mask
``(1 - mask[:, None, None, :].float()) * -1e4`` added to the scores,
softmax, context ``transpose(1, 2).reshape(B, S, C)``, output Linear,
residual + LayerNorm, then ``Linear -> GELU (erf) -> Linear``, residual +
LayerNorm. ``sdpa=True`` (registry name ``bert_sdpa``, same weights) passes
the additive mask to ``F.scaled_dot_product_attention`` instead.

``bert_sdpa`` expands the mask to ``[B, 1, S, S]`` first (as HF's
``_prepare_4d_attention_mask`` does for its SDPA path; numerically the
same). With the unexpanded ``[B, 1, 1, S]`` mask (``expand_mask=False``) the
dynamo opset-23 export is valid ONNX -- ``Attention`` allows any mask
broadcastable to ``[B, H, S_q, S_kv]`` -- but onnxruntime 1.31's CPU
``Attention`` kernel rejects it ("inconsistent q_sequence_length (between
attn_mask and Q)"): it requires ``attn_mask.shape[-2] == S_q``.
"""

from __future__ import annotations

import torch
from torch import nn

from models.attention import attend, finalize_transformer

__all__ = ["Bert", "BertLayer", "bert", "bert_sdpa"]

VOCAB = 100
MAX_POSITIONS = 16


class BertLayer(nn.Module):
    """Post-norm encoder layer with separate q/k/v projections."""

    def __init__(self, dim: int, heads: int, mlp: int, sdpa: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.sdpa = sdpa
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-12)
        self.intermediate = nn.Linear(dim, mlp)
        self.act = nn.GELU()
        self.output = nn.Linear(mlp, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-12)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        return x.view(B, S, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, S, C = x.shape
        q = self._heads(self.query(x))
        k = self._heads(self.key(x))
        v = self._heads(self.value(x))
        ctx = attend(q, k, v, mask, sdpa=self.sdpa)
        ctx = ctx.transpose(1, 2).reshape(B, S, C)
        x = self.norm1(x + self.out(ctx))
        return self.norm2(x + self.output(self.act(self.intermediate(x))))


class Bert(nn.Module):
    """Embeddings + LayerNorm, post-norm layers, first-token pooler, classifier."""

    def __init__(
        self,
        vocab: int = VOCAB,
        max_positions: int = MAX_POSITIONS,
        dim: int = 32,
        depth: int = 2,
        heads: int = 4,
        mlp: int = 64,
        num_classes: int = 10,
        sdpa: bool = False,
        expand_mask: bool = False,
    ) -> None:
        super().__init__()
        self.expand_mask = expand_mask
        self.word_embeddings = nn.Embedding(vocab, dim)
        self.position_embeddings = nn.Embedding(max_positions, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-12)
        self.layers = nn.ModuleList(BertLayer(dim, heads, mlp, sdpa) for _ in range(depth))
        self.pooler = nn.Linear(dim, dim)
        self.pooler_act = nn.Tanh()
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        S = input_ids.shape[1]
        positions = torch.arange(S, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        x = self.norm(x)
        mask = (1 - attention_mask[:, None, None, :].float()) * -1e4
        if self.expand_mask:
            mask = mask.expand(-1, -1, S, -1)
        for layer in self.layers:
            x = layer(x, mask)
        pooled = self.pooler_act(self.pooler(x[:, 0]))
        return self.classifier(pooled)


def _build(seed: int, sdpa: bool, expand_mask: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    return finalize_transformer(Bert(sdpa=sdpa, expand_mask=expand_mask))


def bert(seed: int = 0) -> nn.Module:
    """BERT: post-norm encoder, separate q/k/v, additive padding mask."""
    return _build(seed, sdpa=False)


def bert_sdpa(seed: int = 0, expand_mask: bool = True) -> nn.Module:
    """BERT (same weights as ``bert``) with F.scaled_dot_product_attention, [B,1,S,S] mask."""
    return _build(seed, sdpa=True, expand_mask=expand_mask)
