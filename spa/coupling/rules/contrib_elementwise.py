"""onnxruntime's fused element-wise ops (``com.microsoft``).

Each acts on every element alone (after numpy broadcasting of its operands), so it couples
like the element-wise ops of spa/coupling/rules/elementwise.py:

* unary: ``Gelu`` (erf form), ``QuickGelu`` (``x · σ(α·x)``): axis ``k`` of ``X`` ↔ axis ``k``
  of ``Y``;
* with a bias: ``BiasGelu`` (``gelu(X + bias)``), ``FastGelu`` (tanh approximation of
  ``gelu(X + bias)``, bias optional) and ``BiasAdd`` (``X + bias + skip``): the operands
  broadcast to ``Y`` as in ``Add``, so the 1-D bias is sliced with the channels of ``Y``'s last
  axis and a full-shape ``skip`` is coupled axis by axis.

Facts: the bias (input 1) is added to ``X`` (and to ``skip``): a MatMul read by one of these
has its bias there (FLAP compensation).

The activations are not odd functions (``gelu(0) = 0`` but a removed channel's value is not 0);
the consumer's input weights of a removed channel go with it, as after any activation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from spa.coupling.registry import register
from spa.coupling.rules.elementwise import couple_broadcast

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

    from spa.coupling.context import NodeContext


@register("Gelu", "QuickGelu", domain="com.microsoft")
def unary(ctx: NodeContext) -> None:
    ctx.same_axes([(ctx.input(0), ctx.output(0))])


def _bias_input(node: gs.Node, slot: int) -> int | None:
    """The bias (input 1) is added to ``X`` (input 0) and, in BiasAdd, to ``skip`` too."""
    return 1 if slot == 0 or (slot == 2 and node.op == "BiasAdd") else None


@register("BiasGelu", "FastGelu", "BiasAdd", domain="com.microsoft", adds_bias=_bias_input)
def with_bias(ctx: NodeContext) -> None:
    y = ctx.output(0)
    if y is None:
        ctx.refuse("no output")
        return
    couple_broadcast(ctx, ctx.inputs, y)
