"""OBSPA: Optimal Brain Surgeon for channel groups (DESIGN.md, "OBSPA").

For a consumer layer with weight rows ``W[q, :]`` per input channel ``q`` (the weight with its
input axis first, every other axis flattened: output units × kernel positions) and
``Hinv = (H + λI)⁻¹``, removing the set ``Q`` of input channels and re-fitting the rest costs

    cost(Q) = tr( W[Q]ᵀ · (Hinv[Q,Q])⁻¹ · W[Q] )

and the best update of the kept rows is ``W[K] -= Hinv[K,Q] · (Hinv[Q,Q])⁻¹ · W[Q]``, after
which ``Hinv`` of the kept channels is the Schur complement. A group's channel may own several
input channels of a layer (a flattened channel owns H·W features) and may reach several layers:
its cost is the sum over its layers. Channels are removed greedily in batches, cheapest first,
updating weights and ``Hinv`` as they go; a channel's score is its position in that order, so
allocation keeps the last ones removed. The same closed form, applied to the plan's removed set
at once, is the compensation written into the model (passes/compensation.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from spa.choices import HessianSource
from spa.coupling.types import Role
from spa.errors import OptionError
from spa.ir.quant import layer_weight, weight_array
from spa.options import option, positive
from spa.passes.hessian import damped_inverse
from spa.passes.importance.base import Criterion, Scores, normalise, register_criterion
from spa.progress import progress

if TYPE_CHECKING:
    from spa.coupling.analysis import Analysis, Group
    from spa.passes.statistics import LayerStats

BATCHES = 16  # greedy removal in about this many batches per group


def layer_rows(values: np.ndarray, axis: int, per: int = 1) -> np.ndarray:
    """The weight with its input axis first and the rest flattened, in float64; with ``per``
    > 1 (spa/coupling/facts.py's LayerInput), index ``i`` of ``axis`` holds rows
    ``i·per … (i+1)·per − 1`` on the values' last axis."""
    rows = np.moveaxis(np.asarray(values, np.float64), axis, 0)
    if per > 1:
        rows = np.moveaxis(rows, -1, 1)
    return rows.reshape(values.shape[axis] * per, -1)


def from_rows(rows: np.ndarray, shape: tuple[int, ...], axis: int, per: int = 1) -> np.ndarray:
    """:func:`layer_rows`' inverse: ``rows`` in the layout of values of ``shape``."""
    moved = list(np.moveaxis(np.empty(shape, np.bool_), axis, 0).shape)
    if per > 1:
        moved.insert(1, moved.pop())
    out = rows.reshape(moved)
    if per > 1:
        out = np.moveaxis(out, 1, -1)
    return np.moveaxis(out, 0, axis)


def expanded(indices: np.ndarray, per: int) -> np.ndarray:
    """The rows (:func:`layer_rows`) of indices of a weight space with ``per`` rows each."""
    if per == 1:
        return indices
    return (np.asarray(indices)[:, None] * per + np.arange(per)).reshape(-1)


def obs_cost(w_q: np.ndarray, hinv_qq: np.ndarray) -> float:
    """``tr(W[Q]ᵀ (Hinv[Q,Q])⁻¹ W[Q])`` (diagonal ``Hinv`` given as a vector)."""
    if hinv_qq.ndim == 1:
        return float(np.sum(w_q**2 / hinv_qq[:, None]))
    return float(np.sum(w_q * np.linalg.solve(hinv_qq, w_q)))


def obs_remove(w: np.ndarray, hinv: np.ndarray, q: np.ndarray, keep: np.ndarray) -> None:
    """Remove rows ``q`` of ``w`` in place: update rows ``keep`` and ``hinv`` (Schur)."""
    if hinv.ndim == 1:
        w[q] = 0
        return
    sol = np.linalg.solve(hinv[np.ix_(q, q)], np.concatenate([w[q], hinv[q][:, keep]], axis=1))
    w[keep] -= hinv[np.ix_(keep, q)] @ sol[:, :w.shape[1]]
    hinv[np.ix_(keep, keep)] -= hinv[np.ix_(keep, q)] @ sol[:, w.shape[1]:]
    w[q] = 0


GROUP = "OBSPA (--criterion obspa)"


@dataclass(frozen=True)
class OBSPAOptions:
    """OBSPA's own options (and the compensation's: the same Hessians, the same damping)."""

    # None: calibration when data is given, else synthetic (:meth:`OBSPA.statistics_source`;
    # spa prune: PruneOptions.hessian_source, where --calib synthetic is no data).
    hessian: HessianSource | None = option(
        None, enum=HessianSource, group=GROUP,
        help="where OBSPA's layer Hessians come from (default: calibration when --calib gives "
        "data, else synthetic, which needs none)")
    damping: float = option(0.1, parse=float, group=GROUP,
                            help="λ = damping × mean diagonal of each Hessian")
    samples: int = option(32, parse=positive, group=GROUP,
                          help="synthetic input samples for the Hessians")


def hessian_source(given: HessianSource | str | None, data: bool) -> HessianSource:
    """The Hessian source asked for (``given``), or by default the data when there is some
    (``data``), else synthetic inputs."""
    if given is not None:
        return HessianSource(given)
    return HessianSource.CALIBRATION if data else HessianSource.SYNTHETIC


@register_criterion
class OBSPA(Criterion):
    name = "obspa"
    help = ("Optimal Brain Surgeon per group: greedy removal by OBS cost with the closed-form "
            "update of the kept weights (compensation); --hessian picks the data source")

    Options = OBSPAOptions
    compensation = True

    def __init__(self, *, options: OBSPAOptions = OBSPAOptions(), **kwargs):
        super().__init__(**kwargs)
        self.options = options

    def statistics_source(self, calib_given: bool) -> HessianSource:
        return hessian_source(self.options.hessian, calib_given)

    def run(self, analysis: Analysis, statistics: LayerStats | None = None) -> Scores:
        if statistics is None:
            raise OptionError("criterion obspa scores from layer statistics: run "
                              "passes/statistics.py's LayerStatistics and pass its result")
        tensors = analysis.model.graph.tensors()
        out = {}
        for g in progress(analysis.prunable_groups, "obspa", unit="group"):
            members = [m for m in g.members
                       if m.role is Role.CONSUMER and m.space in statistics.layers]
            if not members:  # nothing reads these channels through a weight: L2 of producers
                out[g.id] = normalise(producer_norms(g, tensors), self.normalization)
                continue
            out[g.id] = self._elimination_order(g, members, tensors, statistics)
        return Scores(out, self.name)

    def _elimination_order(self, g: Group, members, tensors, statistics: LayerStats
                           ) -> np.ndarray:
        state = []
        for m in members:
            per = statistics.layers[m.space].per
            w = layer_rows(weight_array(layer_weight(tensors[m.space[0]])), m.space[1], per)
            h = statistics.hessian(m.space)
            assert h is not None, f"{m.space}: members are chosen among the collected layers"
            hinv = damped_inverse(h, self.options.damping)
            state.append((m, per, w, hinv))
        alive = np.ones(g.size, dtype=bool)
        score = np.zeros(g.size)
        removed = 0
        batch = max(1, math.ceil(g.size / BATCHES))
        while alive.sum() > 1:
            cand = np.flatnonzero(alive)
            cost = np.zeros(cand.size)
            for m, per, w, hinv in state:
                for j, c in enumerate(cand):
                    q = expanded(m.indices[m.channels == c], per)
                    cost[j] += obs_cost(w[q], hinv[q] if hinv.ndim == 1 else hinv[np.ix_(q, q)])
            take = cand[np.lexsort((cand, cost))[:min(batch, cand.size - 1)]]
            for c in take:
                score[c] = removed
                removed += 1
            alive[take] = False
            for m, per, w, hinv in state:
                q = expanded(m.indices[np.isin(m.channels, take)], per)
                keep = expanded(m.indices[np.isin(m.channels, np.flatnonzero(alive))], per)
                obs_remove(w, hinv, q, keep)
        score[alive] = removed
        return score


def producer_norms(g: Group, tensors: dict[str, gs.Tensor]) -> np.ndarray:
    """Sum of squares of each channel's producer rows (the fallback when nothing reads the
    channels through a weight)."""
    total = np.zeros(g.size)
    for m in g.producers:
        rows = layer_rows(weight_array(tensors[m.space[0]]), m.space[1])
        total += np.bincount(m.channels, weights=(rows[m.indices] ** 2).sum(1), minlength=g.size)
    return total
