"""Rewrite: the one mutating step. Applies a plan to the analysed graph, deciding nothing.

First the compensated weights (passes/compensation.py's :class:`WeightUpdates`, full size) are
written. Then, for every channel space the plan shortens: a constant is sliced along the axis
(``np.take`` of the surviving indices), an activation loses its stale shape (shapes are inferred
afresh on export). Each node whose tensors changed runs its rule's rewrite hook (``group`` of
grouped convolutions, Reshape/Split/Slice/Resize constants). Constants orphaned by a hook are
removed. Then the dropped residual blocks (depth pruning) are rewired past: ``Add(x, f)`` → ``x``.
Last, FLAP's bias shifts (:class:`BiasShifts`) are added to the surviving outputs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from spa.coupling.types import KeptLookup
from spa.ir.load import SELECT
from spa.passes.blocks import FUSED_RESIDUAL, SKIP_EPSILON, SUM
from spa.passes.compensation import add_bias_shifts
from spa.plan import kept_indices

if TYPE_CHECKING:
    from spa.coupling.analysis import Analysis
    from spa.passes.compensation import BiasShifts, WeightUpdates
    from spa.plan import Plan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rewritten:
    """What the rewrite changed: channel spaces sliced, layers compensated (weights, biases)."""

    spaces: int
    compensated: int


class Rewrite:
    """``Rewrite().run(analysis, plan, weights=…, shifts=…)`` mutates ``analysis.model.graph``
    in place."""

    def run(self, analysis: Analysis, plan: Plan, *, weights: WeightUpdates | None = None,
            shifts: BiasShifts | None = None) -> Rewritten:
        plan.check_against(analysis)
        graph = analysis.model.graph
        tensors = graph.tensors()
        for name, values in (weights.values.items() if weights is not None else ()):
            tensors[name].values = values
        kept = kept_indices(analysis, plan)
        changed_tensors: set[str] = set()
        # Graph inputs and outputs that change (KV-cache pairs, spa/coupling/analysis.py) keep
        # their declared shape but for the pruned axis; other activations are inferred again.
        signature = {t.name for t in (*graph.inputs, *graph.outputs)}
        for (name, axis), idx in sorted(kept.items()):
            t = tensors.get(name)
            if t is None:
                continue  # a virtual space (a grouped conv's group axis)
            changed_tensors.add(name)
            if isinstance(t, gs.Constant):
                t.values = np.take(np.asarray(t.values), idx, axis=axis)
            elif name in signature:
                t.shape = [*t.shape[:axis], len(idx), *t.shape[axis + 1:]]
            else:
                t.shape = None
        lookup = KeptLookup(kept, analysis.lengths)
        for node in graph.nodes:
            hook = analysis.hooks.get(node.name)
            if hook is not None and any(t.name in changed_tensors
                                        for t in (*node.inputs, *node.outputs)):
                hook(node, lookup)
        drop_blocks(graph, plan)
        _drop_whole_selects(graph)
        graph.cleanup(remove_unused_graph_inputs=False)
        log.info("rewrote %d channel spaces", len(kept))
        compensated = weights.layers if weights is not None else 0
        if shifts is not None:
            compensated += add_bias_shifts(analysis, plan, shifts)
        return Rewritten(len(kept), compensated)


def _drop_whole_selects(graph: gs.Graph) -> None:
    """The loader's per-layer views of a shared attention bias (spa/ir/load.py ``SELECT``)
    that still take every head read the bias itself again: the written model has them only
    where a layer lost heads."""
    for node in [n for n in graph.nodes if n.name.endswith(SELECT)]:
        data, idx = node.inputs[0], node.inputs[1]
        heads = data.shape[1] if data.shape is not None and len(data.shape) > 1 else None
        if isinstance(idx, gs.Constant) and isinstance(heads, int) \
                and np.array_equal(np.asarray(idx.values).reshape(-1), np.arange(heads)):
            _reroute(node.outputs[0], data)


def drop_blocks(graph: gs.Graph, plan: Plan) -> None:
    """Depth pruning: each dropped block's ``Add(x, f)`` becomes ``x`` (its readers read ``x``;
    an ``Add`` that writes a graph output becomes ``Identity(x)``, keeping the output's name),
    and the KV caches its branch reads and writes leave the graph's inputs and outputs. The
    branch is left dead for the cleanup."""
    nodes = {n.name: n for n in graph.nodes}
    outputs = {id(t) for t in graph.outputs}
    for b in plan.dropped:
        add = nodes[b.add]
        # the stream: ``b.stream``, or what an earlier dropped block rewired it to
        x = next(t for t in add.inputs[:2] if t.name != b.branch)
        if add.op in FUSED_RESIDUAL:
            _unfuse(add, x)
            continue
        out = add.outputs[0]
        if id(out) in outputs:
            add.op = "Identity"
            add.inputs.clear()
            add.inputs.append(x)
            continue
        _reroute(out, x)
        add.outputs.clear()
    gone = {name for b in plan.dropped for pair in b.caches for name in pair}
    if gone:  # KV caches of dropped attention branches leave the signature
        graph.inputs = [t for t in graph.inputs if t.name not in gone]
        graph.outputs = [t for t in graph.outputs if t.name not in gone]
    if plan.dropped:
        log.info("dropped %d residual blocks", len(plan.dropped))


def _reroute(out: gs.Tensor, x: gs.Tensor) -> None:
    """Every reader of ``out`` reads ``x`` instead."""
    for reader in list(out.outputs):
        for i, t in enumerate(reader.inputs):
            if t is out:
                reader.inputs[i] = x


def _unfuse(node: gs.Node, x: gs.Tensor) -> None:
    """A fused residual norm whose branch is dropped (passes/blocks.py): the plain norm of the
    stream ``x`` (same epsilon, gamma, beta; its bias went with the branch), and the readers of
    its sum output read ``x``."""
    plain = FUSED_RESIDUAL[node.op][0]
    if len(node.outputs) > SUM:
        _reroute(node.outputs[SUM], x)
    params = [node.inputs[2]]
    if plain == "LayerNormalization" and len(node.inputs) > 3 and node.inputs[3].name:
        params.append(node.inputs[3])  # beta
    attrs: dict[str, object] = {"axis": -1,
                                "epsilon": float(node.attrs.get("epsilon", SKIP_EPSILON))}
    if plain == "SimplifiedLayerNormalization":
        attrs["stash_type"] = 1
    out = node.outputs[0]
    node.inputs.clear()
    node.inputs.extend([x, *params])
    node.outputs.clear()
    node.outputs.append(out)
    node.op, node.domain, node.attrs = plain, "", attrs
