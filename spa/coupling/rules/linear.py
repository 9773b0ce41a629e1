"""Dense layers: Gemm and MatMul with a constant weight.

Gemm ``Y = α·A'·B' + β·C`` (``A' = Aᵀ`` if ``transA``, ``B' = Bᵀ`` if ``transB``):
the K axis of ``A'`` is consumed by the K axis of ``B'`` (consumer); the N axis of ``B'``
produces ``Y.1``; ``C`` is broadcast to ``[M, N]`` and its N axis, when it has one of full
length, goes with ``Y.1``. Only a constant ``B`` is a weight; anything else fails closed.

MatMul ``Y = A @ W`` with a 2-D constant ``W: [K, N]``: ``A.-1 ↔ W.0`` (consumer),
``W.1 ↔ Y.-1`` (producer), and the leading (batch) axes of ``A`` pass to ``Y`` unchanged.
``Y = W @ X`` with a 2-D constant ``W: [M, K]`` (channels-first dense, as in some TF graphs):
``X.-2 ↔ W.1`` (consumer), ``W.0 ↔ Y.-2`` (producer), other axes unchanged.

MatMul of two activations (attention scores ``Q @ Kᵀ``, context ``P @ V``): the batch dims
broadcast like element-wise ops (the head axis couples Q, K, V and the scores), ``A.-2 ↔ Y.-2``
and ``B.-1 ↔ Y.-1``. The contracted axis is summed with no weight to zero it at, so it is left
unhandled: heads are pruned whole, head_dim never.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from spa.coupling.registry import register
from spa.coupling.rules.elementwise import couple_broadcast
from spa.coupling.types import Role

if TYPE_CHECKING:
    from spa.coupling.context import NodeContext


@register("Gemm")
def gemm(ctx: NodeContext) -> None:
    a, b, c, y = ctx.input(0), ctx.input(1), ctx.input(2), ctx.output(0)
    if ctx.const(b) is None or ctx.rank(a) != 2 or ctx.rank(b) != 2:
        return
    trans_a, trans_b = int(ctx.attr("transA", 0)), int(ctx.attr("transB", 0))
    b_k, b_n = ctx.space(b, 1 if trans_b else 0), ctx.space(b, 0 if trans_b else 1)
    ctx.role(b_k, Role.CONSUMER)
    ctx.role(b_n, Role.PRODUCER)
    ctx.identity(ctx.space(a, 0 if trans_a else 1), b_k)
    ctx.identity(ctx.space(a, 1 if trans_a else 0), ctx.space(y, 0))
    ctx.identity(b_n, ctx.space(y, 1))
    if c is not None:
        shape_c = ctx.shape(c)
        if shape_c and shape_c[-1] is not None and shape_c[-1] > 1:
            ctx.identity(ctx.space(c, -1), ctx.space(y, 1))
        if shape_c and len(shape_c) == 2 and shape_c[0] is not None and shape_c[0] > 1:
            ctx.identity(ctx.space(c, 0), ctx.space(y, 0))


@register("MatMul")
def matmul(ctx: NodeContext) -> None:
    a, b, y = ctx.input(0), ctx.input(1), ctx.output(0)
    ra, rb, ry = ctx.rank(a), ctx.rank(b), ctx.rank(y)
    if ra is None or rb is None or ry is None or ra < 2 or rb < 2:
        return
    if ctx.const(b) is not None and rb == 2 and ctx.const(a) is None:
        w_k, w_n = ctx.space(b, 0), ctx.space(b, 1)
        ctx.role(w_k, Role.CONSUMER)
        ctx.role(w_n, Role.PRODUCER)
        ctx.identity(ctx.space(a, -1), w_k)
        ctx.identity(w_n, ctx.space(y, -1))
        for ax in range(ra - 1):
            ctx.identity(ctx.space(a, ax), ctx.space(y, ax + ry - ra))
    elif ctx.const(a) is None and ctx.const(b) is None:
        couple_broadcast(ctx, [a, b], y, skip_last=2)
        ctx.identity(ctx.space(a, -2), ctx.space(y, -2))
        ctx.identity(ctx.space(b, -1), ctx.space(y, -1))
    elif ctx.const(a) is not None and ra == 2 and ctx.const(b) is None:
        w_m, w_k = ctx.space(a, 0), ctx.space(a, 1)
        ctx.role(w_k, Role.CONSUMER)
        ctx.role(w_m, Role.PRODUCER)
        ctx.identity(ctx.space(b, -2), w_k)
        ctx.identity(w_m, ctx.space(y, -2))
        ctx.identity(ctx.space(b, -1), ctx.space(y, -1))
        for ax in range(rb - 2):
            ctx.identity(ctx.space(b, ax), ctx.space(y, ax + ry - rb))
