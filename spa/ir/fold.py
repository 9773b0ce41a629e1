"""Fold simple ops whose inputs are all constants into constants (normal form).

Weights reach their layer through a ``Transpose`` (TF, some PyTorch exports), a ``Cast``, a
``Reshape``/``Squeeze``/``Unsqueeze``; op rules want the weight itself. Shape arithmetic
(``Shape`` of a tensor whose shape is static, then Gather/Slice/Concat/Add/Mod/Where/…) is folded
too, so a Reshape or Expand target that the TorchScript exporter computes at run time becomes a
constant whose entries the rewrite can set. Only these ops are evaluated (in numpy), and the
arithmetic only on small tensors (at most 64 elements; integer, boolean or float: Resize scales
and TF-"same" pads are computed in float); anything else stays as it is.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeAlias

import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper

from spa.ir.quant_chain import starts_chain

_SMALL = 64  # shape arithmetic is folded only on tensors this small
_LARGE = 1 << 16  # a constant Expand is folded only up to this many elements
Folder: TypeAlias = Callable[[gs.Node, list[np.ndarray]], np.ndarray | None]


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
    axes = _axes(node, v) or []
    out = v[0]
    rank = out.ndim + len(axes)
    for a in sorted(x % rank for x in axes):
        out = np.expand_dims(out, a)
    return out


def _slice(node: gs.Node, v: list[np.ndarray]) -> np.ndarray:
    starts, ends = v[1].tolist(), v[2].tolist()
    axes = v[3].tolist() if len(v) > 3 else list(range(len(starts)))
    steps = v[4].tolist() if len(v) > 4 else [1] * len(starts)
    index = [slice(None)] * v[0].ndim
    for a, s, e, st in zip(axes, starts, ends, steps):
        index[a] = slice(s, e, st)
    return v[0][tuple(index)]


def _constant_of_shape(node: gs.Node, v: list[np.ndarray]) -> np.ndarray | None:
    shape = v[0].astype(np.int64)
    if np.prod(shape) > _SMALL:
        return None  # a large fill is data, not shape arithmetic
    fill = np.asarray(node.attrs["value"].values).reshape(-1)[0] if "value" in node.attrs \
        else np.float32(0)
    return np.full(shape, fill)


def _cast_like(node: gs.Node) -> np.ndarray | None:
    """``CastLike(c, x)`` of a constant ``c``: only ``x``'s element type is read."""
    c, like = node.inputs[0], node.inputs[1]
    if not isinstance(c, gs.Constant) or like.dtype is None:
        return None
    return np.asarray(c.values).astype(like.dtype)


def _expand(node: gs.Node, v: list[np.ndarray]) -> np.ndarray | None:
    shape = np.broadcast_shapes(v[0].shape, tuple(int(s) for s in v[1].reshape(-1)))
    if np.prod(shape) > _LARGE:
        return None  # a large broadcast is cheaper at run time than in the file
    return np.broadcast_to(v[0], shape).copy()


def _binary(fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Folder:
    return lambda node, v: np.asarray(fn(v[0], v[1])).astype(np.result_type(v[0], v[1]))


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """ONNX ``Div``: on integers it truncates toward zero (numpy's ``//`` floors)."""
    if not np.issubdtype(np.result_type(a, b), np.integer):
        return np.true_divide(a, b)
    q = np.abs(a) // np.abs(b)
    return np.where((a < 0) != (b < 0), -q, q)


def _clip(node: gs.Node, v: list[np.ndarray]) -> np.ndarray:
    """``Clip(x, min, max)``; either bound may be absent (an empty input name)."""
    bounds = iter(v[1:])
    lo, hi = (next(bounds) if i < len(node.inputs) and node.inputs[i].name else None
              for i in (1, 2))
    return np.clip(v[0], lo, hi)


LAYOUT_FOLDERS: dict[str, Folder] = {
    "Transpose": _transpose, "Cast": _cast, "Reshape": _reshape, "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze, "Expand": _expand,
}
# Shape arithmetic: only evaluated on small tensors. Float arithmetic is there for shapes computed
# in float: timm's TF-"same" padding computes its pads as ``ceil(ih / s)`` on Shape's values.
SHAPE_FOLDERS: dict[str, Folder] = {
    "Gather": lambda node, v: np.take(v[0], v[1], axis=int(node.attrs.get("axis", 0))),
    "Slice": _slice,
    "Concat": lambda node, v: np.concatenate(v, axis=int(node.attrs["axis"])),
    "Add": _binary(np.add), "Sub": _binary(np.subtract), "Mul": _binary(np.multiply),
    "Div": _binary(_div), "Mod": _binary(np.mod),
    "Ceil": lambda node, v: np.ceil(v[0]), "Floor": lambda node, v: np.floor(v[0]),
    "Max": lambda node, v: functools.reduce(np.maximum, v),
    "Min": lambda node, v: functools.reduce(np.minimum, v),
    "Clip": _clip,
    "Neg": lambda node, v: -v[0],
    "Equal": lambda node, v: np.equal(v[0], v[1]),
    "Where": lambda node, v: np.where(v[0], v[1], v[2]),
    "ConstantOfShape": _constant_of_shape,
}


def _is_shape_value(values: list[np.ndarray]) -> bool:
    return all((np.issubdtype(v.dtype, np.number) or v.dtype == np.bool_) and v.size <= _SMALL
               for v in values)


def _static_shape_of(node: gs.Node) -> np.ndarray | None:
    """The value of ``Shape(x)`` when every dim of ``x`` is a known integer."""
    shape = node.inputs[0].shape
    if shape is None or not all(isinstance(d, int) and d >= 0 for d in shape):
        return None
    rank = len(shape)

    def clamp(v: int) -> int:
        return min(max(v + rank if v < 0 else v, 0), rank)

    lo, hi = clamp(int(node.attrs.get("start", 0))), clamp(int(node.attrs.get("end", rank)))
    return np.asarray(shape[lo:hi], dtype=np.int64)


def _static_dims_picked(node: gs.Node) -> np.ndarray | None:
    """The value of ``Gather(Shape(x), i)`` or ``Slice(Shape(x), a, b)`` with constant indices,
    when every dim it picks is static — though others of ``x`` are symbolic.

    ``B, S, C = x.shape; y.reshape(B, S, C)`` exports with dynamic axes as a run-time target
    whose ``C`` is read from ``x`` at run time. A static dim read that way is a constant, and
    the rewrite can then set it when the heads before it are pruned.
    """
    src = node.inputs[0]
    if len(src.inputs) != 1 or src.inputs[0].op != "Shape" or len(node.inputs) < 2 \
            or not all(isinstance(t, gs.Constant) for t in node.inputs[1:] if t.name):
        return None
    shape_node = src.inputs[0]
    x_shape = shape_node.inputs[0].shape
    if x_shape is None:
        return None
    rank = len(x_shape)

    def clamp(v: int) -> int:
        return min(max(v + rank if v < 0 else v, 0), rank)

    lo, hi = clamp(int(shape_node.attrs.get("start", 0))), clamp(int(shape_node.attrs.get("end",
                                                                                       rank)))
    dims = np.asarray([d if isinstance(d, int) and d >= 0 else -1 for d in x_shape[lo:hi]],
                      dtype=np.int64)
    picked = _value_of(node, [dims] + [np.asarray(t.values) for t in node.inputs[1:] if t.name])
    if picked is None or np.any(picked < 0):
        return None  # a symbolic dim is read: stays a run-time value
    return picked


def _value_of(node: gs.Node, values: list[np.ndarray]) -> np.ndarray | None:
    if node.op == "Gather" and int(node.attrs.get("axis", 0)) == 0:
        idx = values[1]
        if np.any((idx < -len(values[0])) | (idx >= len(values[0]))):
            return None
        return np.take(values[0], idx)
    if node.op == "Slice" and len(values) >= 3:
        return _slice(node, values)
    return None


def _value(node: gs.Node) -> np.ndarray | None:
    if node.op == "Shape":
        return _static_shape_of(node)
    if node.op in ("Gather", "Slice") and node.inputs and node.inputs[0].name \
            and not isinstance(node.inputs[0], gs.Constant):
        return _static_dims_picked(node)
    if node.op == "CastLike":
        return _cast_like(node)
    if starts_chain(node):
        return None  # its integer data is the weight (spa/ir/quant_chain.py): kept integer
    ins = [t for t in node.inputs if t.name]
    if not ins or not all(isinstance(t, gs.Constant) for t in ins):
        return None
    values = [np.asarray(t.values) for t in ins]
    fn = LAYOUT_FOLDERS.get(node.op)
    if fn is None and node.op in SHAPE_FOLDERS and _is_shape_value(values):
        fn = SHAPE_FOLDERS[node.op]
    return None if fn is None else fn(node, values)


def redirect(old: gs.Tensor, new: gs.Tensor) -> None:
    """Make every node that reads ``old`` read ``new`` instead (graph outputs stay)."""
    for reader in list(old.outputs):
        for i, t in enumerate(reader.inputs):
            if t is old:
                reader.inputs[i] = new


def fold_constant_ops(graph: gs.Graph,
                      on_layout: Callable[[gs.Node, gs.Constant], None] | None = None) -> int:
    """Replace each foldable node whose inputs are all constants by its value.

    Nodes are visited in topological order, so a chain of foldable nodes folds in one pass.
    ``on_layout(node, constant)`` is told of each layout op folded, once its readers read the
    constant (spa/ir/tied.py records views of weights that others still read).
    Returns how many *shape values* (small results of shape arithmetic, such as Resize scales or
    pads) were folded: those can make shapes known that inference left symbolic.
    """
    folded = 0
    for node in list(graph.nodes):
        if (node.domain or "") not in ("", "ai.onnx") or len(node.outputs) != 1:
            continue
        out = node.outputs[0]
        if out in graph.outputs:
            continue
        value = _value(node)
        if value is None:
            continue
        const = gs.Constant(out.name, np.array(value))  # np.array keeps 0-d values 0-d
        node.outputs.clear()
        redirect(out, const)
        if on_layout is not None and node.op in LAYOUT_FOLDERS:
            on_layout(node, const)
        folded += int(_is_shape_value([const.values]) and node.op not in LAYOUT_FOLDERS)
    return folded
