"""The fused ONNX ``Attention`` op (opset 23).

4-D form: ``Q [B, Hq, S, d]``, ``K [B, Hkv, L, d]``, ``V [B, Hkv, L, dv]`` → ``Y [B, Hq, S, dv]``.
Heads are independent: ``Q.1 ↔ Y.1``, ``K.1 ↔ V.1``, and query head ``h`` reads key/value head
``h // (Hq / Hkv)`` (grouped-query attention; Hq = Hkv is plain multi-head), so a key/value head
goes together with the query heads that share it. A per-head mask axis goes with ``Y.1``.

3-D form: ``Q [B, S, Hq·d]`` etc. with ``q_num_heads``/``kv_num_heads``: the hidden axes are
block-coupled to virtual head axes (head ``h`` owns ``[h·d, (h+1)·d)``), and the rewrite sets
the head counts to the surviving heads. The scale attribute is left alone: head_dim never
changes, and an absent scale (``1/√d``) stays right.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from spa.coupling.registry import register

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

    from spa.coupling.context import NodeContext, Space
    from spa.coupling.types import KeptLookup


@register("Attention", opsets=(23, 10_000))
def attention(ctx: NodeContext) -> None:
    q, k, v, y = ctx.input(0), ctx.input(1), ctx.input(2), ctx.output(0)
    why = _unsupported(ctx, [ctx.rank(t) for t in (q, k, v, y)])
    if why is not None:
        ctx.refuse(why)
        return
    rank = ctx.rank(q)
    for t in (k, v, y):
        ctx.identity(ctx.space(q, 0), ctx.space(t, 0))
    if rank == 4:
        q_heads, kv_heads = ctx.space(q, 1), ctx.space(k, 1)
        ctx.heads_axis(q_heads)
        ctx.identity(q_heads, ctx.space(y, 1))
        ctx.identity(kv_heads, ctx.space(v, 1))
        _couple_mask(ctx, ctx.space(y, 1))
    elif rank == 3:
        if ctx.attr("q_num_heads") is None or ctx.attr("kv_num_heads") is None:
            ctx.decline("3-D inputs without q_num_heads and kv_num_heads: the heads are not "
                        "known")
            return
        q_heads = ctx.virtual("q_heads", ctx.attr_int("q_num_heads"))
        kv_heads = ctx.virtual("kv_heads", ctx.attr_int("kv_num_heads"))
        ctx.heads_axis(q_heads)
        ctx.block(ctx.space(q, 2), q_heads)
        ctx.block(ctx.space(y, 2), q_heads)
        ctx.block(ctx.space(k, 2), kv_heads)
        ctx.block(ctx.space(v, 2), kv_heads)
        _couple_mask(ctx, q_heads)
        ctx.on_rewrite(_head_count_hook(q_heads, kv_heads))
    else:
        ctx.decline(f"inputs of rank {rank}: only the 3-D and 4-D forms are mapped")
        return
    ctx.identity(ctx.space(q, -2 if rank == 4 else 1), ctx.space(y, -2 if rank == 4 else 1))
    ctx.identity(ctx.space(k, -2 if rank == 4 else 1), ctx.space(v, -2 if rank == 4 else 1))
    if q_heads is not None and kv_heads is not None:
        if q_heads.length == kv_heads.length:
            ctx.identity(q_heads, kv_heads)
        else:
            ctx.block(q_heads, kv_heads)


def _unsupported(ctx: NodeContext, ranks: list[int | None]) -> str | None:
    """Why the node is outside the forms above (KV cache, extra outputs, ranks), or None."""
    if ctx.input(4) is not None:
        return "KV-cache inputs (past_key/past_value)"
    if len(ctx.outputs) != 1:
        return "extra outputs (present key/value or the QK scores)"
    if None in ranks:
        return "unknown rank of Q, K, V or the output"
    if len(set(ranks)) != 1:
        return f"Q, K, V and the output have different ranks {ranks}"
    return None


def _couple_mask(ctx: NodeContext, heads: Space | None) -> None:
    """A mask broadcasts to ``[B, Hq, S, L]``: its head axis, if it has one, is 3rd from last."""
    mask = ctx.input(3)
    shape = ctx.shape(mask)
    if mask is None or shape is None or len(shape) < 3 or heads is None:
        return
    if shape[-3] == heads.length and heads.length > 1:
        ctx.identity(ctx.space(mask, -3), heads)


def _head_count_hook(q_heads: Space, kv_heads: Space):
    def hook(node: gs.Node, kept: KeptLookup) -> None:
        node.attrs["q_num_heads"] = kept.count(q_heads.key)
        node.attrs["kv_num_heads"] = kept.count(kv_heads.key)

    return hook
