"""Scaled dot-product attention for ``spa.torch.from_onnx``: ONNX's ``Attention`` (opset 23 on)
and onnxruntime's contrib ``Attention`` and ``MultiHeadAttention``, with their KV caches.

Every attention op here (and GroupQueryAttention, spa/torch/decoder_ops.py) runs one core,
:func:`attend`, on ``[B, heads, S, d]`` queries over ``[B, kv_heads, L, d]`` keys and values,
a key head serving ``heads / kv_heads`` query heads in turn::

    raw = scale · Q Kᵀ   (scale: the attribute, else 1/√d)
    capped = softcap · tanh(raw / softcap)   (softcap > 0 only)
    scores = capped + bias, the keys a query may not see excluded: filled with the dtype's
             lowest value (as onnxruntime fills them), and a query row that sees no key gives
             a zero row, not NaN (the spec's rule and onnxruntime's)
    Y = softmax(scores) V   (a sink logit per head joins each row's softmax, if given)

Which keys a query sees (:func:`visible`): query ``i`` sits at absolute position
``p = offset + i`` and sees key ``j`` iff ``j <= p`` (causal), ``p - left <= j <= p + right``
(windows, -1 unbounded), and ``j < valid`` (the per-row count of real keys). The offset:

- ONNX ``Attention``: the past length with ``past_key`` (so upper-left alignment, offset 0,
  without one, even when the key sequence is longer than the query's: onnxruntime's rule and
  the spec's), ``nonpad_kv_seqlen - S`` per row with that input (opset 24).
- contrib ``Attention``/``MultiHeadAttention`` (``unidirectional``): ``L - S``, lower-right,
  which with a past is the past length. Their key mask is not an exclusion: the masked keys
  get ``mask_filter_value`` (-10000 by default) added to their scores, as a bias.

Caches: the ONNX op and MultiHeadAttention take ``past_key``/``past_value`` ``[B, kv_heads,
P, d]`` and output ``present = concat(past, new)`` along the sequence axis; the contrib
``Attention`` stacks both in one ``past``/``present`` of ``[2, B, heads, P, d]``. A shared
past/present buffer (``past_present_share_buffer``, ``past_sequence_length``) is refused.

The ONNX op's ``qk_matmul_output`` is ``raw``, ``capped``, ``scores`` or the probabilities
(``qk_matmul_output_mode`` 0 to 3), MultiHeadAttention's ``qk`` is ``scores``. A mask
shorter than the keys is padded with excluded positions (the spec; onnxruntime refuses it).
``softmax_precision`` is not applied: the softmax runs in the inputs' dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from spa.coupling.registry import LATEST
from spa.torch.interpreter import UnsupportedOpsError, given, ms_op, op

Tensor = torch.Tensor


def attend(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None,
           softcap: float = 0.0, bias: Tensor | None = None, keep: Tensor | None = None,
           sink: Tensor | None = None) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor, Tensor]]:
    """``softmax(scores) V`` as the module docstring says, and the stages ``(raw, capped,
    scores, probabilities)``. ``keep`` broadcasts to ``[B, heads, S, L]``; ``sink`` is
    ``[heads]``."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    raw = torch.matmul(q, k.transpose(-1, -2)) * (scale or 1.0 / math.sqrt(q.shape[-1]))
    capped = softcap * torch.tanh(raw / softcap) if softcap else raw
    scores = capped if bias is None else capped + bias
    if keep is not None:
        scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
    if sink is None:
        probs = torch.softmax(scores, -1)
    else:
        extra = sink.to(scores.dtype).reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, extra], -1), -1)[..., :-1]
    if keep is not None:
        probs = probs.masked_fill(~keep.any(-1, keepdim=True), 0.0)
    return torch.matmul(probs, v), (raw, capped, scores, probs)


def visible(s: int, length: int, offset: Tensor | int, *, causal: bool = False,
            left: int = -1, right: int = -1, valid: Tensor | None = None,
            device: torch.device | None = None) -> Tensor | None:
    """``[B or 1, 1, S, L]``: may query ``i`` (at ``p = offset + i``; ``offset`` an int or one
    per row) see key ``j``; None when every key is visible."""
    if not causal and left < 0 and right < 0 and valid is None:
        return None
    p = torch.arange(s, device=device)[:, None] + torch.as_tensor(
        offset, device=device).reshape(-1, 1, 1, 1)
    j = torch.arange(length, device=device)
    keep = torch.ones(1, 1, 1, length, dtype=torch.bool, device=device)
    if causal:
        keep = keep & (j <= p)
    if left >= 0:
        keep = keep & (j >= p - left)
    if right >= 0:
        keep = keep & (j <= p + right)
    if valid is not None:
        keep = keep & (j < valid.reshape(-1, 1, 1, 1).to(device))
    return keep


def split_heads(t: Tensor, heads: int) -> Tensor:
    """``[B, S, heads·d]`` → ``[B, heads, S, d]``."""
    return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)


def merge_heads(t: Tensor) -> Tensor:
    """``[B, heads, S, d]`` → ``[B, S, heads·d]``."""
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)


def _with_past(past: Tensor | None, new: Tensor) -> Tensor:
    return new if past is None else torch.cat([past, new], 2)


# ---- ONNX ------------------------------------------------------------------------------------
@op("Attention", opsets=(23, LATEST))
def _attention(a: dict, x: list) -> tuple[Tensor, ...]:
    """ONNX's Attention: 4-D ``[B, heads, S, d]`` inputs, or 3-D ones with
    ``q_num_heads``/``kv_num_heads``; a bool mask keeps its true scores, a float one is
    added; outputs ``Y``, ``present_key``, ``present_value``, ``qk_matmul_output``."""
    mode = a.get("qk_matmul_output_mode", 0)
    if mode not in range(4):
        raise UnsupportedOpsError(f"Attention qk_matmul_output_mode {mode} (0 to 3 only)")
    q, k, v = x[0], x[1], x[2]
    flat = q.dim() == 3
    if flat:
        q = split_heads(q, int(a["q_num_heads"]))
        k, v = (split_heads(t, int(a["kv_num_heads"])) for t in (k, v))
    past_k, past_v, nonpad = given(x, 4), given(x, 5), given(x, 6)
    k, v = _with_past(past_k, k), _with_past(past_v, v)
    s, length = q.shape[2], k.shape[2]
    offset: Tensor | int = 0 if past_k is None else past_k.shape[2]
    if nonpad is not None:
        offset = nonpad.long() - s
    keep = visible(s, length, offset, causal=bool(a.get("is_causal", 0)),
                   left=a.get("left_window_size", -1), right=a.get("right_window_size", -1),
                   valid=None if nonpad is None else nonpad.long(), device=q.device)
    mask, bias = given(x, 3), None
    if mask is not None:
        mask = F.pad(mask, (0, length - mask.shape[-1]),
                     value=False if mask.dtype == torch.bool else -math.inf)
        if mask.dtype == torch.bool:
            keep = mask if keep is None else keep & mask
        else:
            bias = mask
    out, stages = attend(q, k, v, scale=a.get("scale"), softcap=a.get("softcap", 0.0),
                         bias=bias, keep=keep)
    return (merge_heads(out) if flat else out), k, v, stages[mode]


# ---- onnxruntime's contrib ops (com.microsoft) -----------------------------------------------
def key_mask(mask: Tensor | None, n: int, length: int) -> Tensor | None:
    """The contrib ops' key mask as ``[B, 1, S or 1, L]`` bool: valid lengths ``[B]``, a 0/1
    ``[B, L]`` or ``[B, S, L]``."""
    if mask is None:
        return None
    if mask.dim() == 1 and mask.shape[0] == n:
        keep = torch.arange(length, device=mask.device)[None, :] < mask.long()[:, None]
        return keep[:, None, None, :]
    if mask.dim() in (2, 3) and mask.shape[-1] == length:
        keep = mask.ne(0)
        return keep[:, None, None, :] if mask.dim() == 2 else keep[:, None]
    raise UnsupportedOpsError(f"attention with a key mask of shape {list(mask.shape)} "
                              f"({length} keys: lengths [B], 0/1 [B, L] or [B, S, L] only)")


def contrib_attend(a: dict, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
                   bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """Contrib Attention's and MultiHeadAttention's core: masked keys get
    ``mask_filter_value`` added, later ones are excluded with ``unidirectional``
    (lower-right: a past shifts the triangle); the output ``[B, S, heads·d]`` and the
    scores."""
    n, s, length = q.shape[0], q.shape[2], k.shape[2]
    keep = key_mask(mask, n, length)
    if keep is not None:
        penalty = (~keep).to(q.dtype) * a.get("mask_filter_value", -10000.0)
        bias = penalty if bias is None else bias + penalty
    causal = visible(s, length, length - s, causal=bool(a.get("unidirectional", 0)),
                     device=q.device)
    out, stages = attend(q, k, v, scale=a.get("scale"), bias=bias, keep=causal)
    return merge_heads(out), stages[2]


def _mha_inputs(x: list, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """MultiHeadAttention's query, key and value as ``[B, heads, S or L, d]``: separate 3-D
    ones (plus the packed bias), packed QKV ``[B, S, heads, 3, d]``, packed KV ``[B, L, heads,
    2, d]``, or 4-D key and value already split into heads."""
    q, k, v, bias = x[0], given(x, 1), given(x, 2), given(x, 3)
    packed = q.dim() == 5 or (k is not None and k.dim() == 5)
    if q.dim() == 5:
        q, k, v = q.unbind(3)
    elif k is not None and k.dim() == 5:
        k, v = k.unbind(3)
    if k is None or v is None:
        raise UnsupportedOpsError("MultiHeadAttention without key and value")
    if bias is not None:
        if q.dim() != 3 or k.dim() != 3:
            raise UnsupportedOpsError("MultiHeadAttention with a bias and packed or 4-D inputs")
        parts = torch.split(bias, [q.shape[-1], k.shape[-1], v.shape[-1]])
        q, k, v = (t + b for t, b in zip((q, k, v), parts))

    def heads_first(t: Tensor) -> Tensor:  # [B, S, heads·d] or [B, S, heads, d]
        return split_heads(t, heads) if t.dim() == 3 else t.transpose(1, 2)

    if k.dim() == 3 or packed:  # else 4-D, already [B, heads, L, d]
        k, v = heads_first(k), heads_first(v)
    return heads_first(q), k, v


@ms_op("MultiHeadAttention")
def _ms_multi_head_attention(a: dict, x: list) -> tuple[Tensor, ...]:
    """onnxruntime's MultiHeadAttention, self or cross: outputs, ``present_key``,
    ``present_value`` (``[B, heads, P + L, d]``), the scaled ``Q Kᵀ``."""
    if given(x, 8) is not None or given(x, 9) is not None:
        raise UnsupportedOpsError("MultiHeadAttention with past_sequence_length (a shared "
                                  "past/present buffer) or cache_indirection (beam search)")
    q, k, v = _mha_inputs(x, int(a["num_heads"]))
    k, v = _with_past(given(x, 6), k), _with_past(given(x, 7), v)
    out, qk = contrib_attend(a, q, k, v, given(x, 4), given(x, 5))
    return out, k, v, qk


@ms_op("Attention")
def _ms_attention(a: dict, x: list) -> tuple[Tensor, Tensor | None]:
    """Multi-head self-attention on one packed QKV projection (``qkv_hidden_sizes`` when V's
    width differs), with the optional ``past`` ``[2, B, heads, P, d]`` and attention bias;
    outputs and ``present`` (none when V's width differs: there is no cache then)."""
    if a.get("past_present_share_buffer", 0) or given(x, 6) is not None \
            or a.get("do_rotary", 0):
        raise UnsupportedOpsError("Attention with past_present_share_buffer, "
                                  "past_sequence_length or do_rotary")
    heads = int(a["num_heads"])
    hidden = x[1].shape[1]
    sizes = list(a.get("qkv_hidden_sizes") or [hidden // 3] * 3)
    qkv = torch.matmul(x[0], x[1])
    bias = given(x, 2)
    if bias is not None:
        qkv = qkv + bias
    q, k, v = (split_heads(t, heads) for t in torch.split(qkv, sizes, dim=-1))
    past = given(x, 4)
    if past is not None:
        k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
    out, _ = contrib_attend(a, q, k, v, given(x, 3), given(x, 5))
    return out, (torch.stack([k, v]) if k.shape == v.shape else None)  # no cache: V's width
