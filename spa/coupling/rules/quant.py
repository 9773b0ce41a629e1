"""Quantisation in QDQ form: QuantizeLinear and DequantizeLinear.

``y = saturate(round(x / s) + zp)`` (Quantize) and ``y = (x − zp) · s`` (Dequantize) act on
each element alone, so every axis of ``x`` is coupled with the same axis of ``y``:

* *per-tensor* (``s`` and ``zp`` scalars or of length 1): nothing else; the scale is untouched;
* *per-axis* (1-D ``s``, ``zp`` of ``x.shape[axis]``): element ``c`` of ``s`` and ``zp`` goes
  with index ``c`` of ``y``'s ``axis``, so the scales are sliced with the channels they scale.

That covers activation QDQ pairs (a channel passes through) and quantised weights:
``DequantizeLinear(q, s[C_out], zp[C_out], axis=0) → Conv`` — the layer sees the DQ output as
its weight (``NodeContext.const`` dequantises it, spa/ir/quant.py), so the producer and
consumer axes sit on the DQ output, and this rule slices the integer tensor ``q``, ``s`` and
``zp`` along with them. Any axis whose length the scale matches works the same way (a MatMul
weight ``[K, N]`` per-column, axis 1; a conv weight scaled per input channel, axis 1).
The model stays quantised: nothing is folded into float.

*Blocked* (opset 21, ``block_size``: ``s`` and ``zp`` of the data's rank, one value per block of
``axis``, as onnxruntime's ``MatMulNBitsQuantizer`` writes int4 weights in QDQ form): index ``c``
of ``axis`` goes with block ``c // block_size`` of the scale and zero point, so channels on that
axis go in whole blocks (as a ``MatMulNBits``' input columns, spa/coupling/rules/contrib_quant.py),
and every other axis index by index.

Fail closed, with a reason: a blocked axis that is not a whole number of blocks, a scale whose
length fits no axis, and the integer-domain ops (QLinearConv, QLinearMatMul,
ConvInteger, MatMulInteger, …: their weights, scales and zero points are interleaved inputs
with no per-channel rule here; a QDQ export of the same model prunes).

OBSPA's update and reconstruction's refit are computed on the dequantised weight and written as
new codes of ``q`` on its own scales and zero points (spa/ir/quant.py's ``requantized``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from spa.coupling.registry import register
from spa.coupling.types import Role
from spa.ir.quant import per_axis

if TYPE_CHECKING:
    from spa.coupling.context import NodeContext

INTEGER_OPS = ("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QLinearAdd",
               "QLinearMul", "QLinearAveragePool", "QLinearGlobalAveragePool",
               "QLinearLeakyRelu", "QLinearSigmoid", "QLinearConcat", "QGemm",
               "DynamicQuantizeLinear", "DynamicQuantizeMatMul", "MatMulIntegerToFloat")


@register("QuantizeLinear", "DequantizeLinear", opsets=(10, 10_000))
def quantize_linear(ctx: NodeContext) -> None:
    x, scale, zp, y = ctx.input(0), ctx.input(1), ctx.input(2), ctx.output(0)
    shape, scale_shape = ctx.shape(x), ctx.shape(scale)
    if shape is None or scale_shape is None or y is None or len(ctx.outputs) != 1:
        ctx.refuse(ctx.unknown_rank(x if shape is None else scale)
                   if shape is None or scale_shape is None else f"{len(ctx.outputs)} outputs")
        return
    block = int(ctx.node.attrs.get("block_size", 0) or 0)
    if block > 0:
        _blocked(ctx, shape, scale_shape, block)
        return
    axis = per_axis(ctx.node, shape, scale_shape)
    if axis is False:
        ctx.refuse(f"quantisation with scale {list(scale_shape)} on data {list(shape)} "
                   f"(blocked, or per-axis on an axis it does not fit) is not supported")
        return
    ctx.same_axes([(x, y)])
    if axis is not None:
        for param in (scale, zp):
            ctx.identity(ctx.space(param, 0), ctx.space(y, axis))


def _blocked(ctx: NodeContext, shape: tuple, scale_shape: tuple, block: int) -> None:
    """Blocked quantisation (opset 21): ``s`` and ``zp`` of ``x``'s rank, ``⌈n / block⌉`` long on
    ``axis`` and as ``x`` on every other axis. Index ``c`` of ``y``'s ``axis`` goes with block
    ``c // block`` of theirs (so a channel there is a whole block: its values keep their scale
    and zero point, and the pruned layer computes what the masked original does); every other
    axis index by index."""
    x, scale, zp, y = ctx.input(0), ctx.input(1), ctx.input(2), ctx.output(0)
    rank = len(shape)
    if len(scale_shape) != rank or rank == 0:
        ctx.refuse(f"blocked quantisation with scale {list(scale_shape)} on data {list(shape)}: "
                   "the scale must have the data's rank")
        return
    axis = int(ctx.node.attrs.get("axis", 1)) % rank
    ctx.same_axes([(x, y)], skip=[axis])
    params = [p for p in (scale, zp) if p is not None]
    for param in params:
        for j in range(rank):
            if j != axis:
                ctx.identity(ctx.space(param, j), ctx.space(y, j))
    blocked = ctx.space(y, axis)
    if all(ctx.block(blocked, ctx.space(param, axis)) for param in params):
        ctx.identity(ctx.space(x, axis), blocked)
    else:
        ctx.decline(f"blocked quantisation: axis {axis} of {list(shape)} is not a whole number "
                    f"of blocks of {block}", blocked, ctx.space(x, axis),
                    *(ctx.space(p, axis) for p in params))


# Integer-domain ops with a constant weight: (weight input, its output axis, output axis).
_WEIGHTED = {"QLinearConv": (3, 0, 1), "ConvInteger": (1, 0, 1), "QLinearMatMul": (3, -1, -1),
             "MatMulInteger": (1, -1, -1)}


@register(*INTEGER_OPS)
@register(*INTEGER_OPS, domain="com.microsoft")
def integer_op(ctx: NodeContext) -> None:
    """Handle nothing; a constant weight still makes its output channels a (frozen) group, so
    that the analysis names this node as the reason rather than finding no group at all."""
    if ctx.node.op in _WEIGHTED:
        slot, w_axis, y_axis = _WEIGHTED[ctx.node.op]
        w = ctx.input(slot)
        if ctx.const(w) is not None:
            w_out = ctx.space(w, w_axis)
            ctx.role(w_out, Role.PRODUCER)
            ctx.identity(w_out, ctx.space(ctx.output(0), y_axis))
    ctx.refuse("integer-domain quantised op: SPA prunes quantised models in QDQ form "
               "(QuantizeLinear/DequantizeLinear around float ops), not this one; prune the "
               "float model and quantise it after (in a folder beside its float file, a "
               "dynamically quantised copy is made again from the pruned one)")
