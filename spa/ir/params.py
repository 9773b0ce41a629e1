"""What a parameter is, and how many a model file holds.

A parameter is an element of a floating-point constant (an initializer, a ``Constant`` node) or
of a quantised weight (the integer data a ``DequantizeLinear`` or a ``Cast`` to a float type
reads), in the graph or in its subgraphs, **each tensor once**. A zero point is not one: the
float constant a ``Sub`` takes from such a Cast counts no more than a DequantizeLinear's integer
zero point does (normal form turns the one into the other, spa/ir/quant_chain.py). A weight
packed several values a byte (``MatMulNBits``'s ``[N, k_blocks, blob]``) counts the values it
holds, ``N · k_blocks · block_size``, not its bytes (:func:`elements`); so does a tensor of a
4-bit type (``INT4``/``UINT4``, two values a byte on disk): its dims. :func:`stored_params`
counts a file as read; normal form may hold a tensor twice (spa/ir/tied.py) or fold shape
arithmetic on float scalars away, so the count of a model as read is taken from its ModelProto,
not from its normal form.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from spa.ir.dtypes import is_floating
from spa.ir.quant import PACKED_WEIGHTS, packed_block_size


def is_parameter(t: gs.Tensor) -> bool:
    """A floating-point constant other than a zero point, or the integer data a
    ``DequantizeLinear`` or a Cast to float reads, or a packed N-bit weight."""
    if not isinstance(t, gs.Constant):
        return False
    if is_floating(t.dtype):
        return not any(n.op == "Sub" and len(n.inputs) > 1 and n.inputs[1] is t
                       and _casts_integers(n.inputs[0]) for n in t.outputs)
    return packed_block_size(t) is not None or any(
        (n.op == "DequantizeLinear" or _to_float(n.op, n.attrs.get("to")))
        and n.inputs and n.inputs[0] is t for n in t.outputs)


def _to_float(op: str, to: object) -> bool:
    """A Cast to a floating-point type."""
    return op == "Cast" and isinstance(to, int) and is_floating(to)


def _casts_integers(t: gs.Tensor) -> bool:
    """``t`` is a Cast to float of integer data."""
    if len(t.inputs) != 1:
        return False
    node = t.inputs[0]
    return _to_float(node.op, node.attrs.get("to")) and isinstance(node.inputs[0], gs.Constant) \
        and not is_floating(node.inputs[0].dtype)


def elements(t: gs.Tensor, shape: tuple[int, ...]) -> int:
    """The parameters of parameter ``t`` at ``shape`` (its own, or cut by a plan)."""
    block_size = packed_block_size(t)
    if block_size is None:
        return int(np.prod(shape, dtype=np.int64))
    return int(np.prod(shape[:-1], dtype=np.int64)) * block_size


def graph_constants(graph: gs.Graph) -> dict[str, gs.Constant]:
    """The constants of ``graph`` and of its subgraphs, by name (a subgraph reads the enclosing
    scope's by name: the same tensor; names are unique across scopes)."""
    found: dict[str, gs.Constant] = {}
    for g in (graph, *graph.subgraphs(recursive=True)):
        for name, t in g.tensors().items():
            if isinstance(t, gs.Constant):
                found.setdefault(name, t)
    return found


def stored_params(model: onnx.ModelProto) -> int:
    """The parameters ``model`` holds (external tensors are counted from their dims)."""
    graphs = graphs_in(model.graph)
    nodes = [n for g in graphs for n in g.node]
    inits = {t.name: t for g in graphs for t in g.initializer}
    quantised = {n.input[0] for n in nodes if n.op_type == "DequantizeLinear" and n.input}
    casts = {n.output[0]: n.input[0] for n in nodes if n.input and n.output and _to_float(
        n.op_type, next((a.i for a in n.attribute if a.name == "to"), None))
        and n.input[0] in inits and not is_floating(inits[n.input[0]].data_type)}
    quantised |= set(casts.values())
    zero_points = {n.input[1] for n in nodes
                   if n.op_type == "Sub" and len(n.input) > 1 and n.input[0] in casts}
    packed = {n.input[slot]: _block_size(n) for n in nodes
              if (slot := PACKED_WEIGHTS.get((n.domain or "", n.op_type))) is not None
              and len(n.input) > slot}
    total = sum(_size(t) // t.dims[-1] * packed[t.name] if t.name in packed and t.dims
                else _size(t) for g in graphs for t in g.initializer
                if t.name in quantised or t.name in packed
                or (is_floating(t.data_type) and t.name not in zero_points))
    for a in (a for n in nodes if n.op_type == "Constant" for a in n.attribute):
        if a.name == "value" and is_floating(a.t.data_type):
            total += _size(a.t)
        elif a.name in ("value_float", "value_floats"):
            total += 1 if a.name == "value_float" else len(a.floats)
    return total


def graphs_in(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    """``graph`` and its subgraphs (If branches, Loop and Scan bodies), recursively."""
    subs = [g for n in graph.node for a in n.attribute
            for g in ([a.g] if a.HasField("g") else a.graphs)]
    return [graph, *(s for g in subs for s in graphs_in(g))]


def _block_size(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "block_size"), 0)


def _size(t: onnx.TensorProto) -> int:
    return int(np.prod(t.dims, dtype=np.int64))

