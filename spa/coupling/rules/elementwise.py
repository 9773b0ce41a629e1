"""Element-wise ops: unary activations and broadcasting n-ary arithmetic.

Unary ops map element ``i`` of every axis to element ``i`` of the same output axis. N-ary ops
(Add, Mul, Where, …) follow numpy broadcasting: input axis ``j`` aligns with output axis
``j + rank(Y) - rank(input)``; an axis of equal length is coupled identically (a residual add
couples both branches; squeeze-and-excite's ``x * s`` couples ``s``'s channels with ``x``'s; a
per-channel constant operand is sliced with the group); an axis of length 1 broadcast against a
longer one is not coupled (it stays length 1). An axis whose length is unknown on either side is
left unhandled and so freezes if it is a channel space.

Facts: ``Add`` adds its other operand to each (the bias of a MatMul it follows, when constant).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from spa.coupling.registry import register
from spa.coupling.types import Role

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

    from spa.coupling.context import NodeContext

UNARY = (
    "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "ThresholdedRelu", "Sigmoid", "HardSigmoid",
    "HardSwish", "Swish", "Tanh", "Gelu", "Erf", "Mish", "Softplus", "Softsign", "Exp", "Log",
    "Abs", "Neg", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Tan",
    "Asin", "Acos", "Atan", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh", "Not", "IsNaN", "IsInf",
    "Identity", "Cast", "Shrink", "BitwiseNot",
)
NARY = (
    "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mean", "Sum", "Mod", "Equal", "Less",
    "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Xor", "Where", "BitShift",
    "BitwiseAnd", "BitwiseOr", "BitwiseXor",
)


def couple_broadcast(ctx: NodeContext, inputs: list[gs.Tensor], y: gs.Tensor,
                     skip_last: int = 0) -> None:
    """Couple each input's axes with the output's under numpy broadcasting, leaving out the
    last ``skip_last`` axes of every tensor (MatMul broadcasts only its batch dims)."""
    shape_y = ctx.shape(y)
    if shape_y is None:
        ctx.decline(ctx.unknown_rank(y))
        return
    shape_y = shape_y[:len(shape_y) - skip_last]
    for t in inputs:
        shape_t = ctx.shape(t)
        if shape_t is None or len(shape_t) > len(shape_y) + skip_last:
            ctx.decline(ctx.unknown_rank(t) if shape_t is None else
                        f"{ctx.which(t)} has more axes than the output")
            continue
        shape_t = shape_t[:len(shape_t) - skip_last]
        lead = len(shape_y) - len(shape_t)
        for ax, length in enumerate(shape_t):
            if length is not None and length == shape_y[ax + lead]:
                ctx.identity(ctx.space(t, ax), ctx.space(y, ax + lead))
            elif (length is None) != (shape_y[ax + lead] is None):
                # One side unknown: a live channel axis on the other cannot be followed.
                ctx.decline(ctx.lengths_differ(t, y, ax, ax + lead), ctx.space(t, ax),
                            ctx.space(y, ax + lead))


@register(*UNARY)
def unary(ctx: NodeContext) -> None:
    ctx.same_axes([(ctx.input(0), ctx.output(0))])


@register("CastLike")
def cast_like(ctx: NodeContext) -> None:
    # The second input is read for its element type only (dynamo writes CastLike(0, x)).
    ctx.same_axes([(ctx.input(0), ctx.output(0))])
    like = ctx.input(1)
    rank = ctx.rank(like)
    for ax in range(rank or 0):
        ctx.handle(ctx.space(like, ax))


@register("Clip")
def clip(ctx: NodeContext) -> None:
    # min and max are scalars by the spec; only the data input carries channels.
    ctx.same_axes([(ctx.input(0), ctx.output(0))])


@register("Dropout")
def dropout(ctx: NodeContext) -> None:
    ctx.same_axes([(ctx.input(0), out) for out in ctx.outputs])


def _other_operand(node: gs.Node, slot: int) -> int | None:
    """``Add``'s bias for the operand at ``slot``: the other one."""
    return 1 - slot if slot in (0, 1) and len(node.inputs) == 2 else None


@register(*NARY)
@register("Add", adds_bias=_other_operand)
def nary(ctx: NodeContext) -> None:
    couple_broadcast(ctx, ctx.inputs, ctx.output(0))


@register("PRelu")
def prelu(ctx: NodeContext) -> None:
    x, slope, y = ctx.input(0), ctx.input(1), ctx.output(0)
    couple_broadcast(ctx, [x, slope], y)
    shape_s = ctx.shape(slope)
    if ctx.const(slope) is not None and shape_s:
        for ax, length in enumerate(shape_s):
            if length is not None and length > 1:
                ctx.role(ctx.space(slope, ax), Role.SCALE)
