"""Criteria that read calibration data (``--calib FILE.npz``): activation, Wanda, FLAP.

All three look at each consumer layer's input ``x`` over the calibration samples (one
onnxruntime pass, passes/hessian.py) and at the layer's weight rows ``W[c]`` for input channel
``c`` (input axis first, the rest flattened):

* ``activation``: ``E|x_c|`` — channels that carry little signal go;
* ``wanda`` (structured): ``Σ|W[c]| · ‖x_c‖``, with ``‖x_c‖ = sqrt(E[x_c²])``;
* ``flap``: the fluctuation ``‖W[c]‖² · Var(x_c)``; the removed channels' mean contribution
  ``Σ_c E[x_c] · W[c]`` is then folded into the layer's bias (FLAP's bias compensation,
  written by passes/compensation.py from the plan's recipe).

A group that no consumer layer reads through a weight falls back to its producers' L2 norm.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from spa.choices import HessianSource
from spa.coupling.types import Role
from spa.errors import OptionError
from spa.passes.importance.base import Criterion, data_free, normalise, register_criterion
from spa.passes.importance.obspa import layer_rows, producer_norms

if TYPE_CHECKING:
    from spa.coupling.analysis import Analysis, Group, Member
    from spa.passes.hessian import ConsumerLayer, InputStats
    from spa.passes.importance.base import Scores
    from spa.passes.statistics import LayerStats


class Calibrated(Criterion):
    """Base of the calibration criteria: they read the consumer layers' input statistics
    (passes/statistics.py, from calibration data), handed to :meth:`run`."""

    needs_data = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.stats: Mapping[tuple[str, int], InputStats] = {}  # during run() only
        self.layers: Mapping[tuple[str, int], ConsumerLayer] = {}  # likewise

    def statistics_source(self, calib_given: bool) -> HessianSource | None:
        return HessianSource.CALIBRATION if calib_given else None

    def run(self, analysis: Analysis, statistics: LayerStats | None = None) -> Scores:
        if statistics is None or statistics.source is not HessianSource.CALIBRATION:
            raise OptionError(f"criterion {self.name} needs calibration data (--calib FILE.npz "
                              f"with arrays named after the graph inputs); data-free criteria: "
                              f"{data_free()}")
        self.stats, self.layers = statistics.inputs, statistics.layers
        try:
            return super().run(analysis)
        finally:
            self.stats, self.layers = {}, {}

    def local(self, weight: np.ndarray, axis: int, member: Member, group: Group) -> np.ndarray:
        """:meth:`column`'s scores, summed over the channels of each index of ``axis`` (one; a
        ``MatMulNBits``' block of input columns)."""
        per = self.layers[member.space].per
        rows = layer_rows(weight, axis, per)
        return self.column(rows, self.stats[member.space]).reshape(-1, per).sum(axis=1)

    def column(self, rows: np.ndarray, s: InputStats) -> np.ndarray:
        """The score of each input channel of a layer: its weight ``rows`` (input channel first,
        :func:`~spa.passes.importance.obspa.layer_rows`) and its input statistics ``s``."""
        raise NotImplementedError

    def scored(self, member: Member, tensor: gs.Tensor) -> bool:
        return member.role is Role.CONSUMER and member.space in self.stats

    def group_scores(self, group: Group, tensors: dict[str, gs.Tensor]) -> np.ndarray:
        if not any(self.scored(m, tensors.get(m.space[0])) for m in group.members):
            return normalise(producer_norms(group, tensors), self.normalization)
        return super().group_scores(group, tensors)


@register_criterion
class Activation(Calibrated):
    name = "activation"
    help = "mean |activation| of each channel at its consumers (needs --calib)"

    def column(self, rows: np.ndarray, s: InputStats) -> np.ndarray:
        return s.total_abs / max(s.n, 1)


def _rms(s: InputStats) -> np.ndarray:
    h = s.second_moment
    return np.sqrt(h if h.ndim == 1 else np.diag(h))


@register_criterion
class Wanda(Calibrated):
    name = "wanda"
    help = "structured Wanda: |W| of a channel's input weights times its input norm (--calib)"

    def column(self, rows: np.ndarray, s: InputStats) -> np.ndarray:
        return np.abs(rows).sum(axis=1) * _rms(s)


@register_criterion
class FLAP(Calibrated):
    name = "flap"
    help = ("FLAP fluctuation: ‖W‖² of a channel's input weights times its input variance, "
            "with the removed channels' mean folded into the bias (--calib)")
    bias_compensation = True

    def column(self, rows: np.ndarray, s: InputStats) -> np.ndarray:
        return np.square(rows).sum(axis=1) * s.variance
