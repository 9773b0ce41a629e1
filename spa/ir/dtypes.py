"""Element types by what they hold, however they are spelt.

An element type reaches SPA in three spellings: an ONNX ``TensorProto`` enum (onnx-graphsurgeon
keeps the enum as the ``dtype`` of tensors whose type numpy lacks: bfloat16, the float8 family),
a numpy dtype, or an ``ml_dtypes`` dtype (what ``onnx.numpy_helper`` reads those types as).
numpy files ``ml_dtypes`` under kind ``'V'``, not under ``np.floating``, so ``np.issubdtype``
says a bfloat16 weight is not a float (and raises on the enum). Every "is this a float" question
in SPA goes through :func:`is_floating`, which answers on the ONNX enum.
"""

from __future__ import annotations

from typing import TypeAlias

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper

# An element type in any of its spellings: an ONNX enum, or what numpy takes as a dtype.
ElementType: TypeAlias = int | np.integer | npt.DTypeLike | None

# Every ONNX element type that holds real numbers in floating point (the newest ones only if
# this onnx has them).
FLOATING = frozenset(getattr(onnx.TensorProto, n) for n in (
    "FLOAT", "DOUBLE", "FLOAT16", "BFLOAT16", "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2",
    "FLOAT8E5M2FNUZ", "FLOAT8E8M0", "FLOAT4E2M1") if hasattr(onnx.TensorProto, n))


def onnx_type(dtype: ElementType) -> int:
    """The ONNX enum of ``dtype`` (an enum, a numpy or an ``ml_dtypes`` dtype, or a type);
    ``UNDEFINED`` for what ONNX has no type for (None, booleans, objects)."""
    if dtype is None or isinstance(dtype, bool):
        return onnx.TensorProto.UNDEFINED
    if isinstance(dtype, (int, np.integer)):
        return int(dtype)
    try:
        return int(helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
    except (KeyError, TypeError, ValueError):
        return onnx.TensorProto.UNDEFINED


def is_floating(dtype: ElementType) -> bool:
    """True for every floating-point element type, bfloat16 and float8 included."""
    return onnx_type(dtype) in FLOATING


def is_trainable(values: np.ndarray) -> bool:
    """Whether training changes these initializer values (``spa.torch.from_onnx`` makes them
    parameters): float tensors, except scalars (a scale, an epsilon) and masks (±inf or
    ±finfo.max entries), whose gradients are meaningless or not finite."""
    if not (is_floating(values.dtype) and values.ndim > 0):
        return False
    # float16 cannot hold 1e30 (comparing cast it to inf, with a warning): its masks fill
    # with its own largest value
    limit = float(np.finfo(np.float16).max) if values.dtype == np.float16 else 1e30
    return bool((np.abs(values.astype(np.float64)) < limit).all())


__all__ = ["FLOATING", "is_floating", "is_trainable", "onnx_type"]
