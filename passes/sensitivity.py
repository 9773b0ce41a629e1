"""Sensitivity: what removing part of one group does to the model's *final outputs*.

For every scored group and a few removal ratios, the group's lowest-scored channels are masked
(their consumer weights zeroed, as the numeric oracle's masked model does) and the model runs on
calibration samples in onnxruntime; the damage is the relative squared error of all float outputs
against the dense model's, ``‖y − y_dense‖² / ‖y_dense‖²``. When the plan will be compensated
(OBSPA), ``update`` gives each masked plan's compensated consumer weights, and the damage is
measured with them, as the written model will run: zeroed alone, a layer whose kept channels can
stand in for the removed ones looks as fragile as one whose cannot (all-MiniLM-L6-v2, heads 0.3
+ MLP 0.3, OBSPA on 1024 calibration lines: held-out cosine 0.940 → 0.954). The result, a damage
curve per group, is what the sensitivity allocation (passes/allocation.py) spends the budget
against: residual streams and first layers are fragile, and uniform ratios cut them as deep as
the rest.
:func:`zeroed_damage` measures the same damage for whole residual blocks (depth pruning).
Token models whose outputs have no token axis run their samples by length, in chunks cut after
their padding (:func:`spa.calibration.chunked`): all-MiniLM-L6-v2's planning 57 s → 45 s, the
same curves to float rounding (its pruned file byte-identical).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx

from spa.calibration import (
    attended_lengths,
    chunked,
    padding_cut,
    sample_count,
    spread,
    tokenless_outputs,
)
from spa.coupling.analysis import GroupKind
from spa.passes.segments import Frontiers, Runner, fixed_batch, node_inputs, with_types
from spa.plan import GroupPlan, Plan
from spa.progress import progress

if TYPE_CHECKING:
    from spa.coupling.analysis import Analysis, Group
    from spa.passes.importance.base import Scores

log = logging.getLogger(__name__)
RATIOS = (0.125, 0.25, 0.5, 0.75)
MACS_BUDGET = 2e12  # multiply-adds all masked runs may cost together, before samples fall
MIN_SAMPLES = 8
#: A plan's updated full-size consumer weights, by initializer name (the compensation's).
WeightUpdate = Callable[[Plan], Mapping[str, np.ndarray]]
FRONTIER_MEMORY = 1 << 30  # the shared prefix's live tensors held in memory; beyond, on disk


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
    """``Sensitivity(ratios=…, samples=…, update=…).run(analysis, original, scores, inputs)``;
    ``update``: the compensation's weights for a plan (:data:`WeightUpdate`)."""

    def __init__(self, *, ratios: tuple[float, ...] = RATIOS, samples: int = 32,
                 min_channels: int = 1, macs_budget: float = MACS_BUDGET,
                 update: WeightUpdate | None = None):
        self.ratios, self.samples, self.min_channels = ratios, samples, min_channels
        self.update = update
        self.macs_budget = macs_budget  # fewer samples (down to MIN_SAMPLES) for big models

    def run(self, analysis: Analysis, original: onnx.ModelProto, scores: Scores,
            inputs: Mapping[str, np.ndarray]) -> Sensitivities:

        groups = [g for g in analysis.prunable_groups if g.id in scores.by_group]
        masked = _Masked(original, analysis, update=self.update)
        plans = {g.id: [_one_group_plan(analysis, g, scores, c) for c in self._counts(g)]
                 for g in groups}
        # a group's masks change nothing before its first consumer: run the shared prefix once
        # and each group's suffix from there, groups in the order of their first consumers
        starts = {g.id: masked.start(plans[g.id]) for g in groups}
        order = sorted(groups, key=lambda g: starts[g.id])
        # the weights some plan from a start changes: fed there, the rest stay constants
        # (onnxruntime prepacks constant weights: ResNet-50 runs 1.4x faster than fed)
        fed: dict[int, set[str]] = {}
        for g in groups:
            fed.setdefault(starts[g.id], set()).update(
                name for p in plans[g.id] for name in masked.zeroed(p))
        suffix_macs = _suffix_macs(analysis, original)
        per_sample = sum(len(plans[g.id]) * suffix_macs[starts[g.id]] for g in groups)
        n = sample_count(inputs)
        take = min(n, self.samples, max(MIN_SAMPLES, int(self.macs_budget // max(per_sample, 1))))
        feeds = spread(inputs, take)
        # token samples by length, run in chunks cut after their padding (every run sees this
        # order; the damage sums over samples), when no output has a token axis to line up
        cut = padding_cut(original) if tokenless_outputs(original) else None
        if cut is not None:
            by_length = np.argsort(attended_lengths(feeds[cut]), kind="stable")
            feeds = {k: np.asarray(v)[by_length] for k, v in feeds.items()}
        curves: dict[int, Curve] = {}
        with Frontiers(FRONTIER_MEMORY) as fronts:
            reference = masked.reference(fronts, feeds, cut)
            prefix = masked.runner(fronts, feeds, cut)
            for g in progress(order, "sensitivity", unit="group"):
                damage = [_damage(reference, out) for out in masked.outputs(
                    plans[g.id], prefix, feeds, fed[starts[g.id]])]
                curves[g.id] = Curve(tuple(p.groups[0].size - len(p.groups[0].keep)
                                           for p in plans[g.id]), tuple(damage))
        return Sensitivities(curves, take)

    def _counts(self, g: Group) -> list[int]:
        """The removed counts measured: one per ratio, and the most the allocation may remove
        (a curve past its last measurement would extend a slope measured over idle channels,
        and a group's last live channels would look free)."""
        most = g.size - min(g.size, 1 if g.kind is GroupKind.HEADS else self.min_channels)
        counts = {min(most, max(1, math.floor(r * g.size))) for r in self.ratios} | {most}
        return sorted(c for c in counts if c > 0)


class _Masked:
    """The original model with its float consumer weights fed as inputs (each initializer is
    also declared a graph input, so a feed overrides it): one onnxruntime session answers for
    every masked variant of the whole model, and one per starting node for its suffixes. A plan
    whose masking is not a plain initializer slice (a quantised weight behind
    DequantizeLinear, a MatMulNBits scale) gets a whole masked copy of its own, with the
    plan's compensated weights (``update``) in it."""

    def __init__(self, original: onnx.ModelProto, analysis: Analysis,
                 extra: Collection[str] = (),
                 update: WeightUpdate | None = None):
        from spa.coupling.types import Role

        self.original, self.analysis, self.update = original, analysis, update
        packed = _packed_once(original)  # a feed would not reach them: masked copies instead
        self.inits = {i.name: i for i in original.graph.initializer
                      if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)
                      and i.name not in packed}
        self.spaces = {m.space for g in analysis.groups for m in g.members
                       if m.role is Role.CONSUMER}
        self.overridable = {name for name, _ in self.spaces if name in self.inits} | {
            name for name in extra if name in self.inits}
        self.model = with_types(original)
        self.first_reader: dict[str, int] = {}
        for i, node in enumerate(self.model.graph.node):
            for name in node_inputs(node):
                self.first_reader.setdefault(name, i)
        self.suffixes: dict[int, tuple[object, list[str]]] = {}

    @functools.cached_property
    def session(self):
        """The whole model, consumer weights overridable (made only when a plan needs it)."""
        from spa import validate as val

        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        declared = {i.name for i in model.graph.input}
        model.graph.input.extend(
            onnx.helper.make_tensor_value_info(n, self.inits[n].data_type, self.inits[n].dims)
            for n in sorted(self.overridable - declared))
        return val.session(model, what="original model", arena=False)

    def zeroed(self, plan: Plan) -> dict[str, list[tuple[int, np.ndarray]]]:
        """The consumer weight slices the plan's mask zeroes, by initializer name."""
        from spa.plan import removed_indices

        zero: dict[str, list[tuple[int, np.ndarray]]] = {}
        for (name, axis), idx in removed_indices(self.analysis, plan).items():
            if (name, axis) in self.spaces:
                zero.setdefault(name, []).append((axis, idx))
        return zero

    def start(self, plans: list[Plan]) -> int:
        """The first node the plans' masks change (0: they need the whole masked copy)."""
        names = {name for p in plans for name in self.zeroed(p)}
        if not names or any(n not in self.inits for n in names):
            return 0
        return min(self.first_reader.get(n, 0) for n in names)

    def runner(self, fronts: Frontiers, feeds: Mapping[str, np.ndarray],
               cut: str | None = None) -> Runner:
        """A runner over ``feeds`` in chunks; ``cut``: the attention mask by which each chunk
        is cut after its last attended column (``feeds`` already in order of length)."""
        step = fixed_batch(self.model) or 32
        return Runner(self.model, fronts, "original", chunked(feeds, step, cut)[1])

    def reference(self, fronts: Frontiers, feeds: Mapping[str, np.ndarray],
                  cut: str | None = None) -> list[np.ndarray]:
        """The unmasked model's float outputs, run a segment at a time (no whole session)."""
        whole = self.runner(fronts, feeds, cut)
        whole.advance(len(self.model.graph.node), want=())
        names = [o.name for o in self.model.graph.output]
        if not all(whole.holds(n) for n in names):
            return _outputs(self.session, feeds)
        values = [np.concatenate([np.asarray(v[n]) for v in whole.values]) for n in names]
        return [np.asarray(v, np.float64) for v in values if np.issubdtype(v.dtype, np.floating)]

    def outputs(self, plans: list[Plan], prefix: Runner, feeds: Mapping[str, np.ndarray],
                fed: Collection[str]) -> list[list[np.ndarray]]:
        """The float outputs of each plan's masked model; the prefix runner is advanced to
        the plans' first changed node and runs the unchanged part once, the rest in a
        session that takes the weights ``fed`` (those the plans change) as inputs."""
        from spa import validate as val

        start = self.start(plans)
        if start == 0 or start < prefix.position:
            return [self._whole(plan, feeds) for plan in plans]
        prefix.advance(start, want=())
        sess, inputs = self._suffix(prefix, fed)
        outputs = [o.name for o in self.model.graph.output]
        results = []
        for plan in plans:
            weights = self._weights(self.zeroed(plan), plan)
            parts: dict[str, list[np.ndarray]] = {}
            for values in prefix.values:
                run = val.run(sess, {k: np.asarray(values[k]) for k in inputs} | weights)
                for name in outputs:
                    parts.setdefault(name, []).append(np.asarray(
                        run[name] if name in run else values[name]))
            results.append([np.asarray(np.concatenate(parts[o]), np.float64)
                            for o in outputs if np.issubdtype(parts[o][0].dtype, np.floating)])
        return results

    def _whole(self, plan: Plan, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        from spa import validate as val

        zero = self.zeroed(plan)
        if any(name not in self.inits for name in zero):
            updated = self.update(plan) if self.update is not None else {}
            copy = val.masked_model(_with_values(self.original, updated), self.analysis, plan)
            return _outputs(val.session(copy), feeds)
        return _outputs(self.session, feeds, self._weights(zero, plan))

    def _dtype(self, name: str) -> np.dtype:
        return onnx.helper.tensor_dtype_to_np_dtype(self.inits[name].data_type)

    def _suffix(self, prefix: Runner, fed: Collection[str]):
        """A session of the nodes from the prefix's position on, fed the tensors live there
        and the consumer weights ``fed``; and its inputs from the prefix."""
        from spa import validate as val

        start = prefix.position
        if start not in self.suffixes:
            produced = {o for node in self.model.graph.node[start:] for o in node.output}
            model, outer = prefix.segment(
                len(self.model.graph.node),
                [o.name for o in self.model.graph.output if o.name in produced],
                overridable=self.overridable & set(fed))
            self.suffixes.clear()  # one at a time: each holds the weights it reads
            self.suffixes[start] = (val.session(model, what=f"original model from node {start}",
                                                arena=False), outer)
        return self.suffixes[start]

    def _weights(self, zero: dict[str, list[tuple[int, np.ndarray]]],
                 plan: Plan | None = None) -> dict[str, np.ndarray]:
        weights = {}
        updated = self.update(plan) if self.update is not None and plan is not None else {}
        for name, slices in zero.items():
            arr = np.array(updated[name], dtype=self._dtype(name)) if name in updated \
                else onnx.numpy_helper.to_array(self.inits[name]).copy()
            for axis, idx in slices:
                index: list[slice | np.ndarray] = [slice(None)] * arr.ndim
                index[axis] = idx
                arr[tuple(index)] = 0
            weights[name] = arr
        return weights


def zeroed_damage(original: onnx.ModelProto, analysis: Analysis,
                  zero_sets: Sequence[Collection[str]], inputs: Mapping[str, np.ndarray], *,
                  samples: int = 32) -> list[float]:
    """The final-output damage of each set of float initializers zeroed whole (a residual
    block's last layer: depth pruning), on ``samples`` of ``inputs`` spread over them, one
    overridable session for all sets."""
    masked = _Masked(original, analysis, extra={n for z in zero_sets for n in z})
    feeds = spread(inputs, samples)
    chunk = batch_limit(original, analysis)
    reference = _outputs(masked.session, feeds, chunk=chunk)
    damage = []
    for names in zero_sets:
        if all(name in masked.inits for name in names):
            weights = {name: np.zeros_like(onnx.numpy_helper.to_array(masked.inits[name]))
                       for name in names}
            out = _outputs(masked.session, feeds, weights, chunk)
        else:  # not overridable (float16, packed once): a zeroed copy of the whole model
            out = _outputs(_zeroed(original, names), feeds, chunk=chunk)
        damage.append(_damage(reference, out))
    return damage


def _packed_once(original: onnx.ModelProto) -> set[str]:
    """Initializers a fed override does not reach after a session's first run:
    onnxruntime's ``MatMulNBits`` packs its weight with its scales once and keeps them
    (measured: feeding other scales to a later run gives the first run's output)."""
    return {name for node in original.graph.node if node.op_type == "MatMulNBits"
            for name in node.input[1:]}


def _with_values(original: onnx.ModelProto, values: Mapping[str, np.ndarray]
                 ) -> onnx.ModelProto:
    """``original``, or a copy with the initializers named in ``values`` holding them (in
    their own types): a plan's compensated weights, float or codes."""
    if not values:
        return original
    copy = onnx.ModelProto()
    copy.CopyFrom(original)
    for init in copy.graph.initializer:
        if init.name in values:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
            init.CopyFrom(onnx.numpy_helper.from_array(
                np.asarray(values[init.name]).astype(dtype), init.name))
    return copy


def _zeroed(original: onnx.ModelProto, names: Collection[str]):
    """A session of ``original`` with the initializers ``names`` zeroed."""
    from spa import validate as val

    zeros = {init.name: np.zeros_like(onnx.numpy_helper.to_array(init))
             for init in original.graph.initializer if init.name in names}
    return val.session(_with_values(original, zeros), what="original model with a block zeroed",
                       arena=False)


def _suffix_macs(analysis: Analysis, original: onnx.ModelProto) -> list[float]:
    """Per node position, the multiply-adds of one sample from there to the end (the
    registry's MAC terms at the graph's shapes; symbolic dims count as 1)."""
    from spa.metrics import node_macs

    macs = node_macs(analysis.model.graph)
    per_node = [float(macs.get(node.name, 0)) for node in original.graph.node]
    return [*np.cumsum(per_node[::-1])[::-1].tolist(), 0.0]


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
             weights: dict[str, np.ndarray] | None = None, chunk: int | None = None
             ) -> list[np.ndarray]:
    """The float graph outputs, run in chunks of the model's batch (or ``chunk`` samples;
    ``weights`` go whole)."""
    from spa import validate as val

    return [np.asarray(v, np.float64)
            for v in val.run_chunked(sess, dict(feeds), chunk, whole=weights).values()
            if np.issubdtype(np.asarray(v).dtype, np.floating)]


def batch_limit(model: onnx.ModelProto, analysis: Analysis | None = None) -> int | None:
    """The smallest fixed first dim of the graph inputs (a decoder's caches fixed at batch 1
    behind symbolic token inputs): how many samples a run may feed at once; None: any. A
    decoder with KV caches (``analysis.kv_cache``) is fed one sample at a time: onnxruntime's
    GroupQueryAttention takes a prompt after a past only at batch 1."""
    if analysis is not None and analysis.kv_cache:
        return 1
    dims = [i.type.tensor_type.shape.dim[0].dim_value for i in model.graph.input
            if i.type.tensor_type.shape.dim and i.type.tensor_type.shape.dim[0].dim_value > 0]
    return min(dims, default=None)


def _damage(reference: list[np.ndarray], outputs: list[np.ndarray]) -> float:
    num = sum(float(np.sum((r - o) ** 2)) for r, o in zip(reference, outputs))
    den = sum(float(np.sum(r ** 2)) for r in reference)
    return num / den if den > 0 else num
