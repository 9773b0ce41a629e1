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

Facts (spa/coupling/facts.py). MACs: ``|Y| · K``, ``K`` read off ``A`` (Gemm: its axis 0 if
``transA`` else 1; MatMul: its last axis). Layer inputs: Gemm's ``B`` reads ``A`` at its K axis;
a MatMul weight reads the other operand (``A.-1`` for ``W`` on the right, ``X.-2`` on the
left). Bias: Gemm's input 2 (``C``); a MatMul's is the constant of the Add that follows it.

Fail closed, with the reason: a dynamic Gemm weight, a 1-D MatMul operand (a vector product), a
constant MatMul operand of rank other than 2 (a batched weight), two constant operands, an
operand dequantised from integers by plain ops in a form that cannot be sliced
(spa/ir/quant_chain.py).
"""

from __future__ import annotations

from math import prod
from typing import TYPE_CHECKING

from spa.coupling.facts import BiasSlot, MacTerm, mac_term
from spa.coupling.registry import register
from spa.coupling.rules.elementwise import couple_broadcast
from spa.coupling.types import Role

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

    from spa.coupling.context import NodeContext


def _gemm_macs(node: gs.Node) -> MacTerm | None:
    x, w, y = node.inputs[0], node.inputs[1], node.outputs[0]
    k_axis = 0 if int(node.attrs.get("transA", 0)) else 1
    return mac_term([y, x], lambda y_, x_: prod(y_) * x_[k_axis], known=[w])


def _matmul_macs(node: gs.Node) -> MacTerm | None:
    x, w, y = node.inputs[0], node.inputs[1], node.outputs[0]
    return mac_term([y, x], lambda y_, x_: prod(y_) * (x_[-1] if len(x_) > 1 else 1),
                    known=[w])


def _gemm_input(node: gs.Node, slot: int) -> tuple[gs.Tensor, int] | None:
    """``B`` (input 1) reads ``A``'s K axis: 0 if ``transA`` else 1."""
    return (node.inputs[0], 0 if node.attrs.get("transA", 0) else 1) if slot == 1 else None


def _matmul_input(node: gs.Node, slot: int) -> tuple[gs.Tensor, int] | None:
    """A weight on the right reads the left operand's last axis; on the left, the right
    operand's second-to-last."""
    if slot not in (0, 1):
        return None
    return node.inputs[1 - slot], -1 if slot == 1 else -2


@register("Gemm", mac=_gemm_macs, layer_input=_gemm_input, bias=BiasSlot(2))
def gemm(ctx: NodeContext) -> None:
    a, b, c, y = ctx.input(0), ctx.input(1), ctx.input(2), ctx.output(0)
    if ctx.const(b) is None or ctx.rank(a) != 2 or ctx.rank(b) != 2:
        t = a if ctx.rank(a) != 2 else b
        ctx.refuse(ctx.not_constant(b) if ctx.const(b) is None else ctx.unknown_rank(t)
                   if ctx.rank(t) is None else f"{ctx.which(t)} of rank {ctx.rank(t)}")
        return
    trans_a, trans_b = ctx.attr_int("transA", 0), ctx.attr_int("transB", 0)
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


@register("MatMul", mac=_matmul_macs, layer_input=_matmul_input, bias=BiasSlot(None))
def matmul(ctx: NodeContext) -> None:
    a, b, y = ctx.input(0), ctx.input(1), ctx.output(0)
    ra, rb, ry = ctx.rank(a), ctx.rank(b), ctx.rank(y)
    why = _unsupported(ctx, a, b, y)
    if why is not None:
        ctx.refuse(why)
        return
    # _unsupported gave a reason otherwise:
    assert a is not None and b is not None and ra is not None and rb is not None \
        and ry is not None
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
        ctx.decline(f"axis {ra - 1} of '{a.name}' and axis {rb - 2} of '{b.name}' are summed "
                    "over in a product of two activations, with no weight to remove a channel "
                    "at (attention: heads prune whole, head_dim never)",
                    ctx.space(a, -1), ctx.space(b, -2))
    else:  # a constant on the left, by the checks above a 2-D one
        w_m, w_k = ctx.space(a, 0), ctx.space(a, 1)
        ctx.role(w_k, Role.CONSUMER)
        ctx.role(w_m, Role.PRODUCER)
        ctx.identity(ctx.space(b, -2), w_k)
        ctx.identity(w_m, ctx.space(y, -2))
        ctx.identity(ctx.space(b, -1), ctx.space(y, -1))
        for ax in range(rb - 2):
            ctx.identity(ctx.space(b, ax), ctx.space(y, ax + ry - rb))


def _unsupported(ctx: NodeContext, a: gs.Tensor | None, b: gs.Tensor | None, y: gs.Tensor | None
                 ) -> str | None:
    """Why a MatMul is none of the three forms above, or None."""
    ra, rb, ry = ctx.rank(a), ctx.rank(b), ctx.rank(y)
    if ra is None or rb is None or ry is None:
        return ctx.unknown_rank(a if ra is None else b if rb is None else y)
    if ra < 2 or rb < 2:
        return f"1-D {ctx.which(a if ra < 2 else b)}: a vector product"
    chain = ctx.unsliceable_chain(b) or ctx.unsliceable_chain(a)
    if chain is not None:
        return chain
    const_a, const_b = ctx.const(a) is not None, ctx.const(b) is not None
    if const_a and const_b:
        return "both inputs are constants"
    if (const_a and ra != 2) or (const_b and rb != 2):
        w, rank = (a, ra) if const_a else (b, rb)
        return f"constant {ctx.which(w)} of rank {rank}: only a 2-D weight is mapped"
    return None
