"""Inline weights without needless copies: read as views, and left out of structure-only exports.

onnx-graphsurgeon loads a constant's values as ``np.array(numpy_helper.to_array(tensor))``:
protobuf copies the bytes (every read of ``raw_data`` makes a new ``bytes``), and ``np.array``
copies them again. :class:`InlineValues` copies nothing when the model was read from a file
(spa/ir/load.py maps it, and spa/ir/wire.py finds where each tensor's bytes are): its values
are a read-only view of the mapped file, as those of external data are (a pass that changes a
weight makes a new array). Otherwise they are a view of the one copy protobuf makes.

Import re-runs shape inference after folding (spa/ir/load.py), which needs the graph exported
to a ModelProto, but not its weights: :func:`hold_weights` swaps each large weight for a
header-only tensor before that export, and :func:`restore_weights` gives the re-imported
constants their original values back, so no weight is copied.
"""

from __future__ import annotations

import mmap
import sys
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import external_data_helper, helper, numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from spa.ir.dtypes import onnx_type
from spa.ir.packed import is_packed

# Element types whose raw bytes are a numpy array as is (numpy_helper.to_array's result).
PLAIN_DTYPES = {getattr(onnx.TensorProto, n): np.dtype(d) for n, d in (
    ("FLOAT", np.float32), ("DOUBLE", np.float64), ("FLOAT16", np.float16),
    ("INT8", np.int8), ("INT16", np.int16), ("INT32", np.int32), ("INT64", np.int64),
    ("UINT8", np.uint8), ("UINT16", np.uint16), ("UINT32", np.uint32), ("UINT64", np.uint64),
    ("BOOL", np.bool_))}
# Also the element types numpy lacks whose raw bytes are an ``ml_dtypes`` array as is, one
# element after another (not the packed 4-bit types): bfloat16 and the float8 family, where
# this onnx reads them as ``ml_dtypes`` (older ones read bfloat16 as float32: not as is).
_NARROW = {"BFLOAT16": 2, "FLOAT8E4M3FN": 1, "FLOAT8E4M3FNUZ": 1, "FLOAT8E5M2": 1,
           "FLOAT8E5M2FNUZ": 1, "FLOAT8E8M0": 1}  # name → bytes an element


def _narrow_dtypes() -> dict[int, np.dtype]:
    out: dict[int, np.dtype] = {}
    for name, size in _NARROW.items():
        data_type = getattr(onnx.TensorProto, name, None)
        if data_type is None:
            continue  # not in this onnx version
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(data_type))
        if dtype.itemsize == size:
            out[data_type] = dtype
    return out


RAW_DTYPES = {**PLAIN_DTYPES, **_narrow_dtypes()}


@dataclass(frozen=True)
class MappedFile:
    """A model file mapped read-only, and where its initializers' ``raw_data`` lie in it."""

    buffer: mmap.mmap
    spans: dict[str, tuple[int, int]]  # name → (offset, length)

    def release(self) -> None:
        """Drop the pages read so far from this process's memory: they stay in the page cache
        and are mapped again when read (a read-only file mapping loses nothing)."""
        if hasattr(mmap, "MADV_DONTNEED"):
            self.buffer.madvise(mmap.MADV_DONTNEED)


class InlineValues(LazyValues):
    """Lazily loaded values of an inline tensor: a read-only view of its bytes in the mapped
    file, or else of one copy of them."""

    def __init__(self, tensor: onnx.TensorProto, mapped: MappedFile | None = None):
        super().__init__(tensor)
        self.mapped = mapped

    def load(self) -> np.ndarray:
        t = self.tensor
        dtype = RAW_DTYPES.get(t.data_type)
        if dtype is None or sys.byteorder != "little" or not t.HasField("raw_data") \
                or t.HasField("segment"):
            return _to_array(t)
        shape = tuple(int(d) for d in t.dims)
        size = int(np.prod(shape, dtype=np.int64))
        span = self.mapped.spans.get(t.name) if self.mapped is not None else None
        if self.mapped is not None and span is not None and span[1] == size * dtype.itemsize:
            return np.frombuffer(self.mapped.buffer, dtype=dtype, count=size,
                                 offset=span[0]).reshape(shape)
        raw = t.raw_data
        if len(raw) != size * dtype.itemsize:
            return _to_array(t)  # let onnx raise its error
        return np.frombuffer(raw, dtype=dtype).reshape(shape)


def _to_array(t: onnx.TensorProto) -> np.ndarray:
    """``LazyValues.load`` without its warning (printed on stdout) that bfloat16 and float8
    values are cast: onnx reads them as ``ml_dtypes`` arrays of their own type."""
    return np.array(numpy_helper.to_array(t))


def inline_views(graph: gs.Graph, mapped: MappedFile | None = None) -> None:
    """Make the inline constants of a freshly imported ``graph`` load as views (of ``mapped``,
    the file the graph was read from, where it holds them)."""
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant) and type(v := t._values) is LazyValues \
                and not external_data_helper.uses_external_data(v.tensor):
            t._values = InlineValues(v.tensor, mapped)


def hold_weights(graph: gs.Graph, small: int) -> dict[str, LazyValues | np.ndarray]:
    """Swap every unloaded inline constant of more than ``small`` elements, and every loaded
    one of a packed type, for a header-only tensor (name, type, dims); return the values
    taken, by name. onnx-graphsurgeon exports a loaded int4/uint4 array unpacked, a byte an
    element, which onnx refuses (a quantised model's 4-bit zero points, once read; see
    spa/ir/packed.py)."""
    held: dict[str, LazyValues | np.ndarray] = {}
    for name, t in graph.tensors().items():
        v = getattr(t, "_values", None)
        if not isinstance(t, gs.Constant):
            continue
        if type(v) is InlineValues and int(np.prod(v.tensor.dims, dtype=np.int64)) > small:
            header = onnx.TensorProto(name=v.tensor.name, data_type=v.tensor.data_type,
                                      dims=v.tensor.dims)
            if v.tensor.HasField("data_location"):
                header.data_location = v.tensor.data_location
        elif isinstance(v, np.ndarray) and is_packed(v):
            header = onnx.TensorProto(name=name, data_type=onnx_type(v.dtype), dims=v.shape)
        else:
            continue
        held[name] = v
        t._values = LazyValues(header)
    return held


def restore_weights(graph: gs.Graph, held: dict[str, LazyValues | np.ndarray]) -> None:
    """Give the constants of ``graph`` the values :func:`hold_weights` took, by name."""
    for name, t in graph.tensors().items():
        if name in held and isinstance(t, gs.Constant):
            t._values = held[name]
