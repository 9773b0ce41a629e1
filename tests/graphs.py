"""Tiny ONNX graphs for the op-rule tests, and readers of the pruned files.

:class:`Builder` collects nodes and seeded random initializers and turns them into one model;
every op-rule test builds its graph with it, so the tests show the graph and nothing else.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from spa.api import analyze
from spa.coupling.analysis import Group

F32 = onnx.TensorProto.FLOAT
Shape = "list[int] | None | tuple[list[int] | None, int]"
# helper.make_model writes the newest IR version, which onnxruntime may not read yet.
IR_VERSION = 10


class Builder:
    """Nodes + seeded random float32 initializers → an ONNX model."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, np.ndarray] = {}
        self._n = 0

    def _fresh(self, stem: str) -> str:
        self._n += 1
        return f"{stem}{self._n}"

    # --- tensors ------------------------------------------------------------------------------
    def const(self, value, name: str | None = None, dtype=None) -> str:
        """An initializer with ``value`` (int lists become int64)."""
        arr = np.asarray(value, dtype=dtype if dtype is not None else
                         (np.int64 if np.asarray(value).dtype.kind in "iu" else np.float32))
        name = name or self._fresh("c")
        self.inits[name] = arr
        return name

    def weight(self, *shape: int, name: str | None = None, positive: bool = False) -> str:
        """A random float32 initializer; ``positive`` for variances."""
        arr = self.rng.standard_normal(shape).astype(np.float32)
        if positive:
            arr = np.abs(arr) + 0.5
        return self.const(arr, name or self._fresh("w"))

    # --- nodes --------------------------------------------------------------------------------
    def op(self, op_type: str, *inputs: str, outputs: int | list[str] = 1, name: str | None = None,
           domain: str = "", **attrs) -> str | list[str]:
        """Append a node; return its output name (a list when it has several)."""
        name = name or self._fresh(op_type.lower())
        outs = [f"{name}_out{i}" for i in range(outputs)] if isinstance(outputs, int) else outputs
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=name, domain=domain,
                                           **attrs))
        return outs[0] if len(outs) == 1 else outs

    def conv(self, x: str, cin: int, cout: int, *, k: int = 3, dims: int = 2, group: int = 1,
             bias: bool = True, name: str | None = None, **attrs) -> str:
        """Conv with 'same' padding and random weights ``[cout, cin/group, k, ...]``."""
        name = name or self._fresh("conv")
        w = self.weight(cout, cin // group, *([k] * dims), name=f"{name}.w")
        ins = [x, w] + ([self.weight(cout, name=f"{name}.b")] if bias else [])
        attrs.setdefault("pads", [k // 2] * (2 * dims))
        return self.op("Conv", *ins, name=name, group=group, **attrs)

    def conv_t(self, x: str, cin: int, cout: int, *, k: int = 3, group: int = 1,
               name: str | None = None) -> str:
        """ConvTranspose (stride 1, 'same' padding), weights ``[cin, cout/group, k, k]``."""
        name = name or self._fresh("convt")
        w = self.weight(cin, cout // group, k, k, name=f"{name}.w")
        b = self.weight(cout, name=f"{name}.b")
        return self.op("ConvTranspose", x, w, b, name=name, group=group, pads=[k // 2] * 4)

    def gemm(self, x: str, k: int, n: int, *, trans_b: int = 1,
             bias_shape: tuple[int, ...] | None = None, name: str | None = None) -> str:
        """Gemm ``x [M, k] → [M, n]``; the bias is ``[n]`` unless ``bias_shape`` says otherwise."""
        name = name or self._fresh("gemm")
        w = self.weight(*((n, k) if trans_b else (k, n)), name=f"{name}.w")
        bias = self.weight(*(bias_shape or (n,)), name=f"{name}.b")
        return self.op("Gemm", x, w, bias, name=name, transB=trans_b)

    def bn(self, x: str, c: int, name: str | None = None) -> str:
        name = name or self._fresh("bn")
        params = [self.weight(c, name=f"{name}.{p}") for p in ("scale", "bias", "mean")]
        params.append(self.weight(c, name=f"{name}.var", positive=True))
        return self.op("BatchNormalization", x, *params, name=name)

    def stem(self, x: str, cin: int, cout: int) -> str:
        """``x → Conv 'stem' (cin→6) → Relu → Conv 'c1' (6→cout)``: a prunable group (the stem's
        6 channels) upstream of whatever a test does with c1's output."""
        return self.conv(self.op("Relu", self.conv(x, cin, 6, name="stem")), 6, cout, name="c1")

    # --- the model ----------------------------------------------------------------------------
    def graph(self, inputs: dict[str, Shape], outputs: dict[str, Shape]) -> onnx.GraphProto:
        """The graph; a shape is ``[dims]`` (float32) or ``([dims], elem_type)``; None = unknown."""
        return helper.make_graph(self.nodes, "tiny", _value_infos(inputs),
                                 _value_infos(outputs),
                                 [numpy_helper.from_array(v, k) for k, v in self.inits.items()])

    def model(self, inputs: dict[str, Shape], outputs: dict[str, Shape], *,
              opset: int = 17, extra_opsets: dict[str, int] | None = None) -> onnx.ModelProto:
        graph = self.graph(inputs, outputs)
        imports = [helper.make_opsetid("", opset)]
        imports += [helper.make_opsetid(d, v) for d, v in (extra_opsets or {}).items()]
        model = helper.make_model(graph, opset_imports=imports, ir_version=IR_VERSION)
        onnx.checker.check_model(model, full_check=True)
        return model


def _value_infos(shapes: dict[str, Shape]) -> list[onnx.ValueInfoProto]:
    infos = []
    for name, s in shapes.items():
        dims, elem = s if isinstance(s, tuple) else (s, F32)
        infos.append(helper.make_tensor_value_info(name, elem, dims))
    return infos


# --- reading results back ---------------------------------------------------------------------
def load(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path))


def init_shapes(model: onnx.ModelProto | Path) -> dict[str, tuple[int, ...]]:
    """Initializer name → shape of the (pruned) file."""
    model = load(model) if isinstance(model, Path) else model
    return {t.name: tuple(t.dims) for t in model.graph.initializer}


def init_value(model: onnx.ModelProto | Path, name: str) -> np.ndarray:
    model = load(model) if isinstance(model, Path) else model
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def node_named(model: onnx.ModelProto | Path, name: str) -> onnx.NodeProto:
    model = load(model) if isinstance(model, Path) else model
    return next(n for n in model.graph.node if n.name == name)


def attr(node: onnx.NodeProto, name: str):
    return next(helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def input_value(model: onnx.ModelProto | Path, node_name: str, i: int) -> np.ndarray:
    """The constant at input ``i`` of node ``node_name`` (an initializer after SPA's rewrite)."""
    model = load(model) if isinstance(model, Path) else model
    return init_value(model, node_named(model, node_name).input[i])


def kept_slices(original: np.ndarray, pruned: np.ndarray, axis: int) -> list[int]:
    """Which slices of ``original`` along ``axis`` survive in ``pruned`` (matched by value)."""
    orig = np.moveaxis(original, axis, 0).reshape(original.shape[axis], -1)
    new = np.moveaxis(pruned, axis, 0).reshape(pruned.shape[axis], -1)
    found = [int(np.flatnonzero((orig == row).all(axis=1))[0]) for row in new]
    assert found == sorted(set(found)), "pruned slices are not an ordered subset of the original"
    return found


def group_of(model: onnx.ModelProto, tensor: str, axis: int) -> Group:
    """The unique group that has a member on channel space ``(tensor, axis)``."""
    found = [g for g in analyze(model).groups if any(m.space == (tensor, axis) for m in g.members)]
    assert len(found) == 1, f"({tensor}, {axis}) is in {len(found)} groups"
    return found[0]


def reasons(model: onnx.ModelProto) -> list[str]:
    """Every freeze reason of every group that has a producer."""
    return [r for g in analyze(model).groups if g.producers for r in g.frozen]


def with_nodes_first(model: onnx.ModelProto, first) -> onnx.ModelProto:
    """A copy of ``model`` with the nodes ``first`` picks (a predicate) at the top of the graph,
    in their order, the rest after them (still topological when ``first`` reads constants)."""
    nodes = list(model.graph.node)
    top = [n for n in nodes if first(n)]
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(top + [n for n in nodes if n not in top])
    return out
