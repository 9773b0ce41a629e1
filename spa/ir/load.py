"""Load an ONNX file into a normalised onnx-graphsurgeon graph.

Normal form, whatever the producer (PyTorch's two exporters, tf2onnx, paddle2onnx, …):

* every weight is a ``gs.Constant`` — ``Constant`` nodes (paddle2onnx writes weights that way)
  are turned into constants, and ``Identity`` nodes whose input is a constant are bypassed;
* a constant that normal form splits from a tensor others still read (a folded view, a copy)
  is tied to it (spa/ir/tied.py), so that it is counted and written once;
* every tensor carries the shape ONNX shape inference gives it (symbolic dims stay strings);
* external data is read into memory with the tensors that use it.

The file on disk is only read, never written.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import logging
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError
from onnx import external_data_helper
from onnx_graphsurgeon.logger import G_LOGGER

from spa.errors import InvalidModelError, ModelLoadError, UnsupportedModelError, one_line
from spa.ir.computed import fold_computed_weights
from spa.ir.contrib import contrib_shapes, has_contrib, onnx_view, shape_stand_ins
from spa.ir.external import attach_external, check_external, unload
from spa.ir.fold import fold_constant_ops, redirect
from spa.ir.packed import raw_length
from spa.ir.params import stored_params
from spa.ir.shapevalue import DimRef, Entry, resolve_expand, resolve_reshape, shape_entries
from spa.ir.tied import Ties, record_copy, record_view, resolve
from spa.ir.values import MappedFile, hold_weights, inline_views, restore_weights
from spa.ir.wire import binary_protobuf, copy_without, raw_data_spans, unknown_fields

log = logging.getLogger(__name__)

MIN_OPSET = 7
# Initializers up to this many elements stay in the copy used for shape inference: shape
# constants (Reshape targets, Slice bounds) must keep their values; weights only need a type.
_SMALL_TENSOR = 64
# Rounds of fold → refine → re-infer on import (each can make more shapes static; the loop stops
# as soon as one changes nothing). Swin-T needs 8: each stage's window padding folds only once the
# stage before it has static shapes.
_REFINE_ROUNDS = 16
_MADE_UP = "unk__"  # the prefix of the dims ONNX shape inference names itself
_CONTRIB_ROUNDS = 64  # a round per layer of contrib ops in a row (an int4 encoder: 4 a block)


@dataclass
class LoadedModel:
    """A model in SPA's normal form, plus what is needed to write it back faithfully."""

    path: Path | None
    graph: gs.Graph
    proto_header: onnx.ModelProto  # the model without its graph: versions, opsets, metadata
    external_data: bool
    file_bytes: int
    opset: int
    params: int  # the parameters the file holds, each tensor once (spa/ir/params.py)
    notes: list[str] = field(default_factory=list)
    data_files: tuple[Path, ...] = ()  # the external data files the model reads
    mapped: MappedFile | None = None  # the file its inline weights are read from
    ties: Ties = field(default_factory=dict)  # constants split from one tensor of the file


def load_model(path: str | os.PathLike[str]) -> LoadedModel:
    """Read ``path`` and return it in normal form; raise a typed error on bad input."""
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"{p}: no such file")
    if p.is_dir():
        raise ModelLoadError(f"{p}: is a directory, not an ONNX file")
    try:
        model, mapped = _read(p)
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        raise ModelLoadError(f"{p}: not a readable ONNX model (truncated or another file type): "
                             f"{one_line(exc)}") from exc
    if not model.HasField("graph"):  # a graph without nodes is valid (nothing to prune)
        raise ModelLoadError(f"{p}: not an ONNX model (no graph in it)")
    external = any(external_data_helper.uses_external_data(t)
                   for t in external_data_helper._get_all_tensors(model))
    header = _header_of(model)
    opset = check_versions(model, str(p))
    data_files = _data_files(p, model) if external else ()
    if external:  # mapped on demand (spa/ir/external.py), not read into the protobuf
        check_external(model, p.parent, str(p))
    file_bytes = p.stat().st_size + sum(f.stat().st_size for f in data_files)
    model = _with_inferred_shapes(model, str(p), strict=True)
    graph, ties = import_graph(model, str(p), base_dir=p.parent if external else None,
                               mapped=mapped)
    return LoadedModel(path=p, graph=graph, proto_header=header, external_data=external,
                       file_bytes=file_bytes, opset=opset, params=stored_params(model),
                       data_files=data_files, mapped=mapped, ties=ties)


def load_proto(model: onnx.ModelProto, name: str = "<model>") -> LoadedModel:
    """Normalise an in-memory model (tests and the Python API use this)."""
    opset = check_versions(model, name)
    params = stored_params(model)
    graph, ties = normal_graph(model, name)
    return LoadedModel(path=None, graph=graph, proto_header=_header_of(model),
                       external_data=False, file_bytes=model.ByteSize(), opset=opset,
                       params=params, ties=ties)


def normal_graph(model: onnx.ModelProto, name: str = "<model>") -> tuple[gs.Graph, Ties]:
    """The graph of an in-memory model in normal form (its shapes inferred into ``model``),
    and its ties."""
    return import_graph(_with_inferred_shapes(model, name, strict=True), name)


def _read(path: Path) -> tuple[onnx.ModelProto, MappedFile | None]:
    """``onnx.load`` without external data. A binary file is parsed from a read-only memory
    map (no copy of the whole file in memory), which stays open for the weights to be read
    from it without copies (spa/ir/values.py)."""
    if not binary_protobuf(path) or path.stat().st_size == 0:
        return onnx.load(str(path), load_external_data=False), None
    model = onnx.ModelProto()
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    with memoryview(mapped) as view:
        decoded, size = model.ParseFromString(view), len(view)
    if decoded is not None and decoded != size:  # as onnx.load checks
        raise DecodeError(f"Protobuf decoding consumed too few bytes: {decoded} out of {size}")
    spans = raw_data_spans(mapped)
    if spans is None:
        return model, None
    file = MappedFile(mapped, spans)
    file.release()  # parsing read every page; the weights are read again when needed
    return model, file


def check_versions(model: onnx.ModelProto, name: str) -> int:
    """Return the default-domain opset, or raise if SPA cannot read this IR/opset version."""
    if model.ir_version > onnx.IR_VERSION or model.ir_version < 3:
        raise UnsupportedModelError(
            f"{name}: IR version {model.ir_version} is not supported "
            f"(this onnx reads IR 3 to {onnx.IR_VERSION})")
    opset = None
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            opset = imp.version
    if opset is None:
        raise UnsupportedModelError(f"{name}: the model imports no default-domain (ai.onnx) opset")
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise UnsupportedModelError(
            f"{name}: opset {opset} is not supported (SPA reads opsets {MIN_OPSET} to {newest})")
    return opset


def import_graph(model: onnx.ModelProto, name: str, base_dir: Path | None = None, *,
                 mapped: MappedFile | None = None) -> tuple[gs.Graph, Ties]:
    """Check, import and normalise ``model``; external tensors are read from ``base_dir``,
    inline ones from ``mapped`` (the file ``model`` was parsed from) when given. Returns the
    graph and the ties of the constants normal form split from one tensor."""
    try:
        onnx.checker.check_model(onnx_view(weightless(model)))
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise ModelLoadError(f"{name}: fails onnx.checker: {one_line(exc)}") from exc
    _check_node_names(model.graph, name)
    _check_tensor_sizes(model, name, mapped)
    graph = _import(model, base_dir, name, mapped)
    _constant_nodes_to_constants(graph)
    _bypass_constant_identities(graph)
    ties: Ties = {}
    on_layout = functools.partial(record_view, ties)
    # a weight computed at run time left its layer's output shapes unknown: infer them again
    shape_values_folded = fold_constant_ops(graph, on_layout) + fold_computed_weights(graph, name)
    _unshare_constants(graph, ties)
    _unshare_shape_targets(graph)
    _toposort(graph.cleanup(remove_unused_graph_inputs=False))
    # Propagate what folded shape arithmetic and refined Reshapes now tell to the ops after them
    # (inferred dims override the stale symbolic ones). Shapes learnt that way can make more
    # ``Shape`` nodes static, which fold in turn: repeat until nothing changes (a few rounds).
    for _ in range(_REFINE_ROUNDS):
        if not (_refine_shapes(graph) or shape_values_folded):
            break
        unload(graph)  # export references to external data, not copies of it
        held = hold_weights(graph, _SMALL_TENSOR)  # shape inference reads no large weight
        refined = gs.export_onnx(graph, do_type_check=False)
        del refined.opset_import[:]
        refined.opset_import.extend(model.opset_import)
        refined.ir_version = model.ir_version
        _forget_made_up_dims(refined.graph)
        graph = _import(_with_inferred_shapes(refined, name), base_dir, name)
        restore_weights(graph, held)
        shape_values_folded = fold_constant_ops(graph, on_layout)
        if shape_values_folded:
            _toposort(graph.cleanup(remove_unused_graph_inputs=False))
    if _select_shared_head_biases(graph):
        _toposort(graph)
    return graph, resolve(ties, graph)


def _forget_made_up_dims(graph: onnx.GraphProto) -> None:
    """Clear the dims ONNX inference named afresh (``unk__7``) in ``graph``'s value_info, so
    that the next inference, which keeps a named dim it is given, names them from what the
    refined shapes now tell: ``Cast(Expand(x, t))`` keeps the ``unk__55`` it was given first
    after the Expand's output has become ``batch_size``, and the rotary cosine multiplying the
    heads then hides their batch from the Reshape that merges them."""
    for vi in graph.value_info:
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param.startswith(_MADE_UP):
                d.ClearField("dim_param")


def _toposort(graph: gs.Graph) -> None:
    """Sort the nodes (and those of subgraphs), not the model-local functions: SPA never
    changes functions, and onnx-graphsurgeon 0.6's function sort recurses forever when a model
    has both functions and subgraphs (If, Loop, Scan)."""
    graph.toposort(mode="nodes")


def _import(model: onnx.ModelProto, base_dir: Path | None, name: str,
            mapped: MappedFile | None = None) -> gs.Graph:
    # onnx-graphsurgeon warns, on stdout (where --json keeps one JSON document), for every
    # tensor of a type numpy lacks (bfloat16, float8); it keeps the ONNX type, which SPA reads
    # (spa/ir/dtypes.py), so the warning says nothing a user can act on.
    with G_LOGGER.suppress(G_LOGGER.ERROR):
        graph = gs.import_onnx(model)
    if base_dir is not None:
        attach_external(graph, base_dir, name)
    inline_views(graph, mapped)
    return graph


def _unshare_constants(graph: gs.Graph, ties: Ties) -> None:
    """Give each reader of a deduplicated constant its own copy, tied to it in ``ties``.

    Exporters merge initializers with equal values (every zero bias of a freshly initialised
    model becomes one tensor), which would couple unrelated channel spaces — a Q projection's
    heads with the hidden size. Copies change no number, and are written as one tensor again
    where they still agree (spa/ir/tied.py). Only constants that can be such accidents are
    copied: vectors, and tensors holding a single repeated value; a genuinely tied weight matrix
    stays shared, and its readers stay coupled.
    """
    tensors = graph.tensors()
    taken = set(tensors)  # a re-read output may hold copies its source no longer joined
    for name, t in list(tensors.items()):
        readers: list[gs.Node] = []
        for node in t.outputs if isinstance(t, gs.Constant) else ():
            if all(node is not r for r in readers):
                readers.append(node)
        if len(readers) < 2 or int(np.prod(t.shape, dtype=np.int64)) <= 1:
            continue
        values = np.asarray(t.values)
        uniform = _all_equal(values)
        if values.ndim > 1 and not uniform:
            continue
        names = (n for k in itertools.count(1) if (n := f"{name}__spa_copy{k}") not in taken)
        for node, copy_name in zip(readers[1:], names):
            taken.add(copy_name)
            copy = gs.Constant(copy_name, values.copy())
            for i, inp in enumerate(node.inputs):
                if inp is t:
                    node.inputs[i] = copy
            record_copy(ties, copy, t, uniform)


def _all_equal(values: np.ndarray) -> bool:
    """Every element equals the first (a look at the first few decides most weights without
    reading them whole)."""
    flat = values.reshape(-1)
    head = flat[:64]
    return bool(np.all(head == head[0])) and bool(np.all(flat == flat[0]))


# Ops that read a target shape, whose literal entries the rewrite sets: op -> its input slot.
_SHAPE_SLOTS = {"Reshape": 1, "Expand": 1, "ConstantOfShape": 0}


def _unshare_shape_targets(graph: gs.Graph) -> None:
    """Give each Reshape, Expand and ConstantOfShape its own copy of a run-time target built by
    ``Concat`` (through any ``Cast``/``Identity``).

    Exporters build the target of ``view(B, S, heads, head_dim)`` once and feed it to every view
    of that shape — dynamo does so across all layers when ``B`` and ``S`` are symbolic. The
    rewrite sets a target's literal entries (the heads) for one reader, so a shared target
    would make every layer's heads one decision, and the Reshape rule rightly refuses it: the
    heads froze. Copies of the small shape nodes change no number.
    """
    for reader in [n for n in graph.nodes if n.op in _SHAPE_SLOTS
                   and len(n.inputs) > _SHAPE_SLOTS[n.op]]:
        slot = _SHAPE_SLOTS[reader.op]
        chain: list[gs.Node] = []  # the target's producers, the reader's side first
        t = reader.inputs[slot]
        while len(t.inputs) == 1 and t.inputs[0].op in ("Cast", "Identity", "Concat"):
            chain.append(t.inputs[0])
            if chain[-1].op == "Concat":
                break
            t = chain[-1].inputs[0]
        if not chain or chain[-1].op != "Concat" \
                or all(len(n.outputs) == 1 and len(n.outputs[0].outputs) == 1 for n in chain):
            continue
        target = None
        for node in reversed(chain):  # the Concat first
            old = node.outputs[0]
            new = gs.Variable(f"{old.name}__spa_{reader.name}", dtype=old.dtype, shape=old.shape)
            inputs = list(node.inputs) if target is None else [target]
            graph.nodes.append(gs.Node(node.op, f"{node.name}__spa_{reader.name}",
                                       dict(node.attrs), inputs, [new], domain=node.domain))
            target = new
        reader.inputs[slot] = target


#: Marks the ``Gather`` nodes by which :func:`_select_shared_head_biases` gives each reader of a
#: shared attention bias its own heads (spa/coupling/rules/gather.py; the rewrite drops those
#: that keep every head: passes/rewrite.py).
SELECT = "__spa_select"


def _select_shared_head_biases(graph: gs.Graph) -> bool:
    """Give each layer its own view of an attention bias that several layers add to their
    scores: a ``Gather`` of all its heads (``arange(H)`` on axis 1) before each reader.

    T5 computes its relative position bias (with the mask added, ``[B, H, T, T]``) in its
    first layer and every later layer adds that same tensor to its scores; MPNet expands one
    for all of its layers. Read directly, the bias couples every layer's heads: a head could
    only go from all layers at once. Through its own Gather, each layer's heads go alone (the
    rewrite keeps the indices of the heads that layer kept; the bias itself stays whole).
    Copies change no number. A tensor qualifies when it is 4-D with a static head axis
    (axis 1, more than one head) and every reader is an ``Add`` whose other input is 4-D with
    as many heads. A constant (the bias of an export with static sizes, folded) qualifies only
    when each of those inputs is attention scores: a ``MatMul``'s output, scaled or not.
    True when any was found."""
    found = False
    outputs = {t.name for t in graph.outputs}
    for t in list(graph.tensors().values()):
        shape = t.shape
        if shape is None or len(shape) != 4 or not isinstance(shape[1], int) or shape[1] < 2 \
                or t.name in outputs:
            continue
        readers = list(t.outputs)
        if len(readers) < 2 or any(not _adds_to_heads(r, t, shape[1]) for r in readers):
            continue
        if isinstance(t, gs.Constant) and not all(_adds_to_scores(r, t) for r in readers):
            continue
        for r in readers:
            out = gs.Variable(f"{t.name}{SELECT}_{r.name}", dtype=t.dtype, shape=list(shape))
            idx = gs.Constant(f"{t.name}{SELECT}_{r.name}_indices",
                              np.arange(shape[1], dtype=np.int64))
            graph.nodes.append(gs.Node("Gather", f"{r.name}{SELECT}", {"axis": 1}, [t, idx],
                                       [out]))
            r.inputs[[i for i, x in enumerate(r.inputs) if x is t][0]] = out
        found = True
    return found


def _adds_to_heads(node: gs.Node, t: gs.Tensor, heads: int) -> bool:
    """``node`` adds ``t`` to another 4-D tensor of ``heads`` heads (an attention's scores)."""
    if node.op != "Add" or len(node.inputs) != 2:
        return False
    other = _other_input(node, t)
    return other is not t and other.shape is not None and len(other.shape) == 4 \
        and other.shape[1] == heads


def _adds_to_scores(node: gs.Node, t: gs.Tensor) -> bool:
    """The other input of the ``Add`` ``node`` is a ``MatMul``'s output, or one scaled by a
    ``Mul`` or ``Div``: attention scores."""
    other = _other_input(node, t)
    for _ in range(2):
        made = other.inputs[0] if other.inputs else None
        if made is None:
            return False
        if made.op == "MatMul":
            return True
        if made.op not in ("Mul", "Div"):
            return False
        other = made.inputs[0]
    return False


def _other_input(node: gs.Node, t: gs.Tensor) -> gs.Tensor:
    """The input of the two-input ``node`` that is not ``t`` (``t`` itself when it is both)."""
    return node.inputs[1] if node.inputs[0] is t else node.inputs[0]


def _refine_shapes(graph: gs.Graph) -> bool:
    """Fill in Reshape and Expand output dims that ONNX shape inference left unknown (a
    run-time target such as ``x.view(x.size(0), -1)``); True if any dim was filled."""
    changed = False
    for node in graph.nodes:
        if node.op == "Slice":
            changed |= _keep_unsliced_dims(node)
        if node.op not in ("Reshape", "Expand") or len(node.inputs) < 2 \
                or node.inputs[0].shape is None:
            continue
        out = node.outputs[0]
        in_shape = tuple(_static_dim(d) for d in node.inputs[0].shape)
        known = None if out.shape is None else tuple(_static_dim(d) for d in out.shape)
        entries = shape_entries(node.inputs[1])
        if node.op == "Reshape":
            names = tuple(d if isinstance(d, str) else None for d in node.inputs[0].shape)
            resolved = resolve_reshape(in_shape, entries, node.inputs[0].name, known, names)
        else:
            resolved = resolve_expand(in_shape, entries)
            if known is not None and resolved is not None and len(known) == len(resolved):
                resolved = tuple(k if k is not None else r for k, r in zip(known, resolved))
            changed |= _name_expanded_dims(node, entries)
        if resolved is None or resolved == known or None not in (known or (None,)):
            continue
        old = list(out.shape) if out.shape is not None else [None] * len(resolved)
        out.shape = [r if r is not None else o for r, o in zip(resolved, old)]
        changed = True
    return _fill_contracted_dims(graph) or changed


def _keep_unsliced_dims(node: gs.Node) -> bool:
    """Give a Slice's output the input's dims on the axes it does not slice. ONNX inference
    leaves every output dim unknown when a bound is computed at run time: a causal mask cut to
    the keys' length, ``mask[:, :, :, :total]``, loses its batch, and the attention scores it
    is added to lose theirs. Only static dims and names the model gave are copied (a made-up
    name is cleared for the next round). True if a dim was filled."""
    x, y = node.inputs[0], node.outputs[0]
    axes = node.inputs[3] if len(node.inputs) > 3 else None
    if x.shape is None or y.shape is None or len(x.shape) != len(y.shape) or axes is None \
            or not isinstance(axes, gs.Constant):
        return False
    rank = len(x.shape)
    sliced = {int(a) % rank for a in np.asarray(axes.values).reshape(-1)}
    shape, changed = list(y.shape), False
    for ax, d in enumerate(x.shape):
        if ax in sliced or not _unknown(shape[ax]) or _unknown(d):
            continue
        shape[ax] = d
        changed = True
    if changed:
        y.shape = shape
    return changed


def _unknown(d: object) -> bool:
    """A dim nothing is known of: missing, or a name ONNX inference made up."""
    return d is None or (isinstance(d, str) and d.startswith(_MADE_UP))


def _name_expanded_dims(node: gs.Node, entries: list[Entry] | None) -> bool:
    """Name the symbolic dims of an Expand's output that its target copies: an input dim named
    ``s`` (or of length 1) expanded to an entry read from a dim named ``s`` is ``s``. ONNX
    inference cannot read a target computed through ``Where`` and names such dims afresh
    (``unk__42``): transformers' ``repeat_kv`` expands ``[batch, kv, 1, total, d]`` to
    ``[batch, kv, n_rep, total, d]``, and the Reshape after it only regroups ``kv × n_rep`` when
    both sides show the same ``batch`` and ``total``. True if a dim was named."""
    x, out = node.inputs[0].shape, node.outputs[0].shape
    if x is None or out is None or entries is None or len(out) != len(entries) \
            or len(x) > len(out):
        return False
    x = [1] * (len(out) - len(x)) + list(x)
    named = list(out)
    for k, (d, e, o) in enumerate(zip(x, entries, out)):
        if _static_dim(o) is not None or not isinstance(e, DimRef) or e.symbol is None:
            continue
        if d == e.symbol or d == 1:
            named[k] = e.symbol
    if named == list(out):
        return False
    node.outputs[0].shape = named
    return True


def _fill_contracted_dims(graph: gs.Graph) -> bool:
    """Fill a dim that ONNX inference left unknown on one side of a MatMul's (or Gemm's)
    contraction where the other side's is static: the product runs only when the two are
    equal, so in every run of the model the unknown one has the other's length.

    TorchScript exports of Llama-style attention view the heads' output by the hidden state's
    leading dims, ``reshape(*hidden.shape[:-1], -1)``, and inference loses them through the
    mask and the rotary embedding: the ``Reshape`` gives ``[batch, sequence, ?]``. The output
    projection's weight ``[heads·head_dim, hidden]`` says the last dim is ``heads·head_dim``,
    which makes the merge of ``heads × head_dim`` readable (the leading dims then hold the rest,
    row by row). Products that disagree leave the dim unknown (the model could not run). The
    graph's inputs and outputs keep their declared shapes: they are the model's signature.
    True if a dim was filled."""
    found: dict[tuple[str, int], set[int]] = {}
    tensors: dict[str, gs.Tensor] = {}
    signature = {t.name for t in (*graph.inputs, *graph.outputs)}

    def require(t: gs.Tensor, axis: int, other: gs.Tensor, other_axis: int) -> None:
        s, o = t.shape, other.shape
        if t.name in signature or s is None or o is None or not (-len(s) <= axis < len(s)) \
                or not (-len(o) <= other_axis < len(o)):
            return
        length = o[other_axis]
        if _static_dim(s[axis]) is None and _static_dim(length) is not None:
            tensors[t.name] = t
            found.setdefault((t.name, axis % len(s)), set()).add(int(length))

    for node in graph.nodes:
        a, b = ([*node.inputs[:2], gs.Variable("")])[:2]
        axes = contracted_axes(node)
        if (node.domain or "") not in ("", "ai.onnx") or not (a.name and b.name) or axes is None:
            continue
        require(a, axes[0], b, axes[1])
        require(b, axes[1], a, axes[0])
    filled = False
    for (name, axis), lengths in found.items():
        if len(lengths) == 1:
            shape = list(tensors[name].shape)
            shape[axis] = lengths.pop()
            tensors[name].shape = shape
            filled = True
    return filled


def contracted_axes(node: gs.Node) -> tuple[int, int] | None:
    """The axes of input 0 and input 1 a MatMul or Gemm sums over (a MatMul by a vector sums
    its only axis); None for any other op."""
    if node.op == "MatMul" and len(node.inputs) > 1:
        return -1, -2 if len(node.inputs[1].shape or ()) >= 2 else 0
    if node.op == "Gemm":
        return (0 if int(node.attrs.get("transA", 0)) else 1,
                1 if int(node.attrs.get("transB", 0)) else 0)
    return None


def _static_dim(d: object) -> int | None:
    """A dim's length, None when symbolic or unknown."""
    return d if isinstance(d, int) and d >= 0 else None


def _constant_nodes_to_constants(graph: gs.Graph) -> None:
    """Replace each ``Constant`` node by a ``gs.Constant`` tensor of the same name."""
    for node in [n for n in graph.nodes
                 if n.op == "Constant" and (n.domain or "") in ("", "ai.onnx")]:
        values = _constant_node_value(node)
        if values is None:
            continue  # sparse or string constants stay nodes; rules see them as non-constant
        out = node.outputs[0]
        const = gs.Constant(out.name, values)
        node.outputs.clear()
        _replace_uses(graph, out, const)


def _replace_uses(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> None:
    """Make every reader of ``old`` (nodes and graph outputs) read ``new`` instead."""
    redirect(old, new)
    for i, t in enumerate(graph.outputs):
        if t is old:
            graph.outputs[i] = new


def _constant_node_value(node: gs.Node) -> np.ndarray | None:
    attrs = node.attrs
    if "value" in attrs:
        v = attrs["value"]
        return np.asarray(v.values) if isinstance(v, gs.Constant) else None
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32),
                       ("value_int", np.int64), ("value_ints", np.int64)):
        if key in attrs:
            return np.asarray(attrs[key], dtype=dtype)
    return None


def _bypass_constant_identities(graph: gs.Graph) -> None:
    """Make consumers of ``Identity(constant)`` read the constant directly."""
    for node in [n for n in graph.nodes if n.op == "Identity"]:
        src = node.inputs[0]
        if not isinstance(src, gs.Constant):
            continue
        out = node.outputs[0]
        if out in graph.outputs:
            continue
        node.outputs.clear()
        _replace_uses(graph, out, src)


def sort_nodes(graph: onnx.GraphProto) -> bool:
    """Put ``graph``'s nodes in topological order when they are not (onnxruntime's float16
    converter writes some after their readers; onnxruntime sorts them itself, onnx.checker
    refuses them): a stable order, each node as early as its inputs allow and otherwise as
    written. A node reads what its subgraphs read from outside them. Whether nodes moved;
    a cycle leaves them as they are, for the checker to name."""
    made = {o: k for k, node in enumerate(graph.node) for o in node.output if o}
    needs = [sorted({made[x] for x in _reads(node) if x in made and made[x] != k})
             for k, node in enumerate(graph.node)]
    if all(d < k for k, deps in enumerate(needs) for d in deps):
        return False
    waiting = [len(deps) for deps in needs]
    readers: dict[int, list[int]] = {}
    for k, deps in enumerate(needs):
        for d in deps:
            readers.setdefault(d, []).append(k)
    ready = [k for k, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        k = heapq.heappop(ready)
        order.append(k)
        for r in readers.get(k, ()):
            waiting[r] -= 1
            if waiting[r] == 0:
                heapq.heappush(ready, r)
    if len(order) != len(graph.node):
        return False
    nodes = [graph.node[k] for k in order]
    del graph.node[:]
    graph.node.extend(nodes)
    return True


def _reads(node: onnx.NodeProto) -> set[str]:
    """The names ``node`` reads: its inputs, and what the nodes of its subgraphs read."""
    names = set(node.input)
    for attr in node.attribute:
        for g in (*([attr.g] if attr.HasField("g") else []), *attr.graphs):
            for inner in g.node:
                names |= _reads(inner)
    return names


def _check_node_names(graph: onnx.GraphProto, name: str) -> None:
    """Node names are unique within each graph (ONNX IR: a node's name is its identity in the
    graph's namespace; onnxruntime refuses a repeat, SPA's plans name nodes). Empty names are
    not names. The checker does not test this."""
    ops: dict[str, list[str]] = {}
    for node in graph.node:
        if node.name:
            ops.setdefault(node.name, []).append(node.op_type)
        for sub in subgraphs(node):
            _check_node_names(sub, name)
    repeated = [(n, types) for n, types in ops.items() if len(types) > 1]
    if repeated:
        first, types = repeated[0]
        more = f"; {len(repeated) - 1} more names repeat" if len(repeated) > 1 else ""
        raise InvalidModelError(f"{name}: node name '{first}' is given to {len(types)} nodes "
                                f"({', '.join(types)}){more}; ONNX node names must be unique "
                                f"in a graph")


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs held by ``node``'s attributes (If branches, Loop and Scan bodies)."""
    out: list[onnx.GraphProto] = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out.append(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            out.extend(a.graphs)
    return out


def _check_tensor_sizes(model: onnx.ModelProto, name: str, mapped: MappedFile | None) -> None:
    """Each initializer's raw bytes match its dims (the checker runs on a weight-less copy).
    Lengths come from the file's layout when known (reading ``raw_data`` copies it)."""
    spans = mapped.spans if mapped is not None else {}
    for t in model.graph.initializer:
        if t.HasField("raw_data") and t.data_type != onnx.TensorProto.STRING:
            length = spans[t.name][1] if t.name in spans else len(t.raw_data)
            if length != raw_length(t.data_type, t.dims):
                raise ModelLoadError(f"{name}: tensor '{t.name}' holds {length} bytes, "
                                     f"not the {list(t.dims)} its shape says")


def _with_inferred_shapes(model: onnx.ModelProto, name: str,
                          error: type[Exception] = ModelLoadError, *, strict: bool = False
                          ) -> onnx.ModelProto:
    """Infer shapes on a weight-less copy (fast, and fine past 2 GB); keep them in ``model``.

    ``strict`` (a model as read): a node whose shapes conflict (a MatMul of ``[2, 8]`` by
    ``[12, 4]``, a declared shape that is not the inferred one) makes the model invalid, where
    lenient inference would leave its outputs unknown and the channels frozen. It is the
    inference of the full check (types checked too), which SPA's output passes.

    onnxruntime's contrib ops are seen as spa/ir/contrib.py says: their outputs' shapes come
    from onnxruntime, and ONNX inference then runs again to carry them to the ops after them.
    A model as read whose nodes are out of topological order is put in order first
    (:func:`sort_nodes`)."""
    if strict and sort_nodes(model.graph):
        log.info("%s: its nodes were not in topological order; read in that order", name)
    try:
        light = _without_constant_annotations(shape_stand_ins(onnx_view(weightless(model))))
        inferred = _with_contrib_shapes(_infer(light, strict), strict)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, ValueError) as exc:
        if strict:
            raise InvalidModelError(f"{name}: invalid model: shape inference finds a conflict: "
                                    f"{one_line(exc)}") from exc
        raise error(f"{name}: shape inference failed: {one_line(exc)}") from exc
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    del model.graph.output[:]
    model.graph.output.extend(inferred.graph.output)
    return model


def _without_constant_annotations(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` without the declared shapes of ``Constant`` node outputs: a constant's shape
    is its value's, the annotation adds nothing but can be wrong (onnxruntime-genai's builder
    declares its ``[1]`` constants as scalars, which onnxruntime runs and strict inference
    would call a conflict)."""
    constants = {o for n in model.graph.node
                 if n.op_type == "Constant" and n.domain in ("", "ai.onnx") for o in n.output}
    kept = [vi for vi in model.graph.value_info if vi.name not in constants]
    if len(kept) < len(model.graph.value_info):
        del model.graph.value_info[:]
        model.graph.value_info.extend(kept)
    return model


def with_contrib_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` (its ONNX shapes inferred) or, when it has contrib ops (onnxruntime's
    default-domain ones too, seen as spa/ir/contrib.py says), a copy with their outputs'
    shapes too: onnx's inference knows none of them, and a rewritten model's MatMulNBits would
    count no multiply-adds."""
    light = onnx_view(weightless(model))
    if not has_contrib(light):
        return model
    shaped = _with_contrib_shapes(light, strict=False)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.value_info[:]
    copy.graph.value_info.extend(shaped.graph.value_info)
    return copy


def _with_contrib_shapes(inferred: onnx.ModelProto, strict: bool) -> onnx.ModelProto:
    """``inferred`` with the shapes of its contrib ops' outputs (spa/ir/contrib.py) and what
    ONNX inference then carries on, round by round until nothing is added. Shapes that conflict
    with the rest are dropped: their outputs stay unknown (what they touch freezes), the model
    is not refused for what onnxruntime's inference said."""
    for _ in range(_CONTRIB_ROUNDS):
        contrib = contrib_shapes(inferred)
        if not contrib:
            break
        known = {vi.name for vi in contrib}
        extended = onnx.ModelProto()
        extended.CopyFrom(inferred)
        kept = [vi for vi in extended.graph.value_info if vi.name not in known]
        del extended.graph.value_info[:]
        extended.graph.value_info.extend(kept + contrib)
        try:
            inferred = _infer(extended, strict)
        except (onnx.shape_inference.InferenceError, ValueError) as exc:
            log.info("contrib op shapes conflict with ONNX inference (%s): left unknown",
                     one_line(exc))
            break
    return inferred


def _infer(model: onnx.ModelProto, strict: bool) -> onnx.ModelProto:
    """ONNX inference with data propagation (strict: conflicts raise). Strict inference with
    data propagation fails on valid subgraphs: onnx 1.23 calls the ``then`` and ``else``
    branches' nodes that share a name a conflict ("Data for input 0 already exists"; 🤗
    Optimum's merged decoders, whose If holds the decoder with and without a cache). A model
    with subgraphs is then valid when strict inference without data propagation passes, and
    its shapes are the lenient inference's, with it."""
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=strict, strict_mode=strict,
                                                 data_prop=True)
    except onnx.shape_inference.InferenceError:
        if not strict or not any(subgraphs(n) for n in model.graph.node):
            raise
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=False)
    return onnx.shape_inference.infer_shapes(model, data_prop=True)


def weightless(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with each large initializer replaced by a typed graph input of its shape."""
    light = onnx.ModelProto()
    light.ir_version = max(model.ir_version, 4)  # IR 4+: initializers need not be inputs
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    src, g = model.graph, light.graph
    g.name = src.name
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    declared = {i.name for i in src.input}
    for init in src.initializer:
        if np.prod(init.dims, dtype=np.int64) <= _SMALL_TENSOR \
                and not external_data_helper.uses_external_data(init):
            g.initializer.append(init)
        elif init.name not in declared:
            g.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type,
                                                              list(init.dims)))
    return light


def _header_of(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every field of ``model`` but its graph (a whole copy would copy every weight first)."""
    if unknown_fields(model):  # copied field by field, they would be lost
        header = onnx.ModelProto()
        header.CopyFrom(model)
        header.ClearField("graph")
        return header
    return copy_without(model, "graph")


def _data_files(path: Path, model: onnx.ModelProto) -> tuple[Path, ...]:
    seen: dict[str, Path] = {}
    for tensor in external_data_helper._get_all_tensors(model):
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value not in seen:
                seen[entry.value] = path.parent / entry.value
    return tuple(f for f in seen.values() if f.is_file())


__all__ = ["LoadedModel", "load_model", "load_proto", "normal_graph"]
