"""Convolutions: Conv and ConvTranspose (1D/2D/3D, grouped, depthwise).

Conv ``Y = conv(X, W) + B`` with ``W: [O, C/g, *k]``:

* ``W[o]`` produces ``Y[:, o]`` (identity ``W.0 ↔ Y.1``, and ``B.0 ↔ Y.1``);
* ``g == 1``: ``W[:, c]`` consumes ``X[:, c]`` (identity ``X.1 ↔ W.1``);
* ``g > 1``: input channel ``c`` belongs to group ``c // (C/g)`` and output ``o`` to
  ``o // (O/g)``; ``W.1`` indexes channels *within* a group, so it cannot shrink without making
  the groups unequal. SPA removes whole groups: input block and output block of group ``k`` are
  coupled through a virtual space of length ``g`` and ``W.1`` never changes. Depthwise
  (``C/g == 1``) is the case where a group is one input channel and its ``O/C`` outputs.
  The rewrite sets ``group`` to the number of surviving groups.

A weight whose input channels (``W.1 × g`` for Conv, ``W.0`` for ConvTranspose) differ from the
input's makes the model invalid: the rule raises rather than freeze.

ConvTranspose ``W: [C, O/g, *k]`` is the mirror image: ``W.0 ↔ X.1`` consumes, ``W.1`` (within a
group) produces, and grouped ConvTranspose again removes whole groups.

Blocked kernels. onnxruntime's CPU provider runs a Conv in its NCHWc layout (blocks of ``B``
channels: 8 with AVX2, 16 with AVX-512; its ``NchwcTransformer``) when the weight is a constant
4-D float tensor and the channel counts fit the block: ``g == 1`` needs ``C`` a multiple of
``B`` (or ``C < B``: the input is read unblocked) and pads ``O`` up to one (so an ``O`` short of a
block costs a whole block); depthwise (``C/g == 1``, ``O == g``) needs ``O`` a multiple of ``B``;
other grouped convs need ``C/g`` and ``O/g`` multiples of ``B``, which pruning (whole groups)
never changes. Anything else runs the plain NCHW kernel, with reorders between it and its
blocked neighbours. So the spaces whose kept counts should keep whole blocks (the ``blocked``
fact) are ``W.1`` of ``g == 1`` convs and ``W.0`` of depthwise ones; ``W.0`` of a ``g == 1``
conv is padded to a block anyway, and only its consumers decide whether rounding it pays.

Facts (spa/coupling/facts.py). MACs: Conv ``|Y| · |W[0]|`` (each output element reads
``C/g · Πk`` inputs), ConvTranspose ``|X| · |W[0]|`` (each input element is scattered into
``O/g · Πk`` outputs). Layer input of the weight: ``X``, channel axis 1. Bias: Conv's input 2
(ConvTranspose's bias is not compensated).
"""

from __future__ import annotations

from math import prod
from typing import TYPE_CHECKING

from spa.coupling.facts import BiasSlot, LayerInputFn, MacFn, MacTerm, mac_term
from spa.coupling.registry import register
from spa.coupling.types import KeptLookup, Role
from spa.errors import InvalidModelError

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

    from spa.coupling.context import NodeContext


def _common(ctx: NodeContext) -> tuple | None:
    """``(x, w, y, group)`` with the batch axis coupled; None when the node is outside the rule
    (a dynamic weight, an unknown rank): it then handles nothing, and says why."""
    x, w, y = ctx.input(0), ctx.input(1), ctx.output(0)
    why = _unsupported(ctx, x, w)
    if why is not None:
        ctx.refuse(why)
        return None
    group = ctx.attr_int("group", 1)
    _check_channels(ctx, x, w, group)
    ctx.identity(ctx.space(x, 0), ctx.space(y, 0))  # batch
    return x, w, y, group


def _check_channels(ctx: NodeContext, x: gs.Tensor, w: gs.Tensor, group: int) -> None:
    """A weight that does not fit its input makes the model invalid (onnxruntime fails on it;
    neither onnx.checker nor shape inference tests it), which is no channel space to freeze:
    Conv reads ``W.1 × group`` input channels, ConvTranspose ``W.0``."""
    x_shape, w_shape = ctx.shape(x), ctx.shape(w)
    channels = x_shape[1] if x_shape is not None and len(x_shape) > 1 else None
    if not isinstance(channels, int) or w_shape is None or len(w_shape) < 2:
        return
    w_in = w_shape[1] if ctx.node.op != "ConvTranspose" else w_shape[0]
    if w_in is None:
        return  # a quantised weight whose shape is not inferred: nothing to check against
    takes = w_in * group if ctx.node.op != "ConvTranspose" else w_in
    if channels != takes:
        raise InvalidModelError(
            f"invalid model: {ctx.node.op} node '{ctx.name}' reads {channels} input channels, but "
            f"its weight '{w.name}' {list(w_shape)} (group={group}) takes {takes}")


def _unsupported(ctx: NodeContext, x: gs.Tensor, w: gs.Tensor) -> str | None:
    if ctx.const(w) is None:
        return ctx.not_constant(w)
    if ctx.rank(x) is None:
        return ctx.unknown_rank(x)
    if ctx.rank(x) != ctx.rank(w):
        return f"{ctx.which(x)} has rank {ctx.rank(x)} but the weight {ctx.rank(w)}"
    return None


def group_count_hook(x_key: tuple[str, int], channels_per_group: int, attr: str = "group"):
    """Hook: set the node's group count ``attr`` to the groups its input space ``x_key``
    kept (a grouped conv's ``group``, a GroupNormalization's ``num_groups``)."""
    def hook(node: gs.Node, kept: KeptLookup) -> None:
        node.attrs[attr] = kept.count(x_key) // channels_per_group

    return hook


def _couple_groups(ctx: NodeContext, x: gs.Tensor, y: gs.Tensor, group: int) -> bool:
    """Couple input block k with output block k through a virtual group space."""
    sx, sy = ctx.space(x, 1), ctx.space(y, 1)
    if sx is None or sy is None or sx.length % group or sy.length % group:
        return False
    groups = ctx.virtual("groups", group)
    ctx.block(sx, groups)
    ctx.block(sy, groups)
    if sx.length > group:  # not depthwise: a group is several channels on each side
        ctx.note(groups, f"{ctx.node.op} node '{ctx.node.name}' has group={group}: SPA removes "
                         f"whole groups, each {sx.length // group} input and "
                         f"{sy.length // group} output channels at once, so its input and "
                         "output channels are pruned together")
    ctx.on_rewrite(group_count_hook(sx.key, sx.length // group))
    return True


def _refuse_groups(ctx: NodeContext, group: int) -> None:
    """Without both channel counts the surviving groups cannot be counted: keep them all."""
    ctx.refuse(f"group={group} but the channel count of its input or output is unknown (or "
               "not a multiple of it)")


def _conv_macs(node: gs.Node) -> MacTerm | None:
    x, w, y = node.inputs[0], node.inputs[1], node.outputs[0]
    return mac_term([y, w], lambda y_, w_: prod(y_) * prod(w_[1:]), known=[x])


def _conv_transpose_macs(node: gs.Node) -> MacTerm | None:
    x, w, y = node.inputs[0], node.inputs[1], node.outputs[0]
    return mac_term([x, w], lambda x_, w_: prod(x_) * prod(w_[1:]), known=[y])


def _layer_input(node: gs.Node, slot: int) -> tuple[gs.Tensor, int] | None:
    """The weight (input 1) reads the channels of ``X`` (input 0) at axis 1."""
    return (node.inputs[0], 1) if slot == 1 else None


def conv_facts() -> tuple[MacFn, LayerInputFn]:
    """Conv's MAC term and layer-input accessor, for the ops that are a Conv and more."""
    return _conv_macs, _layer_input


def _blocked(node: gs.Node) -> tuple[tuple[str, int], ...]:
    """The weight spaces whose kept counts keep onnxruntime's NCHWc kernels (module docstring);
    none for a weight that is not a constant 4-D float32 tensor."""
    import numpy as np
    import onnx_graphsurgeon as gs

    w = node.inputs[1] if len(node.inputs) > 1 else None
    if not isinstance(w, gs.Constant) or len(w.shape) != 4 or np.dtype(w.dtype) != np.float32:
        return ()
    group = int(node.attrs.get("group", 1))
    if group == 1:
        return ((w.name, 1),)
    if w.shape[1] == 1 and w.shape[0] == group:  # depthwise
        return ((w.name, 0),)
    return ()


@register("Conv", mac=_conv_macs, layer_input=_layer_input, bias=BiasSlot(2), blocked=_blocked)
def conv(ctx: NodeContext) -> None:
    common = _common(ctx)
    if common is None:
        return
    x, w, y, group = common
    w_out = ctx.space(w, 0)
    ctx.role(w_out, Role.PRODUCER)
    ctx.identity(w_out, ctx.space(y, 1))
    bias = ctx.input(2)
    if bias is not None:
        ctx.identity(ctx.space(bias, 0), ctx.space(y, 1))
    if group == 1:
        w_in = ctx.space(w, 1)
        ctx.role(w_in, Role.CONSUMER)
        ctx.identity(ctx.space(x, 1), w_in)
    elif not _couple_groups(ctx, x, y, group):
        _refuse_groups(ctx, group)


@register("ConvTranspose", mac=_conv_transpose_macs, layer_input=_layer_input)
def conv_transpose(ctx: NodeContext) -> None:
    common = _common(ctx)
    if common is None:
        return
    x, w, y, group = common
    w_in = ctx.space(w, 0)
    ctx.role(w_in, Role.CONSUMER)
    ctx.identity(ctx.space(x, 1), w_in)
    bias = ctx.input(2)
    if group == 1:
        w_out = ctx.space(w, 1)
        ctx.role(w_out, Role.PRODUCER)
        ctx.identity(w_out, ctx.space(y, 1))
        if bias is not None:
            ctx.identity(ctx.space(bias, 0), ctx.space(y, 1))
    elif not _couple_groups(ctx, x, y, group):
        _refuse_groups(ctx, group)
    else:
        # W.0 is consumed per group; W.1 is group-local and stays. The producer of Y's
        # channels is W's group block, so W.0 also removes the group's output rows.
        ctx.role(w_in, Role.PRODUCER)
        if bias is not None:
            ctx.identity(ctx.space(bias, 0), ctx.space(y, 1))
