"""Allocation: from channel scores and a target to a :class:`~spa.plan.Plan`.

* ``channels`` target, uniform: each prunable group keeps ``n - floor(ratio·n)`` channels;
* ``channels`` target, global: the ``ratio`` share of all prunable channels with the lowest
  normalised scores go, wherever they are;
* ``params`` / ``flops`` targets: bisection on the channel ratio until the predicted reduction of
  the model's parameters or MACs reaches the target. With kernel steps (below), the ratio is
  searched with exact counts; then every stepped group rounds up, as few as meet the target
  again round down (the smallest share of their size first), and the groups without a step
  move back to the smallest ratio that still meets it (:meth:`Allocation._to_steps`).

Per-kind ratios: attention-head groups use ``heads_ratio``, dense-neuron groups (MLP widths)
``mlp_ratio`` and the residual stream ``hidden_ratio`` when given, instead of ``ratio``; a
params/FLOPs search varies only ``ratio``. The global ranking ranks within each such pool, at its
ratio (before, it read ``ratio`` alone: ``--global --heads-ratio 0.3 --ratio 0`` pruned nothing).

Constraints: keep at least ``min_channels`` per group (never zero; a head group keeps at least
one head); with ``round_to = r`` the number of kept channels is rounded up to a multiple of ``r``
(when the group has that many) — not for head groups, whose unit is already a whole head. With
``steps`` (group id → step, passes/kernel_widths.py: ``--round-to auto``) each group rounds to
its own step instead, 1 (exact) where the runtime's kernels do not care.
Ties in score are broken by channel index, so plans are deterministic.

Sensitivity allocation (``method=SENSITIVITY``, with the damage curves of
passes/sensitivity.py): the budget goes where it hurts the final outputs least. Removal steps
(one channel, or what keeps ``round_to``; a whole head) are ordered greedily by the damage they
add per unit of budget they free (a channel; or, for params/FLOPs targets, the group's measured
cost per channel); with convex curves this greedy order solves the knapsack exactly, and it is
the textbook approximation otherwise. A channel budget takes the prefix of that order that
removes its share of each pool's channels (a pool per kind with its own ratio, and the heads
apart from the channels), except for the groups at ``ratio`` itself, whose channels differ in
cost: they free the MACs the uniform plan would (:meth:`Allocation._uniform_macs`); a params/FLOPs
target takes the shortest prefix whose *counted* reduction (the cost model on the whole plan, so
interactions between groups are counted) meets it, found by bisection, less the steps it does
not need: the crossing step can be large (16 of a conv's 32 channels), and the last steps that
can be undone with the target still met are (the MNIST CNN at 2× FLOPs, OBSPA: ÷3.63 → ÷2.00,
held-out accuracy 0.9893 → 0.9903).

Latency target (``Target.LATENCY``, with a measured table of passes/latency.py): the budget is
the predicted milliseconds saved, ``ratio`` the share of the dense latency to remove. A removal
step's price is the milliseconds its group's table says it frees; a step that the table says
frees nothing (a narrower width measured no faster) is merged with the next until one does, so
no group is left at a width slower than a wider one. The objective is the sensitivity damage
with calibration data, else the kept importance: the damage of removing a group's ``n`` lowest
channels is the sum of their normalised scores (``global`` allocation, the default for this
target); ``uniform`` searches one channel ratio for all groups instead.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from spa.choices import AllocationMethod, Target
from spa.coupling.analysis import GroupKind
from spa.errors import OptionError
from spa.metrics import CostModel, Counts
from spa.options import check_ratio
from spa.plan import FrozenGroup, GroupPlan, Plan, Prediction, kept_indices

if TYPE_CHECKING:
    from spa.coupling.analysis import Analysis, Group
    from spa.passes.importance.base import Scores
    from spa.passes.latency import LatencyTable
    from spa.passes.sensitivity import Sensitivities
    from spa.recipe import Recipe

log = logging.getLogger(__name__)


class Allocation:
    """``Allocation(ratio=0.3, ...).run(analysis, scores, recipe) -> Plan`` (the recipe is
    recorded in the plan as is)."""

    def __init__(self, *, ratio: float, target: Target = Target.CHANNELS,
                 global_ranking: bool = False, round_to: int = 1, min_channels: int = 1,
                 heads_ratio: float | None = None, mlp_ratio: float | None = None,
                 hidden_ratio: float | None = None,
                 method: AllocationMethod | None = None,
                 sensitivities: Sensitivities | None = None,
                 latency: LatencyTable | None = None,
                 steps: Mapping[int, int] | None = None):
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
        self.steps = steps
        self.min_channels = min_channels
        self.method = method or (AllocationMethod.GLOBAL if global_ranking
                                 else AllocationMethod.UNIFORM)
        self.global_ranking = self.method is AllocationMethod.GLOBAL
        if self.method is AllocationMethod.SENSITIVITY and sensitivities is None:
            raise OptionError("sensitivity allocation needs the measured damage curves "
                              "(calibration data)")
        self.sensitivities = sensitivities
        if target is Target.LATENCY and latency is None:
            raise OptionError("a latency target needs the measured latency table")
        self.latency = latency

    def run(self, analysis: Analysis, scores: Scores, recipe: Recipe | None = None) -> Plan:
        cost = CostModel(analysis.model.graph, analysis.model.ties)
        before = Counts(analysis.model.params, cost.count().flops)  # params: as in the file
        if self.method is AllocationMethod.SENSITIVITY:
            assert self.sensitivities is not None
            keep = self._by_curves(analysis, scores, cost, before, self.sensitivities.curves)
        elif self.target is Target.LATENCY and self.method is AllocationMethod.GLOBAL:
            keep = self._by_curves(analysis, scores, cost, before, importance_curves(
                analysis, scores))
        elif self.target is Target.CHANNELS:
            keep = self._keep(analysis, scores, self.ratio)
        else:
            keep = self._search(analysis, scores, cost, before)
        return _predicted(analysis, _make_plan(analysis, keep, recipe, scores.unscored), cost,
                          before)

    def _keep(self, analysis: Analysis, scores: Scores, ratio: float, *,
              rounded: bool = True) -> dict[int, np.ndarray]:
        """Each group's kept channels at ``ratio``: its highest-scored ``count``, the count
        rounded up to the group's step (exact with ``rounded=False``)."""
        counts = self._counts(analysis, scores, ratio)
        if rounded:
            by_id = _by_id(analysis)
            counts = {gid: self._round_up(by_id[gid], k) for gid, k in counts.items()}
        return self._select(analysis, scores, counts)

    def _counts(self, analysis: Analysis, scores: Scores, ratio: float) -> dict[int, int]:
        """Kept counts at ``ratio`` before rounding, at least ``min_channels``."""
        groups = [g for g in analysis.prunable_groups if g.id in scores.by_group]
        if self.global_ranking:  # ranked across the groups of each pool, at its ratio
            counts: dict[int, int] = {}
            for (_, pool_ratio), pool in self._pools(groups, ratio, heads_apart=False).items():
                counts |= _global_counts(pool, scores, pool_ratio, self.min_channels)
        else:
            counts = {g.id: g.size - math.floor(self._ratio_for(g, ratio) * g.size)
                      for g in groups}
        return {g.id: min(g.size, max(counts[g.id], self.min_channels)) for g in groups}

    def _round_up(self, group: Group, k: int) -> int:
        step = self.step(group)
        if step > 1:
            k = min(group.size, math.ceil(k / step) * step)
        if self.target is Target.LATENCY and self.latency is not None:
            k = self.latency.as_fast_wider(group.id, k)
        return k

    def _round_down(self, group: Group, k: int) -> int | None:
        """``k`` rounded down to the group's step, or None where that is ``k`` itself or
        below ``min_channels`` (or zero)."""
        step = self.step(group)
        down = k // step * step
        return down if step > 1 and down != k and down >= max(1, self.min_channels) else None

    @staticmethod
    def _select(analysis: Analysis, scores: Scores,
                counts: Mapping[int, int]) -> dict[int, np.ndarray]:
        keep = {}
        for g in analysis.prunable_groups:
            if g.id in counts:
                order = np.lexsort((np.arange(g.size), -scores.by_group[g.id]))
                keep[g.id] = np.sort(order[:counts[g.id]])
        return keep

    def step(self, group: Group) -> int:
        """What ``group``'s kept count is a multiple of (1: exact): its kernel step, or
        ``round_to``; never for head groups, nor for a group smaller than its step."""
        if group.kind is GroupKind.HEADS:
            return 1
        step = self.round_to if self.steps is None else self.steps.get(group.id, 1)
        return step if group.size >= step else 1

    def _pools(self, groups: list[Group], ratio: float, *, heads_apart: bool
               ) -> dict[tuple[GroupKind | None, float], list[Group]]:
        """The groups that share one budget, by (kind, its ratio): a pool per kind that has a
        ratio of its own (``--heads-ratio``, ``--mlp-ratio``, ``--hidden-ratio``), the head
        groups apart too with ``heads_apart``, and the rest (kind None) at ``ratio``."""
        pools: dict[tuple[GroupKind | None, float], list[Group]] = {}
        for g in groups:
            own = self.kind_ratio.get(g.kind) is not None or (
                heads_apart and g.kind is GroupKind.HEADS)
            pools.setdefault((g.kind if own else None, self._ratio_for(g, ratio)), []).append(g)
        return pools

    def _ratio_for(self, group: Group, ratio: float) -> float:
        explicit = self.kind_ratio.get(group.kind)
        return ratio if explicit is None else explicit

    def _search(self, analysis, scores, cost, before) -> dict[int, np.ndarray]:
        """Smallest channel ratio whose predicted params/FLOPs/latency reduction reaches the
        target. With kernel steps and a params/FLOPs target, the ratio is searched with exact
        counts, which the groups then round onto their steps (:meth:`_to_steps`)."""
        stepped = self.target is not Target.LATENCY and any(
            self.step(g) > 1 for g in analysis.prunable_groups if g.id in scores.by_group)
        if stepped:
            ratio, _ = self._bisect(analysis, scores, cost, before, rounded=False)
            if ratio is not None:
                keep = self._to_steps(analysis, scores, cost, before, ratio)
                if keep is not None:
                    return keep
        return self._bisect(analysis, scores, cost, before, rounded=True)[1]

    def _bisect(self, analysis, scores, cost, before, *, rounded: bool
                ) -> tuple[float | None, dict[int, np.ndarray]]:
        """``(ratio, kept)`` at the smallest ratio that reaches the target (ratio None: out of
        reach, the kept channels at the largest ratio)."""

        def reduction(r: float) -> tuple[float, dict[int, np.ndarray]]:
            keep = self._keep(analysis, scores, r, rounded=rounded)
            return self._reduction(analysis, keep, scores, cost, before), keep

        best = reduction(0.99)
        if best[0] < self.ratio:
            if rounded:
                log.warning("target %s reduction %.3f is out of reach; best is %.3f",
                            self.target.value, self.ratio, best[0])
            return None, best[1]
        ratio, (_, keep) = least_ratio(reduction, self.ratio, 0.99, best, 30)
        return ratio, keep

    def _to_steps(self, analysis, scores, cost, before, ratio: float
                  ) -> dict[int, np.ndarray] | None:
        """The exact counts at ``ratio`` (which meet the target) moved onto each group's step:
        every group rounds up, then the groups that round down by the smallest share of their
        size do, as few as meet the target again. Rounding every group up in lockstep
        overshot instead: a digits ResNet asked for ÷2 FLOPs got ÷3.75, because the bisection
        can only move all groups a whole block at once. None: even rounding every group
        down misses the target."""
        exact = self._counts(analysis, scores, ratio)
        by_id = _by_id(analysis)
        up = {gid: self._round_up(by_id[gid], k) for gid, k in exact.items()}
        downs = []
        for gid, k in exact.items():
            down = self._round_down(by_id[gid], k)
            if down is not None and down < up[gid]:
                downs.append(((k - down) / by_id[gid].size, gid, down))
        downs.sort()

        def reduction(prefix: int) -> tuple[float, dict[int, np.ndarray]]:
            counts = dict(up)
            for _, gid, down in downs[:prefix]:
                counts[gid] = down
            keep = self._select(analysis, scores, counts)
            return self._reduction(analysis, keep, scores, cost, before), keep

        best = reduction(len(downs))
        if best[0] < self.ratio:
            return None
        # the fewest groups rounded down that meet the target
        best = _shortest_prefix(reduction, self.ratio, len(downs), best)[1]
        return self._rebalance(analysis, scores, cost, before, ratio,
                               {gid: len(k) for gid, k in best[1].items()})

    def _rebalance(self, analysis, scores, cost, before, ratio: float,
                   counts: dict[int, int]) -> dict[int, np.ndarray]:
        """``counts`` with the groups that round nowhere (step 1) at the smallest ratio
        (at most ``ratio``) that still meets the target: a whole block rounded down elsewhere
        may have removed more than they need to (an MNIST CNN asked for ÷2 FLOPs: ÷2.74
        before this)."""
        free = [g.id for g in analysis.prunable_groups if g.id in counts and self.step(g) == 1]

        def reduction(r: float) -> tuple[float, dict[int, np.ndarray]]:
            at = self._counts(analysis, scores, r)
            keep = self._select(analysis, scores, counts | {gid: at[gid] for gid in free})
            return self._reduction(analysis, keep, scores, cost, before), keep

        best = reduction(ratio)
        if not free:
            return best[1]
        return least_ratio(reduction, self.ratio, ratio, best, 20)[1][1]

    def _reduction(self, analysis, keep, scores, cost, before) -> float:
        """The share of the params, MACs or (predicted) latency that ``keep`` removes."""
        after = cost.count(kept_indices(analysis, _make_plan(analysis, keep, None,
                                                             scores.unscored)))
        if self.target is Target.LATENCY:
            assert self.latency is not None
            widths = {gid: len(k) for gid, k in keep.items()}
            predicted = self.latency.predict(widths, before.flops - after.flops)
            return 1.0 - predicted / self.latency.dense_ms if self.latency.dense_ms else 0.0
        base = before.params if self.target is Target.PARAMS else before.flops
        value = after.params if self.target is Target.PARAMS else after.flops
        return 1.0 - value / base if base else 0.0

    def _by_curves(self, analysis, scores, cost, before, curves) -> dict[int, np.ndarray]:
        from spa.passes.sensitivity import lowest

        groups = [g for g in analysis.prunable_groups if g.id in scores.by_group]

        def keep_of(counts: dict[int, int]) -> dict[int, np.ndarray]:
            return {g.id: lowest(g, scores, counts[g.id]) for g in groups}

        if self.target is Target.CHANNELS:
            removed = {g.id: 0 for g in groups}
            # heads never share a pool with channels (a head is not worth one neuron)
            for (kind, ratio), pool in self._pools(groups, self.ratio, heads_apart=True).items():
                if kind is None:  # --ratio's pool: its groups differ in cost
                    removed |= self._uniform_macs(analysis, scores, cost, before, pool, curves,
                                                  keep_of)
                    continue
                budget = math.floor(ratio * sum(g.size for g in pool))
                for gid, count in self._greedy(pool, curves, lambda g, now, nxt: nxt - now):
                    if budget <= 0:
                        break
                    budget -= count - removed[gid]
                    removed[gid] = count
            return keep_of(removed)
        price = {} if self.target is Target.LATENCY else \
            self._cost_per_channel(analysis, groups, scores, cost)
        steps = list(self._greedy(groups, curves, self._freed(price)))
        best, counts = self._spend(analysis, scores, cost, before, steps, keep_of,
                                   self.ratio, trim=self.target is not Target.LATENCY)
        if best is not None:
            log.warning("target %s reduction %.3f is out of reach; best is %.3f",
                        self.target.value, self.ratio, best)
        return keep_of(counts)

    def _uniform_macs(self, analysis, scores, cost, before, pool, curves, keep_of
                      ) -> dict[int, int]:
        """Removed counts of ``pool`` (the groups at ``--ratio``) that free as many MACs as
        one ratio in each of them would (the uniform plan, rounded as it rounds), taking the
        removal steps in order of least damage per MAC freed, less those not needed.
        Counted in channels, the least damage went to channels that cost nothing: RegNetY-
        400MF at ``--ratio 0.3`` lost 30% of its channels, all in squeeze-and-excite
        bottlenecks, and 0.4% of its MACs, where one ratio in every group removes 34%."""
        ids = {g.id for g in pool}
        uniform = self._keep(analysis, scores, self.ratio)
        whole = keep_of(dict.fromkeys(uniform, 0))
        goal = self._reduction(analysis, {gid: uniform[gid] if gid in ids else k
                                          for gid, k in whole.items()}, scores, cost, before)
        steps = list(self._greedy(pool, curves, self._freed(self._cost_per_channel(
            analysis, pool, scores, cost))))
        _, counts = self._spend(analysis, scores, cost, before, steps, keep_of, goal)
        return {gid: k for gid, k in counts.items() if gid in ids}

    def _spend(self, analysis, scores, cost, before, steps, keep_of, goal: float, *,
               trim: bool = True) -> tuple[float | None, dict[int, int]]:
        """The removed counts after the shortest prefix of ``steps`` (ordered removal steps,
        from nothing removed) whose counted reduction meets ``goal``, less the steps it does
        not need (with ``trim``); and None in front, or, when even all of them fall short, the
        reduction they reach, with all of them taken."""
        def counts_of(prefix: int) -> dict[int, int]:
            counts = {g.id: 0 for g in analysis.prunable_groups if g.id in scores.by_group}
            for gid, count in steps[:prefix]:
                counts[gid] = count
            return counts

        def reduction(prefix: int) -> Searched:
            keep = keep_of(counts_of(prefix))
            return self._reduction(analysis, keep, scores, cost, before), keep

        best = reduction(len(steps))
        if best[0] < goal:
            return best[0], counts_of(len(steps))
        prefix = _shortest_prefix(reduction, goal, len(steps), best)[0]
        counts = counts_of(prefix)
        if trim:
            counts = _trimmed(steps[:prefix], counts, lambda trial: self._reduction(
                analysis, keep_of(trial), scores, cost, before) >= goal)
        return None, counts

    def _cost_per_channel(self, analysis, groups, scores, cost) -> dict[int, float]:
        """Params or MACs freed per channel of each of ``groups``, alone at half its width."""
        from spa.passes.sensitivity import lowest

        full = cost.count()
        base = full.params if self.target is Target.PARAMS else full.flops
        scored = [h for h in analysis.prunable_groups if h.id in scores.by_group]
        out = {}
        for g in groups:
            half = max(1, g.size // 2)
            plan = _make_plan(analysis, {h.id: (lowest(g, scores, half) if h.id == g.id
                                                else np.arange(h.size)) for h in scored},
                              None, scores.unscored)
            after = cost.count(kept_indices(analysis, plan))
            value = after.params if self.target is Target.PARAMS else after.flops
            out[g.id] = max(base - value, 1) / half
        return out

    def _freed(self, price: dict[int, float]):
        """The budget a removal step ``(group, removed now, removed next)`` frees: ``price``
        per channel, or the milliseconds of the latency table."""
        if self.target is not Target.LATENCY:
            return lambda g, now, nxt: price[g.id] * (nxt - now)
        table = self.latency
        assert table is not None

        def ms(g, now: int, nxt: int) -> float:
            row = table.groups.get(g.id)
            if row is None:  # not timed: no known saving
                return 0.0
            return table.fit[0] * (row.saved(g.size - nxt) - row.saved(g.size - now))
        return ms

    def _greedy(self, groups, curves, freed):
        """Removal steps ``(group id, removed channels after the step)`` in the order of least
        damage added per unit of budget freed; a step that frees nothing is merged with the
        next ones until they do (or the group has none left)."""
        heap: list[tuple[float, int, int, int]] = []
        state = {g.id: 0 for g in groups}
        by_id = {g.id: g for g in groups}

        def push(g) -> None:
            now = state[g.id]
            nxt = self._next_count(g, now)
            while nxt is not None and (gain := freed(g, now, nxt)) <= 1e-12:
                nxt = self._next_count(g, nxt)
            if nxt is None:
                return
            curve = curves.get(g.id)
            added = 0.0 if curve is None else curve.at(nxt) - curve.at(now)
            heapq.heappush(heap, (added / gain, g.id, now, nxt))

        for g in groups:
            push(g)
        while heap:
            _, gid, now, nxt = heapq.heappop(heap)
            if state[gid] != now:
                continue
            state[gid] = nxt
            yield gid, nxt
            push(by_id[gid])

    def _next_count(self, group, removed: int) -> int | None:
        """The next removal count of ``group`` that respects min_channels and round_to."""
        floor = 1 if group.kind is GroupKind.HEADS else self.min_channels
        limit = group.size - min(group.size, floor)
        block = self.step(group)
        step = (group.size - removed) % block or block
        nxt = removed + step
        return nxt if nxt <= limit else None


Searched = tuple[float, dict[int, np.ndarray]]  # (reduction, kept channels)
TRIMMED = 64  # the last steps of a params/FLOPs target's prefix tried undone
T = TypeVar("T")


def least_ratio(reduction: Callable[[float], tuple[float, T]], target: float, hi: float,
                best: tuple[float, T], iterations: int) -> tuple[float, tuple[float, T]]:
    """Bisection on ``[0, hi]`` (``best``: what ``hi`` gives, which meets ``target``) for the
    smallest ratio whose reduction meets ``target``: that ratio and what it gives, as
    ``(reduction, result)``. Also the Torch-Pruning baseline's ratio search."""
    lo = 0.0
    for _ in range(iterations):
        mid = (lo + hi) / 2
        red, keep = reduction(mid)
        if red >= target:
            hi, best = mid, (red, keep)
        else:
            lo = mid
    return hi, best


def _shortest_prefix(reduction: Callable[[int], Searched], target: float, n: int,
                     best: Searched) -> tuple[int, Searched]:
    """The shortest prefix of ``n`` ordered steps whose reduction meets ``target`` (``best``:
    what all ``n`` give, which meets it): its length and what it gives."""
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi) // 2
        red, keep = reduction(mid)
        if red >= target:
            hi, best = mid, (red, keep)
        else:
            lo = mid + 1
    return hi, best


def _trimmed(taken: list[tuple[int, int]], counts: dict[int, int],
             meets: Callable[[dict[int, int]], bool]) -> dict[int, int]:
    """``counts`` (after the ``taken`` steps) without the steps the target does not need. The
    shortest prefix ends with the step that crosses the target, and that step may be large
    (half a conv's channels, in blocks of 16) and make earlier steps superfluous: each of the
    last :data:`TRIMMED` steps, the most damaging per unit of budget first, is undone if the
    plan still ``meets`` the target without it. Undoing never adds damage."""
    before_step: list[int] = []
    previous: dict[int, int] = {}
    for gid, count in taken:
        before_step.append(previous.get(gid, 0))
        previous[gid] = count
    for i in range(len(taken) - 1, max(len(taken) - 1 - TRIMMED, -1), -1):
        gid, count = taken[i]
        if counts[gid] != count:  # a later step of its group is still taken
            continue
        trial = {**counts, gid: before_step[i]}
        if meets(trial):
            counts = trial
    return counts


def _by_id(analysis: Analysis) -> dict[int, Group]:
    return {g.id: g for g in analysis.prunable_groups}


@dataclass(frozen=True)
class ImportanceCurve:
    """The kept importance a group loses with its ``n`` lowest-scored channels: the sum of
    their normalised scores (the damage curve of a data-free latency allocation)."""

    lost: np.ndarray  # lost[n]: the n lowest scores summed; lost[0] = 0

    def at(self, removed: int) -> float:
        return float(self.lost[min(removed, len(self.lost) - 1)])


def importance_curves(analysis: Analysis, scores: Scores) -> dict[int, ImportanceCurve]:
    return {g.id: ImportanceCurve(np.concatenate(([0.0], np.cumsum(np.sort(
        scores.by_group[g.id].astype(np.float64)))))) for g in analysis.prunable_groups
        if g.id in scores.by_group}


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



def with_keep(analysis: Analysis, plan: Plan, keep: Mapping[int, np.ndarray]) -> Plan:
    """``plan`` with the groups of ``keep`` keeping those channels instead (another file of the
    same model decided them: spa/pipeline/family.py), its prediction counted again."""
    groups = tuple(GroupPlan(gp.id, gp.name, gp.size, tuple(int(i) for i in keep[gp.id]))
                   if gp.id in keep else gp for gp in plan.groups)
    cost = CostModel(analysis.model.graph, analysis.model.ties)
    return _predicted(analysis, Plan(plan.fingerprint, groups, plan.frozen, None, plan.recipe,
                                     plan.dropped),
                      cost, Counts(analysis.model.params, cost.count().flops))


def _predicted(analysis: Analysis, plan: Plan, cost: CostModel, before: Counts) -> Plan:
    """``plan`` with its prediction: params and FLOPs ``before`` and after its cut."""
    after = cost.count(kept_indices(analysis, plan))
    return Plan(plan.fingerprint, plan.groups, plan.frozen,
                Prediction(before.params, after.params, before.flops, after.flops),
                plan.recipe, plan.dropped)
