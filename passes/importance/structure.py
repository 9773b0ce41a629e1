"""Data-free criteria beyond plain magnitude: FPGM, BatchNorm scale, LAMP.

``fpgm`` (filter pruning via geometric median): a channel whose weights sit near the others'
geometric median is replaceable, so its score is the sum of its Euclidean distances to every
other channel's weights, ``Σ_j ‖w_i − w_j‖``, computed through the Gram matrix.

``bn_scale``: ``|γ|`` of the BatchNorm the channel passes through (network slimming): a
constant that some node reads at its op's *slimming scale* slot (the registry entry's fact,
spa/coupling/rules/norm.py; BatchNormalization's input 1, at every opset). Inference
exports usually fold BatchNorm into the convolution; a group with no BatchNorm is an error that
says so and suggests a magnitude criterion.

``lamp`` (layer-adaptive magnitude): with a weight's per-channel squared norms sorted ascending,
``score(u) = u² / Σ_{v ≥ u} v²`` — a per-layer rescaling that makes scores comparable across
layers, meant for ``--global`` ranking.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from spa.coupling.registry import entries
from spa.coupling.types import Role
from spa.passes.importance.base import Criterion, along, register_criterion

if TYPE_CHECKING:
    from spa.coupling.analysis import Group, Member


@register_criterion
class FPGM(Criterion):
    name = "fpgm"
    help = "sum of distances to the other channels' weights (geometric median; data-free)"

    def local(self, weight: np.ndarray, axis: int, member: Member, group: Group) -> np.ndarray:
        rows = along(weight, axis)
        sq = np.einsum("ij,ij->i", rows, rows)
        dist2 = np.maximum(sq[:, None] + sq[None, :] - 2 * rows @ rows.T, 0)
        return np.sqrt(dist2).sum(axis=1)


@register_criterion
class BNScale(Criterion):
    name = "bn_scale"
    help = "|gamma| of the channel's BatchNorm (needs unfolded BatchNorm; data-free)"

    def scored(self, member: Member, tensor: gs.Tensor) -> bool:
        return member.role is Role.SCALE and isinstance(tensor, gs.Constant) and any(
            _is_slimming_scale(n, tensor) for n in tensor.outputs)

    def unscorable(self, group: Group, tensors: dict[str, gs.Tensor]) -> str | None:
        if any(self.scored(m, tensors.get(m.space[0])) for m in group.members):
            return None
        return ("criterion bn_scale: no BatchNormalization in the group (inference exports "
                "usually fold it into the convolution; use l1 or obspa)")

    def local(self, weight: np.ndarray, axis: int, member: Member, group: Group) -> np.ndarray:
        return np.abs(along(weight, axis)).sum(axis=1)


def _is_slimming_scale(node: gs.Node, tensor: gs.Tensor) -> bool:
    """``node`` reads ``tensor`` at its op's slimming-scale slot, at any opset (the slot of an op
    does not move between opsets; the criterion sees no model to read one from)."""
    slots = [e.slimming_scale for e in entries(node.domain, node.op)
             if e.slimming_scale is not None]
    return any(slot < len(node.inputs) and node.inputs[slot] is tensor for slot in slots)


@register_criterion
class LAMP(Criterion):
    name = "lamp"
    help = "layer-adaptive magnitude: squared norm over the norms not smaller (data-free)"

    def local(self, weight: np.ndarray, axis: int, member: Member, group: Group) -> np.ndarray:
        sq = np.square(along(weight, axis)).sum(axis=1)
        order = np.argsort(sq, kind="stable")
        tail = np.cumsum(sq[order][::-1])[::-1]  # Σ of the norms at or above each position
        out = np.empty_like(sq)
        out[order] = sq[order] / np.maximum(tail, 1e-300)
        return out
