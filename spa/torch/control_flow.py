"""ONNX's control flow (If, Loop, Scan) and its sequence and optional ops in torch, for
``spa.torch.from_onnx``.

Subgraphs are compiled once, with the module, each into a :class:`Body`: its nodes as steps and
its *free names*, the values it reads from enclosing scopes (also through the subgraphs nested
in it): ``(names its nodes and outputs read − names it defines) ∪ its initializers' keys``.
A node's subgraphs' free names are appended to its inputs, as onnxruntime's implicit inputs,
so the node receives their values as it does its other inputs and hands them to the body it
runs; one walk (:func:`spa.torch.interpreter.run_nodes`) serves every level, and an If in a
Loop body reads a value two scopes out through the Loop's inputs. A subgraph's initializers
are the module's tensors like the main graph's (float ones parameters, in ``onnx_tensors()``)
and reach it the same way, as free names: under their own name, or ``name@k`` for a second
initializer of one name (two branches may each hold a ``one``). Gradients flow through the
branch taken and through every iteration.

ONNX forbids a subgraph to define a name visible from outside it. A subgraph's initializer
that does is refused up front: onnxruntime reads the outer value or the initializer,
depending on what the node's other subgraphs read. A subgraph input that does hides the outer
value, as in onnxruntime.

Semantics, as onnxruntime runs them:

* ``If(cond)``: the outputs of the branch that ``cond`` picks.
* ``Loop(M, cond, v…)``: ``body(i, cond, v…) → (cond, v…, scan…)`` while ``i < M`` (when M
  is given) and ``cond`` holds: the given one first (true when absent), then the body's.
  onnxruntime reads the body's condition even when the cond input is absent, where the spec
  says to ignore it; so does this. Outputs: the last ``v…``, each scan output's values stacked
  on a new first axis.
* ``Scan(state…, xs…)`` (opset 9 on; opset 8's batched form is refused): step ``t`` of ``T``
  gives the body slice ``t`` of each scan input along its ``scan_input_axes`` entry (slice
  ``T−1−t`` where ``scan_input_directions`` is 1); the body's scan outputs are stacked along
  ``scan_output_axes``, in reverse order where ``scan_output_directions`` is 1.
* A loop that runs zero times has empty scan outputs of the shape the body declares (``[0]``
  when it declares none, where onnxruntime infers one).
* A sequence is a Python list of tensors; an optional is its value, or None when empty.
  ``SequenceMap`` runs its body on each position: sequence inputs give their element there,
  tensors themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import onnx
import torch

from spa.coupling.registry import LATEST
from spa.ir.load import subgraphs
from spa.torch.arrays import DTYPES
from spa.torch.interpreter import (
    TORCH_OPS,
    Step,
    UnsupportedOpsError,
    Value,
    attributes,
    op,
    run_nodes,
)

#: stores a subgraph's initializer among the module's tensors under the name given
Keep = Callable[[str, onnx.TensorProto], None]


@dataclass(frozen=True, eq=False)
class Body:
    """A compiled subgraph."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    steps: tuple[Step, ...]
    consts: Mapping[str, str]  # its initializers: local name → name among the module's tensors
    free: tuple[str, ...]  # what it reads from enclosing scopes, sorted
    empty: tuple[torch.Tensor, ...]  # per output: an empty stack of its declared shape

    def run(self, scope: Mapping[str, Value], *inputs: Value) -> list[Value]:
        """The outputs for ``inputs``, reading ``scope`` (values of at least :attr:`free`)."""
        env = dict(scope)
        env.update({local: scope[key] for local, key in self.consts.items()})
        env.update(zip(self.inputs, inputs))
        run_nodes(self.steps, env)
        return [env[o] for o in self.outputs]


def all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """The nodes of ``graph`` and of every subgraph in it, at any depth."""
    for node in graph.node:
        yield node
        for sub in subgraphs(node):
            yield from all_nodes(sub)


def compile_nodes(graph: onnx.GraphProto, opset: int, keep: Keep) -> list[Step]:
    """The steps of ``graph``'s nodes (every op has a torch function at ``opset``: checked up
    front), subgraphs compiled; ``keep`` stores their initializers."""
    main = frozenset(_defined_here(graph))
    return list(_Compiler(graph, opset, keep).steps(graph, main))


def subgraph_initializers(graph: onnx.GraphProto, opset: int) -> dict[str, onnx.TensorProto]:
    """Every subgraph initializer of ``graph``, by the name the module keeps it under (so that
    trained values can be written back into the model's own protos)."""
    found: dict[str, onnx.TensorProto] = {}
    if any(subgraphs(node) for node in graph.node):  # else nothing to compile for
        compile_nodes(graph, opset, found.__setitem__)
    return found


def _defined_here(graph: onnx.GraphProto) -> Iterator[str]:
    """The names ``graph`` itself defines: inputs, initializers, node outputs."""
    yield from (i.name for i in graph.input)
    yield from (i.name for i in graph.initializer)
    yield from (o for node in graph.node for o in node.output if o)


def _defined(graph: onnx.GraphProto) -> Iterator[str]:
    """The names ``graph`` and its subgraphs define."""
    yield from _defined_here(graph)
    for node in graph.node:
        for sub in subgraphs(node):
            yield from _defined(sub)


class _Compiler:
    def __init__(self, graph: onnx.GraphProto, opset: int, keep: Keep):
        self.opset, self.keep = opset, keep
        self.names = set(_defined(graph))
        self.kept: set[str] = set()  # the names subgraphs' initializers are kept under

    def steps(self, graph: onnx.GraphProto, visible: frozenset[str]) -> Iterator[Step]:
        """``visible``: the names defined in ``graph`` and the scopes around it."""
        for node in graph.node:
            fn = TORCH_OPS.lookup(node.domain, node.op_type, self.opset)
            assert fn is not None, node.op_type  # _check_supported ran
            attrs = {k: self.body(v, visible) if isinstance(v, onnx.GraphProto) else v
                     for k, v in attributes(node).items()}
            yield fn, [*node.input, *implicit_inputs(attrs)], list(node.output), attrs

    def body(self, graph: onnx.GraphProto, outer: frozenset[str]) -> Body:
        """``graph`` compiled, ``outer`` the names visible around it."""
        shadowing = sorted(i.name for i in graph.initializer if i.name in outer)
        if shadowing:
            raise UnsupportedOpsError(
                f"subgraph {graph.name}: its initializers {', '.join(shadowing)} shadow values "
                "of an enclosing graph, which ONNX forbids (onnxruntime reads either, "
                "depending on what the node's other subgraphs read)")
        consts = {i.name: self.constant(i) for i in graph.initializer}
        inputs = tuple(i.name for i in graph.input)
        outputs = tuple(o.name for o in graph.output)
        own = {*inputs, *consts, *(o for n in graph.node for o in n.output if o)}
        steps = tuple(self.steps(graph, outer | own))
        read = {i for _, ins, _, _ in steps for i in ins if i} | set(outputs)
        free = tuple(sorted((read - own) | set(consts.values())))
        empty = tuple(_empty(o.type) for o in graph.output)
        return Body(inputs, outputs, steps, consts, free, empty)

    def constant(self, init: onnx.TensorProto) -> str:
        """Keep a subgraph's initializer under its name, or, when another subgraph's has
        kept that, under ``name@k``, a name no value of the model has."""
        name, k = init.name, 0
        while name in self.kept or (k and name in self.names):
            k += 1
            name = f"{init.name}@{k}"
        self.kept.add(name)
        self.keep(name, init)
        return name


def _empty(kind: onnx.TypeProto) -> torch.Tensor:
    """No values stacked of the tensor type ``kind``: shape ``[0, *dims]`` (``[0]`` when a
    dim is unknown)."""
    tensor = kind.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
    shape = [0, *dims] if tensor.HasField("shape") and -1 not in dims else [0]
    return torch.zeros(shape, dtype=DTYPES.get(tensor.elem_type, torch.float32))


def implicit_inputs(attrs: Mapping) -> tuple[str, ...]:
    """The outer values a node's subgraphs read, in the order they follow its own inputs."""
    bodies = [b for b in attrs.values() if isinstance(b, Body)]
    return tuple(sorted({name for b in bodies for name in b.free}))


def _scope(a: dict, x: list) -> tuple[list, dict[str, Value]]:
    """A node's own inputs, and the outer values its subgraphs read, by name."""
    names = implicit_inputs(a)
    own = len(x) - len(names)
    return x[:own], dict(zip(names, x[own:]))


def _device(values: list) -> torch.device:
    return next((v.device for v in values if isinstance(v, torch.Tensor)), torch.device("cpu"))


def _stacked(values: list, axis: int, empty: torch.Tensor, device: torch.device
             ) -> torch.Tensor:
    """A scan output: ``values`` stacked on a new ``axis``; ``empty`` when there are none."""
    if not values:
        return (empty.movedim(0, axis) if empty.dim() > 1 else empty).to(device)
    return torch.stack(values, axis)


# ---- If, Loop, Scan -------------------------------------------------------------------------
@op("If")
def _if(a, x):
    (cond,), scope = _scope(a, x)
    return tuple(a["then_branch" if bool(cond) else "else_branch"].run(scope))


@op("Loop")
def _loop(a, x):
    (trips, cond, *carried), scope = _scope(a, x)
    body: Body = a["body"]
    device = _device([trips, cond, *carried, *scope.values()])
    limit = None if trips is None else int(trips)
    going = True if cond is None else bool(cond)
    scans: list[list[Value]] = []
    i = 0
    while going and (limit is None or i < limit):
        out = body.run(scope, torch.tensor(i, device=device),
                       torch.tensor(going, device=device), *carried)
        going = bool(out[0])
        carried = out[1:1 + len(carried)]
        scans.append(out[1 + len(carried):])
        i += 1
    first = 1 + len(carried)
    stacks = [_stacked([s[k] for s in scans], 0, body.empty[first + k], device)
              for k in range(len(body.outputs) - first)]
    return (*carried, *stacks)


@op("Scan", opsets=(9, LATEST))
def _scan(a, x):
    explicit, scope = _scope(a, x)
    body: Body = a["body"]
    m = int(a["num_scan_inputs"])
    n = len(explicit) - m
    state, xs = explicit[:n], explicit[n:]
    in_axes = a.get("scan_input_axes", [0] * m)
    in_back = a.get("scan_input_directions", [0] * m)
    steps = xs[0].shape[in_axes[0]]
    slices = []
    for t in range(steps):
        ins = [s.select(ax, steps - 1 - t if back else t)
               for s, ax, back in zip(xs, in_axes, in_back)]
        out = body.run(scope, *state, *ins)
        state, step_out = out[:n], out[n:]
        slices.append(step_out)
    k = len(body.outputs) - n
    out_axes = a.get("scan_output_axes", [0] * k)
    out_back = a.get("scan_output_directions", [0] * k)
    stacks = []
    for j, (axis, back) in enumerate(zip(out_axes, out_back)):
        values = [s[j] for s in (reversed(slices) if back else slices)]
        stacks.append(_stacked(values, axis, body.empty[n + j], xs[0].device))
    return (*state, *stacks)


# ---- sequences and optionals ----------------------------------------------------------------
def _position(p: torch.Tensor | None, length: int, default: int) -> int:
    """A sequence position: negative counts from the end."""
    i = default if p is None else int(p)
    return i + length if i < 0 else i


@op("SequenceConstruct")
def _sequence_construct(a, x):
    return list(x)


@op("SequenceEmpty")
def _sequence_empty(a, x):
    return []


@op("SequenceAt")
def _sequence_at(a, x):
    return x[0][_position(x[1], len(x[0]), 0)]


@op("SequenceInsert")
def _sequence_insert(a, x):
    out = list(x[0])
    out.insert(_position(x[2] if len(x) > 2 else None, len(out), len(out)), x[1])
    return out


@op("SequenceErase")
def _sequence_erase(a, x):
    out = list(x[0])
    del out[_position(x[1] if len(x) > 1 else None, len(out), -1)]
    return out


@op("SequenceLength")
def _sequence_length(a, x):
    return torch.tensor(len(x[0]), dtype=torch.int64)


@op("SplitToSequence")
def _split_to_sequence(a, x):
    """Pieces of ``split`` (one length for all, the last shorter; or one per piece) along
    ``axis``; without it, pieces of 1, the axis dropped unless ``keepdims``."""
    t, axis = x[0], int(a.get("axis", 0))
    split = x[1] if len(x) > 1 else None
    if split is None:
        parts = torch.split(t, 1, axis)
        return list(parts) if a.get("keepdims", 1) else [p.squeeze(axis) for p in parts]
    sizes = int(split) if split.dim() == 0 else [int(s) for s in split.tolist()]
    return list(torch.split(t, sizes, axis))


@op("ConcatFromSequence")
def _concat_from_sequence(a, x):
    axis = int(a["axis"])
    return torch.stack(x[0], axis) if a.get("new_axis", 0) else torch.cat(x[0], axis)


@op("SequenceMap")
def _sequence_map(a, x):
    (seq, *extra), scope = _scope(a, x)
    body: Body = a["body"]
    rows = [body.run(scope, item, *[e[i] if isinstance(e, list) else e for e in extra])
            for i, item in enumerate(seq)]
    return tuple(list(column) for column in zip(*rows)) if rows else \
        tuple([] for _ in body.outputs)


@op("Optional")
def _optional(a, x):
    return x[0] if x else None


@op("OptionalHasElement")
def _optional_has_element(a, x):
    return torch.tensor(bool(x) and x[0] is not None)


@op("OptionalGetElement")
def _optional_get_element(a, x):
    if x[0] is None:
        raise ValueError("OptionalGetElement of an empty optional")
    return x[0]
