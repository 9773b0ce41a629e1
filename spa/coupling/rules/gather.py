"""Indexing and broadcasting by shape: Gather, Expand, Tile, ConstantOfShape.

Gather along ``axis``: data axes before and after ``axis`` pass to the output unchanged, the
indices' axes take its place. Constant, distinct indices (a list or a scalar) pick channels of
the gathered axis: output ``j`` goes with input ``indices[j]``, a scalar's channel stays, the
channels no index picks may go, and the rewrite renumbers the indices. Otherwise the gathered
axis is unhandled (pruning it would change what the indices point at). A constant table
gathered on axis 0 is an embedding: its other axes are producers of the channels it emits (the
hidden size, pruned only with ``--hidden``).

Expand broadcasts like an element-wise op; its target shape's literal entries on a changing axis
are rewritten. An axis broadcast from 1 to a literal count holds copies of one value, so it may
shrink freely, the literal rewritten (multi-query attention expanding its one key/value head to
the query heads). Tile couples output index ``i`` with input index ``i mod L`` on each tiled axis.
ConstantOfShape fills every element with one value, so an axis whose length is a literal entry of
its shape (a recurrent layer's zero initial state ``[D, N, H]``, built from ``x``'s batch size
and the constant ``H``) may shrink freely, that entry rewritten; an entry copied from another
tensor's dim, or a literal others read too, fixes its axis.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from spa.coupling.registry import register
from spa.coupling.rules.shape import fixed_entry, rewrite_literals, unreadable_shape
from spa.coupling.rules.slicing import new_const
from spa.coupling.types import Role
from spa.ir.load import SELECT
from spa.ir.shapevalue import DimRef, Lit, shape_entries

if TYPE_CHECKING:
    from spa.coupling.context import NodeContext
    from spa.coupling.types import KeptLookup, SpaceKey


@register("Gather")
def gather(ctx: NodeContext) -> None:
    data, idx, y = ctx.input(0), ctx.input(1), ctx.output(0)
    rank, idx_rank = ctx.rank(data), ctx.rank(idx)
    if data is None or idx is None or rank is None or idx_rank is None:
        ctx.refuse(ctx.unknown_rank(data if rank is None else idx))
        return
    axis = ctx.attr_int("axis", 0) % rank
    selected = ctx.node.name.endswith(SELECT) and _selects(ctx, data, idx, y, axis)
    if not selected and not _picks(ctx, data, idx, y, axis, idx_rank):
        ctx.decline(f"axis {axis} of '{data.name}' is indexed by '{idx.name}': pruning it "
                    "would change what the indices pick", ctx.space(data, axis))
    for ax in range(axis):
        ctx.identity_axes(data, ax, y, ax)
    for ax in range(idx_rank):
        ctx.identity_axes(idx, ax, y, axis + ax)
    for ax in range(axis + 1, rank):
        ctx.identity_axes(data, ax, y, ax - 1 + idx_rank)
        if ctx.const(data) is not None and axis == 0:
            ctx.role(ctx.space(data, ax), Role.PRODUCER)


def _picks(ctx: NodeContext, data: gs.Tensor, idx: gs.Tensor, y: gs.Tensor, axis: int,
           idx_rank: int) -> bool:
    """Map a channel axis indexed by constant indices: output ``j`` of a 1-D index list is
    input ``indices[j]``; a scalar index's channel is pinned (its axis is gone, so it stays).
    The channels no index picks may go. The rewrite renumbers the indices among the kept
    channels (Falcon's fused query/key/value heads: the query heads sliced, the key and value
    heads gathered at ``[-2]`` and ``[-1]``). False when the indices are not constant, of
    higher rank, out of range, or repeat one (the output's axis then takes the indices along,
    and the indexed axis is not pruned)."""
    source = ctx.space(data, axis)
    indices = ctx.const(idx) if idx_rank <= 1 else None
    if source is None or indices is None or ctx.const(data) is not None:
        return False
    picks = [int(i) + source.length if int(i) < 0 else int(i)
             for i in np.asarray(indices).reshape(-1)]
    if len(set(picks)) < len(picks):
        return False  # a repeat (GQA's KV heads by [0, 0, 1, 1]): the indices go with the output
    if idx_rank == 1:
        picked = ctx.space(y, axis)
        mapped = ctx.pick(picked, source, picks)
    else:
        picked = ctx.virtual("picked", 1)
        mapped = ctx.pick(picked, source, picks)
        ctx.pin(picked, f"Gather node '{ctx.node.name}' picks channel {picks[0]} of axis {axis} "
                        f"of '{data.name}' by a scalar index: it stays")
    if mapped:
        ctx.on_rewrite(_renumber_hook((data.name, axis), (y.name, axis) if idx_rank else None,
                                      picks, np.asarray(indices).dtype))
    return mapped


def _selects(ctx: NodeContext, data: gs.Tensor, idx: gs.Tensor, y: gs.Tensor, axis: int
             ) -> bool:
    """A reader's own view of a shared attention bias (spa/ir/load.py
    ``_select_shared_head_biases``): its heads go with the reader's alone, the bias stays
    whole, and the rewrite keeps the indices of the heads the reader kept."""
    indices = ctx.const(idx)
    picked, source = ctx.space(y, axis), ctx.space(data, axis)
    if indices is None or picked is None or source is None:
        return False
    ctx.handle(picked)
    ctx.decline(f"Gather node '{ctx.node.name}' gives one layer its own heads of '{data.name}',"
                " which stays whole", source)
    # the source never changes, so renumbering keeps the picks of the heads the reader kept
    ctx.on_rewrite(_renumber_hook(source.key, picked.key,
                                  [int(i) for i in np.asarray(indices).reshape(-1)],
                                  np.asarray(indices).dtype))
    return True


def _renumber_hook(source: SpaceKey, picked: SpaceKey | None, picks: list[int],
                   dtype: np.dtype):
    def hook(node: gs.Node, kept: KeptLookup) -> None:
        if not kept.changed(source) and (picked is None or not kept.changed(picked)):
            return
        chosen = np.asarray(picks)[kept.kept(picked)] if picked is not None \
            else np.asarray(picks)
        renumbered = np.searchsorted(kept.kept(source), chosen) if kept.changed(source) \
            else chosen  # a source that keeps every channel (a constant is not looked up)
        shape = () if picked is None else renumbered.shape
        node.inputs[1] = new_const(node, "indices", renumbered.reshape(shape), dtype=dtype)

    return hook


@register("Expand")
def expand(ctx: NodeContext) -> None:
    x, shape_t, y = ctx.input(0), ctx.input(1), ctx.output(0)
    shape_x, shape_y = ctx.shape(x), ctx.shape(y)
    entries = shape_entries(shape_t, reader=(ctx.node, 1))
    if x is None or y is None or shape_x is None or shape_y is None:
        ctx.refuse(ctx.unknown_rank(x if shape_x is None else y))
        return
    if entries is None:
        ctx.refuse(unreadable_shape(ctx, shape_t))
        return
    lead_x, lead_e = len(shape_y) - len(shape_x), len(shape_y) - len(entries)
    literals: list[tuple[str, int, Lit]] = []
    for ax, length in enumerate(shape_x):
        o = ax + lead_x
        e = entries[o - lead_e] if o >= lead_e else 1
        # An entry of 1 keeps the input dim; a literal equal to it must be rewritten.
        rewrite = e if isinstance(e, Lit) and e == length and e != 1 \
            and e.rewritable_for(ctx.node) else None
        keeps = e == 1 or rewrite is not None or (isinstance(e, DimRef) and e.tensor == x.name
                                      and e.axis == ax)
        if length == 1 and isinstance(e, Lit) and e > 1 and e == shape_y[o] \
                and e.rewritable_for(ctx.node):
            # Copies of one value, the count a literal: any of them may go (Falcon's one key/value
            # head broadcast to its query heads), the count rewritten.
            ctx.handle(ctx.space(y, o))
            literals.append((y.name, o, e))
        elif length is None or length != shape_y[o]:  # broadcast from 1, or unknown
            if length is not None and shape_y[o] is None:
                ctx.decline(ctx.lengths_differ(x, y, ax, o), ctx.space(x, ax))
        elif not keeps:
            ctx.decline(fixed_entry(ctx, shape_t, o - lead_e, e), ctx.space(x, ax),
                        ctx.space(y, o))
        elif ctx.identity(ctx.space(x, ax), ctx.space(y, o)) and rewrite is not None:
            literals.append((y.name, o, rewrite))
    if literals:
        ctx.on_rewrite(rewrite_literals(literals))


@register("Tile")
def tile(ctx: NodeContext) -> None:
    x, y = ctx.input(0), ctx.output(0)
    repeats = ctx.const_ints(ctx.input(1))
    rank = ctx.rank(x)
    if rank is None or repeats is None or len(repeats) != rank:
        ctx.refuse(ctx.unknown_rank(x) if rank is None else
                   ctx.not_constant(ctx.input(1), "repeats") if repeats is None else
                   f"{len(repeats)} repeats for rank {rank}")
        return
    for ax, r in enumerate(repeats):
        sx, sy = ctx.space(x, ax), ctx.space(y, ax)
        if r == 1:
            ctx.identity(sx, sy)
        else:
            ctx.cyclic(sy, sx)


@register("ConstantOfShape")
def constant_of_shape(ctx: NodeContext) -> None:
    shape_t, y = ctx.input(0), ctx.output(0)
    shape_y = ctx.shape(y)
    entries = shape_entries(shape_t, reader=(ctx.node, 0))
    if y is None or shape_y is None:
        ctx.refuse(ctx.unknown_rank(y))
        return
    if entries is None or len(entries) != len(shape_y):
        ctx.refuse(unreadable_shape(ctx, shape_t))
        return
    literals: list[tuple[str, int, Lit]] = []
    for ax, e in enumerate(entries):
        space = ctx.space(y, ax)
        if isinstance(e, Lit) and e > 0 and e == shape_y[ax] and e.rewritable_for(ctx.node):
            ctx.handle(space)
            literals.append((y.name, ax, e))
        else:
            assert shape_t is not None  # entries were read from it
            ctx.decline(fixed_entry(ctx, shape_t, ax, e), space)
    if literals:
        ctx.on_rewrite(rewrite_literals(literals))
