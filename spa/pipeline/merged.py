"""Merged decoders: one ``If`` whose branches are two decoders, split to be pruned and merged back.

🤗 Optimum's ``decoder_model_merged.onnx`` (and transformers.js folders, which ship only it) is
the first-step decoder and the decoder with past in one file: a graph of a single ``If`` on a
boolean input (``use_cache_branch``), each branch a whole decoder reading the weights the two
share from the outer graph. SPA does not prune inside a branch, so a folder of such files
(spa/pipeline/family.py) is pruned through their branches:

* :func:`split` makes each branch a model of its own: its nodes, the outer weights and inputs
  it reads, its outputs. The family prunes the two as files (the caches one writes and the
  other reads lose the same heads; the weights they share, the same channels), beside the
  separate decoders when the folder has them, which tie them to the same choices.
* :func:`merge` puts the pruned branches back into the merged file's ``If``: the outer graph
  holds each weight once (the branches' shared weights are byte-identical after pruning, as
  the family checks), its inputs and outputs take the pruned shapes, and a branch's placeholder
  outputs (the with-past branch writes empty constants where the first step writes the
  encoder's caches) are resized to the heads kept.
* :func:`agreement` runs the merged file once per branch against that branch's file: the split
  must answer as the original merged file does before anything is pruned (else the merged
  file is left out, as before), and the merged file written must answer as its pruned
  branches do (else nothing is written): :func:`split_into` saves the branches into the
  folder the family prunes, :func:`merged_back` merges them back once pruned.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper, numpy_helper

from spa import validate as val
from spa.errors import ValidationError
from spa.ir.contrib import fixed_dims

if TYPE_CHECKING:
    from spa.pipeline import CheckOptions, PruneReport

#: The If's branch attributes, each split into a file named ``<stem>.<attribute>.onnx``.
BRANCHES = ("then_branch", "else_branch")
_SUBGRAPHS = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


def piece_name(merged: str, branch: str) -> str:
    """The file one branch of ``merged`` is pruned as."""
    return f"{Path(merged).stem}.{branch}.onnx"


def is_merged(model: onnx.ModelProto) -> bool:
    """Whether ``model``'s graph is a single ``If``, as a merged decoder's is."""
    nodes = model.graph.node
    return len(nodes) == 1 and nodes[0].op_type == "If"


def split(model: onnx.ModelProto) -> dict[str, onnx.ModelProto] | str:
    """Each branch of a merged decoder as a model of its own, by attribute name; or why
    ``model`` is not a merged decoder SPA can split."""
    g = model.graph
    if not is_merged(model) or g.node[0].domain not in ("", "ai.onnx"):
        return "its graph is not a single If"
    node = g.node[0]
    inputs = {i.name: i for i in g.input}
    cond = node.input[0]
    if cond not in inputs:
        return f"the If's condition '{cond}' is not a graph input"
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in g.initializer):
        return "its weights are in external data"
    if g.sparse_initializer:
        return "it holds sparse initializers"
    branches = {a.name: a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH}
    if sorted(branches) != sorted(BRANCHES):
        return "its If has no then and else branches"
    weights = {t.name: t for t in g.initializer}
    out: dict[str, onnx.ModelProto] = {}
    for name in BRANCHES:
        sub = branches[name]
        if sub.input:
            return f"its {name} has inputs of its own"
        if any(a.type in _SUBGRAPHS for n in sub.node for a in n.attribute):
            return f"its {name} holds subgraphs of its own"
        held = _placeholders(sub)
        nodes = [n for n in sub.node if not set(n.output) & held]
        outputs = [o for o in sub.output if o.name not in held]
        read = {i for n in nodes for i in n.input} | {o.name for o in outputs}
        if cond in read:
            return f"its {name} reads the condition '{cond}'"
        graph = helper.make_graph(
            nodes, f"{g.name}.{name}", [inputs[i] for i in inputs if i in read], outputs,
            [weights[w] for w in weights if w in read] + list(sub.initializer),
            value_info=list(sub.value_info))
        piece = onnx.ModelProto()
        piece.CopyFrom(model)
        piece.graph.CopyFrom(graph)
        out[name] = piece
    return out


def merge(template: onnx.ModelProto, pieces: Mapping[str, onnx.ModelProto]) -> onnx.ModelProto:
    """The merged decoder ``template`` with each branch replaced by its pruned file."""
    g = template.graph
    node = g.node[0]
    weights: dict[str, onnx.TensorProto] = {}
    graphs: dict[str, onnx.GraphProto] = {}
    for name in BRANCHES:
        sub = pieces[name].graph
        renamed: dict[str, str] = {}
        for t in sub.initializer:
            if t.name in weights and not _same(weights[t.name], t):
                renamed[t.name] = _unique(f"{t.name}.{name}", weights)
            key = renamed.get(t.name, t.name)
            if key not in weights:
                weights[key] = onnx.TensorProto()
                weights[key].CopyFrom(t)
                weights[key].name = key
        nodes = []
        for n in sub.node:
            copy = _copied(n)
            copy.input[:] = [renamed.get(i, i) for i in n.input]
            nodes.append(copy)
        was = next(a.g for a in node.attribute if a.name == name)
        written = {o.name: o for o in sub.output}
        held = _placeholders(was)  # put back, in their place among the If's outputs
        nodes += [_copied(n) for n in was.node if set(n.output) & held]
        graphs[name] = helper.make_graph(
            nodes, was.name, [], [written.get(o.name, o) for o in was.output],
            value_info=list(sub.value_info))
    _fit_placeholders(graphs)
    order = [t.name for t in g.initializer]  # the original's first, then the new ones
    first = set(order)
    ordered = [weights[n] for n in order if n in weights] + \
        [t for n, t in weights.items() if n not in first]
    inputs = [_input_type(i, [pieces[name].graph for name in BRANCHES]) for i in g.input]
    outputs = [_output_type(o, [graphs[name] for name in BRANCHES]) for o in g.output]
    attrs = {a.name: a for a in node.attribute}
    if_node = helper.make_node("If", list(node.input), list(node.output), name=node.name,
                               domain=node.domain,
                               **{a: graphs[a] if a in graphs else helper.get_attribute_value(
                                   attrs[a]) for a in attrs})
    merged = onnx.ModelProto()
    merged.CopyFrom(template)
    merged.graph.CopyFrom(helper.make_graph([if_node], g.name, inputs, outputs, ordered,
                                            doc_string=g.doc_string))
    return merged


def agreement(merged: onnx.ModelProto | str, pieces: Mapping[str, str | onnx.ModelProto],
              cond: str, dims: dict[str, int]) -> float:
    """The worst relative difference between the merged decoder, run down each branch on
    seeded random inputs, and that branch's own file."""
    whole = val.session(merged, what="merged decoder")
    own = {name: val.session(pieces[name], what=f"merged decoder's {name}")
           for name in BRANCHES}
    feeds: dict[str, np.ndarray] = {}
    for sess in (*own.values(), whole):  # each input as the branch that reads it declares it
        for k, v in val.random_inputs(sess, dims=dims).items():
            feeds.setdefault(k, v)
    worst = 0.0
    for name, flag in zip(BRANCHES, (True, False)):
        wanted = {i.name for i in own[name].get_inputs()}
        got = val.run(own[name], {k: v for k, v in feeds.items() if k in wanted})
        ran = val.run(whole, {**feeds, cond: np.array([flag])})
        worst = max(worst, val.worst_relative(got, ran))
    return worst


def split_into(model: onnx.ModelProto, name: str, path: Path, checks: CheckOptions
               ) -> onnx.ModelProto | str:
    """Save the branches of the merged decoder ``model`` into ``path``, and return it; or why
    it is not split (its branches, split apart, must answer as it does)."""
    pieces = split(model)
    if isinstance(pieces, str):
        return pieces
    cond = model.graph.node[0].input[0]
    worst = agreement(model, pieces, cond, dict(checks.input_dims))
    if not worst <= checks.rtol:
        return f"its branches, split apart, do not answer as it does (relative {worst:.1e})"
    for branch, piece in pieces.items():
        onnx.save(piece, str(path / piece_name(name, branch)))
    return model


def merged_back(tmp: Path, name: str, template: onnx.ModelProto, checks: CheckOptions,
                reports: Mapping[str, PruneReport]) -> dict:
    """Merge the pruned branches of ``name`` in ``tmp`` back into it (their files removed);
    it must answer as they do."""
    files = {b: tmp / piece_name(name, b) for b in BRANCHES}
    pieces = {b: onnx.load(str(f)) for b, f in files.items()}
    model = merge(template, pieces)
    onnx.save(model, str(tmp / name))
    done: dict = {"branches": {b: f.name for b, f in files.items()},
                  "symbolic_dims": _symbolic_sizes(model, pieces.values())}
    if checks.validate:
        dims = dict(checks.input_dims)
        for f in files.values():
            if f.name in reports:
                dims |= reports[f.name].input_dims
        worst = agreement(str(tmp / name), {b: str(f) for b, f in files.items()},
                          template.graph.node[0].input[0], dims)
        if not worst <= checks.rtol:
            raise ValidationError(f"{name}: merged back, its branches answer {worst:.1e} "
                                  f"(relative) apart from their pruned files")
        done["relative_diff"] = worst
    for f in files.values():
        f.unlink()
    return done


def axis_name(name: str, axis: int) -> str:
    """The name of axis ``axis`` of graph input ``name`` where SPA declares it symbolic (a
    pruned cache's head axis, fed placeholder caches of another size)."""
    return f"{name}.axis{axis}"


def _symbolic_sizes(merged: onnx.ModelProto, branches: Iterable[onnx.ModelProto]
                    ) -> dict[str, int]:
    """The size each axis the merge declared symbolic (:func:`_input_type`) has in the branch
    that reads it: the merged file is fed such caches, with that branch, at those sizes."""
    declared = {v.name: v for v in merged.graph.input}
    sizes: dict[str, int] = {}
    for branch in branches:
        for v in branch.graph.input:
            if v.name not in declared:
                continue
            dims = declared[v.name].type.tensor_type.shape.dim
            for axis, (d, size) in enumerate(zip(dims, fixed_dims(v))):
                if d.dim_param == axis_name(v.name, axis) and size:
                    sizes[d.dim_param] = size
    return sizes


def _placeholders(graph: onnx.GraphProto) -> set[str]:
    """The outputs of ``graph`` an empty Constant makes: placeholders, not decoder outputs."""
    made = {o: n for n in graph.node for o in n.output}
    held = set()
    for out in graph.output:
        n = made.get(out.name)
        value = next((a.t for a in n.attribute if a.name == "value"), None) \
            if n is not None and n.op_type == "Constant" else None
        if value is not None and 0 in value.dims:
            held.add(out.name)
    return held


def _copied(node: onnx.NodeProto) -> onnx.NodeProto:
    out = onnx.NodeProto()
    out.CopyFrom(node)
    return out


def _same(a: onnx.TensorProto, b: onnx.TensorProto) -> bool:
    return val.same_bits(numpy_helper.to_array(a), numpy_helper.to_array(b))


def _unique(name: str, taken: Mapping[str, object]) -> str:
    k, out = 0, name
    while out in taken:
        k += 1
        out = f"{name}.{k}"
    return out


def _fit_placeholders(graphs: Mapping[str, onnx.GraphProto]) -> None:
    """A branch output made by an empty Constant (a placeholder: the with-past branch writes
    ``(0, heads, 1, head size)`` where the first step writes the encoder's caches) takes the
    other branch's sizes on its non-empty axes, so both branches say the same head count."""
    for name, graph in graphs.items():
        others = {o.name: fixed_dims(o) for n, gr in graphs.items() if n != name for o in gr.output}
        made = {o: n for n in graph.node for o in n.output}
        for out in graph.output:
            n = made.get(out.name)
            other = others.get(out.name)
            if n is None or n.op_type != "Constant" or other is None:
                continue
            attr = next((a for a in n.attribute if a.name == "value"), None)
            if attr is None:
                continue
            value = numpy_helper.to_array(attr.t)
            if value.size or value.ndim != len(other):
                continue
            shape = tuple(s if s == 0 or o is None else o for s, o in zip(value.shape, other))
            attr.t.CopyFrom(numpy_helper.from_array(np.zeros(shape, value.dtype), attr.t.name))
            for d, s in zip(out.type.tensor_type.shape.dim, shape):
                if d.HasField("dim_value"):
                    d.dim_value = s


def _input_type(declared: onnx.ValueInfoProto, graphs: list[onnx.GraphProto]
                ) -> onnx.ValueInfoProto:
    """A merged graph input as the branches that read it declare it. An input one branch does
    not read (a cache only the with-past branch reads) declares a pruned axis symbolic: the
    first step is fed placeholder caches that runtimes size from the model's config (Optimum,
    transformers.js: the original head count, length 0), which that branch never reads."""
    found = [v for gr in graphs for v in gr.input if v.name == declared.name]
    if not found:
        return declared
    out = onnx.ValueInfoProto()
    out.CopyFrom(found[0])
    if len(found) < len(graphs):
        was = fixed_dims(declared)
        for axis, d in enumerate(out.type.tensor_type.shape.dim):
            if axis < len(was) and d.HasField("dim_value") and d.dim_value != was[axis]:
                d.dim_param = axis_name(declared.name, axis)
    return out


def _output_type(declared: onnx.ValueInfoProto, graphs: list[onnx.GraphProto]
                 ) -> onnx.ValueInfoProto:
    """A merged graph output as declared, its fixed sizes those the branches now write (the
    non-zero size they agree on at each axis)."""
    out = onnx.ValueInfoProto()
    out.CopyFrom(declared)
    found = [fixed_dims(o) for gr in graphs for o in gr.output if o.name == declared.name]
    for axis, d in enumerate(out.type.tensor_type.shape.dim):
        sizes = {f[axis] for f in found if axis < len(f) and f[axis]}
        if d.HasField("dim_value") and len(sizes) == 1:
            d.dim_value = sizes.pop()
    return out


__all__ = ["BRANCHES", "agreement", "axis_name", "is_merged", "merge", "merged_back",
           "piece_name", "split", "split_into"]
