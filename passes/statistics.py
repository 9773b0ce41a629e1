"""Layer statistics: an analysis pass over the consumer layers' inputs (passes/hessian.py).

``LayerStatistics(source=…, samples=…, seed=…, calib=…, dims=…).run(analysis)`` runs the
model once per sample batch in onnxruntime and returns :class:`LayerStats`, a frozen result
that the pipeline hands, explicitly, to whoever needs it: OBSPA's scoring and the OBS
compensation read its Hessians ``H = E[x xᵀ]``, the calibrated criteria (activation, Wanda,
FLAP) and FLAP's bias compensation its per-channel means and variances. Nothing reads them
back off a criterion. With ``HessianSource.IDENTITY`` no model runs: ``H = I``.

Calibration data is read, checked and split once per run by :mod:`spa.calibration`; this pass
takes its training arrays (``calib``, named after the graph inputs, first axis = samples).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from spa.choices import HessianSource
from spa.passes.hessian import ConsumerLayer, InputStats, consumer_layers, input_stats

if TYPE_CHECKING:
    from spa.coupling.analysis import Analysis

LayerKey = tuple[str, int]  # (weight name, input axis)


@dataclass(frozen=True)
class LayerStats:
    """Per consumer layer: where it reads its input, and that input's statistics."""

    source: HessianSource
    layers: Mapping[LayerKey, ConsumerLayer]
    inputs: Mapping[LayerKey, InputStats]  # empty for the identity source
    # the same without the calibration data's validation runs (None: not split)
    fitted: Mapping[LayerKey, InputStats] | None = None

    def without_runs(self) -> LayerStats | None:
        """These statistics over the samples fitted alone, without the validation runs
        (:func:`spa.calibration.validation_runs`); None when they were not kept apart."""
        if self.fitted is None:
            return None
        return LayerStats(self.source, self.layers, self.fitted)

    def hessian(self, key: LayerKey) -> np.ndarray | None:
        """``H`` (float64, mean over samples) of a layer; diagonal (1-D) for very wide ones,
        ``I`` (as a vector of ones) for the identity source; None for no such layer."""
        layer = self.layers.get(key)
        if layer is None:
            return None
        if self.source is HessianSource.IDENTITY:
            return np.ones(layer.width)
        stats = self.inputs.get(key)
        return None if stats is None else stats.second_moment


class LayerStatistics:
    """The analysis pass: statistics of every consumer layer's input over ``source``."""

    def __init__(self, *, source: HessianSource, samples: int, seed: int = 0,
                 calib: Mapping[str, np.ndarray] | None = None,
                 dims: Mapping[str, int] | None = None, skip_padding: bool = True,
                 keep_fitted: bool = False):
        self.source, self.samples, self.seed = source, samples, seed
        self.keep_fitted = keep_fitted  # also the statistics without the validation runs
        self.skip_padding = skip_padding  # False: as plans before it, padding rows count
        self.calib = dict(calib) if calib is not None else None
        self.dims = dict(dims) if dims is not None else None

    def run(self, analysis: Analysis) -> LayerStats:
        layers = consumer_layers(analysis)
        if self.source is HessianSource.IDENTITY:
            return LayerStats(self.source, layers, {})
        split = input_stats(analysis, layers, self.source, samples=self.samples,
                            seed=self.seed, calib=self.calib, dims=self.dims,
                            skip_padding=self.skip_padding, keep_fitted=self.keep_fitted)
        return LayerStats(self.source, layers, split.whole, split.fitted)
