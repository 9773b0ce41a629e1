"""ONNX tensors as torch tensors, for :func:`spa.torch.from_onnx`: element types, and
initializers whose numpy form torch cannot take as it is.

torch has no 4-bit dtype: an int4/uint4 initializer is widened to int8/uint8, and the tensor is
kept in :data:`WIDENED` with its ONNX type (a zero point's type is the type QuantizeLinear
quantises to, spa/torch/quant_ops.py). bfloat16 and float8 arrays come from ``ml_dtypes``, which
``torch.from_numpy`` rejects; they are read bit for bit.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from torch.utils.weak import WeakIdKeyDictionary

from spa.errors import UnsupportedOpsError
from spa.ir.dtypes import onnx_type

#: ONNX element type → torch dtype, for ops that take a ``dtype``/``to`` attribute
DTYPES: dict[int, torch.dtype] = {
    onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT8: torch.int8, onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT32: torch.int32, onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.UINT8: torch.uint8, onnx.TensorProto.UINT16: torch.uint16,
    onnx.TensorProto.UINT32: torch.uint32, onnx.TensorProto.UINT64: torch.uint64,
    onnx.TensorProto.BOOL: torch.bool, onnx.TensorProto.COMPLEX64: torch.complex64,
    onnx.TensorProto.COMPLEX128: torch.complex128,
    onnx.TensorProto.FLOAT8E4M3FN: torch.float8_e4m3fn,
    onnx.TensorProto.FLOAT8E4M3FNUZ: torch.float8_e4m3fnuz,
    onnx.TensorProto.FLOAT8E5M2: torch.float8_e5m2,
    onnx.TensorProto.FLOAT8E5M2FNUZ: torch.float8_e5m2fnuz,
}


def torch_dtype(code: int, what: str) -> torch.dtype:
    """The torch dtype of ONNX element type ``code``; ``what`` names the op and attribute."""
    if code not in DTYPES:
        raise UnsupportedOpsError(f"{what}={onnx.TensorProto.DataType.Name(code)}")
    return DTYPES[code]


#: tensors that hold int4/uint4 values widened to int8/uint8 (torch has no 4-bit dtype) → that
#: ONNX element type, by identity: a zero point's type is the type QuantizeLinear quantises to
WIDENED: WeakIdKeyDictionary = WeakIdKeyDictionary()
#: element types read bit for bit from their ``ml_dtypes`` arrays
_BIT_VIEWS = (onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT8E4M3FN,
              onnx.TensorProto.FLOAT8E4M3FNUZ, onnx.TensorProto.FLOAT8E5M2,
              onnx.TensorProto.FLOAT8E5M2FNUZ)


def torch_array(array: np.ndarray) -> torch.Tensor:
    """An initializer's values as a torch tensor: int4/uint4 widened to int8/uint8 (and kept in
    :data:`WIDENED`), bfloat16 and float8 (``ml_dtypes`` arrays, which ``torch.from_numpy``
    rejects) bit for bit; other ``ml_dtypes`` types (float4, int2) refused."""
    name = array.dtype.name
    code = onnx_type(array.dtype)
    if name in ("int4", "uint4"):
        wide = torch.from_numpy(array.astype(np.int8 if name == "int4" else np.uint8))
        WIDENED[wide] = code
        return wide
    if code in _BIT_VIEWS:
        bits = np.ascontiguousarray(array).view(np.uint8 if array.itemsize == 1 else np.int16)
        return torch.from_numpy(bits.copy()).view(torch_dtype(code, "an initializer of type"))
    if type(array.dtype).__module__.startswith("ml_dtypes") or array.dtype.kind == "V":
        raise UnsupportedOpsError(f"an initializer of type {name}")
    return torch.from_numpy(np.array(array, copy=True))
