"""Subgraphs for latency tables (passes/latency.py): a channel group's layers cut out of a model.

A group's layers are every node that reads or writes one of its tensors, plus the nodes that
compute the non-float values (shapes, indices) those read, back to float tensors or graph
inputs. Cut out of a model whose input sizes are fixed and whose shapes are inferred, they make a
model of their own: what they read from outside becomes an input (with its inferred shape),
what they write that nothing inside reads becomes an output. Groups whose layers hold control
flow, or read a tensor whose shape inference leaves unsized, are not timed (and say why).

Groups with disjoint layers do not change each other's subgraphs, so they can be pruned together
in one rewritten model: :func:`colours` partitions the groups so (greedy colouring of the "share
a node" graph).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import networkx as nx
import onnx
from onnx import helper

from spa.inputs import dim_key

if TYPE_CHECKING:
    from spa.coupling.analysis import Group

_REAL = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
         onnx.TensorProto.BFLOAT16)


def static(model: onnx.ModelProto, dims: Mapping[str, int]) -> onnx.ModelProto:
    """``model`` with its symbolic input dims fixed to ``dims`` (else 1), so that shape
    inference gives every tensor a size."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for inp in out.graph.input:
        for axis, d in enumerate(inp.type.tensor_type.shape.dim):
            key = dim_key(inp.name, axis,
                          d.dim_value if d.HasField("dim_value") else d.dim_param)
            if key is not None:
                d.Clear()
                d.dim_value = dims.get(key, 1)
    return out


def group_nodes(graph: onnx.GraphProto, group: Group) -> tuple[frozenset[str], str]:
    """Names of the nodes that read or write a tensor of ``group``, plus the nodes computing
    the non-float values (shapes, indices) they read; or why the group cannot be timed."""
    tensors = {m.space[0] for m in group.members}
    producer = {o: n for n in graph.node for o in n.output}
    floats = _float_values(graph)
    chosen: dict[str, onnx.NodeProto] = {}
    for n in graph.node:
        if any(t in tensors for t in (*n.input, *n.output)):
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                   for a in n.attribute):
                return frozenset(), f"node {n.name} has a subgraph"
            chosen[n.name] = n
    todo = list(chosen.values())
    while todo:  # the shape arithmetic they read comes along
        n = todo.pop()
        for t in n.input:
            p = producer.get(t)
            if p is not None and p.name not in chosen and t not in floats:
                chosen[p.name] = p
                todo.append(p)
    if not chosen:
        return frozenset(), "no node reads or writes its tensors"
    if any(not n.name for n in chosen.values()):
        return frozenset(), "a node of the group has no name"
    infos = {v.name: v for v in (*graph.input, *graph.value_info, *graph.output)}
    inits = {i.name for i in graph.initializer}
    made = {o for n in chosen.values() for o in n.output}
    for t in (t for n in chosen.values() for t in n.input if t):
        if t not in made and t not in inits and not static_shape(infos.get(t)):
            return frozenset(), f"shape inference gives no fixed shape to {t}"
    return frozenset(chosen), ""


def static_shape(info: onnx.ValueInfoProto | None) -> bool:
    if info is None or not info.type.tensor_type.HasField("shape"):
        return False
    return all(d.HasField("dim_value") for d in info.type.tensor_type.shape.dim)


def _float_values(graph: onnx.GraphProto) -> set[str]:
    types = {v.name: v.type.tensor_type.elem_type
             for v in (*graph.input, *graph.value_info, *graph.output)}
    return {n for n, t in types.items() if t in _REAL}


def colours(nodes: Mapping[int, frozenset[str]]) -> list[set[int]]:
    """Sets of groups with pairwise disjoint node sets (greedy colouring, largest first)."""
    g = nx.Graph()
    g.add_nodes_from(nodes)
    by_node: dict[str, list[int]] = {}
    for gid, names in nodes.items():
        for n in names:
            by_node.setdefault(n, []).append(gid)
    for gids in by_node.values():
        g.add_edges_from((a, b) for i, a in enumerate(gids) for b in gids[i + 1:])
    colour = nx.coloring.greedy_color(g, strategy="largest_first")
    out: dict[int, set[int]] = {}
    for gid, c in sorted(colour.items()):
        out.setdefault(c, set()).add(gid)
    return [out[c] for c in sorted(out)]


def subgraph(model: onnx.ModelProto, names: frozenset[str]) -> bytes:
    """The nodes ``names`` of ``model`` (shapes inferred) as a model of their own: what they
    read from outside become inputs, what they write and nothing inside reads, outputs."""
    graph = model.graph
    nodes = [n for n in graph.node if n.name in names]
    made = {o for n in nodes for o in n.output}
    read = {t for n in nodes for t in n.input if t}
    inits = [i for i in graph.initializer if i.name in read]
    have = made | {i.name for i in inits}
    infos = {v.name: v for v in (*graph.input, *graph.value_info, *graph.output)}
    inputs = [infos[t] for t in dict.fromkeys(t for n in nodes for t in n.input if t)
              if t not in have]
    final = {o.name for o in graph.output}
    outputs = [infos.get(o) or onnx.ValueInfoProto(name=o) for n in nodes for o in n.output
               if o and (o in final or o not in read)]
    sub = helper.make_graph(nodes, "latency", inputs, outputs, inits)
    out = helper.make_model(sub, opset_imports=model.opset_import, ir_version=model.ir_version)
    return out.SerializeToString()
