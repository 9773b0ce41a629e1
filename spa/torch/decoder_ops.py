"""The ops of LLM decoder graphs for ``spa.torch.from_onnx``: rotary embeddings (ONNX's
``RotaryEmbedding``, opset 23, and onnxruntime's contrib one), onnxruntime's
``GroupQueryAttention`` (what onnxruntime-genai's builder emits), ONNX's ``SwiGLU`` (opset 28).

Rotary embedding of ``x`` at position ``p``, on the first ``R`` channels of each head
(``R = 2 · cos.shape[-1]``, ``rotary_embedding_dim``; the others pass through), with
``c = cos[p]``, ``s = sin[p]`` of ``R/2`` entries::

    (x₁, x₂) = the halves of x[:R]                   (interleaved: x[0:R:2], x[1:R:2])
    out[:R] = (c·x₁ − s·x₂, s·x₁ + c·x₂) concatenated (interleaved: alternating)

ONNX's form takes ``(X, cos, sin, position_ids?)``: without position ids the caches are
already ``[B, S, R/2]`` per position. The contrib form takes ``(X, position_ids, cos, sin)``,
position ids ``[B, S]`` or one offset ``[1]`` (positions ``offset + s``); its ``scale``
attribute is ignored, as onnxruntime's CPU kernel ignores it, and ``is_packed_batching`` is
refused. Both take ``[B, heads, S, d]`` or ``[B, S, heads·d]`` (heads from ``num_heads``; the
contrib form, without it, takes full rotary heads of ``R``).

GroupQueryAttention (``[B, S, heads·d]`` query, key and value, or one packed QKV) keeps a
BNSH cache: row ``b`` holds ``T_b = seqlens_k[b] + 1`` tokens after this step, the ``S`` new
ones at positions ``o_b = max(T_b − S, 0)`` on (a first prompt, ``S ==
total_sequence_length``, starts at 0). ``present``, of ``max(total_sequence_length, P)``
rows, is ``past[:o_b]``, the new keys, then zeros, as onnxruntime's CPU kernel writes it.
Query ``i`` of row ``b`` sits at ``o_b + i``; it sees keys ``j < T_b`` and, unless
``causal=0``, ``j <= o_b + i``; with ``local_window_size`` ``W`` only the last ``W`` of those,
``j > o_b + i − W`` (onnxruntime 1.32's CPU kernel; older ones kept ``W + 1``). With
``do_rotary`` queries and new keys are rotated at ``o_b + i``, or at their position ids if
given, except on a first prompt: there onnxruntime reads the first id only, ``ids[0, 0] + i``
for every row. ``softcap`` applies before the attention bias; ``smooth_softmax`` adds a zero
logit to every row's softmax, ``head_sink`` one logit per head. Refused by name: quantized
caches (``k_scale``, ``v_scale``, ``k_quant_type``, ``v_quant_type``,
``kv_cache_bit_width``), per-head Q/K norms, ``query_seqlens``, ``sliding_window_cache``,
``qk_output``.
"""

from __future__ import annotations

import torch

from spa.coupling.registry import LATEST
from spa.torch.attention_ops import attend, merge_heads, split_heads, visible
from spa.torch.interpreter import UnsupportedOpsError, given, int_of, ms_op, op

Tensor = torch.Tensor


def rotate(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    """``x [B, heads, S, d]`` rotated by ``cos``, ``sin`` ``[B or 1, S, R/2]``."""
    half = cos.shape[-1]
    rot, rest = x[..., :2 * half], x[..., 2 * half:]
    c, s = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    x1, x2 = (rot[..., 0::2], rot[..., 1::2]) if interleaved else (rot[..., :half],
                                                                  rot[..., half:])
    real, imag = c * x1 - s * x2, s * x1 + c * x2
    out = torch.stack([real, imag], -1).flatten(-2) if interleaved else torch.cat([real, imag],
                                                                                  -1)
    return torch.cat([out, rest], -1)


def _rotary(x: Tensor, heads: int, cos: Tensor, sin: Tensor, dim: int,
            interleaved: bool) -> Tensor:
    """Rotate ``x``, ``[B, heads, S, d]`` or ``[B, S, heads·d]``, on its first ``dim``
    channels (0: as many as the caches hold)."""
    if dim:
        cos, sin = cos[..., :dim // 2], sin[..., :dim // 2]
    if x.dim() == 4:
        return rotate(x, cos, sin, interleaved)
    if not heads:
        raise UnsupportedOpsError("RotaryEmbedding of a 3-D input without num_heads")
    return merge_heads(rotate(split_heads(x, heads), cos, sin, interleaved))


@op("RotaryEmbedding", opsets=(23, LATEST))
def _rotary_embedding(a: dict, x: list) -> Tensor:
    cos, sin, pos = x[1], x[2], given(x, 3)
    if pos is not None:
        cos, sin = cos[pos.long()], sin[pos.long()]
    return _rotary(x[0], a.get("num_heads", 0), cos, sin, a.get("rotary_embedding_dim", 0),
                   bool(a.get("interleaved", 0)))


@ms_op("RotaryEmbedding")
def _ms_rotary_embedding(a: dict, x: list) -> Tensor:
    if a.get("is_packed_batching", 0):
        raise UnsupportedOpsError("RotaryEmbedding with is_packed_batching (ragged batches)")
    inp, pos, cos, sin = x
    s = inp.shape[2] if inp.dim() == 4 else inp.shape[1]
    pos = pos.long()
    if pos.numel() == 1:
        pos = pos.reshape(1, 1) + torch.arange(s, device=pos.device)
    heads = a.get("num_heads", 0) or (inp.shape[-1] // (2 * cos.shape[-1]))
    return _rotary(inp, heads, cos[pos], sin[pos], a.get("rotary_embedding_dim", 0),
                   bool(a.get("interleaved", 0)))


@op("SwiGLU", opsets=(28, LATEST))
def _swiglu(a: dict, x: list) -> Tensor:
    """``A · sigmoid(alpha · A) · B``."""
    return x[0] * torch.sigmoid(a.get("alpha", 1.0) * x[0]) * x[1]


# ---- GroupQueryAttention ---------------------------------------------------------------------
_GQA_REFUSED_INPUTS = {12: "k_scale", 13: "v_scale", 14: "q_norm_weight",
                       15: "k_norm_weight", 16: "query_seqlens"}


def _gqa_refusals(a: dict, x: list) -> list[str]:
    """What of a GroupQueryAttention node this module cannot run, by name."""
    out = [name for i, name in _GQA_REFUSED_INPUTS.items() if given(x, i) is not None]
    out += [f"{k}={a[k]}" for k in ("sliding_window_cache", "qk_output", "kv_cache_bit_width")
            if a.get(k, 0)]
    out += [f"{k}={a[k]}" for k in ("k_quant_type", "v_quant_type")
            if a.get(k, "NONE") != "NONE"]
    return out


def _cache(past: Tensor | None, new: Tensor, offsets: list[int], length: int) -> Tensor:
    """``present`` of ``length`` rows: per batch row ``past[:o]``, the new rows, zeros."""
    rows = []
    for b, o in enumerate(offsets):
        kept = [new[b]] if past is None else [past[b, :, :o], new[b]]
        pad = new.new_zeros(new.shape[1], length - o - new.shape[2], new.shape[3])
        rows.append(torch.cat([*kept, pad], 1))
    return torch.stack(rows)


@ms_op("GroupQueryAttention")
def _group_query_attention(a: dict, x: list) -> tuple[Tensor, Tensor, Tensor]:
    """Outputs: ``[B, S, heads·d]``, ``present_key``, ``present_value``."""
    refused = _gqa_refusals(a, x)
    if refused:
        raise UnsupportedOpsError("GroupQueryAttention with " + ", ".join(refused))
    heads, kv_heads = int(a["num_heads"]), int(a["kv_num_heads"])
    q, k, v = x[0], given(x, 1), given(x, 2)
    if k is None or v is None:
        d = q.shape[-1] // (heads + 2 * kv_heads)
        q, k, v = torch.split(q, [heads * d, kv_heads * d, kv_heads * d], -1)
    q, k, v = split_heads(q, heads), split_heads(k, kv_heads), split_heads(v, kv_heads)
    s, total = q.shape[2], int_of(x[6])
    totals = x[5].long().reshape(-1) + 1
    offsets = (totals - s).clamp(min=0)
    if a.get("do_rotary", 0):
        pos = given(x, 9)
        steps = torch.arange(s, device=q.device)
        if pos is None:
            pos = offsets[:, None] + steps
        elif s == total:  # a first prompt: onnxruntime reads the first position id only
            pos = pos.reshape(-1)[:1, None] + steps
        pos = pos.long()
        cos, sin, inter = x[7][pos], x[8][pos], bool(a.get("rotary_interleaved", 0))
        q, k = rotate(q, cos, sin, inter), rotate(k, cos, sin, inter)
    past_k, past_v = given(x, 3), given(x, 4)
    length = max(total, 0 if past_k is None else past_k.shape[2])
    where = [int(o) for o in offsets.tolist()]
    present_k, present_v = _cache(past_k, k, where, length), _cache(past_v, v, where, length)
    window = int(a.get("local_window_size", -1))
    keep = visible(s, length, offsets, causal=bool(a.get("causal", 1)),
                   left=window - 1 if window > 0 else -1, valid=totals, device=q.device)
    bias = given(x, 10)
    if bias is not None:
        bias = torch.nn.functional.pad(bias, (0, length - bias.shape[-1]))
    sink = given(x, 11)
    if sink is None and a.get("smooth_softmax", 0):
        sink = q.new_zeros(heads)
    out, _ = attend(q, present_k, present_v, scale=a.get("scale"),
                    softcap=a.get("softcap", 0.0), bias=bias, keep=keep, sink=sink)
    return merge_heads(out), present_k, present_v
