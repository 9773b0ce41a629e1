"""From per-weight scores to one score per channel of each group.

Every criterion follows the same two steps (DESIGN.md, "Importance"):

1. *local*: a per-index score for each weight space of the group (producer rows, consumer
   columns, per-channel scales), summed over the indices that make up one channel (a flattened
   channel owns several features; a grouped-conv channel owns a block);
2. *reduce* over the group's weight spaces (mean, sum or max), then *normalise* per group
   (by the mean, the max, to zero mean/unit variance, or not at all) so that a global ranking
   across groups compares like with like.

A criterion only supplies :meth:`Criterion.local`; the rest is this one code path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from spa.choices import HessianSource, Normalization, Reduction
from spa.errors import OptionError
from spa.ir.quant import is_weight, layer_weight, weight_values
from spa.options import option

if TYPE_CHECKING:
    from spa.coupling.analysis import Analysis, Group, Member
    from spa.passes.statistics import LayerStats


@dataclass(frozen=True)
class Scores:
    """One score per channel of each scored group (higher = more important)."""

    by_group: dict[int, np.ndarray]
    criterion: str
    # Groups the criterion cannot score, with the reason: they are not pruned (the plan lists
    # them as frozen) rather than stopping the run.
    unscored: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ScoringOptions:
    """The two steps every criterion shares (declared once; PruneOptions copies them)."""

    reduction: Reduction = option(
        Reduction.MEAN, enum=Reduction,
        help="how a channel's scores over the group's weights are combined")
    normalization: Normalization = option(
        Normalization.MEAN, enum=Normalization,
        help="per-group normalisation of channel scores")


CRITERIA: dict[str, type[Criterion]] = {}


def register_criterion(cls: type[Criterion]) -> type[Criterion]:
    CRITERIA[cls.name] = cls
    return cls


def data_free() -> str:
    """The criteria that score without data, for messages."""
    return ", ".join(sorted(n for n, c in CRITERIA.items() if not c.needs_data))


def get_criterion(name: str, **options) -> Criterion:
    if name not in CRITERIA:
        raise OptionError(f"unknown criterion '{name}' (choose from {', '.join(sorted(CRITERIA))})")
    return CRITERIA[name](**options)


class Criterion:
    """Base class: subclasses set ``name``, ``help`` and implement :meth:`local`."""

    name: ClassVar[str]
    help: ClassVar[str]

    #: The criterion's own options dataclass (fields named as PruneOptions' fields), or None.
    Options: ClassVar[type | None] = None
    #: Whether the plan's recipe writes the OBS update of the kept weights (compensation).
    compensation: ClassVar[bool] = False
    #: Whether the plan's recipe adds FLAP's bias shift (passes/compensation.py).
    bias_compensation: ClassVar[bool] = False
    #: Whether it scores from calibration data only (layer inputs, gradients): no data, no
    #: scores.
    needs_data: ClassVar[bool] = False

    def __init__(self, *, reduction: Reduction = ScoringOptions.reduction,
                 normalization: Normalization = ScoringOptions.normalization, seed: int = 0):
        self.reduction = reduction
        self.normalization = normalization
        self.seed = seed

    def local(self, weight: np.ndarray, axis: int, member: Member, group: Group) -> np.ndarray:
        """Score of each index along ``axis`` of ``weight`` (length ``weight.shape[axis]``)."""
        raise NotImplementedError

    def statistics_source(self, calib_given: bool) -> HessianSource | None:
        """The layer statistics (passes/statistics.py) :meth:`run` reads, or None (weights
        only). ``calib_given``: whether calibration data is at hand."""
        return None

    def run(self, analysis: Analysis, statistics: LayerStats | None = None) -> Scores:
        tensors = analysis.model.graph.tensors()
        out, unscored = {}, {}
        for g in analysis.prunable_groups:
            why = self.unscorable(g, tensors)
            if why is None:
                out[g.id] = self.group_scores(g, tensors)
            else:
                unscored[g.id] = why
        if not out:
            raise OptionError(f"criterion {self.name} can score no group: "
                              f"{next(iter(unscored.values()))}")
        return Scores(out, self.name, unscored)

    def unscorable(self, group: Group, tensors: dict[str, gs.Tensor]) -> str | None:
        """Why this criterion cannot score ``group`` (it is then left whole), or None."""
        return None

    def scored(self, member: Member, tensor: gs.Tensor) -> bool:
        """Which members of a group this criterion reads (default: every weight axis, float or
        quantised)."""
        return member.role.is_weight and is_weight(tensor)

    def group_scores(self, group: Group, tensors: dict[str, gs.Tensor]) -> np.ndarray:
        per_member = []
        for m in group.members:
            t = tensors.get(m.space[0])
            if not self.scored(m, t):
                continue
            values = np.asarray(weight_values(layer_weight(t)), dtype=np.float64)  # dequantised
            local = self.local(values, m.space[1], m, group)[m.indices]
            per_member.append(np.bincount(m.channels, weights=local, minlength=group.size))
        if not per_member:
            return np.zeros(group.size)
        return normalise(reduce(np.stack(per_member), self.reduction), self.normalization)


def reduce(per_member: np.ndarray, how: Reduction) -> np.ndarray:
    if how is Reduction.SUM:
        return per_member.sum(axis=0)
    if how is Reduction.MAX:
        return per_member.max(axis=0)
    return per_member.mean(axis=0)


def normalise(scores: np.ndarray, how: Normalization) -> np.ndarray:
    if how is Normalization.MEAN:
        return scores / (scores.mean() + 1e-12)
    if how is Normalization.MAX:
        return scores / (scores.max() + 1e-12)
    if how is Normalization.STANDARD:
        return (scores - scores.mean()) / (scores.std() + 1e-12)
    return scores


def along(values: np.ndarray, axis: int) -> np.ndarray:
    """``values`` with ``axis`` first and the rest flattened: one row per index."""
    return np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1)
