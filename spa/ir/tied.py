"""Tied constants: one tensor of the file that the normal form holds twice, joined again on export.

Normal form gives a reader its own constant in two cases, and the file's tensor may still be
read by others:

* a layout op of a constant (``Transpose``, ``Cast``, ``Reshape``, …) is folded
  (spa/ir/fold.py): the result is a new constant, a *view* of its source — HuggingFace's tied
  ``lm_head`` is ``MatMul(x, Transpose(wte))`` beside the embedding's ``Gather(wte, ids)``;
* a vector, or a tensor of one repeated value, read by several nodes is copied per reader
  (spa/ir/load.py, ``_unshare_constants``): each copy is a *copy* of its source.

A :class:`Tie` records how a derived constant came from its source. The rule, on export and in
every count: **a derived parameter whose values still equal its derivation from its source's
values is written as that derivation** — a copy as the source itself, a view as its layout
nodes reading the source — never as a second tensor. So each tensor of the file is counted
once, and written once. The coupling analysis (spa/coupling/tied.py) couples a view's axes with
its source's, so that pruning slices both alike; copies stay uncoupled (their readers may be
unrelated), and are joined again where their sliced values agree. A derived constant whose
values differ (its source is gone, or a compensation changed one of them) is written as itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from spa.ir.fold import LAYOUT_FOLDERS, redirect
from spa.ir.params import graph_constants, is_parameter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Step:
    """One folded layout op: its type, attributes, constant inputs after the first (name and
    value), the name of the node it was, and the shape it produced."""

    op: str
    attrs: dict = field(compare=False)
    args: tuple[tuple[str, np.ndarray], ...] = field(compare=False)
    node: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Tie:
    """The constant keyed by this tie is ``source`` through ``steps`` (none: a copy);
    ``uniform`` when every element is one value (a copy of zeros stays equal when sliced)."""

    source: str
    steps: tuple[Step, ...] = ()
    uniform: bool = False

    @property
    def is_copy(self) -> bool:
        return not self.steps


Ties = dict[str, Tie]  # derived constant's name → how it derives from its source


def record_view(ties: Ties, node: gs.Node, const: gs.Constant) -> None:
    """Record that ``const`` is layout node ``node`` of its constant first input (a parameter
    only: folded shape arithmetic is no weight)."""
    if not is_parameter(const):
        return
    args = tuple((t.name, np.asarray(t.values)) for t in node.inputs[1:] if t.name)
    step = Step(node.op, dict(node.attrs), args, node.name, tuple(const.shape))
    ties[const.name] = Tie(node.inputs[0].name, (step,))


def record_copy(ties: Ties, copy: gs.Constant, source: gs.Constant, uniform: bool) -> None:
    if is_parameter(copy):
        ties[copy.name] = Tie(source.name, (), uniform)


def resolve(ties: Ties, graph: gs.Graph) -> Ties:
    """The ties of ``graph``'s constants, each to its nearest ancestor still in the graph (a
    view of a view whose middle constant was dropped is a two-step view); ties whose source
    chain leaves the graph are dropped."""
    constants = graph_constants(graph)
    out: Ties = {}
    for name in sorted(n for n in ties if n in constants):
        tie, uniform = ties[name], ties[name].uniform
        steps = tie.steps
        while tie.source not in constants and tie.source in ties:
            tie = ties[tie.source]
            steps = tie.steps + steps
        if tie.source in constants and tie.source != name:
            out[name] = Tie(tie.source, steps, uniform)
    return out


def live(ties: Ties, graph: gs.Graph) -> Ties:
    """The ties whose derived constant and source are both constants of ``graph`` (or of its
    subgraphs: a body that reads a vector by name gets its own copy)."""
    constants = graph_constants(graph)
    return {n: t for n, t in ties.items() if n in constants and t.source in constants}


def tied_names(ties: Ties, graph: gs.Graph) -> set[str]:
    """Every constant of ``graph`` that is one side of a live tie."""
    return {n for name, t in live(ties, graph).items() for n in (name, t.source)}


def steps_for(tie: Tie, shape: tuple[int, ...]) -> tuple[Step, ...]:
    """The steps that make a derived constant of ``shape`` now: a last ``Reshape``/``Expand``
    whose output was pruned targets the pruned shape (its other steps never change, see
    spa/coupling/tied.py)."""
    last = tie.steps[-1] if tie.steps else None
    if last is None or last.shape == shape or last.op not in ("Reshape", "Expand"):
        return tie.steps
    target = ((last.args[0][0], np.asarray(shape, dtype=np.int64)),)
    return (*tie.steps[:-1], Step(last.op, last.attrs, target, last.node, shape))


def derive(steps: tuple[Step, ...], values: np.ndarray) -> np.ndarray:
    """``values`` through ``steps``, as spa/ir/fold.py evaluated them."""
    for s in steps:
        out = LAYOUT_FOLDERS[s.op](gs.Node(s.op, attrs=s.attrs), [values, *(v for _, v in s.args)])
        # Only Expand declines (past a size), and a step folded once folds no larger tensor again.
        assert out is not None, f"{s.op} step '{s.node}' no longer folds"
        values = out
    return np.asarray(values)


def still_equal(tie: Tie, derived: gs.Constant, source: gs.Constant) -> bool:
    """``derived`` holds what ``source`` gives through the tie's steps."""
    mine = np.asarray(derived.values)
    try:
        theirs = derive(steps_for(tie, tuple(mine.shape)), np.asarray(source.values))
    except ValueError:  # a pruned shape the steps no longer fit
        return False
    return theirs.dtype == mine.dtype and np.array_equal(theirs, mine)


def join_ties(graph: gs.Graph, ties: Ties) -> int:
    """Write each live tie that still holds as its derivation (copies first: a copy of a
    view joins the view's constant before that becomes the output of its layout nodes).
    Returns how many derived constants are gone."""
    ordered = sorted(live(ties, graph).items(), key=lambda kv: (not kv[1].is_copy, kv[0]))
    constants = graph_constants(graph)
    joined = 0
    for name, tie in ordered:
        derived, source = constants[name], constants[tie.source]
        if not still_equal(tie, derived, source):
            # Copies pruned apart are two tensors now; a view pruned apart is not expected
            # (the analysis couples it), but a weight update could do it.
            (log.debug if tie.is_copy else log.warning)(
                "'%s' no longer equals %s of '%s': written as a tensor of its own", name,
                "a copy" if tie.is_copy else "its view", tie.source)
            continue
        if tie.is_copy:
            redirect(derived, source)
            constants[name] = source  # a view of the copy reads its source
        else:
            redirect(derived, _layout_nodes(graph, tie, derived, source))
        joined += 1
    if joined:
        graph.cleanup(remove_unused_graph_inputs=False).toposort(mode="nodes")
    return joined


def _layout_nodes(graph: gs.Graph, tie: Tie, derived: gs.Constant, source: gs.Constant
                  ) -> gs.Variable:
    """Append the tie's layout nodes reading ``source``; return their output (``derived``'s
    name, dtype and shape)."""
    tensors = graph.tensors()
    node_names = {n.name for n in graph.nodes}
    steps = steps_for(tie, tuple(derived.shape))
    x: gs.Tensor = source
    for k, s in enumerate(steps):
        last = k == len(steps) - 1
        y = gs.Variable(derived.name if last else f"{derived.name}__spa_tie{k}",
                        dtype=derived.dtype if last else None, shape=list(s.shape))
        args = [_arg(tensors, name, value) for name, value in s.args]
        name = s.node if s.node not in node_names else f"{s.node}__spa_tie"
        graph.nodes.append(gs.Node(s.op, name, dict(s.attrs), [x, *args], [y]))
        node_names.add(name)
        x = y
    return x


def _arg(tensors: dict[str, gs.Tensor], name: str, value: np.ndarray) -> gs.Constant:
    """The graph's constant ``name`` when it holds ``value``, else a new one."""
    t = tensors.get(name)
    if isinstance(t, gs.Constant) and np.array_equal(np.asarray(t.values), value):
        return t
    fresh = name if t is None else f"{name}__spa_tie"
    tensors[fresh] = gs.Constant(fresh, value)
    return tensors[fresh]
