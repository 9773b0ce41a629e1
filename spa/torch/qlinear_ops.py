"""onnxruntime's contrib quantised ops (``com.microsoft``) in torch, for ``spa.torch.from_onnx``:
the QLinear* family its quantiser writes in QOperator format, QGemm, DynamicQuantizeMatMul,
MatMulIntegerToFloat, and MatMulNBits (onnxruntime-genai's block-quantised weights). Forward
only; the quantise/dequantise core is spa/torch/quant_ops.py's.

Each op follows onnxruntime's CPU kernel, whose rounding departs from "dequantise, compute in
float, quantise" in where the zero point enters and in what is fused:

- **QLinearAdd**: ``c = round(fma(ra, a, fma(rb, b, zc - fma(ra, za, rb·zb))))`` with
  ``ra = sa / sc``, ``rb = sb / sc`` (MLAS's AVX2 kernel: the zero points folded into one
  constant, fused multiply-adds, emulated here in float64). Other CPUs' kernels round the
  intermediate sums differently: at most one step apart.
- **QLinearMul**: ``c = round((a - za)(b - zb) · (sa·sb/sc) + zc)``: the zero point added
  before rounding (half to even), unlike QuantizeLinear.
- **QLinearSigmoid**, **QLinearLeakyRelu**: a table of the 256 inputs, dequantised, mapped,
  quantised (as onnxruntime builds it); onnxruntime's sigmoid is MLAS's polynomial, torch's is
  exact: an entry near a rounding boundary may land one step apart.
- **QLinearGlobalAveragePool**: ``round(Σ(x - zx) · (sx / (sy·n))) + zy``, the sum exact.
- **QLinearAveragePool**: dequantised, each window summed in float32 in row-major order,
  divided by its count, then ``round(mean / sy + zy)`` (the zero point inside the rounding).
  With ``count_include_pad`` every window counts the kernel's size, even one that
  ``ceil_mode`` lets overhang the padding (onnxruntime's QLinear kernel; its float
  AveragePool, and torch, count only the padded input there).
- **QLinearConcat**: every input whose scale or zero point differs from the output's is
  requantised entry by entry (dequantise, quantise); float inputs are refused.
- **QGemm**, **MatMulIntegerToFloat**, **DynamicQuantizeMatMul**: the exact integer product
  (plus QGemm's int32 ``C``), then ``acc · (α·sa·sb)`` in float32 (+ bias), or requantised by
  ``α·sa·sb/sy`` when QGemm has an output zero point (without one its output is float,
  ``acc · α·sa·sb/sy``: onnxruntime's reading of a lone ``y_scale``). DynamicQuantizeMatMul
  quantises ``A`` as DynamicQuantizeLinear does (uint8 over ``[min(A, 0), max(A, 0)]``).
- **MatMulNBits**: ``B`` unpacked least significant bits first (4 bits: low nibble first),
  ``W = (q - zp) · scale`` per block of ``block_size`` along ``K`` (``zp`` packed like ``B``, or
  float, or ``2^(bits-1)`` when absent), ``Y = A Wᵀ + bias`` (just the bias for an empty ``B``,
  an omitted projection). onnxruntime's CPU kernels take 2, 4 and 8 bits; other widths,
  ``g_idx`` and prepacked weights are refused. onnxruntime may accumulate in another order, or
  (``accuracy_level`` 4) quantise ``A`` to int8 per block: ignored here, the tests bound the
  difference.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from spa.torch.interpreter import UnsupportedOpsError, given, ms_op, positive_axis
from spa.torch.quant_ops import (
    along,
    dequantise,
    dynamic_quantise,
    int_matmul,
    multiplier,
    qtype_of,
    quantise,
    requantise,
    saturate,
)

Tensor = torch.Tensor


def _fma(x: Tensor, y: Tensor, z: Tensor) -> Tensor:
    """``x·y + z`` rounded once to float32 (in float64: exact products of float32 values)."""
    return (x.double() * y.double() + z.double()).float()


def _zp(t: Tensor | None) -> Tensor:
    return torch.zeros(()) if t is None else t.float()


# ---- element-wise ---------------------------------------------------------------------------
@ms_op("QLinearAdd")
def _qlinear_add(a: dict, x: list) -> Tensor:
    sa, za, sb, zb, sc, zc = x[1], _zp(given(x, 2)), x[4], _zp(given(x, 5)), x[6], given(x, 7)
    ra, rb = sa.float() / sc.float(), sb.float() / sc.float()
    fixed = _zp(zc) - _fma(ra, za, rb * zb)
    total = _fma(ra, x[0].float(), _fma(rb, x[3].float(), fixed))
    return saturate(total, None, qtype_of(x[0], "QLinearAdd"))


@ms_op("QLinearMul")
def _qlinear_mul(a: dict, x: list) -> Tensor:
    product = (x[0].float() - _zp(given(x, 2))) * (x[3].float() - _zp(given(x, 5)))
    total = product * multiplier(x[1], x[4], x[6]) + _zp(given(x, 7))
    return saturate(total, None, qtype_of(x[0], "QLinearMul"))


def _through_table(name: str, fn: Callable[[dict, Tensor], Tensor]) -> None:
    """Register the QLinear unary op ``name``: ``quantise(fn(dequantise(x)))``, entry by entry
    as onnxruntime's table does."""
    def run(a: dict, x: list) -> Tensor:
        values = dequantise(x[0], x[1], given(x, 2))
        return quantise(fn(a, values), x[3], given(x, 4), qtype_of(x[0], name))
    ms_op(name)(run)


_through_table("QLinearSigmoid", lambda a, v: torch.sigmoid(v))
_through_table("QLinearLeakyRelu", lambda a, v: F.leaky_relu(v, a.get("alpha", 0.01)))


@ms_op("QLinearConcat")
def _qlinear_concat(a: dict, x: list) -> Tensor:
    scale, zp = x[0], x[1]
    qt = qtype_of(zp, "QLinearConcat")
    parts = []
    for t, s, z in zip(x[2::3], x[3::3], x[4::3]):
        if t.is_floating_point():
            raise UnsupportedOpsError("QLinearConcat with float inputs")
        same = bool(torch.equal(s, scale) and torch.equal(z, zp))
        parts.append(t if same else quantise(dequantise(t, s, z), scale, zp, qt))
    return torch.cat(parts, positive_axis(a["axis"], parts[0].dim()))


# ---- pooling --------------------------------------------------------------------------------
def _channels_first(a: dict, fn: Callable[[Tensor], Tensor], t: Tensor) -> Tensor:
    """``fn`` on ``t`` laid out N, C, spatial… (``channels_last``: moved there and back)."""
    if not a.get("channels_last", 0):
        return fn(t)
    return fn(t.movedim(-1, 1)).movedim(1, -1)


@ms_op("QLinearGlobalAveragePool")
def _qlinear_global_average_pool(a: dict, x: list) -> Tensor:
    def pool(t: Tensor) -> Tensor:
        acc = (t.long() - x[2].long()).sum(tuple(range(2, t.dim())), keepdim=True)
        ratio = x[1].float() / (x[3].float() * math.prod(t.shape[2:]))
        return saturate(acc.float() * ratio, x[4], qtype_of(x[4], "QLinearGlobalAveragePool"))
    return _channels_first(a, pool, x[0])


def _windows(t: Tensor, kernel: list[int], strides: list[int]) -> Tensor:
    """``t``'s pooling windows: ``[N, C, out…, kernel entries]``, row-major within a window."""
    for i, (k, s) in enumerate(zip(kernel, strides)):
        t = t.unfold(2 + i, k, s)
    return t.flatten(-len(kernel))


def _pad(t: Tensor, begin: list[int], end: list[int], value: float = 0.0) -> Tensor:
    flat = [p for b, e in zip(reversed(begin), reversed(end)) for p in (b, e)]
    return F.pad(t, flat, value=value)


def _pool_pads(a: dict, shape: tuple[int, ...]) -> tuple[list[int], list[int]]:
    """Begin and end pads per spatial axis, the end ones grown for ``ceil_mode`` (a last window
    starting in the end padding is dropped, as in onnxruntime and torch)."""
    if a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise UnsupportedOpsError(f"QLinearAveragePool with auto_pad={a['auto_pad']}")
    kernel, rank = a["kernel_shape"], len(a["kernel_shape"])
    strides, pads = a.get("strides", [1] * rank), a.get("pads", [0] * (2 * rank))
    begin, end = list(pads[:rank]), list(pads[rank:])
    if a.get("ceil_mode", 0):
        for i, (n, k, s) in enumerate(zip(shape, kernel, strides)):
            out = -(-(n + begin[i] + end[i] - k) // s) + 1
            if (out - 1) * s >= n + begin[i]:
                out -= 1
            end[i] = max(end[i], (out - 1) * s + k - n - begin[i])
    return begin, end


@ms_op("QLinearAveragePool")
def _qlinear_average_pool(a: dict, x: list) -> Tensor:
    kernel = a["kernel_shape"]
    strides = a.get("strides", [1] * len(kernel))

    def pool(t: Tensor) -> Tensor:
        begin, end = _pool_pads(a, tuple(t.shape[2:]))
        values = _windows(_pad(dequantise(t, x[1], given(x, 2)), begin, end), kernel,
                          strides).unbind(-1)
        total = values[0]
        for v in values[1:]:  # onnxruntime's order: float32 sums are not associative
            total = total + v
        count: Tensor | float = float(math.prod(kernel))  # with count_include_pad
        if not a.get("count_include_pad", 0):
            ones = _pad(torch.ones((1, 1, *t.shape[2:])), begin, end)
            count = _windows(ones, kernel, strides).sum(-1)
        mean = total / count
        return saturate(mean / x[3].float() + _zp(given(x, 4)), None,
                        qtype_of(x[0], "QLinearAveragePool"))
    return _channels_first(a, pool, x[0])


# ---- products -------------------------------------------------------------------------------
def _scaled(acc: Tensor, scale: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    """An integer accumulator to float: ``acc · scale (+ bias)`` in float32."""
    out = acc.float() * scale
    return (out if bias is None else out + bias.float()).to(dtype)


@ms_op("MatMulIntegerToFloat")
def _matmul_integer_to_float(a: dict, x: list) -> Tensor:
    acc = int_matmul(x[0], given(x, 4), x[1], given(x, 5))
    scale = x[2].float().reshape(()) * along(x[3].float(), -1, 1)
    return _scaled(acc, scale, given(x, 6), x[2].dtype)


@ms_op("DynamicQuantizeMatMul")
def _dynamic_quantize_matmul(a: dict, x: list) -> Tensor:
    q, scale, zp = dynamic_quantise(x[0])
    acc = int_matmul(q, zp, x[1], given(x, 3))
    return _scaled(acc, scale * along(x[2].float(), -1, 1), given(x, 4), x[0].dtype)


@ms_op("QGemm")
def _qgemm(a: dict, x: list) -> Tensor:
    A = x[0].t() if a.get("transA", 0) else x[0]
    B = x[3].t() if a.get("transB", 0) else x[3]
    acc = int_matmul(A, x[2], B, given(x, 5))
    bias = given(x, 6)
    if bias is not None:
        acc = acc + bias.long()
    scale = float(a.get("alpha", 1.0)) * x[1].float().reshape(()) * along(x[4].float(), -1, 1)
    y_scale, y_zp = given(x, 7), given(x, 8)
    if y_scale is not None:
        scale = scale / y_scale.float()
    if y_zp is None:  # float output, divided by a y_scale if there is one (onnxruntime's)
        return _scaled(acc, scale, None, torch.float32)
    return requantise(acc, scale, y_zp, qtype_of(y_zp, "QGemm"))


# ---- MatMulNBits ----------------------------------------------------------------------------
def unpack_bits(packed: Tensor, bits: int) -> Tensor:
    """uint8 bytes → their ``8 // bits`` fields, least significant first (last axis grows)."""
    shifts = torch.arange(0, 8, bits, dtype=torch.int32)
    fields = (packed.int().unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return fields.flatten(-2)


@ms_op("MatMulNBits")
def _matmul_nbits(a: dict, x: list) -> Tensor:
    bits, block, K, N = int(a.get("bits", 4)), int(a["block_size"]), int(a["K"]), int(a["N"])
    if bits not in (2, 4, 8):
        raise UnsupportedOpsError(f"MatMulNBits with bits={bits}")
    if given(x, 4) is not None:
        raise UnsupportedOpsError("MatMulNBits with g_idx")
    if a.get("weight_prepacked", 0):
        raise UnsupportedOpsError("MatMulNBits with weight_prepacked=1")
    bias = given(x, 5)
    if not x[1].numel():  # an omitted projection: zeros (plus the bias)
        y = torch.zeros((*x[0].shape[:-1], N), dtype=torch.float32)
        return (y if bias is None else y + bias.float()).to(x[0].dtype)
    blocks = -(-K // block)
    q = unpack_bits(x[1], bits).reshape(N, blocks, block).float()
    zp = given(x, 3)
    if zp is None:
        centre = torch.full((N, blocks, 1), float(1 << (bits - 1)))
    elif zp.dtype == torch.uint8:
        centre = unpack_bits(zp.reshape(N, -1), bits)[:, :blocks, None].float()
    else:
        centre = zp.float().reshape(N, blocks, 1)
    w = ((q - centre) * x[2].float().reshape(N, blocks, 1)).reshape(N, -1)[:, :K]
    y = x[0].float() @ w.t()
    return (y if bias is None else y + bias.float()).to(x[0].dtype)
