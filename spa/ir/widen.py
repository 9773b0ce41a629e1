"""Float32 twins of bfloat16 (and float16) models, for validation on onnxruntime's CPU.

onnxruntime's CPU provider has no bfloat16 kernel for arithmetic (Conv, MatMul, Gemm, Add,
Relu, … all fail with NOT_IMPLEMENTED), so neither a bfloat16 model nor its pruned version runs
there. Validation runs their *twins* instead: the same graph with every bfloat16 element type
made float32 —

* initializers and tensor attributes (``Constant``, ``ConstantOfShape``), widened exactly:
  every bfloat16 number is a float32 number;
* graph inputs, outputs and value_info;
* the element-type attributes ``to`` (Cast) and ``dtype`` (EyeLike, Random*);
* the same inside subgraphs (If, Loop, Scan) and model-local functions.

The original, the masked original and the pruned model are all compared as twins, so the
numeric oracle keeps its meaning: pruning only slices, and a wrong slice shows as a difference
at any precision. What a twin does not reproduce is bfloat16 rounding between ops (a ``Cast``
to bfloat16 becomes a cast to float32).

A float16 model runs on onnxruntime's CPU, but its rounding (about 5e-4 relative per value)
drowns the oracle's 1e-4: the pruned model and the masked original add in different orders and
round apart (all-MiniLM-L6-v2 in float16 at ratio 0.3: 9.7e-5, at 0.1: 1e-4, pruned right).
Its oracle compares the float32 twins (``half=True``), where a wrong slice still shows and
rounding does not; everything else (latency, fidelity) runs the float16 files themselves.
float8 types need no twin: ONNX allows them only where
onnxruntime's CPU handles them (Cast, QuantizeLinear, DequantizeLinear, data movement).
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from spa.ir.dtypes import onnx_type

BF16 = onnx.TensorProto.BFLOAT16
F16 = onnx.TensorProto.FLOAT16
F32 = onnx.TensorProto.FLOAT
_TYPE_ATTRS = ("to", "dtype")  # integer attributes that name an element type
A = onnx.AttributeProto


def uses_bfloat16(graph: gs.Graph) -> bool:
    """Any tensor of ``graph`` (constant or activation) is bfloat16."""
    return any(onnx_type(t.dtype) == BF16 for t in graph.tensors().values())


def uses_float16(graph: gs.Graph) -> bool:
    """Any tensor of ``graph`` (constant or activation) is float16."""
    return any(onnx_type(t.dtype) == F16 for t in graph.tensors().values())


def widened(model: str | os.PathLike[str] | onnx.ModelProto, *, half: bool = False
            ) -> onnx.ModelProto:
    """The float32 twin of ``model`` (a file is read with its external data): its bfloat16
    made float32, and with ``half`` its float16 too."""
    if isinstance(model, onnx.ModelProto):
        twin = onnx.ModelProto()
        twin.CopyFrom(model)
    else:
        twin = onnx.load(str(model))
    narrow = frozenset({BF16, F16} if half else {BF16})
    _widen_graph(twin.graph, narrow)
    for function in twin.functions:
        _widen_nodes(function.node, narrow)
    return twin


def _widen_graph(graph: onnx.GraphProto, narrow: frozenset[int]) -> None:
    for tensor in graph.initializer:
        _widen_tensor(tensor, narrow)
    for sparse in graph.sparse_initializer:
        _widen_tensor(sparse.values, narrow)
    for info in (*graph.input, *graph.output, *graph.value_info):
        _widen_type(info.type, narrow)
    _widen_nodes(graph.node, narrow)


def _widen_nodes(nodes, narrow: frozenset[int]) -> None:
    for node in nodes:
        for a in node.attribute:
            if a.type == A.INT and a.name in _TYPE_ATTRS and a.i in narrow:
                a.i = F32
            elif a.type == A.TENSOR:
                _widen_tensor(a.t, narrow)
            elif a.type == A.TENSORS:
                for t in a.tensors:
                    _widen_tensor(t, narrow)
            elif a.type == A.GRAPH:
                _widen_graph(a.g, narrow)
            elif a.type == A.GRAPHS:
                for g in a.graphs:
                    _widen_graph(g, narrow)


def _widen_tensor(tensor: onnx.TensorProto, narrow: frozenset[int]) -> None:
    if tensor.data_type in narrow:
        values = numpy_helper.to_array(tensor).astype(np.float32)
        tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))


def _widen_type(t: onnx.TypeProto, narrow: frozenset[int]) -> None:
    kind = t.WhichOneof("value")
    if kind in ("tensor_type", "sparse_tensor_type"):
        inner = getattr(t, kind)
        if inner.elem_type in narrow:
            inner.elem_type = F32
    elif kind in ("sequence_type", "optional_type"):
        _widen_type(getattr(t, kind).elem_type, narrow)
    elif kind == "map_type":
        _widen_type(t.map_type.value_type, narrow)


__all__ = ["uses_bfloat16", "uses_float16", "widened"]
