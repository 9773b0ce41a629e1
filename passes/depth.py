"""Depth pruning: which residual blocks (passes/blocks.py) to drop, and the plan that drops them.

Each candidate block gets one measured score, lowest dropped first:

* ``damage`` (default): the final-output damage of blocks zeroed (their last layer's weights
  and biases set to 0, which is exactly what dropping them does), on calibration or synthetic
  inputs: ``‖y − y_dense‖² / ‖y_dense‖²``, measured by passes/sensitivity.py. Selection is
  greedy: each step drops the block whose removal, together with those already dropped,
  damages least (blocks interact: the damage of two is not the sum of theirs), and the score
  recorded is that joint damage;
* ``cosine``: ShortGPT's block influence, ``1 − cos(x, x + f)`` of the block's input and output
  along the channel axis, averaged over positions and samples.

``--drop-blocks N`` drops the N lowest; ``--depth-ratio R`` drops ``round(R · candidates)``.
:func:`with_depth` puts the choice into a width plan: channel groups that lie wholly inside
dropped branches are left unpruned (they go with the branch), and the prediction counts the
model without the dead nodes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import onnx

from spa import validate as val
from spa.calibration import spread
from spa.choices import DepthCriterion
from spa.errors import OptionError
from spa.metrics import CostModel
from spa.passes.blocks import Block, Blocks, FindBlocks, dead_nodes
from spa.passes.segments import with_types
from spa.passes.sensitivity import batch_limit, zeroed_damage
from spa.plan import DroppedBlock, GroupPlan, Plan, Prediction, kept_indices

if TYPE_CHECKING:
    from spa.coupling.analysis import Analysis

log = logging.getLogger(__name__)
SAMPLES = 32


@dataclass(frozen=True)
class DepthChoice:
    """The candidate blocks, each one's score (by ``Add`` node) and the blocks dropped."""

    blocks: Blocks
    scores: Mapping[str, float]
    dropped: tuple[DroppedBlock, ...]


class Depth:
    """``Depth(count=…, ratio=…, criterion=…).run(analysis, original, inputs)``."""

    def __init__(self, *, count: int | None = None, ratio: float | None = None,
                 criterion: DepthCriterion = DepthCriterion.DAMAGE, samples: int = SAMPLES):
        self.count, self.ratio, self.criterion, self.samples = count, ratio, criterion, samples

    def run(self, analysis: Analysis, original: onnx.ModelProto,
            inputs: Mapping[str, np.ndarray]) -> DepthChoice:
        blocks = FindBlocks().run(analysis)
        n = self.how_many(len(blocks.candidates), blocks)
        if n == 0:
            return DepthChoice(blocks, {}, ())
        if self.criterion is DepthCriterion.DAMAGE:
            scores = self.greedy(analysis, original, blocks.candidates, inputs, n)
            picked = list(scores)[:n]
        else:
            scores = dict(zip((b.add for b in blocks.candidates),
                              [1.0 - c for c in cosines(original, blocks.candidates, inputs,
                                                        analysis, samples=self.samples)]))
            picked = sorted(scores, key=lambda a: scores[a])[:n]
        by_add = blocks.by_add()
        chosen = sorted(blocks.candidates.index(by_add[a]) for a in picked)
        dropped = tuple(DroppedBlock(b.add, b.stream, b.branch, b.zero, scores[b.add], b.caches)
                        for b in (blocks.candidates[i] for i in chosen))
        log.info("depth: dropping %d of %d residual blocks (%s): %s", n,
                 len(blocks.candidates), self.criterion.value,
                 ", ".join(f"{b.add} ({b.score:.3g})" for b in dropped))
        return DepthChoice(blocks, scores, dropped)

    def how_many(self, available: int, blocks: Blocks) -> int:
        """Blocks to drop; more than there are candidates is the user's error."""
        n = self.count if self.count is not None else round((self.ratio or 0.0) * available)
        if n > available:
            why = "; ".join(list(blocks.refused.values())[:2])
            raise OptionError(f"--drop-blocks {n}: the model has {available} candidate "
                              f"residual block{'s' if available != 1 else ''}"
                              + (f" (not candidates: {why})" if why else ""))
        return n

    def greedy(self, analysis: Analysis, original: onnx.ModelProto, blocks: tuple[Block, ...],
               inputs: Mapping[str, np.ndarray], n: int) -> dict[str, float]:
        """Blocks in the order greedy selection drops them: each step drops the block whose
        removal, with those already dropped, damages the final outputs least; its score is
        that joint damage. The first step is each block's own damage."""
        order: dict[str, float] = {}
        gone: list[str] = []
        left = list(blocks)
        for _ in range(n):
            damage = zeroed_damage(original, analysis, [(*gone, *b.zero) for b in left],
                                   inputs, samples=self.samples)
            best = min(range(len(left)), key=lambda i: (damage[i], i))
            order[left[best].add] = damage[best]
            gone.extend(left.pop(best).zero)
        return order


def cosines(original: onnx.ModelProto, blocks: tuple[Block, ...],
            inputs: Mapping[str, np.ndarray], analysis: Analysis | None = None, *,
            samples: int = SAMPLES) -> list[float]:
    """ShortGPT's cosine of each block's input and output (channel axis: 1 for 4-d
    activations, else the last), averaged over positions and samples."""
    model = with_types(original)
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    outs = {b.stream for b in blocks} | {_output(model, b) for b in blocks}
    declared = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.helper.make_tensor_value_info(
        name, types.get(name, onnx.TensorProto.FLOAT), None) for name in sorted(outs - declared))
    sess = val.session(model, what="original model")
    got = val.run_chunked(sess, spread(inputs, samples), batch_limit(original, analysis))
    return [_cosine(got[b.stream], got[_output(model, b)]) for b in blocks]


def _output(model: onnx.ModelProto, block: Block) -> str:
    return next(n.output[0] for n in model.graph.node if n.name == block.add)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    axis = 1 if a.ndim == 4 else -1
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    num = np.sum(a64 * b64, axis=axis)
    den = np.linalg.norm(a64, axis=axis) * np.linalg.norm(b64, axis=axis)
    return float(np.mean(num / np.maximum(den, 1e-12)))


def with_depth(analysis: Analysis, plan: Plan, dropped: tuple[DroppedBlock, ...]) -> Plan:
    """``plan`` that also drops ``dropped``: groups wholly inside the dead branches keep all
    their channels, and the prediction counts the model without the dead nodes."""
    if not dropped:
        return plan
    graph = analysis.model.graph
    gone = dead_nodes(graph, {b.add: b.stream for b in dropped},
                      {present for b in dropped for _, present in b.caches})
    tensors = graph.tensors()
    by_id = {g.id: g for g in analysis.groups}

    def dead(name: str) -> bool:
        t = tensors.get(name)
        if t is None:  # a node's virtual space (a grouped conv's group axis): "<node>::…"
            return name.partition("::")[0] in gone
        users = [*t.inputs, *t.outputs]
        return bool(users) and all(n.name in gone for n in users)

    groups = tuple(GroupPlan(gp.id, gp.name, gp.size, tuple(range(gp.size)))
                   if gp.removed and all(dead(m.space[0]) for m in by_id[gp.id].members)
                   else gp for gp in plan.groups)
    plan = replace(plan, groups=groups, dropped=dropped)
    cost = CostModel(graph, analysis.model.ties)
    nodes = {n.name: n for n in graph.nodes}
    biases = {t.name for b in dropped for t in nodes[b.add].inputs[2:]  # fused norms' biases
              if t.name in b.zero}
    after = cost.count(kept_indices(analysis, plan), gone, biases)
    pred = plan.prediction
    before = Prediction(analysis.model.params, 0, cost.count().flops, 0) if pred is None \
        else pred
    return replace(plan, prediction=Prediction(before.params_before, after.params,
                                               before.flops_before, after.flops))
