"""Ops that cut, join or pad an axis: Concat, Split, Slice, Pad, Resize/Upsample.

Concat along ``axis``: input ``i`` occupies ``[o_i, o_i + n_i)`` of the output (offset map);
other axes are coupled identically. Split is its mirror image. Slice with step 1 maps output
``j`` to input ``start + j``; input channels outside the window belong to no output and may go
freely (the rewrite recomputes ``start``/``end`` by counting survivors). Pad and Resize couple
the axes they leave alone (no padding, scale 1). Every constant that names a length on a pruned
axis (split sizes, slice bounds, Resize ``sizes``) is rewritten from the plan.

A decoder exported with plain ops appends this step's keys or values to its cache with
``present = Concat(past [B, H, P, d], k [B, H, S, d], axis=2)``: a graph input so joined along
its symbolic positions is declared a KV-cache pair with the output on the head axis (axis 1,
coupled identically above), which the analysis accepts when the past is read by nothing else
that cares about its heads and the present is a graph output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from spa.coupling.context import axes_text
from spa.coupling.registry import register

if TYPE_CHECKING:
    from spa.coupling.context import NodeContext
    from spa.coupling.types import KeptLookup


def new_const(node: gs.Node, label: str, values: list[int] | np.ndarray, dtype=np.int64
              ) -> gs.Constant:
    return gs.Constant(f"{node.name}__spa_{label}", np.asarray(values, dtype=dtype))


def _set_input(node: gs.Node, i: int, tensor: gs.Tensor) -> None:
    """Set input ``i`` (appending when it is the next one), keeping gs's links in sync."""
    if i < len(node.inputs):
        node.inputs[i] = tensor
    else:
        node.inputs.append(tensor)


@register("Concat")
def concat(ctx: NodeContext) -> None:
    y = ctx.output(0)
    rank = ctx.rank(y)
    if rank is None:
        ctx.refuse(ctx.unknown_rank(y))
        return
    axis = ctx.attr_int("axis") % rank
    ctx.same_axes([(x, y) for x in ctx.inputs], skip=[axis])
    start = 0
    for x in ctx.inputs:
        sx = ctx.space(x, axis)
        if sx is None:  # the other axes stay coupled: a cache's positions are symbolic
            ctx.decline(_unknown_offset(ctx, x, axis))
            break
        if not ctx.offset(sx, ctx.space(y, axis), start):
            ctx.decline(ctx.lengths_differ(x, y, axis, axis), sx)
        start += sx.length
    _kv_cache(ctx, y, axis)


def _kv_cache(ctx: NodeContext, y: gs.Tensor, axis: int) -> None:
    """Declare ``past`` → ``y`` a KV-cache pair when ``past``, an input read from outside
    the graph, is laid out ``[batch, heads, positions, head_size]`` (rank 4, positions
    symbolic: they grow a step at a time, head size known) and the Concat appends along the
    positions (axis 2). The analysis accepts the pair only when the past is a graph input
    this node alone reads and ``y`` (or the Identity an exporter wrote it through) a graph
    output (spa/coupling/analysis.py)."""
    if axis != 2:  # along another axis (the heads, say), the input keeps its shape
        return
    present = _written_as(ctx, y)
    for x in ctx.inputs:
        shape = ctx.shape(x)
        if _read_from_outside(x) and shape is not None and len(shape) == 4 \
                and shape[2] is None and shape[3] is not None:
            ctx.kv_cache(ctx.space(x, 1), ctx.space(present, 1), head_size=shape[3])


def _written_as(ctx: NodeContext, y: gs.Tensor, depth: int = 0) -> gs.Tensor:
    """The graph output ``y`` leaves as: ``y``, or the one graph output written from it
    through Identity nodes (the Identity rule couples their axes); else ``y``."""
    if ctx.is_graph_output(y) or depth > 4:
        return y
    ends = {id(t): t for c in ctx.consumers(y) if c.op == "Identity" and c.outputs
            for t in [_written_as(ctx, c.outputs[0], depth + 1)] if ctx.is_graph_output(t)}
    return next(iter(ends.values())) if len(ends) == 1 else y


def _read_from_outside(t: gs.Tensor) -> bool:
    """A tensor no node writes: a graph input (or an outer-scope name in a subgraph)."""
    return isinstance(t, gs.Variable) and not t.inputs


@register("Split")
def split(ctx: NodeContext) -> None:
    x = ctx.input(0)
    rank = ctx.rank(x)
    if rank is None:
        ctx.refuse(ctx.unknown_rank(x))
        return
    axis = ctx.attr_int("axis", 0) % rank
    start = 0
    for y in ctx.outputs:
        ctx.same_axes([(x, y)], skip=[axis])
        sy = ctx.space(y, axis)
        if sy is None:
            ctx.decline(_unknown_offset(ctx, y, axis))
            return
        if not ctx.offset(sy, ctx.space(x, axis), start):
            ctx.decline(ctx.lengths_differ(y, x, axis, axis), sy)
        start += sy.length
    ctx.on_rewrite(_split_hook(ctx.opset, [(y.name, axis) for y in ctx.outputs]))


def _unknown_offset(ctx: NodeContext, part: gs.Tensor, axis: int) -> str:
    return f"unknown length of axis {axis} of {ctx.which(part)}: the offsets of the parts " \
           "from there on are unknown"


def _split_hook(opset: int, out_keys: list[tuple[str, int]]):
    def hook(node: gs.Node, kept: KeptLookup) -> None:
        sizes = [kept.count(k) for k in out_keys]
        if opset >= 13:
            node.attrs.pop("num_outputs", None)
            _set_input(node, 1, new_const(node, "split", sizes))
        else:
            node.attrs["split"] = sizes

    return hook


def _slice_params(ctx: NodeContext, rank: int) -> list[tuple[int, int, int, int]] | None:
    """(axis, start, end, step) per sliced axis with bounds clamped; None, with the reason
    recorded on ``ctx``, when a bound is computed at run time or an axis' length is unknown."""
    if ctx.opset >= 10:
        vals = [ctx.const_ints(ctx.input(i)) if ctx.input(i) is not None else None
                for i in range(1, 5)]
        starts, ends, axes, steps = vals
        dynamic = [ctx.input(i) for i, v in enumerate(vals, start=1)
                   if ctx.input(i) is not None and v is None]
    else:
        starts, ends = ctx.attr_ints("starts"), ctx.attr_ints("ends")
        axes, steps, dynamic = ctx.attr_ints("axes"), None, []
    if starts is None or ends is None or dynamic:
        ctx.decline(ctx.not_constant(dynamic[0], "bounds") if dynamic
                    else "missing starts or ends")
        return None
    axes = list(axes) if axes else list(range(len(starts)))
    steps = list(steps) if steps else [1] * len(starts)
    shape = ctx.shape(ctx.input(0))
    assert shape is not None, "the caller knows the rank of input 0"
    out = []
    for ax, s, e, st in zip(axes, starts, ends, steps):
        ax %= rank
        length = shape[ax]
        if length is None:
            ctx.decline(f"unknown length of the sliced axis {ax} of {ctx.which(ctx.input(0))}")
            return None
        s, e = (s + length if s < 0 else s), (e + length if e < 0 else e)
        s, e = min(max(s, 0), length), min(max(e, 0), length)
        out.append((ax, s, e, st))
    return out


@register("Slice")
def slice_(ctx: NodeContext) -> None:
    io = ctx.data_io()
    if io is None:
        ctx.refuse(ctx.unknown_rank(ctx.input(0)))
        return
    x, y, rank = io
    params = _slice_params(ctx, rank)
    if params is None:
        sliced = _sliced_axes(ctx, rank)
        if sliced is not None:  # bounds read at run time, on known axes: the others pass
            ctx.same_axes([(x, y)], skip=sliced)
        return
    ctx.same_axes([(x, y)], skip=[p[0] for p in params])
    coupled = [ctx.offset(ctx.space(y, ax), ctx.space(x, ax), s)
               for ax, s, _, step in params if step == 1]
    for ax, _, _, step in params:
        if step != 1:
            ctx.decline(f"slices axis {ax} of '{x.name}' with step {step}", ctx.space(x, ax),
                        ctx.space(y, ax))
    if any(coupled):
        ctx.on_rewrite(_slice_hook(ctx.opset, x.name, y.name, params))


def _sliced_axes(ctx: NodeContext, rank: int) -> list[int] | None:
    """The axes a Slice cuts when its ``axes`` are constant (or absent: the first as many as
    it has starts), whatever its bounds; None when they are not known. T5's relative position
    bias, ``bias[:, :, -length:, :]``, cuts its positions by a length read at run time, and its
    heads pass unchanged."""
    if ctx.opset < 10:
        axes = ctx.attr_ints("axes")
        return [a % rank for a in axes] if axes else None
    axes_t = ctx.input(3)
    if axes_t is not None:
        axes = ctx.const_ints(axes_t)
        return None if axes is None else [a % rank for a in axes]
    starts = ctx.shape(ctx.input(1))
    count = starts[0] if starts is not None and len(starts) == 1 else None
    return None if count is None else list(range(min(count, rank)))


def _slice_hook(opset: int, x_name: str, y_name: str, params: list[tuple[int, int, int, int]]):
    def hook(node: gs.Node, kept: KeptLookup) -> None:
        starts, ends, axes, steps = [], [], [], []
        for ax, s, e, step in params:
            if step == 1 and kept.changed((x_name, ax)):
                s = int(np.searchsorted(kept.kept((x_name, ax)), s))
                e = s + kept.count((y_name, ax))
            starts.append(s)
            ends.append(e)
            axes.append(ax)
            steps.append(step)
        if opset >= 10:
            new = [new_const(node, "starts", starts), new_const(node, "ends", ends),
                   new_const(node, "axes", axes), new_const(node, "steps", steps)]
            for i, const in enumerate(new, start=1):
                _set_input(node, i, const)
        else:
            node.attrs.update(starts=starts, ends=ends, axes=axes)

    return hook


@register("Pad")
def pad(ctx: NodeContext) -> None:
    io = ctx.data_io()
    if io is None:
        ctx.refuse(ctx.unknown_rank(ctx.input(0)))
        return
    x, y, rank = io
    pads = ctx.const_ints(ctx.input(1)) if ctx.opset >= 11 else (ctx.attr_ints("pads") or [])
    axes = list(range(rank))
    axes_t = ctx.input(3) if ctx.opset >= 18 else None
    if axes_t is not None:
        axes = [a % rank for a in (ctx.const_ints(axes_t) or [])]
    if pads is None or len(pads) != 2 * len(axes):
        ctx.refuse(ctx.not_constant(ctx.input(1), "pads") if pads is None else
                   ctx.not_constant(axes_t, "axes")
                   if axes_t is not None and ctx.const_ints(axes_t) is None else
                   f"{len(pads)} pads for {len(axes)} axes")
        return
    padded = {ax for k, ax in enumerate(axes) if pads[k] or pads[k + len(axes)]}
    ctx.same_axes([(x, y)], skip=sorted(padded))
    if padded:
        ctx.decline(f"pads {axes_text(padded)} of '{x.name}': the padded length is fixed",
                    *(ctx.space(t, ax) for t in (x, y) for ax in padded))


@register("Resize", "Upsample")
def resize(ctx: NodeContext) -> None:
    x, y = ctx.input(0), ctx.output(0)
    shape_x, shape_y = ctx.shape(x), ctx.shape(y)
    why = _resize_unsupported(ctx, shape_x, shape_y)
    if why is not None:
        ctx.refuse(why)
        return
    assert x is not None and y is not None and shape_x is not None and shape_y is not None, \
        "_resize_unsupported gives a reason for unknown ranks"
    sizes_t = ctx.input(3) if ctx.node.op == "Resize" and ctx.opset >= 11 else None
    sizes = ctx.const_ints(sizes_t) if sizes_t is not None else None
    if sizes_t is not None and sizes is None:
        ctx.refuse(ctx.not_constant(sizes_t, "sizes"))
        return
    scales_at = 1 if ctx.node.op == "Upsample" or ctx.opset == 10 else 2
    scales_t = ctx.input(scales_at)
    scales = ctx.const(scales_t) if scales_t is not None else ctx.attr("scales")
    if scales is not None and len(np.asarray(scales).reshape(-1)) not in (0, len(shape_x)):
        ctx.refuse(f"{np.asarray(scales).size} scales for rank {len(shape_x)}")
        return
    scales = None if scales is None or np.asarray(scales).size == 0 \
        else np.asarray(scales, dtype=np.float64).reshape(-1)
    # An axis is left alone when its length is unchanged and (if given) its scale is exactly 1:
    # a length-preserving scale such as 1.2 on 2 channels would still mix them.
    unchanged = [ax for ax in range(len(shape_x))
                 if shape_x[ax] is not None and shape_x[ax] == shape_y[ax]
                 and (scales is None or scales[ax] == 1.0)]
    for ax in unchanged:
        ctx.identity(ctx.space(x, ax), ctx.space(y, ax))
    changed = [ax for ax, d in enumerate(shape_x) if d is not None and ax not in unchanged]
    for ax in changed:
        if shape_y[ax] is None:
            ctx.decline(ctx.lengths_differ(x, y, ax, ax), ctx.space(x, ax))
    resized = [ax for ax in changed if shape_y[ax] is not None]
    if resized:
        ctx.decline(f"resizes {axes_text(resized)} of '{x.name}'",
                    *(ctx.space(t, ax) for t in (x, y) for ax in resized))
    if sizes:
        ctx.on_rewrite(_resize_hook([(y.name, ax) for ax in unchanged], sizes))


def _resize_unsupported(ctx: NodeContext, shape_x: tuple | None, shape_y: tuple | None
                        ) -> str | None:
    if shape_x is None or shape_y is None:
        return ctx.unknown_rank(ctx.input(0) if shape_x is None else ctx.output(0))
    if ctx.attr("axes") is not None:
        return "an axes attribute (opset 18)"
    if ctx.attr("coordinate_transformation_mode") == "tf_crop_and_resize":
        return "mode tf_crop_and_resize (its region of interest is in input coordinates)"
    return None


def _resize_hook(out_keys: list[tuple[str, int]], sizes: list[int]):
    def hook(node: gs.Node, kept: KeptLookup) -> None:
        new = list(sizes)
        for key in out_keys:
            new[key[1]] = kept.count(key)
        node.inputs[3] = new_const(node, "sizes", new)

    return hook
