"""Compensation: the OBS update of the kept input weights of every consumer layer.

For each consumer layer, ``Q`` is the union of the input channels the plan removes (several
groups may feed one layer, as in a concat), and the kept rows get
``W[K] -= Hinv[K,Q] · (Hinv[Q,Q])⁻¹ · W[Q]`` with the layer's ``Hinv = (H + λI)⁻¹`` — the
closed form of OBSPA (passes/importance/obspa.py), exact for the joint removal. It reads the
full-size weights and the layer statistics (passes/statistics.py) and mutates nothing: it
returns the updated weights (:class:`WeightUpdates`), which the rewrite, the one mutating step,
writes before it slices them; FLAP's bias shifts (:class:`BiasShifts`) likewise, added by the
rewrite after slicing. It decides nothing the plan did not.
A quantised weight is updated in float and written as new codes on its own scales and zero
points: a ``DequantizeLinear``'s or a chain of plain ops' integers (spa/ir/quant_chain.py), or
a ``MatMulNBits``' packed ``B`` (whose consumer space, its scales' blocks, stands for
``block_size`` input columns each; spa/ir/quant.py). A weight several nodes read (ALBERT's
layers share theirs) gets one update, from the statistics of all its uses (passes/hessian.py),
and FLAP's shift goes into the bias after each use, from that use's own input mean. A weight
tied to another tensor of the file (spa/ir/tied.py: a tied ``lm_head`` is a view of the
embedding) gets no update: one layer's update would untie it, and the file would hold it twice.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from spa.coupling.registry import entry_of
from spa.ir.quant import (
    PackedWeight,
    QuantizedWeight,
    has_codes,
    layer_weight,
    packed_weight,
    quantized_weight,
    requantized,
    weight_array,
)
from spa.ir.tied import tied_names
from spa.passes.hessian import damped_inverse
from spa.passes.importance.obspa import expanded, from_rows, layer_rows, obs_remove
from spa.plan import kept_indices, removed_indices
from spa.progress import progress

if TYPE_CHECKING:
    from spa.coupling.analysis import Analysis
    from spa.passes.statistics import LayerStats
    from spa.plan import Plan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightUpdates:
    """The OBS-updated full-size weights, by tensor name; ``layers``: how many consumer
    layers were updated."""

    values: Mapping[str, np.ndarray]
    layers: int


@dataclass(frozen=True)
class BiasShifts:
    """Per consumer node, FLAP's output shift and the weight space of its outputs."""

    by_node: Mapping[str, tuple[np.ndarray, tuple[str, int]]]


class Compensation:
    """``Compensation(damping=λ).run(analysis, plan, statistics) -> WeightUpdates``;
    ``reuse_inverses``: keep the last plan's layers' ``(H + λI)⁻¹`` for the next run (the
    sensitivity measures several cuts of one group in a row against the same statistics)."""

    def __init__(self, *, damping: float, reuse_inverses: bool = False):
        self.damping = damping
        self.inverses: dict[tuple[str, int], np.ndarray] | None = {} if reuse_inverses else None

    def run(self, analysis: Analysis, plan: Plan, statistics: LayerStats) -> WeightUpdates:
        removed = removed_indices(analysis, plan).items()
        out, updated, skipped, untied = self._update(
            analysis, progress(removed, "compensation", unit="layer"), statistics)
        if skipped:
            # Codes of no integer type (float 8): the update has no codes to go into, and
            # those layers lose their channels without it.
            log.warning("compensation not written into %d quantised weight(s) (%s): their "
                        "removed channels are dropped without an update", len(skipped),
                        _some(skipped))
        if untied:
            log.warning("compensation not written into %d tied weight(s) (%s): an update would "
                        "untie them", len(untied), _some(untied))
        return WeightUpdates(out, updated)

    def values(self, analysis: Analysis, plan: Plan,
               statistics: LayerStats) -> Mapping[str, np.ndarray]:
        """The updated full-size weights alone, with no progress and no warnings."""
        return self._update(analysis, removed_indices(analysis, plan).items(), statistics)[0]

    def _update(self, analysis: Analysis, removed: Iterable[tuple[tuple[str, int], np.ndarray]],
                statistics: LayerStats
                ) -> tuple[dict[str, np.ndarray], int, list[str], list[str]]:
        tensors = analysis.model.graph.tensors()
        tied = tied_names(analysis.model.ties, analysis.model.graph)
        out: dict[str, np.ndarray] = {}
        updated = 0
        skipped: list[str] = []
        untied: list[str] = []
        used: set[tuple[str, int]] = set()
        # updated in float, written in their codes: a DequantizeLinear's integers, a packed B
        coded: dict[str, QuantizedWeight | PackedWeight] = {}
        for key, gone in removed:
            h = statistics.hessian(key)
            t = layer_weight(tensors.get(key[0]))  # a MatMulNBits' B, not its scales
            name = t.name if t is not None else key[0]
            quantized = quantized_weight(t) if h is not None else None
            if quantized is not None and not has_codes(quantized):
                skipped.append(name)
                continue
            if h is not None and name in tied:
                untied.append(name)
                continue
            if h is None or h.ndim == 1 or (quantized is None and not isinstance(t, gs.Constant)):
                continue  # not a consumer layer, or a diagonal H (no cross terms to use)
            packed = packed_weight(t)
            if quantized is not None:
                coded[name] = quantized
            elif packed is not None:
                coded[name] = packed
            values = out[name] if name in out else np.array(weight_array(t))  # never a view
            per = statistics.layers[key].per
            w = layer_rows(values, key[1], per)
            gone = expanded(gone, per)
            keep = np.setdiff1d(np.arange(w.shape[0]), gone)
            obs_remove(w, self._inverse(key, h), gone, keep)
            used.add(key)
            out[name] = from_rows(w, values.shape, key[1], per).astype(values.dtype)
            updated += 1
        for name, weight in coded.items():  # new codes on the weight's own scales
            if isinstance(weight, PackedWeight):
                out[name] = weight.codes(out.pop(name))
            else:
                out[weight.q.name] = requantized(weight, out.pop(name))
        if self.inverses is not None:  # only this plan's layers: the next plan is most often
            # another cut of the same group (the sensitivity's order), and every layer's
            # inverse kept would double the memory of the statistics
            self.inverses = {k: v for k, v in self.inverses.items() if k in used}
        return out, updated, skipped, untied

    def _inverse(self, key: tuple[str, int], h: np.ndarray) -> np.ndarray:
        """``(H + λI)⁻¹``, a copy the OBS removal may update in place."""
        if self.inverses is None:
            return damped_inverse(h, self.damping)
        if key not in self.inverses:
            self.inverses[key] = damped_inverse(h, self.damping)
        return self.inverses[key].copy()


def _some(names: list[str]) -> str:
    return ", ".join(sorted(names)[:3]) + ("…" if len(names) > 3 else "")


class BiasCompensation:
    """FLAP: fold the removed input channels' mean contribution into each consumer's bias.

    For a consumer layer with rows ``W[c]`` (input channel ``c`` first) the removed channels
    ``Q`` contributed ``Σ_{c∈Q} E[x_c] · W[c]`` on average; summed over kernel positions this is
    the shift of the layer's outputs. :meth:`run` computes it on the full-size weights before
    the rewrite; :func:`add_bias_shifts` (called by the rewrite) adds it, restricted to the
    surviving outputs, to the bias after slicing. Where the bias is comes from the op's registry
    entry (its bias slot, spa/coupling/facts.py): an input (Conv, Gemm), created if the node had
    none, or the constant that the op reading it adds (MatMul → Add, or a fused bias:
    ``BiasGelu``, ``SkipLayerNormalization``); an op without a bias slot is left alone.
    """

    def run(self, analysis: Analysis, plan: Plan, statistics: LayerStats) -> BiasShifts:
        tensors = analysis.model.graph.tensors()
        layers, stats = statistics.layers, statistics.inputs
        out = {}
        for key, gone in removed_indices(analysis, plan).items():
            if key not in layers or key not in stats:
                continue
            values = weight_array(layer_weight(tensors[key[0]]))  # dequantised
            w = layer_rows(values, key[1], layers[key].per)
            gone = expanded(gone, layers[key].per)
            for node, mean in stats[key].means(layers[key]).items():  # each use of a shared
                shift = (mean[gone] @ w[gone]).reshape(  # weight on its own input's mean
                    np.moveaxis(values, key[1], 0).shape[1], -1).sum(axis=1)
                out[node] = (shift, (key[0], 1 - key[1]))  # the weight's output axis
        return BiasShifts(out)


def add_bias_shifts(analysis: Analysis, plan: Plan, shifts: BiasShifts) -> int:
    """Add the shifts to the rewritten graph's biases (the rewrite calls this after slicing)."""
    kept = kept_indices(analysis, plan)
    nodes = {n.name: n for n in analysis.model.graph.nodes}
    done = 0
    for name, (shift, out_key) in shifts.by_node.items():
        survivors = kept.get(out_key, np.arange(shift.size))
        done += _add_to_bias(nodes[name], analysis.model.opset, shift[survivors])
    return done


def _add_to_bias(node: gs.Node, opset: int, shift: np.ndarray) -> int:
    """Add ``shift`` to the node's bias, at its op's bias slot: 1 if done, 0 if it has none."""
    entry = entry_of(node, opset)
    if entry is None or entry.bias is None:
        return 0
    slot = entry.bias
    if slot.input is None:
        return _add_to_following_bias(node, opset, shift)
    if len(node.inputs) > slot.input and isinstance(node.inputs[slot.input], gs.Constant) \
            and np.asarray(node.inputs[slot.input].values).size == shift.size:
        _shift_constant(node.inputs[slot.input], shift)
        return 1
    if len(node.inputs) <= slot.input:  # after empty optional inputs, if it has fewer
        node.inputs.extend(gs.Variable.empty() for _ in range(slot.input - len(node.inputs)))
        node.inputs.append(gs.Constant(f"{node.name}__spa_bias", shift.astype(_float(node))))
        return 1
    return 0


def _float(node: gs.Node) -> type | np.dtype:
    """The float type of ``node``'s output (a new bias's), float32 when unknown."""
    dtype = node.outputs[0].dtype
    return np.dtype(dtype) if dtype is not None and np.dtype(dtype).kind == "f" else np.float32


def _add_to_following_bias(node: gs.Node, opset: int, shift: np.ndarray) -> int:
    """The bias of a layer with none of its own: the constant that the one node reading it adds
    to it (an Add, or a fused bias: its op's added-bias fact)."""
    if len(node.outputs[0].outputs) != 1:
        return 0
    reader = node.outputs[0].outputs[0]
    entry = entry_of(reader, opset)
    slots = [i for i, t in enumerate(reader.inputs) if t is node.outputs[0]]
    slot = entry.adds_bias(reader, slots[0]) if entry is not None and entry.adds_bias \
        and len(slots) == 1 else None
    t = reader.inputs[slot] if slot is not None and slot < len(reader.inputs) else None
    if isinstance(t, gs.Constant) and np.asarray(t.values).size == shift.size:
        _shift_constant(t, shift)
        return 1
    return 0


def _shift_constant(t: gs.Constant, shift: np.ndarray) -> None:
    values = np.asarray(t.values)
    t.values = (values.astype(np.float64).reshape(-1) + shift).astype(values.dtype).reshape(
        values.shape)
