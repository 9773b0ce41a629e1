"""Element types packed several values a byte: the bytes they take, the bytes they are written as.

ONNX stores ``INT4``/``UINT4`` (opset 21), ``FLOAT4E2M1`` and ``INT2``/``UINT2`` packed, low bits
first, the last byte part-used when the count does not fill it: ``⌈n · bits / 8⌉`` bytes.
``onnx.numpy_helper`` reads such a tensor as an ``ml_dtypes`` array of one value an element (one
byte each) and packs it again on the way out (``from_array``). onnx-graphsurgeon does not: it
exports an array's bytes as they are, one value a byte, which ``make_tensor`` rejects, and it
counts an unloaded tensor's bytes as one a value. Every byte count of a tensor and every export
of a packed array in SPA goes through here (spa/ir/load.py, spa/ir/external.py, spa/ir/save.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from spa.ir.dtypes import onnx_type

# Bits a value of each packed type (only the types this onnx knows).
BITS = {getattr(onnx.TensorProto, n): bits for n, bits in (
    ("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2))
    if hasattr(onnx.TensorProto, n)}
# The integers each packed integer type holds.
_RANGES = {getattr(onnx.TensorProto, n): r for n, r in (
    ("INT4", (-8, 7)), ("UINT4", (0, 15)), ("INT2", (-2, 1)), ("UINT2", (0, 3)))
    if hasattr(onnx.TensorProto, n)}


def own_dtype(data_type: int) -> bool:
    """This onnx reads ``data_type`` tensors as arrays of a dtype of their own (``ml_dtypes``,
    as onnx 1.23 reads the 4-bit types; older ones read them unpacked into int8 and uint8,
    which would be written back as 8-bit)."""
    try:
        return onnx_type(helper.tensor_dtype_to_np_dtype(data_type)) == data_type
    except (KeyError, TypeError, ValueError):
        return False


def integer_range(dtype: np.dtype) -> tuple[int, int] | None:
    """The least and greatest integer ``dtype`` holds (numpy's integers, the packed integer
    types); None for other types."""
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return int(info.min), int(info.max)
    return _RANGES.get(onnx_type(dtype))


def raw_length(data_type: int, dims: Sequence[int]) -> int | None:
    """Bytes of the raw data of a ``data_type`` tensor of shape ``dims``; None for a type
    without a fixed size (strings) or unknown to this onnx."""
    count = int(np.prod(dims, dtype=np.int64))
    if data_type in BITS:
        return -(-count * BITS[data_type] // 8)
    if data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    try:
        return count * np.dtype(helper.tensor_dtype_to_np_dtype(data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return None


def is_packed(values: np.ndarray | LazyValues) -> bool:
    """``values`` (an array, or unloaded values) are of a packed type."""
    if isinstance(values, LazyValues):
        return values.tensor.data_type in BITS
    return onnx_type(values.dtype) in BITS


def nbytes(values: np.ndarray | LazyValues) -> int:
    """Bytes ``values`` take written out (packed types packed)."""
    if not is_packed(values):
        return int(values.nbytes)
    if isinstance(values, LazyValues):
        return raw_length(values.tensor.data_type, values.tensor.dims) or 0
    return raw_length(onnx_type(values.dtype), values.shape) or 0


def packed_bytes(values: np.ndarray) -> bytes:
    """The raw data of an array of a packed type (one value an element), as ONNX stores it."""
    return numpy_helper.from_array(np.asarray(values)).raw_data
