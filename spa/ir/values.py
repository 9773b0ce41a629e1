"""Inline weights without needless copies: read as views, and left out of structure-only exports.

onnx-graphsurgeon loads a constant's values as ``np.array(numpy_helper.to_array(tensor))``:
protobuf copies the bytes (every read of ``raw_data`` makes a new ``bytes``), and ``np.array``
copies them again. :class:`InlineValues` keeps the first copy only, as a read-only view of it
(as the mapped values of external data are: a pass that changes a weight makes a new array).

Import re-runs shape inference after folding (spa/ir/load.py), which needs the graph exported
to a ModelProto, but not its weights: :func:`hold_weights` swaps each large weight for a
header-only tensor before that export, and :func:`restore_weights` gives the re-imported
constants their original values back, so no weight is copied.
"""

from __future__ import annotations

import sys

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import external_data_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

# Element types whose raw bytes are a numpy array as is (numpy_helper.to_array's result).
PLAIN_DTYPES = {getattr(onnx.TensorProto, n): np.dtype(d) for n, d in (
    ("FLOAT", np.float32), ("DOUBLE", np.float64), ("FLOAT16", np.float16),
    ("INT8", np.int8), ("INT16", np.int16), ("INT32", np.int32), ("INT64", np.int64),
    ("UINT8", np.uint8), ("UINT16", np.uint16), ("UINT32", np.uint32), ("UINT64", np.uint64),
    ("BOOL", np.bool_))}


class InlineValues(LazyValues):
    """Lazily loaded values of an inline tensor: a read-only view of one copy of its bytes."""

    def load(self) -> np.ndarray:
        t = self.tensor
        dtype = PLAIN_DTYPES.get(t.data_type)
        if dtype is None or sys.byteorder != "little" or not t.HasField("raw_data") \
                or t.HasField("segment"):
            return super().load()
        raw = t.raw_data
        shape = tuple(int(d) for d in t.dims)
        if len(raw) != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            return super().load()  # let onnx raise its error
        return np.frombuffer(raw, dtype=dtype).reshape(shape)


def inline_views(graph: gs.Graph) -> None:
    """Make the inline constants of a freshly imported ``graph`` load as views."""
    for t in graph.tensors().values():
        v = getattr(t, "_values", None)
        if isinstance(t, gs.Constant) and type(v) is LazyValues \
                and not external_data_helper.uses_external_data(v.tensor):
            t._values = InlineValues(v.tensor)


def hold_weights(graph: gs.Graph, small: int) -> dict[str, LazyValues]:
    """Swap every unloaded inline constant of more than ``small`` elements for a header-only
    tensor (name, type, dims); return the values taken, by name."""
    held: dict[str, LazyValues] = {}
    for name, t in graph.tensors().items():
        v = getattr(t, "_values", None)
        if not isinstance(t, gs.Constant) or type(v) is not InlineValues \
                or int(np.prod(v.tensor.dims, dtype=np.int64)) <= small:
            continue
        header = onnx.TensorProto(name=v.tensor.name, data_type=v.tensor.data_type,
                                  dims=v.tensor.dims)
        if v.tensor.HasField("data_location"):
            header.data_location = v.tensor.data_location
        held[name] = v
        t._values = LazyValues(header)
    return held


def restore_weights(graph: gs.Graph, held: dict[str, LazyValues]) -> None:
    """Give the constants of ``graph`` the values :func:`hold_weights` took, by name."""
    for name, t in graph.tensors().items():
        if name in held and isinstance(t, gs.Constant):
            t._values = held[name]
