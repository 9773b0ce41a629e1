"""Allocation: from channel scores and a target to a :class:`~spa.plan.Plan`.

* ``channels`` target, uniform: each prunable group keeps ``n - floor(ratio·n)`` channels;
* ``channels`` target, global: the ``ratio`` share of all prunable channels with the lowest
  normalised scores go, wherever they are;
* ``params`` / ``flops`` targets: bisection on the channel ratio until the predicted reduction of
  the model's parameters or MACs reaches the target.

Per-kind ratios: attention-head groups use ``heads_ratio``, dense-neuron groups (MLP widths)
``mlp_ratio`` and the residual stream ``hidden_ratio`` when given, instead of ``ratio`` (uniform
allocation; a params/FLOPs search varies only ``ratio``).

Constraints: keep at least ``min_channels`` per group (never zero; a head group keeps at least
one head); with ``round_to = r`` the number of kept channels is rounded up to a multiple of ``r``
(when the group has that many) — not for head groups, whose unit is already a whole head.
Ties in score are broken by channel index, so plans are deterministic.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import numpy as np

from spa.choices import Target
from spa.coupling.analysis import GroupKind
from spa.errors import OptionError
from spa.metrics import CostModel, Counts
from spa.options import check_ratio
from spa.plan import FrozenGroup, GroupPlan, Plan, Prediction, kept_indices

if TYPE_CHECKING:
    from spa.coupling.analysis import Analysis, Group
    from spa.passes.importance.base import Scores
    from spa.recipe import Recipe

log = logging.getLogger(__name__)


class Allocation:
    """``Allocation(ratio=0.3, ...).run(analysis, scores, recipe) -> Plan`` (the recipe is
    recorded in the plan as is)."""

    def __init__(self, *, ratio: float, target: Target = Target.CHANNELS,
                 global_ranking: bool = False, round_to: int = 1, min_channels: int = 1,
                 heads_ratio: float | None = None, mlp_ratio: float | None = None,
                 hidden_ratio: float | None = None):
        for name, value in (("ratio", ratio), ("heads ratio", heads_ratio),
                            ("mlp ratio", mlp_ratio), ("hidden ratio", hidden_ratio)):
            if value is not None:
                check_ratio(value, name)
        self.kind_ratio = {GroupKind.HEADS: heads_ratio, GroupKind.NEURONS: mlp_ratio,
                           GroupKind.HIDDEN: hidden_ratio}
        if round_to < 1 or min_channels < 1:
            raise OptionError("round_to and min_channels must be at least 1")
        self.ratio = ratio
        self.target = target
        self.global_ranking = global_ranking
        self.round_to = round_to
        self.min_channels = min_channels

    def run(self, analysis: Analysis, scores: Scores, recipe: Recipe | None = None) -> Plan:
        cost = CostModel(analysis.model.graph, analysis.model.ties)
        before = Counts(analysis.model.params, cost.count().flops)  # params: as in the file
        if self.target is Target.CHANNELS:
            keep = self._keep(analysis, scores, self.ratio)
        else:
            keep = self._search(analysis, scores, cost, before)
        plan = _make_plan(analysis, keep, recipe, scores.unscored)
        after = cost.count(kept_indices(analysis, plan))
        pred = Prediction(before.params, after.params, before.flops, after.flops)
        return Plan(plan.fingerprint, plan.groups, plan.frozen, pred, plan.recipe)

    def _keep(self, analysis: Analysis, scores: Scores, ratio: float) -> dict[int, np.ndarray]:
        groups = [g for g in analysis.prunable_groups if g.id in scores.by_group]
        if self.global_ranking:
            counts = _global_counts(groups, scores, ratio, self.min_channels)
        else:
            counts = {g.id: g.size - math.floor(self._ratio_for(g, ratio) * g.size)
                      for g in groups}
        keep = {}
        for g in groups:
            k = min(g.size, max(counts[g.id], self.min_channels))
            if self.round_to > 1 and g.size >= self.round_to and g.kind is not GroupKind.HEADS:
                k = min(g.size, math.ceil(k / self.round_to) * self.round_to)
            order = np.lexsort((np.arange(g.size), -scores.by_group[g.id]))
            keep[g.id] = np.sort(order[:k])
        return keep

    def _ratio_for(self, group: Group, ratio: float) -> float:
        explicit = self.kind_ratio.get(group.kind)
        return ratio if explicit is None else explicit

    def _search(self, analysis, scores, cost, before) -> dict[int, np.ndarray]:
        """Smallest channel ratio whose predicted params/FLOPs reduction reaches the target."""
        base = before.params if self.target is Target.PARAMS else before.flops

        def reduction(r: float) -> tuple[float, dict[int, np.ndarray]]:
            keep = self._keep(analysis, scores, r)
            after = cost.count(kept_indices(analysis, _make_plan(analysis, keep, None,
                                                                 scores.unscored)))
            value = after.params if self.target is Target.PARAMS else after.flops
            return (1.0 - value / base if base else 0.0), keep

        lo, hi = 0.0, 0.99
        best = reduction(hi)
        if best[0] < self.ratio:
            log.warning("target %s reduction %.3f is out of reach; best is %.3f",
                        self.target.value, self.ratio, best[0])
            return best[1]
        for _ in range(30):
            mid = (lo + hi) / 2
            red, keep = reduction(mid)
            if red >= self.ratio:
                hi, best = mid, (red, keep)
            else:
                lo = mid
        return best[1]


def _global_counts(groups, scores: Scores, ratio: float, min_channels: int) -> dict[int, int]:
    total = sum(g.size for g in groups)
    n_remove = math.floor(ratio * total)
    entries = sorted((float(s), g.id, i) for g in groups
                     for i, s in enumerate(scores.by_group[g.id]))
    counts = {g.id: g.size for g in groups}
    for _, gid, _ in entries:
        if n_remove == 0:
            break
        if counts[gid] > min_channels:
            counts[gid] -= 1
            n_remove -= 1
    return counts


def _make_plan(analysis: Analysis, keep: dict[int, np.ndarray], recipe: Recipe | None,
               unscored: dict[int, str]) -> Plan:
    """The plan of ``keep``; groups the criterion could not score join the frozen ones."""
    groups = tuple(GroupPlan(g.id, g.name, g.size, tuple(int(i) for i in keep[g.id]))
                   for g in analysis.prunable_groups if g.id not in unscored)
    frozen = tuple(FrozenGroup(g.id, g.name, g.size, g.frozen) for g in analysis.frozen_groups)
    frozen += tuple(FrozenGroup(g.id, g.name, g.size, (unscored[g.id],))
                    for g in analysis.prunable_groups if g.id in unscored)
    return Plan(analysis.fingerprint, tuple(groups), frozen, None, recipe)

