"""onnxruntime's ``RotaryEmbedding`` (``com.microsoft``): rotary position embedding, per head.

``RotaryEmbedding(input, position_ids, cos_cache, sin_cache)`` rotates pairs of values inside
each head's ``head_size`` values by angles of the token's position: head ``h`` of the output
reads head ``h`` of the input only, so heads pass through, and ``head_size`` (whose values it
mixes pairwise) never changes.

* 4-D ``[B, N, S, H]``: axes 0–2 pass through; axis 3 (within a head) freezes.
* 3-D ``[B, S, N·H]``: the hidden axis is block-coupled to a virtual head axis of ``num_heads``
  (``head_size = 2 · cos_cache.shape[1]`` when ``num_heads`` is 0); the rewrite sets
  ``num_heads`` to the surviving heads when the attribute is given.

Fail closed, with a reason: ``is_packed_batching``, a head count that does not divide the
hidden size, an unknown rank.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from spa.coupling.registry import register

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

    from spa.coupling.context import NodeContext, Space
    from spa.coupling.types import KeptLookup

_COS = 2


@register("RotaryEmbedding", domain="com.microsoft")
def rotary_embedding(ctx: NodeContext) -> None:
    x, y = ctx.input(0), ctx.output(0)
    rank = ctx.rank(x)
    if ctx.attr_int("is_packed_batching", 0):
        ctx.refuse("attribute is_packed_batching=1 is not mapped")
        return
    if x is None or rank not in (3, 4) or ctx.rank(y) != rank:
        ctx.refuse(ctx.unknown_rank(x) if rank is None else f"{ctx.which(x)} of rank {rank}")
        return
    if rank == 4:
        ctx.same_axes([(x, y)], skip=[3])
        ctx.decline("axis 3 holds one head's values, which the rotation mixes pairwise",
                    ctx.space(x, 3), ctx.space(y, 3))
        return
    for ax in (0, 1):
        ctx.identity_axes(x, ax, y, ax)
    n_heads = ctx.attr_int("num_heads", 0) or _heads_from_cache(ctx)
    heads = ctx.virtual("heads", n_heads) if n_heads else None
    if heads is None or not (ctx.block(ctx.space(x, 2), heads)
                             and ctx.block(ctx.space(y, 2), heads)):
        ctx.decline(f"num_heads={n_heads} does not split axis 2 of '{x.name}' into heads",
                    ctx.space(x, 2), ctx.space(y, 2))
        return
    if ctx.attr_int("num_heads", 0):
        ctx.on_rewrite(_head_count_hook(heads))


def _heads_from_cache(ctx: NodeContext) -> int:
    """Heads when ``num_heads`` is 0: the hidden size over ``2 · cos_cache.shape[1]``."""
    width, cache = ctx.shape(ctx.input(0)), ctx.shape(ctx.input(_COS))
    if not width or not cache or width[-1] is None or not cache[-1]:
        return 0
    head_size = 2 * cache[-1]
    return width[-1] // head_size if width[-1] % head_size == 0 else 0


def _head_count_hook(heads: Space):
    def hook(node: gs.Node, kept: KeptLookup) -> None:
        node.attrs["num_heads"] = kept.count(heads.key)

    return hook
