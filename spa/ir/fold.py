"""Fold simple ops whose inputs are all constants into constants (normal form).

Weights reach their layer through a ``Transpose`` (TF, some PyTorch exports), a ``Cast``, a
``Reshape``/``Squeeze``/``Unsqueeze``; op rules want the weight itself. Only these layout ops are
evaluated (in numpy); anything else on constants stays as it is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper

if TYPE_CHECKING:
    from collections.abc import Callable


def _axes(node: gs.Node, values: list[np.ndarray]) -> list[int] | None:
    if len(values) > 1:
        return [int(a) for a in values[1].reshape(-1)]
    axes = node.attrs.get("axes")
    return None if axes is None else [int(a) for a in axes]


def _transpose(node: gs.Node, v: list[np.ndarray]) -> np.ndarray:
    return np.transpose(v[0], node.attrs.get("perm"))


def _cast(node: gs.Node, v: list[np.ndarray]) -> np.ndarray:
    return v[0].astype(helper.tensor_dtype_to_np_dtype(int(node.attrs["to"])))


def _reshape(node: gs.Node, v: list[np.ndarray]) -> np.ndarray:
    shape = [int(s) for s in v[1].reshape(-1)]
    if not int(node.attrs.get("allowzero", 0)):
        shape = [v[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return v[0].reshape(shape)


def _squeeze(node: gs.Node, v: list[np.ndarray]) -> np.ndarray:
    axes = _axes(node, v)
    return np.squeeze(v[0], axis=None if not axes else tuple(axes))


def _unsqueeze(node: gs.Node, v: list[np.ndarray]) -> np.ndarray:
    out = v[0]
    rank = out.ndim + len(_axes(node, v) or [])
    for a in sorted(x % rank for x in _axes(node, v) or []):
        out = np.expand_dims(out, a)
    return out


FOLDERS: dict[str, Callable[[gs.Node, list[np.ndarray]], np.ndarray]] = {
    "Transpose": _transpose, "Cast": _cast, "Reshape": _reshape, "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
}


def fold_layout_ops(graph: gs.Graph) -> int:
    """Replace each foldable node whose inputs are all constants by its value; return the count."""
    folded = 0
    for node in list(graph.nodes):
        fn = FOLDERS.get(node.op)
        if fn is None or (node.domain or "") not in ("", "ai.onnx") or len(node.outputs) != 1:
            continue
        ins = [t for t in node.inputs if t.name]
        if not ins or not all(isinstance(t, gs.Constant) for t in ins):
            continue
        out = node.outputs[0]
        if out in graph.outputs:
            continue
        const = gs.Constant(out.name, np.ascontiguousarray(fn(node, [np.asarray(t.values)
                                                                     for t in ins])))
        node.outputs.clear()
        for consumer in list(out.outputs):
            for i, t in enumerate(consumer.inputs):
                if t is out:
                    consumer.inputs[i] = const
        folded += 1
    return folded
