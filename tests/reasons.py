"""Tiny graphs around an op that gives up, and its give-up words read back, for the tests
that assert them.

Most give-ups show in the plan: the channels they touch freeze, and the group's reasons say
``<Op> node '<name>': <why>`` (:func:`frozen_text`). A rule that gives up on an unknown rank
leaves no channel space of its own that a group could reach; its words are read off the rule
itself, run on the node of the normalised graph (:func:`rule_reason`).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from attn_graphs import X3, D, linear
from graphs import Builder, group_of

from spa.api import analyze
from spa.coupling.context import NodeContext
from spa.coupling.registry import ensure_loaded, lookup
from spa.ir.load import load_proto

X = {"x": [1, 3, 4, 4]}
C = 4  # channels of the stem's second conv 'c1', whose group each test freezes
INT64 = onnx.TensorProto.INT64


def after_stem(build, out_shape, *, inputs=None, opset: int = 17) -> onnx.ModelProto:
    """``x → stem → c1 (C channels, [1, C, 4, 4]) → build(b, c1's output) → graph output``."""
    b = Builder()
    y = build(b, b.stem("x", 3, C))
    return b.model({**X, **(inputs or {})}, {y: out_shape}, opset=opset)


def after_dense(build, out_shape, *, inputs=None, opset: int = 17) -> onnx.ModelProto:
    """``x [1, S, D] → MatMul 'fc' (D → 8, weight 'fc.w') → build(b, its output) → output``."""
    b = Builder()
    y = build(b, linear(b, "x", D, 8, "fc", bias=False))
    return b.model({**X3, **(inputs or {})}, {y: out_shape}, opset=opset)


def behind_unknown_rank(build, out_shape, *, opset: int = 17) -> onnx.ModelProto:
    """``build(b, u)`` where ``u`` (``'foo_out0'``) comes out of a custom op: rank unknown."""
    b = Builder()
    u = b.op("Foo", b.stem("x", 3, C), domain="my.ops", name="foo")
    y = build(b, u)
    return b.model(X, {y: out_shape}, opset=opset, extra_opsets={"my.ops": 1})


def frozen_text(model: onnx.ModelProto, tensor: str, axis: int = 0, *,
                hidden: bool = False) -> str:
    """The reasons (one a line) of the group on ``(tensor, axis)``, asserted frozen."""
    g = group_of(model, tensor, axis) if not hidden else next(
        g for g in analyze(model, hidden=True).groups
        if any(m.space == (tensor, axis) for m in g.members))
    assert g.frozen and not g.prunable, f"({tensor}, {axis}) is not frozen"
    return "\n".join(g.frozen)


def rule_reason(model: onnx.ModelProto, node: str, *, hidden: bool = False) -> str | None:
    """The reasons the rule of ``node`` records (None: it gave up on nothing)."""
    ensure_loaded()
    loaded = load_proto(model)
    graph = loaded.graph
    consumers_of: dict = {}
    for n in graph.nodes:
        for t in n.inputs:
            consumers_of.setdefault(t.name, []).append(n)
    target = next(n for n in graph.nodes if n.name == node)
    ctx = NodeContext(target, loaded.opset, consumers_of, hidden=hidden,
                      graph_outputs=frozenset(t.name for t in graph.outputs))
    lookup(target.domain or "", target.op, loaded.opset)(ctx)
    return _recorded(ctx)


def reason_on(op: str, inputs: dict, outputs: dict, *, opset: int = 17,
              **attrs) -> str | None:
    """The reason the rule of ``op`` records on one node whose tensors have exactly the given
    shapes (a list, None for an unknown dim; None for an unknown rank) or values (an array: a
    constant). No shape inference runs: for shapes inference would fill in, as it may not on a
    real model."""
    ensure_loaded()

    def tensor(name: str, spec) -> gs.Tensor:
        if isinstance(spec, np.ndarray):
            return gs.Constant(name, spec)
        return gs.Variable(name, np.float32, spec)

    node = gs.Node(op, name="n", attrs=attrs,
                   inputs=[tensor(k, v) for k, v in inputs.items()],
                   outputs=[tensor(k, v) for k, v in outputs.items()])
    ctx = NodeContext(node, opset, {})
    lookup("", op, opset)(ctx)
    return _recorded(ctx)


def _recorded(ctx: NodeContext) -> str | None:
    """Every reason the rule recorded, for the node and for single spaces, once each, joined
    by ``; `` (None: none)."""
    found = [ctx.result.refusal, *ctx.result.reasons.values()]
    parts = [p for r in found if r for p in r.split("; ")]
    return "; ".join(dict.fromkeys(parts)) or None
