"""onnxruntime's ``MatMulNBits`` weight format: packing, dequantising, quantising again.

The logical weight ``W [K, N]`` is stored row by row of ``Wᵀ``: ``B [N, k_blocks, blob]``
(uint8, ``bits`` bits a value, packed low bits first along K, ``block_size`` values a block),
``scales [N, k_blocks]`` and optional zero points, packed like ``B`` along the blocks
(``[N, ⌈k_blocks·bits/8⌉]``; absent: ``2^(bits−1)``). A value is ``(q − zero_point) · scale``.
:func:`requantize` rounds a changed weight to the codes of given scales and zero points, the
layer's own or fresh ones (:func:`fitted_scales`).
"""

from __future__ import annotations

import numpy as np


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """Rows of ``bits``-bit values packed low bits first (``[rows, bytes]``), unpacked
    (``[rows, bytes · 8/bits]``, uint8)."""
    per_byte = 8 // bits
    shifts = np.arange(per_byte, dtype=np.uint8) * bits
    values = (packed[..., None] >> shifts) & ((1 << bits) - 1)
    return values.reshape(*packed.shape[:-1], -1).astype(np.uint8)


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Rows of ``bits``-bit values (``[rows, count]``) packed low bits first, the last byte
    of a row padded with zeros."""
    per_byte = 8 // bits
    shifts = np.arange(per_byte, dtype=np.uint8) * bits
    count = values.shape[-1]
    padded = np.zeros((*values.shape[:-1], -(-count // per_byte) * per_byte), np.uint8)
    padded[..., :count] = values
    groups = padded.reshape(*values.shape[:-1], -1, per_byte)
    return np.bitwise_or.reduce(groups << shifts, axis=-1).astype(np.uint8)


def blocks(b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int,
           block_size: int) -> np.ndarray:
    """The float64 values ``B [N, k_blocks, blob]`` stands for, block by block:
    ``[N, k_blocks, block_size]`` (``B``'s first two axes, its bytes unpacked). Zero points
    packed, absent, or float (``[N, k_blocks]``, as the scales)."""
    n, count = scales.shape
    q = unpack(b, bits).reshape(n, count, -1)[:, :, :block_size].astype(np.float64)
    zp = _zero_points(zero_points, scales.shape, bits)
    return (q - zp[:, :, None]) * scales.astype(np.float64)[:, :, None]


def dequantize(b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int,
               block_size: int, k: int) -> np.ndarray:
    """The float64 weight ``W [K, N]`` of a MatMulNBits' ``B``, scales and zero points."""
    w = blocks(b, scales, zero_points, bits, block_size)
    return w.reshape(w.shape[0], -1)[:, :k].T


def requantize(w: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int,
               block_size: int) -> np.ndarray:
    """``W [K, N]`` rounded to the codes of the given scales and packed zero points: ``B``."""
    k, n = w.shape
    blocks = scales.shape[1]
    zp = _zero_points(zero_points, scales.shape, bits)
    step = scales.astype(np.float64)
    step = np.where(step != 0, step, 1.0)
    q = np.rint(w.T.reshape(n, blocks, block_size) / step[:, :, None] + zp[:, :, None])
    return pack(np.clip(q, 0, (1 << bits) - 1).astype(np.uint8), bits)


def fitted_scales(w: np.ndarray, bits: int, block_size: int, zero_points: bool
                  ) -> tuple[np.ndarray, np.ndarray | None]:
    """Scales and zero points fitted to ``W [K, N]`` block by block (:func:`fitted_steps`, as
    onnxruntime's quantiser rounds): the scales ``[N, k_blocks]`` (float64), and the zero
    points packed (``zero_points``) or None, the range then centred on the implicit
    ``2^(bits−1)``."""
    k, n = w.shape
    blocks = w.T.reshape(n, k // block_size, block_size)
    top = (1 << bits) - 1
    if not zero_points:
        return fitted_steps(blocks, 0, top, float(1 << (bits - 1)))[0], None
    scales, zp = fitted_steps(blocks, 0, top)
    return scales, pack(zp.astype(np.uint8), bits)


def fitted_steps(blocks: np.ndarray, low: int, high: int,
                 zero_point: np.ndarray | float | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The scale and zero point that round each block (``blocks [..., size]``) to the nearest
    of the integer codes ``low…high``: the block's range, 0 included, over the steps. A
    ``zero_point`` given (one, or one per block) stays, and the scale is the least that holds
    the range on its side of it; else it is fitted, asymmetric (float64 zero points on the
    integer grid). A block of zeros takes scale 1."""
    least = np.minimum(blocks.min(-1), 0.0)
    most = np.maximum(blocks.max(-1), 0.0)
    if zero_point is None:
        scales = np.where(most > least, (most - least) / (high - low), 1.0)
        return scales, np.clip(np.rint(low - least / scales), low, high)
    z = np.broadcast_to(np.asarray(zero_point, np.float64), least.shape)
    below = np.divide(-least, z - low, out=np.zeros_like(least), where=z > low)
    above = np.divide(most, high - z, out=np.zeros_like(most), where=z < high)
    scales = np.maximum(below, above)
    return np.where(scales > 0, scales, 1.0), z


def _zero_points(packed: np.ndarray | None, shape: tuple[int, ...], bits: int) -> np.ndarray:
    """The zero point of each row and block (``shape``: the scales'), float64: unpacked, as
    given when float, or the implicit ``2^(bits−1)``."""
    if packed is None:
        return np.full(shape, float(1 << (bits - 1)))
    if packed.dtype.kind == "f":
        return packed.astype(np.float64).reshape(shape)
    return unpack(packed, bits)[:, :shape[1]].astype(np.float64)
