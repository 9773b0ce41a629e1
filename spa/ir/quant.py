"""Weights stored quantised: ``DequantizeLinear(q, scale, zero_point, axis)`` of constants.

A QDQ model (``onnxruntime.quantization`` with ``QuantFormat.QDQ``, or a PyTorch/TensorRT
export) keeps each weight as an integer constant ``q`` and reaches its layer through
``DequantizeLinear``: ``w = (q − zero_point) · scale``. The scale and zero point are either
per-tensor (one value each) or per-axis (1-D, one value per index of ``q``'s ``axis``).
SPA keeps the model quantised (the DequantizeLinear is never folded into a float weight);
this module gives the float value such a weight stands for, so that rules see a constant
weight and importance criteria score the numbers the layer multiplies by.

Blocked quantisation (``block_size``: one scale per block of ``axis``, opset 21) is dequantised
the same way, each scale and zero point repeated over its block (:func:`spread`).

A weight dequantised by plain ops (``Cast`` → ``Sub`` → ``Mul`` → ``Transpose``, recognised in
spa/ir/quant_chain.py) is the same thing spelt otherwise: :func:`quantized_weight` reads it as
one, with ``perm`` the Transpose after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias, cast

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from spa.ir import nbits
from spa.ir.external import attach_external, peek
from spa.ir.packed import integer_range
from spa.ir.quant_chain import DequantChain, dequant_chain

DEFAULT_DOMAINS = ("", "ai.onnx")
# Ops that read a weight packed several values a byte, ``[rows, blocks, blob]`` with
# ``block_size`` values a blob: (domain, op) → the input slot of the weight.
PACKED_WEIGHTS = {("com.microsoft", "MatMulNBits"): 1}
# Where the masked original zeroes a weight: (axis, removed indices, the values to write there;
# None: zeros), as spa/validate.py keeps them.
ZeroSlice: TypeAlias = tuple[int, np.ndarray, "np.ndarray | None"]


@dataclass(frozen=True)
class QuantizedWeight:
    """A ``DequantizeLinear`` whose inputs are all constants; ``axis`` None when per-tensor;
    ``block_size`` > 0 when blocked (the scale has ``q``'s rank). A chain of plain ops
    (spa/ir/quant_chain.py) has its Mul as ``node``, scale and zero point broadcast against
    ``q`` and ``perm`` the Transpose of the dequantised values, if any."""

    node: gs.Node
    q: gs.Constant
    scale: gs.Constant
    zero_point: gs.Constant | None
    axis: int | None
    block_size: int = 0
    perm: tuple[int, ...] | None = None


def quantized_weight(t: gs.Tensor | None) -> QuantizedWeight | None:
    """The quantised constant ``t`` is dequantised from, or None (not a DequantizeLinear of
    constants, or a scale that fits no axis)."""
    if not isinstance(t, gs.Variable) or len(t.inputs) != 1:
        return None
    node = t.inputs[0]
    if node.op != "DequantizeLinear" or (node.domain or "") not in DEFAULT_DOMAINS:
        chain = dequant_chain(t)
        if not isinstance(chain, DequantChain):
            return None
        mul = next(n for n in chain.nodes if n.op == "Mul")
        return QuantizedWeight(mul, chain.q, chain.scale, chain.zero_point, chain.axis,
                               perm=chain.perm)
    ins = [x for x in node.inputs]
    q, scale = ins[0], ins[1] if len(ins) > 1 else None
    zp = ins[2] if len(ins) > 2 and ins[2].name else None
    if not isinstance(q, gs.Constant) or not isinstance(scale, gs.Constant) \
            or (zp is not None and not isinstance(zp, gs.Constant)):
        return None
    if zp is not None and tuple(zp.shape) != tuple(scale.shape):
        return None
    block = int(node.attrs.get("block_size", 0) or 0)
    if block > 0 and len(scale.shape) == len(q.shape) and q.shape:
        axis = int(node.attrs.get("axis", 1)) % len(q.shape)
        if -(-q.shape[axis] // block) == scale.shape[axis]:
            return QuantizedWeight(node, q, scale, zp, axis, block)
        return None
    per = per_axis(node, q.shape, scale.shape)
    return None if per is False else QuantizedWeight(node, q, scale, zp, per)


def per_axis(node: gs.Node, shape: tuple, scale_shape: tuple) -> int | None | bool:
    """The quantisation axis of ``node`` (Q or DQ) for data of ``shape``: None when
    per-tensor, False when the form is not understood (blocked, or the scale's length is not
    the axis's length)."""
    if int(node.attrs.get("block_size", 0) or 0):
        return False
    size = int(np.prod(scale_shape, dtype=np.int64))
    if len(scale_shape) == 0 or (len(scale_shape) == 1 and size == 1):
        return None
    if len(scale_shape) != 1 or not shape:
        return False
    axis = int(node.attrs.get("axis", 1))
    if not -len(shape) <= axis < len(shape):
        return False
    axis %= len(shape)
    return axis if shape[axis] == size else False


def dequantize(w: QuantizedWeight) -> np.ndarray:
    """``(q − zero_point) · scale``, broadcast along the quantisation axis, in the scale's
    float type (what DequantizeLinear outputs)."""
    q = peek(w.q)
    scale = peek(w.scale)
    zp = np.zeros((), np.float32) if w.zero_point is None else peek(w.zero_point)
    scale = spread(scale, w.axis, q.shape, w.block_size)
    zp = spread(zp, w.axis, q.shape, w.block_size)
    out = (q.astype(np.float32) - zp.astype(np.float32)) * scale.astype(np.float32)
    out = out.astype(scale.dtype, copy=False)
    return out if w.perm is None else np.transpose(out, w.perm)


def spread(v: np.ndarray, axis: int | None, shape: tuple[int, ...], block_size: int = 0
           ) -> np.ndarray:
    """A scale or zero point ``v`` shaped to broadcast against integers of ``shape``: one
    value, one per index of ``axis``, or (``block_size``) one per block of ``axis``, repeated
    over the block."""
    if block_size and np.ndim(v) and axis is not None:
        return np.repeat(v, block_size, axis=axis).take(np.arange(shape[axis]), axis=axis)
    return along(v, axis, len(shape))


def has_codes(w: QuantizedWeight) -> bool:
    """Whether new values of ``w`` can be written as codes of its integer tensor on its own
    scale and zero point (:func:`requantized`): a DequantizeLinear or a chain of plain ops, of
    an integer type (8 to 32 bits, or packed 4 and 2 bits), per tensor, axis or block."""
    return integer_range(np.dtype(w.q.dtype)) is not None


def codes_on(values: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | float,
             old: np.ndarray) -> np.ndarray:
    """``values`` as integer codes of ``old``'s type on the given scale and zero point
    (broadcast against ``values``): rounded to the nearest step, clipped to the type's range;
    where the scale is 0, ``old``'s codes stay."""
    low, high = cast(tuple[int, int], integer_range(old.dtype))
    scale = np.asarray(scale, np.float64)
    step = np.where(scale != 0, scale, 1.0)
    codes = np.clip(np.rint(values / step + np.asarray(zero_point, np.float64)), low, high)
    return np.where(scale != 0, codes, old.astype(np.float64)).astype(old.dtype)


def requantized(w: QuantizedWeight, values: np.ndarray) -> np.ndarray:
    """The dequantised-layout ``values`` of a weight that :func:`has_codes` as new codes of its
    integer tensor on its own scale and zero point (a chain's Transpose undone)."""
    q = peek(w.q)
    if w.perm is not None:
        values = np.transpose(values, np.argsort(w.perm))
    zp = np.zeros(()) if w.zero_point is None \
        else spread(peek(w.zero_point), w.axis, q.shape, w.block_size)
    return codes_on(values, spread(peek(w.scale), w.axis, q.shape, w.block_size), zp, q)


def along(v: np.ndarray, axis: int | None, ndim: int) -> np.ndarray:
    """``v`` (one value, or one per index of ``axis``) shaped to broadcast along ``axis``."""
    if v.size == 1 or axis is None:
        return v.reshape(())
    shape = [1] * ndim
    shape[axis] = v.size
    return v.reshape(shape)


def weight_values(t: gs.Tensor | None) -> np.ndarray | None:
    """The float values a constant or a dequantised constant holds; None for anything else.
    A packed N-bit weight (:func:`packed_weight`) gives its values block by block, float64
    ``[N, k_blocks, block_size]``: its own first two axes, so that its channel spaces index
    them. External tensors are mapped for the caller only (spa/ir/external.py, :func:`peek`)."""
    packed = packed_weight(t)
    if packed is not None:
        return packed.values()
    if isinstance(t, gs.Constant):
        return peek(t)
    w = quantized_weight(t)
    return None if w is None else dequantize(w)


def weight_array(t: gs.Tensor | None) -> np.ndarray:
    """:func:`weight_values` of a tensor known to be a weight (a member of a group's weight
    spaces): a caller's invariant, asserted."""
    values = weight_values(t)
    assert values is not None, f"'{getattr(t, 'name', t)}' is not a weight"
    return values


def is_weight(t: gs.Tensor | None) -> bool:
    """``t`` is a constant, or the DequantizeLinear of constants (without reading values)."""
    return isinstance(t, gs.Constant) or quantized_weight(t) is not None


def zero_point_fill(q: np.ndarray, zero_point: np.ndarray | None, axis: int | None,
                    block_size: int = 0) -> np.ndarray:
    """``q``-shaped array of the zero point: where ``q`` holds it, the weight is exactly 0
    (how the masked original zeroes a quantised weight's slice); ``block_size``: one zero point
    per block of ``axis``."""
    if zero_point is None:
        return np.zeros_like(q)
    zp = np.asarray(zero_point).astype(q.dtype)
    return np.broadcast_to(spread(zp, axis, q.shape, block_size), q.shape)


@dataclass(frozen=True)
class PackedWeight:
    """A constant read as a packed N-bit weight: ``MatMulNBits``' ``B`` (spa/ir/nbits.py), with
    its node's scales, zero points (None: the implicit ones), ``bits`` and ``block_size``."""

    node: gs.Node
    b: gs.Constant
    scales: gs.Constant
    zero_points: gs.Constant | None
    bits: int
    block_size: int

    def values(self) -> np.ndarray:
        """``[N, k_blocks, block_size]``, float64 (:func:`spa.ir.nbits.blocks`)."""
        zp = None if self.zero_points is None else peek(self.zero_points)
        return nbits.blocks(peek(self.b), peek(self.scales), zp, self.bits, self.block_size)

    def codes(self, values: np.ndarray) -> np.ndarray:
        """``values`` (as :meth:`values` gives them) rounded to new codes on this weight's own
        scales and zero points: a new ``B``."""
        n, count, size = values.shape
        zp = None if self.zero_points is None else peek(self.zero_points)
        return nbits.requantize(values.reshape(n, count * size).T, peek(self.scales), zp,
                                self.bits, size).reshape(peek(self.b).shape)


def packed_weight(t: gs.Tensor | None) -> PackedWeight | None:
    """The packed N-bit weight ``t`` is (``MatMulNBits``' ``B``, its scales and zero points
    constants of shape ``[N, k_blocks]`` or packed, no ``g_idx``), or None."""
    if not isinstance(t, gs.Constant) or len(t.shape or ()) != 3:
        return None
    for node in t.outputs:
        if PACKED_WEIGHTS.get((node.domain or "", node.op)) != 1 or node.inputs[1] is not t \
                or len(node.inputs) < 3:
            continue
        scales = node.inputs[2]
        zp = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3].name else None
        g_idx = len(node.inputs) > 4 and node.inputs[4].name
        bits, size = int(node.attrs.get("bits", 4)), int(node.attrs.get("block_size", 0))
        if not isinstance(scales, gs.Constant) or len(scales.shape or ()) != 2 or g_idx \
                or (zp is not None and not isinstance(zp, gs.Constant)) or size <= 0 \
                or bits not in (2, 4, 8) or tuple(scales.shape) != tuple(t.shape[:2]):
            return None
        return PackedWeight(node, t, scales, zp, bits, size)
    return None


def layer_weight(t: gs.Tensor | None) -> gs.Tensor | None:
    """The tensor holding the weights that a weight space of ``t`` indexes: for the scales of a
    packed N-bit weight (where ``MatMulNBits`` has its consumer space, so that the masked
    original zeroes a block exactly), that weight; else ``t``. What criteria score."""
    if isinstance(t, gs.Constant):
        for node in t.outputs:
            if PACKED_WEIGHTS.get((node.domain or "", node.op)) == 1 \
                    and len(node.inputs) > 2 and node.inputs[2] is t:
                b = node.inputs[1]
                return b if packed_weight(b) is not None else t
    return t


def packed_block_size(t: gs.Tensor) -> int | None:
    """``block_size`` of the op that reads ``t`` as a packed N-bit weight (``MatMulNBits``'s
    ``B``), or None: ``t`` then holds ``prod(shape[:-1]) · block_size`` values."""
    for node in t.outputs:
        slot = PACKED_WEIGHTS.get((node.domain or "", node.op))
        if slot is not None and len(node.inputs) > slot and node.inputs[slot] is t:
            return int(node.attrs.get("block_size", 0)) or None
    return None


def through_chains(model: onnx.ModelProto, zero: dict[str, list[ZeroSlice]],
                   base_dir: Path | None) -> None:
    """The masked original's zeroing (spa/validate.py), moved from a dequantising chain's
    output to its integers: each ``(axis, indices, fill)`` of ``zero`` on a chain's output
    becomes one on ``q`` (axis ``k`` of the output is ``perm[k]`` of ``q``), filled with the
    zero point, so that ``(zp − zp) · s = 0``. ``base_dir``: where ``model``'s external data
    is (the chain is read from its tensors)."""
    if not zero or not any(n.op_type == "Cast" for n in model.graph.node):
        return
    graph = gs.import_onnx(model)
    if base_dir is not None:
        attach_external(graph, base_dir)
    tensors = graph.tensors()
    inits = {t.name for t in model.graph.initializer}
    for name in list(zero):
        chain = dequant_chain(tensors.get(name))
        if not isinstance(chain, DequantChain) or chain.q.name not in inits:
            continue
        q = peek(chain.q)
        zp = None if chain.zero_point is None else peek(chain.zero_point)
        fill = zero_point_fill(q, zp, chain.axis)
        perm = chain.perm or tuple(range(q.ndim))
        zero.setdefault(chain.q.name, []).extend((perm[a], idx, fill)
                                                 for a, idx, _ in zero.pop(name))
