"""Building blocks shared by the transformer reference models.

* :func:`attend` -- scaled dot-product attention either written out by hand
  (``q @ k^T * scale``, additive mask, ``softmax``, ``@ v``) or through
  ``F.scaled_dot_product_attention`` (``sdpa=True``). The hand-written form
  exports to ``MatMul``/``Mul``/``Add``/``Softmax``/``MatMul`` with every
  exporter; the SDPA form is what the dynamo exporter lowers through its SDPA
  decomposition at opset 18-22 and to the fused ONNX ``Attention`` op at
  opset >= 23.
* :class:`RMSNorm` -- Llama-style RMSNorm written out by hand
  (``x * rsqrt(mean(x^2) + eps) * weight``). At opset 23 exactly, the dynamo
  exporter's onnxscript optimizer (``optimize=True``) fuses this pattern into
  ``RMSNormalization``; otherwise it stays ``Pow``/``ReduceMean``/``Add``/
  ``Sqrt``/``Reciprocal``/``Mul`` (dynamo) or ``Pow``/``ReduceMean``/``Add``/
  ``Sqrt``/``Div``/``Mul`` (torchscript). ``F.rms_norm`` is deliberately not
  used: the torchscript exporter has no symbolic for ``aten::rms_norm``.
* :func:`rotate_half`, :func:`apply_rotary`, :func:`rotary_tables` -- rotary
  position embeddings (the HF "rotate half" layout).
* :func:`repeat_kv` -- the HF grouped-query-attention K/V expansion.
* :func:`finalize_transformer` -- deterministic re-initialisation: Kaiming
  fan-in linears (see :func:`models._common.reinit_weights`), randomised norm
  affine parameters (so no norm is an identity), ``N(0, 1)`` embeddings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models._common import reinit_weights

__all__ = [
    "RMSNorm",
    "apply_rotary",
    "attend",
    "finalize_transformer",
    "repeat_kv",
    "rotary_tables",
    "rotate_half",
]


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    sdpa: bool = False,
    is_causal: bool = False,
) -> torch.Tensor:
    """Attention over ``[B, H, S, d]`` tensors; returns ``[B, H, S, d]``.

    ``mask`` is an additive float mask broadcastable to ``[B, H, S, S]``.
    ``is_causal`` is only used with ``sdpa=True`` (the hand-written callers
    build their own causal mask and pass it as ``mask``). SDPA uses its
    default scale; the hand-written form multiplies by the Python constant
    ``d ** -0.5`` (``int()`` keeps the torchscript tracer from recording the
    size lookup as graph ops).
    """
    if sdpa:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
    scale = int(q.shape[-1]) ** -0.5
    scores = q @ k.transpose(-2, -1) * scale
    if mask is not None:
        scores = scores + mask
    return scores.softmax(dim=-1) @ v


class RMSNorm(nn.Module):
    """RMSNorm over the last axis, written out by hand (Llama style)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``cat((-x2, x1), -1)`` with ``x1``/``x2`` the two halves of the last axis."""
    d = x.shape[-1]
    x1 = x[..., : d // 2]
    x2 = x[..., d // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` (``cos``/``sin`` broadcast to ``x``)."""
    return x * cos + rotate_half(x) * sin


def rotary_tables(
    seq_len: int, head_dim: int, base: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``/``sin`` tables of shape ``[seq_len, head_dim]`` (HF layout)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    pos = torch.arange(seq_len, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``[b, kv, s, d] -> [b, kv * n_rep, s, d]`` (HF ``repeat_kv``)."""
    if n_rep == 1:
        return x
    b, kv, s, d = x.shape
    return x[:, :, None].expand(b, kv, n_rep, s, d).reshape(b, kv * n_rep, s, d)


@torch.no_grad()
def finalize_transformer(module: nn.Module) -> nn.Module:
    """Re-initialise ``module`` deterministically and switch it to eval mode.

    Linears get Kaiming fan-in weights and small biases; LayerNorm/RMSNorm
    weights ``U(0.5, 1.5)`` and biases ``N(0, 0.1)``; embeddings ``N(0, 1)``.
    Uses the global torch RNG, so seed it first. Parameters registered
    directly on a module (CLS tokens, position tables) are left to the caller.
    """
    reinit_weights(module)
    for m in module.modules():
        if isinstance(m, (nn.LayerNorm, RMSNorm)):
            if m.weight is not None:
                m.weight.uniform_(0.5, 1.5)
            bias = getattr(m, "bias", None)
            if bias is not None:
                bias.normal_(0.0, 0.1)
        elif isinstance(m, nn.Embedding):
            m.weight.normal_(0.0, 1.0)
        elif isinstance(m, nn.MultiheadAttention):
            # in_proj is a bare Parameter, not an nn.Linear: fan-in Kaiming by hand.
            if m.in_proj_weight is not None:
                m.in_proj_weight.normal_(0.0, m.embed_dim**-0.5)
            if m.in_proj_bias is not None:
                m.in_proj_bias.normal_(0.0, 0.05)
    module.eval()
    return module
