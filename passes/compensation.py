"""Compensation: the OBS update of the kept input weights of every consumer layer.

For each consumer layer, ``Q`` is the union of the input channels the plan removes (several
groups may feed one layer, as in a concat), and the kept rows get
``W[K] -= Hinv[K,Q] · (Hinv[Q,Q])⁻¹ · W[Q]`` with the layer's ``Hinv = (H + λI)⁻¹`` — the
closed form of OBSPA (passes/importance/obspa.py), exact for the joint removal. Runs on the
full-size weights just before the rewrite slices them; it decides nothing the plan did not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from passes.hessian import damped_inverse
from passes.importance.obspa import layer_rows, obs_remove
from spa.plan import removed_indices

if TYPE_CHECKING:
    from spa.coupling.analysis import Analysis
    from spa.plan import Plan


class Compensation:
    """``Compensation(damping=0.1).run(analysis, plan, hessians)``: update weights in place."""

    def __init__(self, *, damping: float = 0.1):
        self.damping = damping

    def run(self, analysis: Analysis, plan: Plan,
            hessians: dict[tuple[str, int], np.ndarray]) -> int:
        tensors = analysis.model.graph.tensors()
        updated = 0
        for key, gone in removed_indices(analysis, plan).items():
            h = hessians.get(key)
            t = tensors.get(key[0])
            if h is None or not isinstance(t, gs.Constant) or h.ndim == 1:
                continue  # not a consumer layer, or a diagonal H (no cross terms to use)
            values = np.asarray(t.values)
            w = layer_rows(values, key[1])
            keep = np.setdiff1d(np.arange(w.shape[0]), gone)
            obs_remove(w, damped_inverse(h, self.damping), gone, keep)
            moved = np.moveaxis(values, key[1], 0).shape
            t.values = np.moveaxis(w.reshape(moved), 0, key[1]).astype(values.dtype)
            updated += 1
        return updated
