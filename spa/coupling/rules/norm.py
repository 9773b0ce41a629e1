"""Normalisations whose statistics are per channel.

BatchNormalization (inference form) and InstanceNormalization normalise each channel on its own,
so ``X.1 ↔ Y.1`` and every per-channel parameter (scale, bias, running mean/var) goes with it;
the scale is the channel's ``SCALE`` for importance criteria. BatchNormalization in training
form (extra outputs) fails closed.

LayerNormalization and RMSNormalization normalise over axes ``axis..-1``: pruning those would
change the statistics, so only the leading axes pass through and the normalised axes freeze if
live — unless hidden-size pruning is on (``--hidden-ratio``), where a last-axis norm couples its
axis with its scale and bias and the statistics change by design.

Facts (spa/coupling/facts.py): BatchNormalization's scale ``γ`` (input 1) is its slimming scale,
the ``|γ|`` network slimming (criterion ``bn_scale``) ranks channels by.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from spa.coupling.context import axes_text
from spa.coupling.registry import register
from spa.coupling.rules.conv import group_count_hook
from spa.coupling.types import Role

if TYPE_CHECKING:
    from collections.abc import Sequence

    import onnx_graphsurgeon as gs

    from spa.coupling.context import NodeContext


def _per_channel(ctx: NodeContext, n_params: int, skip: Sequence[int] = ()) -> None:
    x, y = ctx.input(0), ctx.output(0)
    ctx.same_axes([(x, y)], skip)
    for i in range(1, 1 + n_params):
        p = ctx.input(i)
        if p is not None:
            sp = ctx.space(p, 0)
            ctx.identity(sp, ctx.space(y, 1))
            if i == 1:
                ctx.role(sp, Role.SCALE)


@register("BatchNormalization", slimming_scale=1)
def batch_norm(ctx: NodeContext) -> None:
    if len(ctx.outputs) != 1 or ctx.attr_int("training_mode", 0):
        ctx.refuse("training mode (it computes batch statistics and updates running ones)")
        return
    _per_channel(ctx, 4)


@register("InstanceNormalization")
def instance_norm(ctx: NodeContext) -> None:
    """Each (sample, channel) normalised over the axes after the channel: those keep every
    element, which matters where a reshape made them channels (a ``GroupNorm(1, C)`` export
    views ``[N, C, H, W]`` as ``[N, 1, C·H·W]``)."""
    rank = ctx.rank(ctx.input(0)) or 2
    _per_channel(ctx, 2, skip=range(2, rank))
    _pin_normalised(ctx, rank)


def _pin_normalised(ctx: NodeContext, rank: int) -> None:
    """Keep every element of the axes ``2..rank`` of input 0 and output 0, which the node
    normalises over (per sample and channel or group), with the statistics reason."""
    x, y = ctx.input(0), ctx.output(0)
    reason = statistics_reason(f"{ctx.node.op} node '{ctx.node.name}' normalises over "
                               f"{axes_text(range(2, rank))} of '{getattr(x, 'name', '')}'",
                               False)
    for t in (x, y):
        for ax in range(2, rank):
            space = ctx.space(t, ax)
            if space is not None:
                ctx.handle(space)
                ctx.pin(space, reason)


@register("GroupNormalization", opsets=(21, 10_000))
def group_norm(ctx: NodeContext) -> None:
    """``GroupNormalization`` (what PyTorch's dynamo exporter writes at opset 21 and later):
    statistics per sample and group of ``C / num_groups`` channels, over those channels and
    the spatial axes. Channels go a whole group at a time (a virtual space of the groups, as a
    grouped conv's), ``num_groups`` becomes the groups kept; scale and bias are per channel.
    The spatial axes keep every element. (Opset 18's form, parameters per group, is
    deprecated: onnx.checker refuses it.)"""
    x, y = ctx.input(0), ctx.output(0)
    rank, groups = ctx.rank(x), ctx.attr_int("num_groups", 0)
    sx, sy = ctx.space(x, 1), ctx.space(y, 1)
    if rank is None or sx is None or groups < 1 or sx.length % groups:
        ctx.refuse(ctx.unknown_rank(x) if rank is None else
                   f"num_groups={groups} does not divide the {sx.length if sx else '?'} "
                   "channels")
        return
    if groups == 1:  # statistics over every channel: none can go
        ctx.same_axes([(x, y)], skip=range(1, rank))
        ctx.decline(statistics_reason(f"GroupNormalization node '{ctx.node.name}' has one "
                                      "group, normalising over every channel", False),
                    sx, sy, ctx.space(ctx.input(1), 0), ctx.space(ctx.input(2), 0),
                    *(ctx.space(t, ax) for t in (x, y) for ax in range(2, rank)))
        return
    ctx.same_axes([(x, y)], skip=range(2, rank))
    virtual = ctx.virtual("groups", groups)
    ctx.block(sx, virtual)
    for i in (1, 2):
        param = ctx.space(ctx.input(i), 0)
        ctx.identity(param, sy)
        if i == 1 and param is not None:
            ctx.role(param, Role.SCALE)
    if sx.length > groups:
        ctx.note(virtual, f"GroupNormalization node '{ctx.node.name}' has num_groups={groups}:"
                          f" SPA removes whole groups of {sx.length // groups} channels")
    _pin_normalised(ctx, rank)
    ctx.on_rewrite(group_count_hook(sx.key, sx.length // groups, "num_groups"))


@register("LayerNormalization", opsets=(17, 10_000))
@register("RMSNormalization", opsets=(23, 10_000))
def layer_norm(ctx: NodeContext) -> None:
    x, rank = ctx.input(0), ctx.rank(ctx.input(0))
    if x is None or rank is None or len(ctx.outputs) != 1:
        ctx.refuse(ctx.unknown_rank(x) if rank is None else
                   "statistics outputs (Mean/InvStdDev)")
        return
    normalise(ctx, [ctx.input(1), ctx.input(2)])


def normalise(ctx: NodeContext, params: list[gs.Tensor | None],
              statistics: Sequence[gs.Tensor] = ()) -> None:
    """Input 0 normalised over axes ``axis..-1`` into output 0, with 1-D ``params`` (scale
    first) applied per channel of the last axis and ``statistics`` outputs (``[…, 1, …]``)
    sharing the leading axes."""
    x, y = ctx.input(0), ctx.output(0)
    rank = ctx.rank(x)
    assert x is not None and rank is not None  # checked by the callers
    axis = ctx.attr_int("axis", -1) % rank
    for ax in range(axis):
        ctx.identity_axes(x, ax, y, ax)
        for stat in statistics:
            ctx.identity_axes(x, ax, stat, ax)
    if axis == rank - 1 and ctx.hidden:
        # Hidden-size pruning: the normalised axis goes with its scale and bias; the statistics
        # are then over fewer channels (outside the masked oracle, by design).
        sx, sy = ctx.space(x, axis), ctx.space(y, axis)
        if ctx.identity(sx, sy):
            ctx.statistics_over(sx)
            for i, param in enumerate(params):
                sp = ctx.space(param, -1) if param is not None and ctx.rank(param) == 1 else None
                ctx.identity(sp, sy)
                if i == 0:
                    ctx.role(sp, Role.SCALE)
    ctx.decline(statistics_reason(f"normalises over {axes_text(range(axis, rank))} of "
                                  f"'{x.name}'", axis == rank - 1 and not ctx.hidden),
                *(ctx.space(t, ax) for t in (x, y) for ax in range(axis, rank)))


def statistics_reason(what: str, hint_hidden: bool) -> str:
    """Why a normalisation (or the mean of a decomposed one) keeps the axes its statistics run
    over; ``hint_hidden``: it is the last axis, which ``--hidden`` would prune."""
    hint = " (prune the hidden size with --hidden)" if hint_hidden else ""
    return f"{what}: its statistics change when channels go{hint}"
