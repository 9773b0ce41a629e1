"""Recurrent layers: RNN, GRU and LSTM, pruned by hidden units.

With ``H = hidden_size``, ``g`` gates (RNN 1; GRU 3, order z, r, h; LSTM 4, order i, o, f, c),
``D`` directions and ``layout = 0``:

* ``W [D, g·H, I]``, ``R [D, g·H, H]``: row ``k·H + j`` is gate ``k`` of hidden unit ``j``,
  so axis 1 of each is coupled with a virtual hidden space of length ``H`` by ``r ↔ r mod H``
  (producers: removing unit ``j`` removes its rows in every gate);
* ``B [D, 2·g·H]`` (input and recurrence biases, gate-major) and LSTM's peepholes
  ``P [D, 3·H]`` likewise, ``r ↔ r mod H``;
* ``R``'s axis 2 is the previous hidden state: column ``j`` reads unit ``j`` (consumer, in the
  same group as the rows: a removed unit's contribution to the others is zeroed there);
* ``initial_h``, ``initial_c`` ``[D, N, H]``, ``Y [T, D, N, H]``, ``Y_h``, ``Y_c`` ``[D, N, H]``:
  the last axis is the hidden space;
* ``X [T, N, I]`` axis 2 is consumed by ``W``'s axis 2 (identity): a layer before it, or a
  recurrent layer before it, loses its units in ``W``'s input columns.

Every gate acts on unit ``j`` alone (activations, ``clip``, LSTM's ``input_forget``, the
cell state ``c_j``), and GRU's reset gate ``r_j`` multiplies unit ``j``'s own terms whether it is
applied before or after the recurrence product (``linear_before_reset`` either way), so a unit
whose rows are gone and whose ``R`` column is zeroed leaves the others unchanged: the masked
oracle holds. The time and batch axes pass through; the direction axis is not pruned. The
rewrite sets ``hidden_size`` to the surviving units.

Facts: MACs ``T · N · (|W| + |R|)``; the layer input of ``W`` is ``X`` at axis 2 (``R`` reads a
state that is no tensor: it has none). No bias slot (compensation leaves these layers alone).

Fail closed, with the reason: ``layout = 1`` (batch-first), a weight or bias that is not a
constant, an unknown rank or length, a ``hidden_size`` that disagrees with the weights.
"""

from __future__ import annotations

from math import prod
from typing import TYPE_CHECKING

from spa.coupling.facts import MacTerm, mac_term
from spa.coupling.registry import register
from spa.coupling.types import KeptLookup, Role, SpaceKey

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

    from spa.coupling.context import NodeContext, Space

GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}
DIRECTION = "the direction axis of a recurrent layer is not pruned"


def _macs(node: gs.Node) -> MacTerm | None:
    x, w, r = node.inputs[0], node.inputs[1], node.inputs[2]
    return mac_term([x, w, r], lambda x_, w_, r_: x_[0] * x_[1] * (prod(w_) + prod(r_)))


def _layer_input(node: gs.Node, slot: int) -> tuple[gs.Tensor, int] | None:
    """``W`` (input 1) reads ``X``'s axis 2; ``R`` reads the hidden state, no tensor."""
    return (node.inputs[0], 2) if slot == 1 else None


@register("RNN", "GRU", "LSTM", mac=_macs, layer_input=_layer_input)
def recurrent(ctx: NodeContext) -> None:
    why = _unsupported(ctx)
    if why is not None:
        ctx.refuse(why)
        return
    x, w, r = ctx.input(0), ctx.input(1), ctx.input(2)
    hidden = ctx.virtual("hidden", ctx.attr_int("hidden_size"))
    w_rows, r_rows, r_cols = ctx.space(w, 1), ctx.space(r, 1), ctx.space(r, 2)
    for rows in (w_rows, r_rows):
        ctx.role(rows, Role.PRODUCER)
        ctx.cyclic(rows, hidden)
    ctx.role(r_cols, Role.CONSUMER)
    ctx.identity(r_cols, hidden)
    w_in = ctx.space(w, 2)
    ctx.role(w_in, Role.CONSUMER)
    ctx.identity_axes(x, 2, w, 2)
    for t in _params(ctx):
        ctx.cyclic(ctx.space(t, 1), hidden)
    _states(ctx, hidden)
    ctx.decline(DIRECTION, *(ctx.space(t, 0) for t in (w, r, *_params(ctx))))
    ctx.on_rewrite(_hidden_hook(hidden.key))


def _params(ctx: NodeContext) -> list[gs.Tensor]:
    """``B`` and, for LSTM, the peepholes ``P``: constants of ``[D, k·H]``."""
    slots = (3, 7) if ctx.node.op == "LSTM" else (3,)
    return [t for t in (ctx.input(i) for i in slots) if t is not None]


def _states(ctx: NodeContext, hidden: Space) -> None:
    """The hidden axis of the states and outputs; time and batch pass through."""
    x = ctx.input(0)
    y = ctx.output(0)
    states = [ctx.input(5), *([ctx.input(6)] if ctx.node.op == "LSTM" else [])]
    finals = [ctx.output(1), *([ctx.output(2)] if ctx.node.op == "LSTM" else [])]
    ctx.identity(ctx.space(x, 0), ctx.space(y, 0))
    ctx.identity(ctx.space(y, 3), hidden)
    ctx.identity(ctx.space(x, 1), ctx.space(y, 2))
    ctx.identity(ctx.space(x, 1), ctx.space(ctx.input(4), 0))  # sequence_lens
    for t in (*states, *finals):
        if t is not None:
            ctx.identity(ctx.space(t, 2), hidden)
            ctx.identity(ctx.space(x, 1), ctx.space(t, 1))
    ctx.decline(DIRECTION, ctx.space(y, 1), *(ctx.space(t, 0) for t in (*states, *finals)))


def _unsupported(ctx: NodeContext) -> str | None:
    """Why the node is outside the rule, or None."""
    layout = ctx.attr_int("layout", 0)
    if layout != 0:
        return f"layout={layout} (batch-first) is not mapped"
    x, w, r = ctx.input(0), ctx.input(1), ctx.input(2)
    for t, what in ((w, "weight"), (r, "weight"), *((p, "bias") for p in _params(ctx))):
        if ctx.const(t) is None:
            return ctx.not_constant(t, what)
    if ctx.rank(x) != 3:
        return ctx.unknown_rank(x) if ctx.rank(x) is None else f"{ctx.which(x)} of rank " \
                                                                 f"{ctx.rank(x)}"
    gates, hidden = GATES[ctx.node.op], ctx.node.attrs.get("hidden_size")
    w_shape, r_shape = ctx.shape(w), ctx.shape(r)
    assert w_shape is not None and r_shape is not None  # constants
    if hidden is None or w_shape[1] != gates * int(hidden) or r_shape[1:] != (
            gates * int(hidden), int(hidden)):
        return f"hidden_size={hidden} does not fit W {list(w_shape)} and R {list(r_shape)} " \
               f"with {gates} gate(s)"
    return None


def _hidden_hook(key: SpaceKey):
    def hook(node: gs.Node, kept: KeptLookup) -> None:
        node.attrs["hidden_size"] = kept.count(key)

    return hook
