"""Weights dequantised by plain ops: ``Transpose?((Cast(q) − zp?) · s)`` of constants.

Shipped int8 encoders store a weight as integers and dequantise it with ordinary ops: ``q`` an
integer constant, ``Cast`` to a float type, an optional ``Sub`` of a constant zero point ``zp``,
a ``Mul`` by a constant scale ``s`` (either operand), an optional ``Transpose``. ``s`` and
``zp`` broadcast against ``q``; each is either *per-tensor* (one value) or *per-axis* (its only
dim longer than 1 is ``q``'s length on one axis ``a``): the same weight as
``DequantizeLinear(q, s, zp, axis=a)`` followed by the Transpose.

:func:`dequant_chain` is the one place that recognises such a chain; spa/ir/quant.py then reads
its output as a quantised weight (rules see a constant weight, criteria score the float values).
The chain stays as it is: its ops' own rules (Cast, Sub and Mul element-wise, Transpose) couple
``q``, ``s`` and ``zp`` with the weight's channels, so the rewrite slices the integers with their
per-channel scales and zero points and the model stays integer and computes what it computed
(onnxruntime folds the chain into a float weight; a ``DequantizeLinear`` feeding a MatMul would
instead run as a MatMulNBits that quantises its input, ~1e-3 off). Its ``Cast`` is not folded
into a float constant (:func:`starts_chain`). The masked original zeroes a removed channel of
such a weight by writing the zero point into ``q`` (``(zp − zp) · s = 0``), through the
Transpose (spa/ir/quant.py, :func:`through_chains`).

A chain SPA cannot slice is left unread and says why (:func:`dequant_chain` returns the reason;
the layer reading it freezes with those words, spa/coupling/context.py): a scale or zero point
that varies along several axes (one value per element, or per block), scale and zero point per
different axes, a zero point that is no integer of ``q``'s type, an intermediate tensor or the
integers read by another node, a scale or zero point that is not a constant.

``q`` may be 4-bit (``INT4``/``UINT4``, opset 21; onnxruntime casts them on CPU): read as an
``ml_dtypes`` array of one value an element, sliced like any other, and packed two values a byte
again when written (spa/ir/packed.py), so the written weight stays 4-bit. (An onnx that reads
them unpacked into 8-bit arrays leaves them unread, :data:`INTEGERS`.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from spa.ir.dtypes import is_floating, onnx_type
from spa.ir.external import peek
from spa.ir.packed import integer_range, own_dtype

DEFAULT_DOMAINS = ("", "ai.onnx")
_T = onnx.TensorProto
# Integer types a dequantising chain stores weights in; the 4-bit ones where this onnx reads
# them as 4-bit arrays (spa/ir/packed.py), else their Cast folds to a float constant.
INTEGERS = frozenset((_T.INT8, _T.UINT8, _T.INT16, _T.UINT16)) \
    | frozenset(t for t in (_T.INT4, _T.UINT4) if own_dtype(t))


@dataclass(frozen=True)
class DequantChain:
    """``out = Transpose?((Cast(q) − zero_point?) · scale)``; ``axis`` (of ``q``) the one
    axis scale and zero point vary along, None when both are per-tensor; ``perm`` the
    Transpose's; ``nodes`` the chain's ops, in order."""

    nodes: tuple[gs.Node, ...]
    q: gs.Constant
    scale: gs.Constant
    zero_point: gs.Constant | None
    axis: int | None
    perm: tuple[int, ...] | None
    out: gs.Variable


def starts_chain(node: gs.Node) -> bool:
    """``node`` casts an integer constant to a float type for a ``Sub`` or ``Mul`` to read."""
    if node.op != "Cast" or (node.domain or "") not in DEFAULT_DOMAINS or not node.inputs \
            or not isinstance(node.inputs[0], gs.Constant) or len(node.outputs) != 1:
        return False
    q = node.inputs[0]
    return onnx_type(q.dtype) in INTEGERS and is_floating(int(node.attrs.get("to", 0))) \
        and any(r.op in ("Sub", "Mul") and all(isinstance(t, gs.Constant) for t in r.inputs
                                               if t is not node.outputs[0])
                for r in node.outputs[0].outputs)


def dequant_chain(t: gs.Tensor | None) -> DequantChain | str | None:
    """The chain ``t`` is dequantised by; the reason it has no ``DequantizeLinear`` form; or
    None when ``t`` is no Mul (or Transpose of a Mul) of a Cast of an integer constant."""
    if not isinstance(t, gs.Variable) or len(t.inputs) != 1:
        return None
    perm_node = _producer(t, "Transpose")
    mul_out = perm_node.inputs[0] if perm_node is not None else t
    mul = _producer(mul_out, "Mul")
    if mul is None:
        return None
    found = _operands(mul)
    if found is None:
        return None
    cast, sub, scale_t = found
    q = cast.inputs[0]
    nodes = tuple(n for n in (cast, sub, mul, perm_node) if n is not None)
    why = _shared(nodes, t)
    if why is not None:
        return why
    zp_t = sub.inputs[1] if sub is not None else None
    if not isinstance(scale_t, gs.Constant) or (zp_t is not None
                                                and not isinstance(zp_t, gs.Constant)):
        return f"its {'scale' if not isinstance(scale_t, gs.Constant) else 'zero point'} " \
               "is not a constant"
    return _chain(nodes, q, scale_t, zp_t, perm_node, t)


def _producer(t: gs.Tensor, op: str) -> gs.Node | None:
    if not isinstance(t, gs.Variable) or len(t.inputs) != 1:
        return None
    node = t.inputs[0]
    return node if node.op == op and (node.domain or "") in DEFAULT_DOMAINS else None


def _operands(mul: gs.Node) -> tuple[gs.Node, gs.Node | None, gs.Tensor] | None:
    """``(Cast, Sub or None, scale)`` of ``Mul((Cast(q) − zp?), s)``, either operand order."""
    for i in (0, 1):
        x, s = mul.inputs[i], mul.inputs[1 - i]
        sub = _producer(x, "Sub")
        cast = _producer(sub.inputs[0] if sub is not None else x, "Cast")
        if cast is not None and starts_chain(cast):
            return cast, sub, s
    return None


def _shared(nodes: tuple[gs.Node, ...], out: gs.Tensor) -> str | None:
    """Why the chain's intermediate tensors are not its own, or None."""
    for node in nodes[:-1]:
        inner = node.outputs[0]
        if len(inner.outputs) != 1:
            return f"its intermediate '{inner.name}' is read by {len(inner.outputs)} nodes"
    q = nodes[0].inputs[0]
    if len(q.outputs) != 1:
        return f"its integer tensor '{q.name}' is read by {len(q.outputs)} nodes"
    return None


def _chain(nodes: tuple[gs.Node, ...], q: gs.Constant, scale_t: gs.Constant,
           zp_t: gs.Constant | None, perm_node: gs.Node | None, out: gs.Variable
           ) -> DequantChain | str:
    shape = tuple(int(d) for d in q.shape)
    s_axis = _axis_of(scale_t, shape)
    zp_axis = _axis_of(zp_t, shape) if zp_t is not None else None
    for what, t, axis in (("scale", scale_t, s_axis), ("zero point", zp_t, zp_axis)):
        if axis is False:
            assert t is not None  # an absent zero point has axis None
            return f"its {what} of shape {list(t.shape)} on integers {list(shape)} is neither " \
                   "per-tensor nor per-channel along one axis: its channels cannot be sliced " \
                   "with the weight's"
    if s_axis is not None and zp_axis is not None and s_axis != zp_axis:
        return f"its scale is per-channel along axis {s_axis} but its zero point along {zp_axis}"
    axis = s_axis if s_axis is not None else zp_axis
    assert axis is not False  # returned above
    if zp_t is not None and not _integer_of(peek(zp_t), peek(q).dtype):
        return f"its zero point '{zp_t.name}' holds values that are no {peek(q).dtype} " \
               f"integers (SPA zeroes a channel by writing the zero point into '{q.name}')"
    return DequantChain(nodes, q, scale_t, zp_t, axis, _perm(perm_node, len(shape)), out)


def _integer_of(values: np.ndarray, dtype: np.dtype) -> bool:
    """Every value is an integer ``dtype`` holds."""
    v = np.asarray(values, np.float64)
    bounds = integer_range(dtype)
    return bounds is not None and bool(np.all(v == np.round(v))) and (
        v.size == 0 or (v.min() >= bounds[0] and v.max() <= bounds[1]))


def _axis_of(t: gs.Constant, shape: tuple[int, ...]) -> int | None | bool:
    """The axis of ``shape`` a broadcast operand ``t`` varies along; None when per-tensor;
    False when it varies along several, or would broadcast ``shape`` larger."""
    ts = tuple(int(d) for d in t.shape)
    if len(ts) > len(shape):
        return False
    lead = len(shape) - len(ts)
    long = [ax + lead for ax, n in enumerate(ts) if n != 1]
    if any(ts[ax - lead] != shape[ax] for ax in long):
        return False
    return None if not long else long[0] if len(long) == 1 else False


def _perm(node: gs.Node | None, rank: int) -> tuple[int, ...] | None:
    if node is None:
        return None
    perm = node.attrs.get("perm")
    return tuple(int(p) for p in perm) if perm is not None else tuple(range(rank))[::-1]
