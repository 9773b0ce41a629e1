"""onnxruntime's fused dense and convolution layers (``com.microsoft``).

``FusedMatMul`` ``Y = α · A' @ B'`` (``A' = Aᵀ`` over the last two axes if ``transA``, ``B'``
likewise with ``transB``): a MatMul (spa/coupling/rules/linear.py) whose operands may be read
transposed. With a 2-D constant ``B`` (``[K, N]``, or ``[N, K]`` if ``transB``): ``A``'s K axis
(``-2`` if ``transA`` else ``-1``) ↔ ``B``'s K axis (consumer), ``B``'s N axis ↔ ``Y.-1``
(producer), ``A``'s M axis ↔ ``Y.-2`` and its batch axes pass to ``Y``. Of two activations
(onnxruntime fuses ``Q @ Kᵀ · scale`` into one): the batch axes broadcast, the M and N axes pass
to ``Y``, and the contracted K axes, summed with no weight to zero a channel at, freeze. ``α``
scales every output alike and changes no coupling.

``FusedConv`` ``Y = act(conv(X, W) + B + Z)``: a Conv (spa/coupling/rules/conv.py) followed by
an element-wise activation, with an optional ``Z`` of ``Y``'s shape added before it; the Conv
rule couples ``X``, ``W``, ``B`` and ``Y``, and ``Z`` goes with ``Y`` axis by axis.

Facts: MACs ``|Y| · K`` (FusedMatMul), those of Conv (FusedConv); layer inputs as MatMul's and
Conv's; FusedConv's bias is input 2, as Conv's. FusedMatMul has no bias slot: a following
``Add`` is outside the ``α`` scaling, so a shift computed for ``A' @ B'`` would be off by ``α``.

Fail closed, with a reason naming the attribute: ``transBatchA``/``transBatchB`` (batch axes
moved past the matrix axes), a FusedConv activation outside the element-wise ones onnxruntime
documents, a constant ``A``, a constant ``B`` of rank other than 2.
"""

from __future__ import annotations

from math import prod
from typing import TYPE_CHECKING

from spa.coupling.facts import BiasSlot, MacTerm, mac_term
from spa.coupling.registry import register
from spa.coupling.rules.conv import conv, conv_facts
from spa.coupling.rules.elementwise import couple_broadcast
from spa.coupling.types import Role

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

    from spa.coupling.context import NodeContext

# FusedConv activations onnxruntime implements (all element-wise).
ACTIVATIONS = ("Relu", "Tanh", "Sigmoid", "LeakyRelu", "Clip", "HardSigmoid")
_BATCH_TRANSPOSES = ("transBatchA", "transBatchB")


def _k_axis(node: gs.Node) -> int:
    """``A``'s contracted axis."""
    return -2 if int(node.attrs.get("transA", 0)) else -1


def _fused_matmul_macs(node: gs.Node) -> MacTerm | None:
    a, b, y = node.inputs[0], node.inputs[1], node.outputs[0]
    k = _k_axis(node)
    return mac_term([y, a], lambda y_, a_: prod(y_) * (a_[k] if len(a_) > 1 else 1), known=[b])


def _fused_matmul_input(node: gs.Node, slot: int) -> tuple[gs.Tensor, int] | None:
    """A constant ``B`` reads ``A`` at its K axis."""
    return (node.inputs[0], _k_axis(node)) if slot == 1 else None


@register("FusedMatMul", domain="com.microsoft", mac=_fused_matmul_macs,
          layer_input=_fused_matmul_input)
def fused_matmul(ctx: NodeContext) -> None:
    a, b, y = ctx.input(0), ctx.input(1), ctx.output(0)
    ra, rb, ry = ctx.rank(a), ctx.rank(b), ctx.rank(y)
    batch = [t for t in _BATCH_TRANSPOSES if ctx.attr_int(t, 0)]
    if batch or a is None or b is None or ra is None or rb is None or ry is None \
            or min(ra, rb) < 2:
        ctx.refuse(f"attribute {batch[0]}=1 (batch axes transposed) is not mapped" if batch else
                   ctx.unknown_rank(a if ra is None else b if rb is None else y)
                   if None in (ra, rb, ry) else "a 1-D operand: a vector product")
        return
    if ctx.const(a) is not None or (ctx.const(b) is not None and rb != 2):
        ctx.refuse("a constant A (weight on the left)" if ctx.const(a) is not None else
                   f"constant {ctx.which(b)} of rank {rb}: only a 2-D weight is mapped")
        return
    a_k, a_m = (-2, -1) if ctx.attr_int("transA", 0) else (-1, -2)
    b_k, b_n = (-1, -2) if ctx.attr_int("transB", 0) else (-2, -1)
    ctx.identity(ctx.space(a, a_m), ctx.space(y, -2))
    ctx.identity(ctx.space(b, b_n), ctx.space(y, -1))
    if ctx.const(b) is not None:
        w_k, w_n = ctx.space(b, b_k), ctx.space(b, b_n)
        ctx.role(w_k, Role.CONSUMER)
        ctx.role(w_n, Role.PRODUCER)
        ctx.identity(ctx.space(a, a_k), w_k)
        for ax in range(ra - 2):
            ctx.identity(ctx.space(a, ax), ctx.space(y, ax + ry - ra))
        return
    couple_broadcast(ctx, [a, b], y, skip_last=2)
    ctx.decline(f"axis {ra + a_k} of '{a.name}' and axis {rb + b_k} of '{b.name}' are summed "
                "over in a product of two activations, with no weight to remove a channel at",
                ctx.space(a, a_k), ctx.space(b, b_k))


mac, layer_input = conv_facts()


@register("FusedConv", domain="com.microsoft", mac=mac, layer_input=layer_input,
          bias=BiasSlot(2))
def fused_conv(ctx: NodeContext) -> None:
    conv(ctx)  # first: a refused node's weight still makes its (frozen) group
    activation = ctx.attr("activation")
    if activation is not None and str(activation) not in ACTIVATIONS:
        ctx.refuse(f"attribute activation={activation!s} is not one of the element-wise "
                   f"activations {', '.join(ACTIVATIONS)}")
        return
    z = ctx.input(3)
    if z is not None:
        ctx.same_axes([(z, ctx.output(0))])
