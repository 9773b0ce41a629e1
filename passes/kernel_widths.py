"""Kernel widths: the step each group's kept count keeps so that the runtime's fast kernels run.

onnxruntime's blocked (NCHWc) convolutions take a Conv only when its channel counts are whole
blocks of ``B`` channels (8 with AVX2, 16 with AVX-512; the ``blocked`` fact of
spa/coupling/rules/conv.py says which weight spaces need them). A conv that misses them runs
the plain NCHW kernel with reorders around it: EfficientNet-Lite0 at ``--ratio 0.05`` with
exact counts ran at 0.41× the dense model's speed (1 thread, AVX-512). Rounding elsewhere buys
nothing: MatMul/Gemm (transformers, classifier heads) have no blocked layout, and a conv's
output channels are padded to a block whatever their count, so a group that only such convs
produce and no blocked conv reads (a CNN's last conv before its classifier, a ViT's patch
embedding) keeps its exact count, and a model without blocked convs prunes as with
``--round-to 1``.

Rule. A group's member space ``s`` that a blocked fact names holds ``u_s = |s ∩ group| / n``
channels per group unit (``n``: the group's size; ``u > 1`` where a unit is a conv group or a
repeated channel), so ``k`` kept units give ``k·u_s`` channels there, a whole number of blocks
when ``k`` is a multiple of ``B / gcd(B, u_s)``. The group's step is the least common multiple
over its blocked members (1 with none); the allocation keeps counts on it (rounding up, or
down where a params/FLOPs target needs it: passes/allocation.py), and leaves exact a group
smaller than its step (it cannot reach a block). Attention-head groups are never
rounded (their unit is a whole head).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from spa.coupling.analysis import GroupKind
from spa.coupling.registry import entry_of

if TYPE_CHECKING:
    from spa.coupling.analysis import Analysis


class KernelWidths:
    """``KernelWidths(block=16).run(analysis) -> {group id: step}`` for the prunable groups."""

    def __init__(self, *, block: int):
        self.block = block

    def run(self, analysis: Analysis) -> dict[int, int]:
        if self.block <= 1:
            return {g.id: 1 for g in analysis.prunable_groups}
        blocked: set[tuple[str, int]] = set()
        opset = analysis.model.opset
        for node in analysis.model.graph.nodes:
            entry = entry_of(node, opset)
            if entry is not None and entry.blocked is not None:
                blocked.update(entry.blocked(node))
        steps = {}
        for g in analysis.prunable_groups:
            step = 1
            if g.kind is not GroupKind.HEADS:
                for m in g.members:
                    if m.space in blocked:
                        per_unit = max(1, len(m.indices) // g.size)
                        step = math.lcm(step, self.block // math.gcd(self.block, per_unit))
            steps[g.id] = step
        return steps
