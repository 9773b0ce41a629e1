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
    x, y = ctx.input(0), ctx.output(0)
    rank = ctx.rank(x)
    _per_channel(ctx, 2, skip=range(2, rank or 2))
    reason = statistics_reason(f"InstanceNormalization node '{ctx.node.name}' normalises "
                               f"over {axes_text(range(2, rank or 2))} of "
                               f"'{getattr(x, 'name', '')}'", False)
    for t in (x, y):
        for ax in range(2, rank or 2):
            space = ctx.space(t, ax)
            if space is not None:
                ctx.handle(space)
                ctx.pin(space, reason)


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
