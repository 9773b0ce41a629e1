"""Symbolic value of a 1-D shape tensor computed in the graph.

``x.view(x.size(0), -1)`` exports as ``Concat(Unsqueeze(Gather(Shape(x), 0)), [-1])``. To know
what a Reshape does with such a target, evaluate it entry by entry: each entry is an int
(constant) or a :class:`DimRef` (a dim of a tensor read through ``Shape``). Anything else, or
anything not understood, gives None (the caller then fails closed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

Entry = "int | DimRef"


@dataclass(frozen=True)
class DimRef:
    tensor: str
    axis: int


def shape_op_dims(node: gs.Node, rank: int) -> range:
    """The input dims a ``Shape`` node returns (its ``start``/``end`` attributes, opset 15)."""

    def clamp(v: int) -> int:
        return min(max(v + rank if v < 0 else v, 0), rank)

    return range(clamp(int(node.attrs.get("start", 0))), clamp(int(node.attrs.get("end", rank))))


def shape_entries(t: gs.Tensor | None, depth: int = 0) -> list | None:
    if t is None or depth > 12:
        return None
    if isinstance(t, gs.Constant):
        v = np.asarray(t.values)
        return [int(x) for x in v.reshape(-1)] if v.ndim <= 1 else None
    if len(t.inputs) != 1:
        return None
    node = t.inputs[0]
    op = node.op
    if op == "Shape":
        src = node.inputs[0]
        if src.shape is None:
            return None
        return [DimRef(src.name, ax) for ax in shape_op_dims(node, len(src.shape))]
    if op in ("Cast", "Identity"):
        return shape_entries(node.inputs[0], depth + 1)
    if op in ("Squeeze", "Unsqueeze"):
        inner = shape_entries(node.inputs[0], depth + 1)
        return inner if inner is not None and len(inner) <= 1 else None
    if op == "Concat":
        parts = [shape_entries(i, depth + 1) for i in node.inputs]
        if any(p is None for p in parts):
            return None
        return [e for p in parts for e in p]
    if op == "Gather" and int(node.attrs.get("axis", 0)) == 0:
        data = shape_entries(node.inputs[0], depth + 1)
        idx = node.inputs[1]
        if data is None or not isinstance(idx, gs.Constant):
            return None
        return [data[int(i)] for i in np.asarray(idx.values).reshape(-1)
                if -len(data) <= int(i) < len(data)]
    return None
