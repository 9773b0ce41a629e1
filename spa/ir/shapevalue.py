"""Symbolic value of a 1-D shape tensor computed in the graph.

``x.view(x.size(0), -1)`` exports as ``Concat(Unsqueeze(Gather(Shape(x), 0)), [-1])``. To know
what a Reshape does with such a target, evaluate it entry by entry: each entry is an int
(constant) or a :class:`DimRef` (a dim of a tensor read through ``Shape``). Anything else, or
anything not understood, gives None (the caller then fails closed).

A constant entry is a :class:`Lit`, an ``int`` that remembers where it is read from (the node,
input slot and position), so a rewrite can change exactly that entry — also inside a run-time
``Concat`` — by giving the reading node a new constant (shared constants stay untouched).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import prod
from typing import TypeAlias, cast

import numpy as np
import onnx_graphsurgeon as gs


@dataclass(frozen=True)
class DimRef:
    tensor: str
    axis: int
    # The dim's static length where shape inference knows it, else its symbolic name (ONNX
    # shape inference names dims it proves equal alike); not part of the identity.
    length: int | None = field(default=None, compare=False)
    symbol: str | None = field(default=None, compare=False)


class Lit(int):
    """A literal shape entry and where it is read: ``(node, input slot, flat position)``."""

    source: tuple[gs.Node, int, int] | None

    def __new__(cls, value: int, source: tuple[gs.Node, int, int] | None = None) -> Lit:
        obj = super().__new__(cls, value)
        obj.source = source
        return obj

    def rewritable_for(self, reader: gs.Node) -> bool:
        """True when changing this entry changes only what ``reader`` sees: it is read by
        ``reader`` itself, or every path from the node reading it leads to ``reader`` through
        Cast/Identity (tf2onnx builds targets in int32), flattening Reshapes and Where's
        branches, or ends at an ``Equal`` with negative constants (true neither before nor
        after: TorchScript's ``expand`` target, ``Where(Equal(s, -1), 1, s)``)."""
        if self.source is None:
            return False
        return _only_reaches(self.source[0], reader, 0)

    def write(self, value: int) -> None:
        """Give the reading node a copy of its constant with this entry set to ``value``."""
        assert self.source is not None, "only a rewritable entry (read from a node) is written"
        node, slot, pos = self.source
        values = np.array(node.inputs[slot].values, copy=True)
        values.reshape(-1)[pos] = value
        node.inputs[slot] = gs.Constant(f"{node.name}__spa_in{slot}", values)


def _only_reaches(node: gs.Node, reader: gs.Node, depth: int) -> bool:
    """Whether every use of ``node``'s value ends at ``reader`` (see :meth:`Lit.rewritable_for`)."""
    if node is reader:
        return True
    if depth > 8 or len(node.outputs) != 1 or not node.outputs[0].outputs:
        return False  # no reader known: a graph output, or nothing reads it
    out = node.outputs[0]
    for c in out.outputs:
        if c is reader or (c.op == "Equal" and any(_negatives(t) for t in c.inputs)):
            continue
        through = c.op in ("Cast", "Identity") or (c.op == "Reshape" and c.inputs[0] is out
                                                   and _flattens(c)) \
            or (c.op == "Where" and c.inputs[0] is not out)
        if not (through and _only_reaches(c, reader, depth + 1)):
            return False
    return True


Entry: TypeAlias = Lit | DimRef  # one entry of a shape tensor: a literal or a dim read by Shape


def shape_op_dims(node: gs.Node, rank: int) -> range:
    """The input dims a ``Shape`` node returns (its ``start``/``end`` attributes, opset 15)."""

    def clamp(v: int) -> int:
        return min(max(v + rank if v < 0 else v, 0), rank)

    return range(clamp(int(node.attrs.get("start", 0))), clamp(int(node.attrs.get("end", rank))))


def shape_entries(t: gs.Tensor | None, depth: int = 0,
                  reader: tuple[gs.Node, int] | None = None) -> list[Entry] | None:
    """Entries of the 1-D shape tensor ``t``; ``reader`` is the (node, slot) reading it."""
    if t is None or depth > 12:
        return None
    if isinstance(t, gs.Constant):
        v = np.asarray(t.values)
        if v.ndim > 1:
            return None
        return [Lit(int(x), (reader[0], reader[1], i) if reader else None)
                for i, x in enumerate(v.reshape(-1))]
    if len(t.inputs) != 1:
        return None
    node = t.inputs[0]
    op = node.op
    if op == "Shape":
        src = node.inputs[0]
        if src.shape is None:
            return None
        return [_dim_ref(src, ax) for ax in shape_op_dims(node, len(src.shape))]
    if op in ("Cast", "Identity"):
        return shape_entries(node.inputs[0], depth + 1)
    if op in ("Squeeze", "Unsqueeze"):
        inner = shape_entries(node.inputs[0], depth + 1)
        return inner if inner is not None and len(inner) <= 1 else None
    if op == "Concat":
        joined: list[Entry] = []
        for i, part_t in enumerate(node.inputs):
            part = shape_entries(part_t, depth + 1, (node, i))
            if part is None:
                return None
            joined += part
        return joined
    if op == "Slice" and len(node.inputs) >= 3:
        data = shape_entries(node.inputs[0], depth + 1)
        if data is None or not all(isinstance(b, gs.Constant) for b in node.inputs[1:5]):
            return None
        bounds = [np.asarray(b.values).reshape(-1).tolist() for b in node.inputs[1:5]]
        if any(len(b) != 1 for b in bounds) \
                or (len(bounds) > 2 and bounds[2] != [0]) or (len(bounds) > 3 and bounds[3] != [1]):
            return None
        return data[slice(int(bounds[0][0]), int(bounds[1][0]))]
    if op == "Gather" and int(node.attrs.get("axis", 0)) == 0:
        data = shape_entries(node.inputs[0], depth + 1)
        idx = node.inputs[1]
        if data is None or not isinstance(idx, gs.Constant):
            return None
        return [data[int(i)] for i in np.asarray(idx.values).reshape(-1)
                if -len(data) <= int(i) < len(data)]
    if op == "Reshape" and _flattens(node):
        return shape_entries(node.inputs[0], depth + 1)
    if op == "Where" and len(node.inputs) == 3:
        return _where_otherwise(node, depth)
    return None


def _flattens(node: gs.Node) -> bool:
    """A Reshape of a 1-D tensor to ``[-1]`` (a no-op on shape vectors)."""
    x, target = node.inputs[0], node.inputs[1]
    return isinstance(target, gs.Constant) and np.asarray(target.values).tolist() == [-1] \
        and x.shape is not None and len(x.shape) == 1


def _negatives(t: gs.Tensor) -> bool:
    """A constant whose entries are all negative: never a dim, nor a count SPA writes."""
    return isinstance(t, gs.Constant) and np.asarray(t.values).size > 0 \
        and bool((np.asarray(t.values) < 0).all())


def _where_otherwise(node: gs.Node, depth: int) -> list[Entry] | None:
    """``Where(Equal(s, c), x, s)`` with ``c`` negative: ``s`` with its literal entries equal to
    ``c`` replaced by ``x``'s (TorchScript's ``expand`` writes it to replace ``-1`` entries,
    "keep this dim", by 1). Dims never equal ``c``; a literal that does needs ``x`` constant."""
    cond, x, s = node.inputs
    if len(cond.inputs) != 1 or cond.inputs[0].op != "Equal":
        return None
    a, c = cond.inputs[0].inputs
    if a is not s or not _negatives(c):
        return None
    entries = shape_entries(s, depth + 1)
    if entries is None:
        return None
    negative = [i for i, e in enumerate(entries) if isinstance(e, Lit) and e < 0]
    if not negative:
        return entries
    cs = _spread(cast(gs.Constant, c), len(entries))
    xs = _spread(x, len(entries)) if isinstance(x, gs.Constant) else None
    if cs is None or xs is None:
        return None
    out = list(entries)
    for i in negative:
        if entries[i] != int(cs[i]):
            return None  # a negative literal Where keeps: not a shape
        out[i] = Lit(int(xs[i]))
    return out


def _spread(t: gs.Constant, n: int) -> np.ndarray | None:
    """A constant's values as ``n`` entries (one value is every entry's); None when it holds
    neither one nor ``n``."""
    v = np.asarray(t.values).reshape(-1)
    return np.broadcast_to(v, (n,)) if v.size in (1, n) else None


def _dim_ref(src: gs.Tensor, axis: int) -> DimRef:
    d = src.shape[axis]
    if isinstance(d, int) and d >= 0:
        return DimRef(src.name, axis, d)
    return DimRef(src.name, axis, symbol=d if isinstance(d, str) and d else None)


def resolve_expand(in_shape: tuple[int | None, ...] | None, entries: list[Entry] | None
                   ) -> tuple[int | None, ...] | None:
    """Expand's output shape where the target determines it (``-1`` never occurs in Expand)."""
    if in_shape is None or entries is None:
        return None
    rank = max(len(in_shape), len(entries))
    x = (1,) * (rank - len(in_shape)) + tuple(in_shape)
    e = [1] * (rank - len(entries)) + list(entries)
    out: list[int | None] = []
    for d, t in zip(x, e):
        if isinstance(t, DimRef) or t is None:
            out.append(d if d is not None and d != 1 else None)
        else:
            out.append(d if t == 1 else (int(t) if d in (None, 1, int(t)) else None))
    return tuple(out)


def resolve_reshape(in_shape: tuple[int | None, ...] | None, entries: list[Entry] | None,
                    x_name: str, inferred: tuple[int | None, ...] | None,
                    in_symbols: tuple[str | None, ...] = ()
                    ) -> tuple[int | None, ...] | None:
    """The Reshape's output shape, static wherever the target determines it.

    ONNX shape inference gives up on ``[N, 8, 4, 4] → Concat(N, -1)``; here the symbolic ``N``
    of the target cancels the input's ``N`` and ``-1`` resolves to 128. ``in_symbols``: the
    input's symbolic dim names; a dim of another tensor named alike cancels too (GPT-2 reshapes
    its values by the key's shape: ``v.view(*k.shape[:-1], -1, d)``).
    """
    if in_shape is None or entries is None:
        return inferred

    def symbol(k: int) -> str:
        named = in_symbols[k] if k < len(in_symbols) else None
        return f"dim:{named}" if named else f"{x_name}:{k}"

    symbols = [symbol(k) for k, d in enumerate(in_shape) if d is None]
    static = prod(d for d in in_shape if d is not None)
    out: list[int | str | None] = []
    for pos, e in enumerate(entries):
        if isinstance(e, DimRef) and e.tensor != x_name:
            # A dim of another tensor (tf2onnx's Tensordot copies [N, H, W] of the tensor it
            # flattened): its static length, or its symbol (cancelled by an input dim of that
            # name only).
            out.append(e.length if e.length is not None else
                       f"dim:{e.symbol}" if e.symbol else f"{e.tensor}:{e.axis}")
        elif isinstance(e, DimRef):
            out.append(in_shape[e.axis] if in_shape[e.axis] is not None else symbol(e.axis))
        elif e == 0:
            if pos >= len(in_shape):
                return inferred
            out.append(in_shape[pos] if in_shape[pos] is not None else symbol(pos))
        else:
            out.append(e)
    if None in out:
        return inferred
    if out.count(-1) == 1:
        rest_symbols = [d for d in out if isinstance(d, str)]
        rest_static = prod(d for d in out if isinstance(d, int) and d != -1)
        if sorted(rest_symbols) == sorted(symbols) and rest_static and not static % rest_static:
            out[out.index(-1)] = static // rest_static
        else:
            out[out.index(-1)] = None
    resolved = tuple(d if isinstance(d, int) else None for d in out)
    if inferred is None or len(inferred) != len(resolved):
        return resolved
    return tuple(i if i is not None else r for i, r in zip(inferred, resolved))
