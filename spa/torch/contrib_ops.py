"""onnxruntime's contrib ops (``com.microsoft``) as its transformer optimiser fuses them into BERT
and GPT-2, in torch, for ``spa.torch.from_onnx``: the GELUs, SkipLayerNormalization,
SkipSimplifiedLayerNormalization, EmbedLayerNormalization, FusedMatMul and FusedConv; matched
against onnxruntime in the tests. (The contrib attention, rotary and quantisation ops live with
their ONNX kin: attention_ops.py, decoder_ops.py, quant_ops.py, qlinear_ops.py.)

- ``Gelu`` and ``BiasGelu`` (of ``x + bias``) are exact, ``FastGelu`` (of ``x + bias`` when a
  bias is given) is the tanh approximation, ``QuickGelu`` is ``x · sigmoid(alpha · x)``.
- The skip norms normalise ``input + skip (+ bias)`` over the last axis (epsilon 1e-12 by
  default) and also output the sum (the residual that the next block adds to).
- EmbedLayerNormalization sums the word, position (``0..S-1`` unless position ids are given)
  and segment embeddings, normalises, and counts each row's mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from spa.torch import recurrent
from spa.torch.interpreter import UnsupportedOpsError, given, ms_op
from spa.torch.nn_ops import _conv


def _biased(x: list) -> torch.Tensor:
    bias = given(x, 1)
    return x[0] if bias is None else x[0] + bias


ms_op("Gelu")(lambda a, x: F.gelu(x[0]))
ms_op("BiasGelu")(lambda a, x: F.gelu(_biased(x)))
ms_op("FastGelu")(lambda a, x: F.gelu(_biased(x), approximate="tanh"))
ms_op("QuickGelu")(lambda a, x: x[0] * torch.sigmoid(a.get("alpha", 1.702) * x[0]))


def _skip_sum(x: list) -> torch.Tensor:
    """SkipLayerNormalization's input + skip (+ bias, its fifth input)."""
    total = x[0] + x[1]
    bias = given(x, 4)
    return total if bias is None else total + bias


@ms_op("SkipLayerNormalization")
def _skip_layernorm(a, x):
    """Outputs: the normalised sum, its mean and inverse standard deviation, the sum."""
    total = _skip_sum(x)
    mean = total.mean(-1, keepdim=True)
    inv = torch.rsqrt(total.var(-1, unbiased=False, keepdim=True) + a.get("epsilon", 1e-12))
    out = (total - mean) * inv * x[2]
    beta = given(x, 3)
    return (out if beta is None else out + beta), mean, inv, total


@ms_op("FusedMatMul")
def _fused_matmul(a, x):
    """``alpha · op(A) @ op(B)``, ``transA``/``transB`` swapping the last two axes (the
    batch transposes, ``transBatchA``/``transBatchB``, are not run)."""
    if a.get("transBatchA", 0) or a.get("transBatchB", 0):
        raise UnsupportedOpsError("FusedMatMul with transBatchA or transBatchB")
    A = x[0].transpose(-1, -2) if a.get("transA", 0) else x[0]
    B = x[1].transpose(-1, -2) if a.get("transB", 0) else x[1]
    return (A @ B) * a.get("alpha", 1.0)


@ms_op("FusedConv")
def _fused_conv(a, x):
    """onnxruntime's Conv with its activation fused: ``act(conv(X, W, B) + Z)``."""
    y = _conv(a, x[:3])
    z = given(x, 3)
    y = y if z is None else y + z
    name = a.get("activation")
    params = list(a.get("activation_params", []))
    if name is None:
        return y
    if name == "Clip":
        return torch.clamp(y, params[0], params[1])
    fn = recurrent.activation(name, *params[:2])  # LeakyRelu's alpha, HardSigmoid's alpha, beta
    if fn is None:
        raise UnsupportedOpsError(f"FusedConv activation {name}")
    return fn(y)


@ms_op("SkipSimplifiedLayerNormalization")
def _skip_rmsnorm(a, x):
    """Outputs: the RMS-normalised sum (input, skip, gamma, bias), unused, the inverse RMS,
    the sum."""
    total = x[0] + x[1]
    bias = given(x, 3)
    total = total if bias is None else total + bias
    inv = torch.rsqrt((total * total).mean(-1, keepdim=True) + a.get("epsilon", 1e-12))
    return total * inv * x[2], inv, inv, total


@ms_op("EmbedLayerNormalization")
def _embed_layernorm(a, x):
    """Word + position (+ segment) embeddings, layer-normalised; the mask index (the count of
    ones of each row of the mask, int32); the sum before the norm."""
    ids = x[0].long()
    n, s = ids.shape
    positions = given(x, 8)
    pos = (torch.arange(s, device=ids.device).expand(n, s) if positions is None
           else positions.long().expand(n, s))
    total = F.embedding(ids, x[2]) + F.embedding(pos, x[3])
    segments, table = given(x, 1), given(x, 4)
    if segments is not None and table is not None:
        total = total + F.embedding(segments.long(), table)
    out = F.layer_norm(total, total.shape[-1:], x[5], x[6], eps=a.get("epsilon", 1e-12))
    mask = given(x, 7)
    count = (mask.ne(0).sum(-1) if mask is not None
             else torch.full((n,), s, device=ids.device)).to(torch.int32)
    return out, count, total
