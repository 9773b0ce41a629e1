"""Pooling and reductions.

Spatial pooling (Max/Average/Lp pool, their global forms) is computed channel by channel:
``X.0 ↔ Y.0`` and ``X.1 ↔ Y.1``; spatial axes change length and are not coupled. MaxPool's
optional ``Indices`` output encodes flat positions that include the channel, so a MaxPool whose
indices are used fails closed.

Reductions (ReduceMean, ReduceMax, …) couple every axis they do not reduce with the matching
output axis (``keepdims`` decides the output position); a reduced axis mixes channels and stays
unhandled — except a ReduceMean over the last axis under hidden-size pruning (the statistics of
a decomposed LayerNorm/RMSNorm, which change by design). Softmax-like ops over an axis behave
the same for their normalised axes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from spa.coupling.context import axes_text
from spa.coupling.registry import register
from spa.coupling.rules.norm import statistics_reason

if TYPE_CHECKING:
    from spa.coupling.context import NodeContext

REDUCE = ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd", "ReduceL1",
          "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")
# The opset from which each reduction reads its axes from an input instead of an attribute.
_AXES_AS_INPUT = {op: (13 if op == "ReduceSum" else 18) for op in REDUCE}


@register("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
          "GlobalLpPool")
def pool(ctx: NodeContext) -> None:
    if len(ctx.outputs) != 1:
        ctx.refuse("an Indices output: its flat positions count the channels")
        return
    x, y = ctx.input(0), ctx.output(0)
    ctx.identity_axes(x, 0, y, 0)
    ctx.identity_axes(x, 1, y, 1)


def _couple_kept_axes(ctx: NodeContext, reduced: set[int], keepdims: bool) -> None:
    x, y = ctx.input(0), ctx.output(0)
    out_ax = 0
    for ax in range(ctx.rank(x) or 0):
        if ax in reduced:
            out_ax += 1 if keepdims else 0
            continue
        ctx.identity_axes(x, ax, y, out_ax)
        out_ax += 1


@register(*REDUCE)
def reduce(ctx: NodeContext) -> None:
    x = ctx.input(0)
    rank = ctx.rank(x)
    if x is None or rank is None:
        ctx.refuse(ctx.unknown_rank(x))
        return
    if ctx.opset >= _AXES_AS_INPUT[ctx.node.op]:
        axes_t = ctx.input(1)
        axes = [] if axes_t is None else ctx.const_ints(axes_t)
        if axes is None:
            ctx.refuse(ctx.not_constant(axes_t, "axes"))
            return
    else:
        axes = ctx.attr_ints("axes") or []
    if not axes:
        if ctx.attr_int("noop_with_empty_axes", 0):
            ctx.same_axes([(x, ctx.output(0))])
            return
        axes = list(range(rank))
    reduced = {a % rank for a in axes}
    _couple_kept_axes(ctx, reduced, bool(ctx.attr_int("keepdims", 1)))
    what = f"reduces over {axes_text(reduced)} of '{x.name}'"
    spaces = [ctx.space(x, ax) for ax in sorted(reduced)]
    if ctx.node.op == "ReduceMean" and reduced == {rank - 1}:
        # The mean (or mean square) of a decomposed LayerNorm/RMSNorm over the hidden axis.
        ctx.statistics_over(ctx.space(x, rank - 1))
        ctx.decline(statistics_reason(what, not ctx.hidden), *spaces)
    else:
        ctx.decline(f"{what}: every output mixes all its channels", *spaces)


@register("Softmax", "LogSoftmax", "Hardmax", "LpNormalization")
def softmax(ctx: NodeContext) -> None:
    io = ctx.data_io()
    if io is None:
        ctx.refuse(ctx.unknown_rank(ctx.input(0)))
        return
    x, y, rank = io
    axis = ctx.attr_int("axis", -1 if ctx.opset >= 13 or ctx.node.op == "LpNormalization"
                        else 1) % rank
    # Before opset 13 Softmax flattens axes axis..-1 into one; all of them are normalised.
    last = axis + 1 if ctx.opset >= 13 or ctx.node.op == "LpNormalization" else rank
    for ax in range(rank):
        if not axis <= ax < last:
            ctx.identity_axes(x, ax, y, ax)
    ctx.decline(f"normalises over {axes_text(range(axis, last))} of '{x.name}': every output "
                "depends on all its channels",
                *(ctx.space(t, ax) for t in (x, y) for ax in range(axis, last)))


@register("ArgMax", "ArgMin")
def arg_reduce(ctx: NodeContext) -> None:
    x = ctx.input(0)
    rank = ctx.rank(x)
    if x is None or rank is None:
        ctx.refuse(ctx.unknown_rank(x))
        return
    axis = ctx.attr_int("axis", 0) % rank
    _couple_kept_axes(ctx, {axis}, bool(ctx.attr_int("keepdims", 1)))
    ctx.decline(f"returns positions along axis {axis} of '{x.name}': they change when "
                "channels go", ctx.space(x, axis))
