"""ONNX's quantisation ops in torch, for ``spa.torch.from_onnx``: the quantise/dequantise core,
QuantizeLinear, DequantizeLinear (ONNX's and onnxruntime's contrib ones), DynamicQuantizeLinear,
MatMulInteger, ConvInteger, QLinearConv and QLinearMatMul. onnxruntime's contrib QLinear* family
and MatMulNBits (spa/torch/qlinear_ops.py) share the core.

- **Quantise**: ``q = saturate(round(x / scale) + zero_point)``, rounding half to even
  (``torch.round``), saturating to the target type's range. The division is in float32 before
  opset 23 (for float16 inputs too, as in onnxruntime), then in the type ``precision`` names,
  else in the scale's type (the spec: onnxruntime divides float16 by a float16 scale in float16).
  The target is ``output_dtype`` if set, else the zero point's type, else uint8. To float8,
  ``x / scale + zero_point`` is rounded to the format; ``saturate=1`` clamps to its largest
  finite value (±inf too), ``saturate=0`` overflows to NaN (e4m3fn, the fnuz types) or ±inf
  (e5m2). onnxruntime departs from the spec there: it gives NaN for e5m2 values in
  ``[61440, 65536)``, which round up to inf; the spec's inf is kept.
- **Dequantise**: ``y = (q - zero_point) · scale``, the difference exact in int64, then float32
  (as onnxruntime rounds an int32 difference), then the output type (``output_dtype``, else the
  scale's). Scales and zero points are a scalar (or one entry: per tensor), 1-D along ``axis``
  (per axis) or, with ``block_size``, the input's shape with ``axis`` cut into blocks.
- **Requantise** (integer kernels): an exact integer accumulator times the float32 multiplier
  ``(scale_a · scale_b) / scale_y``, rounded half to even, plus the zero point, saturated:
  onnxruntime's MLAS output stage, bit for bit. Accumulators are computed in int64 (MatMul) or
  float64 (Conv; exact below 2^53), the zero points subtracted first, so padding is by the zero
  point, as in onnxruntime.
- **int4/uint4** have no torch dtype: their values live in int8/uint8 tensors (-8..7, 0..15),
  one per byte. :func:`spa.torch.arrays.torch_array` reads an ``int4``/``uint4``/float8
  initializer (which ``numpy_helper.to_array`` gives as an ``ml_dtypes`` array, which
  ``torch.from_numpy`` rejects) into such a tensor and remembers its type (by identity, in
  ``arrays.WIDENED``), so that an int4/uint4 zero point (an initializer or a Constant's
  value, not a value an op computes) makes QuantizeLinear saturate to 4 bits, as the spec's
  type rule says, without ``output_dtype``.
- **Gradients**: a straight-through estimator, as quantisation-aware training uses. When the
  input or scale of a QuantizeLinear needs a gradient, its integer output is paired (by
  identity, weakly) with a float copy ``round(u) + (u - u.detach())·[lo <= round(u) <= hi]``
  (``u = x / scale + zero_point``); a DequantizeLinear reading that output reads the copy. So a
  QuantizeLinear → DequantizeLinear pair passes the gradient to ``x`` unchanged inside the clamp
  range and zero outside, and to a float scale both through the division and the
  multiplication (the LSQ gradient ``round(x/s) - x/s`` inside, the clamped level outside).
  The other integer kernels are forward only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from onnx import TensorProto
from torch.utils.weak import WeakIdKeyDictionary

from spa.coupling.registry import LATEST
from spa.torch.arrays import WIDENED, torch_dtype
from spa.torch.interpreter import (
    UnsupportedOpsError,
    given,
    ms_op,
    op,
    positive_axis,
)
from spa.torch.nn_ops import _conv

Tensor = torch.Tensor


@dataclass(frozen=True)
class QType:
    """A quantised element type: the torch dtype holding it, and the range it saturates to."""

    code: int
    dtype: torch.dtype
    lo: float
    hi: float

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point


def _int(code: int, dtype: torch.dtype, bits: int, signed: bool) -> QType:
    lo = -(1 << (bits - 1)) if signed else 0
    return QType(code, dtype, lo, lo + (1 << bits) - 1)


def _float8(code: int, dtype: torch.dtype) -> QType:
    top = float(torch.finfo(dtype).max)
    return QType(code, dtype, -top, top)


T = TensorProto
QTYPES: dict[int, QType] = {q.code: q for q in (
    _int(T.INT8, torch.int8, 8, True), _int(T.UINT8, torch.uint8, 8, False),
    _int(T.INT16, torch.int16, 16, True), _int(T.UINT16, torch.uint16, 16, False),
    _int(T.INT32, torch.int32, 32, True),
    _int(T.INT4, torch.int8, 4, True), _int(T.UINT4, torch.uint8, 4, False),
    _float8(T.FLOAT8E4M3FN, torch.float8_e4m3fn), _float8(T.FLOAT8E4M3FNUZ, torch.float8_e4m3fnuz),
    _float8(T.FLOAT8E5M2, torch.float8_e5m2), _float8(T.FLOAT8E5M2FNUZ, torch.float8_e5m2fnuz))}
#: torch dtype → the quantised type a tensor of it holds (unless WIDENED: see the docstring)
BY_DTYPE: dict[torch.dtype, QType] = {
    q.dtype: q for q in QTYPES.values() if q.code not in (T.INT4, T.UINT4)}
UINT8 = QTYPES[T.UINT8]
# torch rounds e4m3fn overflow to its largest value; beyond this (the rounding midpoint above
# 448, where a tie goes to 448's even mantissa) the spec's non-saturating cast gives NaN
_E4M3FN_NAN_ABOVE = 464.0


def target(a: dict, zero_point: Tensor | None, what: str) -> QType:
    """The type ``what`` quantises to: ``output_dtype``, else its zero point's, else uint8."""
    code = int(a.get("output_dtype", 0))
    if code:
        if code not in QTYPES or code == T.INT32:
            raise UnsupportedOpsError(f"{what} with output_dtype={T.DataType.Name(code)}")
        return QTYPES[code]
    return UINT8 if zero_point is None else qtype_of(zero_point, what)


def qtype_of(t: Tensor, what: str) -> QType:
    """The quantised type ``t`` holds: the 4-bit type it was widened from, else its dtype's."""
    if t in WIDENED:
        return QTYPES[WIDENED[t]]
    if t.dtype not in BY_DTYPE:
        raise UnsupportedOpsError(f"{what} with {t.dtype} values")
    return BY_DTYPE[t.dtype]


def along(p: Tensor, axis: int, rank: int) -> Tensor:
    """A per-tensor or 1-D ``p`` laid out to broadcast along ``axis`` of a rank-``rank``
    tensor (a scalar if it has one entry)."""
    if p.numel() == 1:
        return p.reshape(())
    return p.reshape([-1] + [1] * (rank - 1 - positive_axis(axis, rank)))


def spread(p: Tensor | None, x: Tensor, axis: int = 1, block: int = 0,
           what: str = "QuantizeLinear") -> Tensor | None:
    """A scale or zero point of ``what`` laid out to broadcast against ``x``: per tensor (one
    entry), per ``axis`` (1-D) or per block of ``block`` entries along ``axis`` (``x``'s
    rank)."""
    if p is None or not block:
        if p is not None and p.dim() > 1 and p.numel() > 1:
            raise UnsupportedOpsError(f"{what} with a {p.dim()}-D scale and no block_size")
        return None if p is None else along(p, axis, x.dim())
    axis = positive_axis(axis, x.dim())
    return p.repeat_interleave(block, dim=axis).narrow(axis, 0, x.shape[axis])


# a quantised tensor → its float copy that carries the straight-through gradient
_STRAIGHT: WeakIdKeyDictionary = WeakIdKeyDictionary()


def saturate(u: Tensor, zero_point: Tensor | None, qt: QType, *, clamp: bool = True) -> Tensor:
    """``u`` (``x / scale`` or an accumulator times its multiplier, float32) rounded to ``qt``
    with ``zero_point`` added; ``clamp=False``: float8's non-saturating cast."""
    zp = torch.zeros((), device=u.device) if zero_point is None else zero_point.float()
    if qt.is_float:
        v = u + zp
        q = v.clamp(qt.lo, qt.hi) if clamp else v
        out = q.to(qt.dtype)
        if not clamp and qt.dtype == torch.float8_e4m3fn:
            out = torch.where(v.abs() > _E4M3FN_NAN_ABOVE, torch.nan, out.float()).to(qt.dtype)
        return out
    return (torch.round(u) + zp).clamp(qt.lo, qt.hi).to(qt.dtype)


def quantise(x: Tensor, scale: Tensor, zero_point: Tensor | None, qt: QType, *,
             clamp: bool = True, precision: torch.dtype = torch.float32) -> Tensor:
    """``saturate(round(x / scale) + zero_point)``, the division in ``precision`` (scale and
    zero point laid out by :func:`spread`); the straight-through copy kept when a gradient is
    wanted."""
    u = (x.to(precision) / scale.to(precision)).float()
    q = saturate(u, zero_point, qt, clamp=clamp)
    if torch.is_grad_enabled() and u.requires_grad:
        level = u if qt.is_float else torch.round(u)
        if zero_point is not None:
            level = level + zero_point.float()
        inside = (level >= qt.lo) & (level <= qt.hi)
        _STRAIGHT[q] = q.float().detach() + (u - u.detach()) * inside
    return q


def dequantise(q: Tensor, scale: Tensor, zero_point: Tensor | None,
               dtype: torch.dtype | None = None) -> Tensor:
    """``(q - zero_point) · scale`` in float32, as ``dtype`` (default: the scale's); through
    the straight-through copy of a quantised value that has one."""
    straight = _STRAIGHT.get(q)
    if straight is not None:
        diff = straight if zero_point is None else straight - zero_point.float()
    elif q.is_floating_point():
        diff = q.float() if zero_point is None else q.float() - zero_point.float()
    else:
        diff = (q.long() if zero_point is None else q.long() - zero_point.long()).float()
    return (diff * scale.float()).to(dtype or scale.dtype)


def requantise(acc: Tensor, multiplier: Tensor, zero_point: Tensor | None, qt: QType) -> Tensor:
    """An exact integer accumulator to ``qt``: float32 ``acc · multiplier``, rounded, plus the
    zero point, saturated (onnxruntime's MLAS requantisation)."""
    return saturate(acc.float() * multiplier, zero_point, qt)


def multiplier(*scales: Tensor) -> Tensor:
    """``(s_a · s_b) / s_y``, in float32 in that order (onnxruntime's output scale)."""
    a, b, y = (s.float() for s in scales)
    return a * b / y


# ---- QuantizeLinear and DequantizeLinear ----------------------------------------------------
def _layout(a: dict, what: str, x: Tensor, *params: Tensor | None) -> list[Tensor | None]:
    axis, block = a.get("axis", 1), int(a.get("block_size", 0))
    return [spread(p, x, axis, block, what) for p in params]


def _quantize_linear(a: dict, x: list, precision: torch.dtype | None) -> Tensor:
    zp = given(x, 2)
    qt = target(a, zp, "QuantizeLinear")
    scale, zp = _layout(a, "QuantizeLinear", x[0], x[1], zp)
    assert scale is not None
    return quantise(x[0], scale, zp, qt, clamp=bool(a.get("saturate", 1)),
                    precision=precision or scale.dtype)


def _precision(a: dict) -> torch.dtype | None:
    """Opset 23's ``precision`` of the division (None: the scale's type)."""
    code = int(a.get("precision", 0))
    if code not in (0, T.FLOAT, T.FLOAT16, T.BFLOAT16):
        raise UnsupportedOpsError(f"QuantizeLinear with precision={T.DataType.Name(code)}")
    return torch_dtype(code, "QuantizeLinear precision") if code else None


op("QuantizeLinear", opsets=(1, 22))(lambda a, x: _quantize_linear(a, x, torch.float32))
ms_op("QuantizeLinear")(lambda a, x: _quantize_linear(a, x, torch.float32))
op("QuantizeLinear", opsets=(23, LATEST))(lambda a, x: _quantize_linear(a, x, _precision(a)))


@op("DequantizeLinear")
@ms_op("DequantizeLinear")
def _dequantize_linear(a: dict, x: list) -> Tensor:
    scale, zp = _layout(a, "DequantizeLinear", x[0], x[1], given(x, 2))
    assert scale is not None
    code = int(a.get("output_dtype", 0))
    if code and code not in (T.FLOAT, T.FLOAT16, T.BFLOAT16):
        raise UnsupportedOpsError(f"DequantizeLinear with output_dtype={T.DataType.Name(code)}")
    return dequantise(x[0], scale, zp, torch_dtype(code, "") if code else None)


@op("DynamicQuantizeLinear")
def _dynamic_quantize_linear(a: dict, x: list) -> tuple[Tensor, Tensor, Tensor]:
    q, scale, zp = dynamic_quantise(x[0])
    return q, scale, zp


def dynamic_quantise(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """uint8 over ``[min(x, 0), max(x, 0)]``: ``scale = (max - min) / 255`` (1 when the range
    is empty), ``zero_point = round(clamp(-min / scale, 0, 255))``."""
    lo = x.detach().float().min().clamp(max=0)
    hi = x.detach().float().max().clamp(min=0)
    scale = torch.where(hi == lo, 1.0, (hi - lo) / 255.0)
    zp = torch.round((0.0 - lo / scale).clamp(0, 255)).to(torch.uint8)
    return saturate(x.detach().float() / scale, zp, UINT8), scale, zp


# ---- integer kernels ------------------------------------------------------------------------
def centred(t: Tensor, zero_point: Tensor | None, axis: int) -> Tensor:
    """``t - zero_point`` in int64, a 1-D zero point along ``axis``."""
    wide = t.long()
    return wide if zero_point is None else wide - along(zero_point.long(), axis, t.dim())


def int_matmul(a: Tensor, a_zp: Tensor | None, b: Tensor, b_zp: Tensor | None) -> Tensor:
    """``(a - a_zp) @ (b - b_zp)`` exactly, in int64: a per-row zero point of ``a`` (its
    ``M``), a per-column one of ``b`` (its ``N``)."""
    return centred(a, a_zp, -2) @ centred(b, b_zp, -1)


def int_conv(a: dict, x: Tensor, x_zp: Tensor | None, w: Tensor, w_zp: Tensor | None) -> Tensor:
    """``conv(x - x_zp, w - w_zp)`` exactly (float64), as int64; ``w_zp`` per output channel."""
    out = _conv(a, [centred(x, x_zp, 1).double(), centred(w, w_zp, 0).double()])
    assert isinstance(out, Tensor)
    return out.long()


@op("MatMulInteger")
def _matmul_integer(a: dict, x: list) -> Tensor:
    return int_matmul(x[0], given(x, 2), x[1], given(x, 3)).int()


@op("ConvInteger")
def _conv_integer(a: dict, x: list) -> Tensor:
    return int_conv(a, x[0], given(x, 2), x[1], given(x, 3)).int()


@op("QLinearConv")
def _qlinear_conv(a: dict, x: list) -> Tensor:
    acc = int_conv(a, x[0], x[2], x[3], x[5])
    bias = given(x, 8)
    if bias is not None:
        acc = acc + along(bias.long(), 1, acc.dim())
    m = along(multiplier(x[1], x[4], x[6]), 1, acc.dim())
    return requantise(acc, m, x[7], qtype_of(x[7], "QLinearConv"))


@op("QLinearMatMul")
def _qlinear_matmul(a: dict, x: list) -> Tensor:
    if x[0].is_floating_point() or x[3].is_floating_point():
        raise UnsupportedOpsError("QLinearMatMul with float8 inputs")
    acc = int_matmul(x[0], x[2], x[3], x[5])
    m = along(multiplier(x[1], x[4], x[6]), -1, acc.dim())
    return requantise(acc, m, x[7], qtype_of(x[7], "QLinearMatMul"))
