"""onnxruntime's fused attention ops (``com.microsoft``): ``Attention``, ``MultiHeadAttention`` and
``GroupQueryAttention``.

``Attention(input [B, S, D], weights [D, Hq + Hk + Hv], bias [Hq + Hk + Hv], mask_index, …)``
with ``num_heads = N`` projects ``input`` once, splits the columns into Q, K and V (sizes
``qkv_hidden_sizes``, equal thirds when absent) and runs ``N`` heads, head ``h`` reading columns
``[h·d, (h+1)·d)`` of each part (``d = size / N``, ``dv = Hv / N``). The output ``[B, S, Hv]``
is the heads' contexts side by side. So:

* ``input.2 ↔ weights.0`` (consumer; the hidden size), ``input.0/1 ↔ output.0/1``;
* a virtual head axis of length ``N``: the Q, K and V columns of head ``h`` in ``weights.1``
  (producer) and ``bias.0`` go with it (:meth:`NodeContext.sections`), and so do
  ``output.2``'s block ``[h·dv, (h+1)·dv)`` and the head axis of an ``attention_bias`` input
  (``[B, N, S, T]``) that has one.

Heads are pruned whole; the rewrite sets ``num_heads`` (and ``qkv_hidden_sizes``) to what
survives. ``d`` never changes, so an absent ``scale`` (``1/√d``) stays right.
A KV cache (GPT-2 as onnxruntime's tools export it: ``past [2, B, N, P, d]`` read, ``present
[2, B, N, P + S, d]`` written, keys and values of head ``h`` at index ``h`` of axis 2) goes with
the heads; as graph input and output they are a KV-cache pair, which lose the pruned heads
together. ``unidirectional`` (a causal mask) acts within a head.

Facts: MACs ``B·S·D·(Hq+Hk+Hv)`` for the projection plus ``B·S·S·(Hq + Hv)`` for the scores
and the context (the sequence length read off ``input``; symbolic dims count 1, as for a MatMul
of two activations); the weight reads ``input`` at its last axis; the bias is input 2.

``MultiHeadAttention(query [B, S, D], key [B, L, D], value [B, L, Dv], bias [D + D + Dv], …)``
is the same without the projection (Q, K and V come from the layers before it): head ``h`` owns
block ``[h·d, (h+1)·d)`` of ``query.2`` and ``key.2`` and ``[h·dv, (h+1)·dv)`` of ``value.2``
and ``output.2``; the bias splits as the QKV columns do; the rewrite sets ``num_heads``. MACs
``B·S·L·(D + Dv)`` (scores and context).

``GroupQueryAttention`` (grouped KV heads, rotary inside, KV cache): see
:func:`group_query_attention`; a KV head and the query heads that read it are one channel.

Fail closed, with a reason naming what is not mapped: for ``Attention`` a cache in another
form (a past without a present or the other way round, K and V of different head sizes,
``past_sequence_length``, a shared past/present buffer), for ``MultiHeadAttention`` a KV cache
(``past`` inputs, ``present`` outputs, a cache indirection),
the QK output and ``do_rotary``; packed QKV or KV forms and head-split (4-D) keys; a quantised
KV cache (``k_quant_type``/``v_quant_type``); a dynamic or non-2-D weight, an input of rank
other than 3, sizes that the head counts do not divide.
"""

from __future__ import annotations

from math import prod
from typing import TYPE_CHECKING

from spa.coupling.facts import BiasSlot, MacTerm, mac_term
from spa.coupling.registry import register
from spa.coupling.types import Role

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

    from spa.coupling.context import NodeContext, Space
    from spa.coupling.types import KeptLookup

_PAST, _ATTENTION_BIAS = 4, 5
_CACHE_EXTRA = (6, 7)  # past_sequence_length, cache_indirection


def _macs(node: gs.Node) -> MacTerm | None:
    x, w, y = node.inputs[0], node.inputs[1], node.outputs[0]

    def count(x_: tuple[int, ...], w_: tuple[int, ...], y_: tuple[int, ...]) -> int:
        tokens, seq = prod(x_[:-1]), x_[-2]
        return tokens * x_[-1] * w_[1] + tokens * seq * ((w_[1] - y_[-1]) // 2 + y_[-1])

    return mac_term([x, w, y], count) if len(x.shape or ()) == 3 else None


def _layer_input(node: gs.Node, slot: int) -> tuple[gs.Tensor, int] | None:
    return (node.inputs[0], -1) if slot == 1 else None


@register("Attention", domain="com.microsoft", mac=_macs, layer_input=_layer_input,
          bias=BiasSlot(2))
def attention(ctx: NodeContext) -> None:
    x, w, bias, y = ctx.input(0), ctx.input(1), ctx.input(2), ctx.output(0)
    why = _unsupported(ctx)
    if why is not None:
        ctx.refuse(why)
        return
    w_shape = ctx.shape(w)
    assert w_shape is not None and w_shape[1] is not None  # _unsupported said why otherwise
    n_heads = ctx.attr_int("num_heads")
    sizes = ctx.attr_ints("qkv_hidden_sizes") or [w_shape[1] // 3] * 3
    if sum(sizes) != w_shape[1] or any(n % n_heads for n in sizes):
        ctx.refuse(f"num_heads={n_heads} does not divide the Q, K, V sizes {sizes} of "
                   f"{ctx.which(w)} {list(w_shape)}")
        return
    for ax in (0, 1):
        ctx.identity_axes(x, ax, y, ax)
    w_in, w_out = ctx.space(w, 0), ctx.space(w, 1)
    ctx.role(w_in, Role.CONSUMER)
    ctx.role(w_out, Role.PRODUCER)
    ctx.identity(ctx.space(x, 2), w_in)
    heads = ctx.virtual("heads", n_heads)
    ctx.heads_axis(heads)
    ctx.sections(w_out, heads, sizes)
    ctx.sections(ctx.space(bias, 0), heads, sizes)
    ctx.block(ctx.space(y, 2), heads)
    relative = ctx.input(_ATTENTION_BIAS)
    shape = ctx.shape(relative)
    if shape is not None and len(shape) == 4 and shape[1] == n_heads > 1:
        ctx.identity(ctx.space(relative, 1), heads)
    ctx.on_rewrite(_head_count_hook(heads, sizes if ctx.attr("qkv_hidden_sizes") else None))
    # Last: a refused node's heads are still one (frozen) group, named by this reason.
    why = _cache_unsupported(ctx, sizes, n_heads)
    if why is not None:
        ctx.refuse(why)
    elif ctx.input(_PAST) is not None:
        spaces = ctx.space(ctx.input(_PAST), 2), ctx.space(ctx.output(1), 2)
        for s in spaces:
            ctx.identity(s, heads)
        ctx.kv_cache(*spaces, head_size=sizes[1] // n_heads)
    if ctx.attr_int("do_rotary", 0):
        ctx.refuse("attribute do_rotary=1 (rotary embedding inside the op) is not mapped")


def _unsupported(ctx: NodeContext) -> str | None:
    """Why the node's weight cannot be read as above, or None."""
    x, w = ctx.input(0), ctx.input(1)
    if ctx.const(w) is None:
        return ctx.not_constant(w)
    if ctx.rank(x) != 3 or ctx.rank(w) != 2:
        t = x if ctx.rank(x) != 3 else w
        return ctx.unknown_rank(t) if ctx.rank(t) is None else \
            f"{ctx.which(t)} of rank {ctx.rank(t)}"
    return None


def _cache_unsupported(ctx: NodeContext, sizes: list[int], n_heads: int) -> str | None:
    """Why the node's KV cache cannot go with its heads, or None (no cache, or a mapped one:
    ``past`` ``[2, B, N, P, d]`` read and ``present`` ``[2, B, N, P + S, d]`` written, K and V
    of one head size, nothing else about the cache given)."""
    past, present = ctx.input(_PAST), ctx.output(1)
    if past is None and present is None:
        return None
    shapes = [ctx.shape(t) for t in (past, present)]
    extra = [ctx.input(i) is not None for i in _CACHE_EXTRA]
    if any(s is None or len(s) != 5 or s[2] != n_heads for s in shapes) \
            or sizes[1] != sizes[2] or any(extra) or ctx.attr_int("past_present_share_buffer", 0):
        return "a KV cache (past input or present output) is not mapped"
    return None


def _head_count_hook(heads: Space, sizes: list[int] | None):
    def hook(node: gs.Node, kept: KeptLookup) -> None:
        n_kept = kept.count(heads.key)
        node.attrs["num_heads"] = n_kept
        if sizes is not None:
            node.attrs["qkv_hidden_sizes"] = [n // heads.length * n_kept for n in sizes]

    return hook


def _mha_macs(node: gs.Node) -> MacTerm | None:
    q, k, v = node.inputs[0], node.inputs[1], node.inputs[2]
    return mac_term([q, k, v], lambda q_, k_, v_: prod(q_[:-1]) * k_[-2] * (q_[-1] + v_[-1])) \
        if all(len(t.shape or ()) == 3 for t in (q, k, v)) else None


# MultiHeadAttention's inputs and outputs that only its KV-cache (or debugging) forms have.
_MHA_CACHE_INPUTS, _MHA_CACHE_OUTPUTS = (6, 7, 8, 9), (1, 2, 3)


@register("MultiHeadAttention", domain="com.microsoft", mac=_mha_macs)
def multi_head_attention(ctx: NodeContext) -> None:
    q, k, v, bias, y = ctx.input(0), ctx.input(1), ctx.input(2), ctx.input(3), ctx.output(0)
    ranks = [ctx.rank(t) for t in (q, k, v, y)]
    if ranks != [3, 3, 3, 3]:
        ctx.refuse(f"Q, K, V and output of ranks {ranks}: only separate 3-D Q, K and V are "
                   "mapped (not packed QKV or KV, nor head-split keys)")
        return
    n_heads = ctx.attr_int("num_heads")
    heads = ctx.virtual("heads", n_heads)
    ctx.heads_axis(heads)
    for t in (k, v, y):
        ctx.identity_axes(q, 0, t, 0)
    ctx.identity_axes(q, 1, y, 1)
    ctx.identity_axes(k, 1, v, 1)
    spaces = [ctx.space(t, 2) for t in (q, k, v, y)]
    for space in spaces:
        if not ctx.block(space, heads):
            ctx.refuse(f"num_heads={n_heads} does not divide the hidden sizes "
                       f"{[s.length if s else None for s in spaces]} of Q, K, V and output")
            return
    sq, sk, sv, _ = spaces
    assert sq is not None and sk is not None and sv is not None  # block() coupled them
    ctx.sections(ctx.space(bias, 0), heads, [sq.length, sk.length, sv.length])
    relative = ctx.input(_ATTENTION_BIAS)
    shape = ctx.shape(relative)
    if shape is not None and len(shape) == 4 and shape[1] == n_heads > 1:
        ctx.identity(ctx.space(relative, 1), heads)
    ctx.on_rewrite(_head_count_hook(heads, None))
    if any(ctx.input(i) is not None for i in _MHA_CACHE_INPUTS) \
            or any(ctx.output(i) is not None for i in _MHA_CACHE_OUTPUTS):
        ctx.refuse("a KV cache (past or present key/value, cache indirection) or the QK "
                   "output is not mapped")


# GroupQueryAttention's inputs and outputs (by position).
_GQA_PAST = (3, 4)
_GQA_PRESENT = (1, 2)
_GQA_ATTENTION_BIAS, _GQA_HEAD_SINK, _GQA_OUTPUT_QK = 10, 11, 3
# Attributes of forms not mapped: a quantised KV cache (its scales are per KV head or tensor).
_GQA_UNMAPPED = ("k_quant_type", "v_quant_type")


def _gqa_macs(node: gs.Node) -> MacTerm | None:
    q, k = node.inputs[0], node.inputs[1]
    return mac_term([q, k], lambda q_, k_: 2 * prod(q_[:-1]) * k_[-2] * q_[-1]) \
        if all(len(t.shape or ()) == 3 for t in (q, k)) else None


@register("GroupQueryAttention", domain="com.microsoft", mac=_gqa_macs)
def group_query_attention(ctx: NodeContext) -> None:
    """``GroupQueryAttention(query [B, S, Hq·d], key, value [B, S, Hkv·d], past_key/value
    [B, Hkv, P, d], …)``: query head ``h`` reads key/value head ``h // (Hq / Hkv)``, so a KV head
    and its query heads are one channel. Packed (no key and value: ``query`` is ``[Q | K | V]``
    of widths ``Hq·d, Hkv·d, Hkv·d``, as onnxruntime-genai's builder fuses the projections), KV
    head ``j`` is the ``j``-th block of each part. Rotary embedding (``do_rotary``), sliding
    windows, softcap and q/k norms act within a head and are untouched. The past and present KV
    cache's head axes go with the KV heads: in a decoder they are graph inputs and outputs, a
    KV-cache pair each (past key with present key, past value with present value), which lose
    the pruned KV heads together. ``head_sink`` and a per-head ``attention_bias`` go with the
    query heads; the rewrite sets ``num_heads`` and ``kv_num_heads``."""
    q, k, v, y = ctx.input(0), ctx.input(1), ctx.input(2), ctx.output(0)
    unmapped = [f"{a}={ctx.attr(a)}" for a in _GQA_UNMAPPED
                if str(ctx.attr(a, "NONE")).upper() != "NONE"]
    packed = k is None and v is None
    if (k is None) != (v is None) or unmapped:
        ctx.refuse(f"attribute {unmapped[0]} (a quantised KV cache) is not mapped" if unmapped
                   else "only one of key and value given")
        return
    ranks = [ctx.rank(t) for t in (q, k, v, y) if t is not None or not packed]
    if set(ranks) != {3}:
        ctx.refuse(f"Q, K, V and output of ranks {ranks}: only 3-D inputs are mapped")
        return
    q_heads = ctx.virtual("q_heads", ctx.attr_int("num_heads"))
    kv_heads = ctx.virtual("kv_heads", ctx.attr_int("kv_num_heads"))
    ctx.heads_axis(q_heads)
    for t in (k, v, y):
        ctx.identity_axes(q, 0, t, 0)
    ctx.identity_axes(q, 1, y, 1)
    couplings = [ctx.block(ctx.space(y, 2), q_heads), ctx.block(q_heads, kv_heads)]
    if packed:  # [Q | K | V]: KV head j's query heads are the j-th block of the Q part
        width = ctx.space(q, 2)
        n = q_heads.length + 2 * kv_heads.length
        size = width.length // n if width is not None and width.length % n == 0 else 0
        couplings.append(size > 0 and ctx.sections(width, kv_heads, [
            q_heads.length * size, kv_heads.length * size, kv_heads.length * size]))
    else:
        k_width = ctx.space(k, 2)
        size = k_width.length // kv_heads.length if k_width and kv_heads.length else 0
        couplings += [ctx.block(ctx.space(q, 2), q_heads), ctx.block(k_width, kv_heads),
                      ctx.block(ctx.space(v, 2), kv_heads)]
    if not all(couplings):
        ctx.refuse(f"num_heads={q_heads.length} and kv_num_heads={kv_heads.length} do not "
                   f"divide the widths of Q, K, V and output, or each other")
        return
    for past, present in zip(_GQA_PAST, _GQA_PRESENT, strict=True):
        spaces = ctx.space(ctx.input(past), 1), ctx.space(ctx.output(present), 1)
        for s in spaces:
            ctx.identity(s, kv_heads)
        ctx.kv_cache(*spaces, head_size=size)
    sink = ctx.input(_GQA_HEAD_SINK)
    ctx.identity(ctx.space(sink, 0), q_heads)
    for t in (ctx.input(_GQA_ATTENTION_BIAS), ctx.output(_GQA_OUTPUT_QK)):
        shape = ctx.shape(t)
        if shape is not None and len(shape) == 4 and shape[1] == q_heads.length > 1:
            ctx.identity(ctx.space(t, 1), q_heads)
    ctx.on_rewrite(_gqa_hook(q_heads, kv_heads))


def _gqa_hook(q_heads: Space, kv_heads: Space):
    def hook(node: gs.Node, kept: KeptLookup) -> None:
        node.attrs["num_heads"] = kept.count(q_heads.key)
        node.attrs["kv_num_heads"] = kept.count(kv_heads.key)

    return hook
