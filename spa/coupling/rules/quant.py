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

Fail closed, with a reason: blocked quantisation (``block_size``, a scale of the data's rank),
a scale whose length fits no axis, and the integer-domain ops (QLinearConv, QLinearMatMul,
ConvInteger, MatMulInteger, …: their weights, scales and zero points are interleaved inputs
with no per-channel rule here; a QDQ export of the same model prunes).

OBSPA's compensation does not write into quantised weights (passes/compensation.py): a float
update rounded back to int8 would be lossy, so those layers lose their channels without an
update, and the run says so.
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
    axis = per_axis(ctx.node, shape, scale_shape)
    if axis is False:
        ctx.refuse(f"quantisation with scale {list(scale_shape)} on data {list(shape)} "
                   f"(blocked, or per-axis on an axis it does not fit) is not supported")
        return
    ctx.same_axes([(x, y)])
    if axis is not None:
        for param in (scale, zp):
            ctx.identity(ctx.space(param, 0), ctx.space(y, axis))


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
               "(QuantizeLinear/DequantizeLinear around float ops), not this one")
