"""Sensitivity: what removing part of one group does to the model's *final outputs*.

For every scored group and a few removal ratios, the group's lowest-scored channels are masked
(their consumer weights zeroed, as the numeric oracle's masked model does) and the model runs on
calibration samples in onnxruntime; the damage is the relative squared error of all float outputs
against the dense model's, ``‖y − y_dense‖² / ‖y_dense‖²``. The result, a damage curve per group,
is what the sensitivity allocation (passes/allocation.py) spends the budget against: residual
streams and first layers are fragile, and uniform ratios cut them as deep as the rest.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx

from spa.plan import GroupPlan, Plan
from spa.progress import progress

if TYPE_CHECKING:
    from spa.coupling.analysis import Analysis, Group
    from spa.passes.importance.base import Scores

log = logging.getLogger(__name__)
RATIOS = (0.125, 0.25, 0.5, 0.75)


@dataclass(frozen=True)
class Curve:
    """Measured damage of a group at removed channel counts (0 removed: no damage)."""

    removed: tuple[int, ...]
    damage: tuple[float, ...]

    def at(self, removed: int) -> float:
        """Damage at ``removed`` channels: piecewise linear between measurements (monotone:
        removing more never measures as less), extended with the last slope."""
        xs = np.array((0, *self.removed), dtype=np.float64)
        ys = np.maximum.accumulate(np.array((0.0, *self.damage)))
        if removed <= xs[-1]:
            return float(np.interp(removed, xs, ys))
        slope = (ys[-1] - ys[-2]) / max(xs[-1] - xs[-2], 1) if len(xs) > 1 else 0.0
        return float(ys[-1] + max(slope, 0.0) * (removed - xs[-1]))


@dataclass(frozen=True)
class Sensitivities:
    """Damage curves by group id, and how many samples measured them."""

    curves: Mapping[int, Curve]
    samples: int


class Sensitivity:
    """``Sensitivity(ratios=…, samples=…).run(analysis, original, scores, inputs)``."""

    def __init__(self, *, ratios: tuple[float, ...] = RATIOS, samples: int = 32,
                 min_channels: int = 1):
        self.ratios, self.samples, self.min_channels = ratios, samples, min_channels

    def run(self, analysis: Analysis, original: onnx.ModelProto, scores: Scores,
            inputs: Mapping[str, np.ndarray]) -> Sensitivities:

        n = len(next(iter(inputs.values())))
        take = min(n, self.samples)
        feeds = {k: np.asarray(v[:take]) for k, v in inputs.items()}
        groups = [g for g in analysis.prunable_groups if g.id in scores.by_group]
        masked = _Masked(original, analysis)
        reference = _outputs(masked.session, feeds)
        curves: dict[int, Curve] = {}
        for g in progress(groups, "sensitivity", unit="group"):
            counts = sorted({c for r in self.ratios
                             if 0 < (c := min(g.size - self.min_channels,
                                              max(1, math.floor(r * g.size))))})
            damage = []
            for c in counts:
                plan = _one_group_plan(analysis, g, scores, c)
                damage.append(_damage(reference, masked.outputs(plan, feeds)))
            curves[g.id] = Curve(tuple(counts), tuple(damage))
        return Sensitivities(curves, take)


class _Masked:
    """The original model with its float consumer weights fed as inputs (each initializer is
    also declared a graph input, so a feed overrides it): one onnxruntime session answers for
    every masked variant. A plan whose masking is not a plain initializer slice (a quantised
    weight behind DequantizeLinear) gets a masked copy of its own."""

    def __init__(self, original: onnx.ModelProto, analysis: Analysis):
        from spa import validate as val
        from spa.coupling.types import Role

        self.original, self.analysis = original, analysis
        self.inits = {i.name: i for i in original.graph.initializer
                      if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)}
        self.spaces = {m.space for g in analysis.groups for m in g.members
                       if m.role is Role.CONSUMER}
        names = sorted({name for name, _ in self.spaces if name in self.inits})
        model = onnx.ModelProto()
        model.CopyFrom(original)
        declared = {i.name for i in model.graph.input}
        model.graph.input.extend(
            onnx.helper.make_tensor_value_info(n, self.inits[n].data_type, self.inits[n].dims)
            for n in names if n not in declared)
        self.session = val.session(model, what="original model")
        self.arrays: dict[str, np.ndarray] = {}

    def outputs(self, plan: Plan, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        from spa import validate as val
        from spa.plan import removed_indices

        zero: dict[str, list[tuple[int, np.ndarray]]] = {}
        for (name, axis), idx in removed_indices(self.analysis, plan).items():
            if (name, axis) in self.spaces:
                zero.setdefault(name, []).append((axis, idx))
        if any(name not in self.inits for name in zero):
            copy = val.masked_model(self.original, self.analysis, plan)
            return _outputs(val.session(copy), feeds)
        weights = {}
        for name, slices in zero.items():
            arr = self._array(name).copy()
            for axis, idx in slices:
                index: list[slice | np.ndarray] = [slice(None)] * arr.ndim
                index[axis] = idx
                arr[tuple(index)] = 0
            weights[name] = arr
        return _outputs(self.session, feeds, weights)

    def _array(self, name: str) -> np.ndarray:
        if name not in self.arrays:
            self.arrays[name] = onnx.numpy_helper.to_array(self.inits[name])
        return self.arrays[name]


def lowest(group: Group, scores: Scores, removed: int) -> np.ndarray:
    """The kept channels of ``group`` when its ``removed`` lowest-scored ones go (ties: by
    index, as the allocation breaks them)."""
    order = np.lexsort((np.arange(group.size), -scores.by_group[group.id]))
    return np.sort(order[:group.size - removed])


def _one_group_plan(analysis: Analysis, group: Group, scores: Scores, removed: int) -> Plan:
    keep = tuple(int(i) for i in lowest(group, scores, removed))
    return Plan(analysis.fingerprint, (GroupPlan(group.id, group.name, group.size, keep),), (),
                None, None)


def _outputs(sess, feeds: Mapping[str, np.ndarray],
             weights: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
    """The float graph outputs, run in chunks of the model's batch (``weights`` go whole)."""
    from spa import validate as val

    return [np.asarray(v, np.float64)
            for v in val.run_chunked(sess, dict(feeds), whole=weights).values()
            if np.issubdtype(np.asarray(v).dtype, np.floating)]


def _damage(reference: list[np.ndarray], outputs: list[np.ndarray]) -> float:
    num = sum(float(np.sum((r - o) ** 2)) for r, o in zip(reference, outputs))
    den = sum(float(np.sum(r ** 2)) for r in reference)
    return num / den if den > 0 else num
