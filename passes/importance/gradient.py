"""Criteria that need gradients: ``taylor``, and the prune-at-initialisation ``snip``, ``grasp``,
``crop``.

The gradients come from a torch module and one batch (:mod:`spa.torch.saliency` computes a
per-weight saliency for every parameter and maps it onto the ONNX constants); this module only
turns per-weight saliencies into per-channel scores through the shared code path (sum over a
channel's slice of each weight, reduce over the group's weights, normalise per group).

* ``taylor``: ``|w · ∂L/∂w|``, the first-order estimate of the loss change when ``w`` goes.
* ``snip``: connection sensitivity ``|∂L/∂c|`` at ``c = 1`` for a mask ``c`` on each weight,
  which is again ``|w · ∂L/∂w|``, taken at initialisation, before training.
* ``grasp``: ``w · (H g)``, where ``H g`` is the Hessian-gradient product. GraSP removes the
  weights whose removal reduces the gradient norm least, i.e. the largest ``−w·Hg``; as an
  importance (keep the high) that is ``w · Hg``. It is signed, so it is normalised to zero mean
  and unit variance per group rather than divided by the mean.
* ``crop``: ``|w · (H g)|``, CroP's gradient-flow preservation: any change of the gradient
  norm, up or down, counts.

On an ONNX file (``spa prune --criterion taylor --calib batch.npz``, the npz holding the graph
inputs and integer ``labels``) the model itself runs in PyTorch (``spa.torch.from_onnx``) for the
gradients. Without either these criteria raise an error naming both ways and the data-free
alternatives.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from spa.errors import OptionError
from spa.passes.importance.base import (
    Criterion,
    Normalization,
    along,
    data_free,
    register_criterion,
)

if TYPE_CHECKING:
    from spa.coupling.analysis import Analysis, Group, Member
    from spa.passes.importance.base import Scores
    from spa.passes.statistics import LayerStats


class Gradient(Criterion):
    """Base: per-weight saliencies keyed by ONNX constant name, same layout as the constant."""

    #: What the saliency is made of ("wg": w·g, "whg": w·Hg) and whether to take |·|.
    needs: ClassVar[str] = "wg"
    absolute: ClassVar[bool] = True
    needs_data = True

    def __init__(self, *, saliency: dict[str, np.ndarray] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.saliency = saliency
        if not self.absolute and self.normalization is Normalization.MEAN:
            self.normalization = Normalization.STANDARD  # a signed mean can be ~0 or negative

    def run(self, analysis: Analysis, statistics: LayerStats | None = None) -> Scores:
        if self.saliency is None:
            raise OptionError(
                f"criterion {self.name} needs gradients: --calib FILE.npz with the graph "
                "inputs and integer 'labels', or from Python spa.torch.prune(module, inputs, "
                f"criterion='{self.name}', batch=(x, y)); data-free criteria: {data_free()}")
        return super().run(analysis)

    @property
    def _saliency(self) -> dict[str, np.ndarray]:
        assert self.saliency is not None, "run() refuses a criterion without saliencies"
        return self.saliency

    def scored(self, member: Member, tensor: gs.Tensor) -> bool:
        return member.role.is_weight and tensor is not None and tensor.name in self._saliency

    def local(self, weight: np.ndarray, axis: int, member: Member, group: Group) -> np.ndarray:
        s = np.asarray(self._saliency[member.space[0]], dtype=np.float64)
        if s.shape != weight.shape:
            raise OptionError(f"saliency of '{member.space[0]}' has shape {s.shape}, the weight "
                              f"{weight.shape}")
        return along(np.abs(s) if self.absolute else s, axis).sum(axis=1)


@register_criterion
class Taylor(Gradient):
    name = "taylor"
    help = "first-order Taylor |w·dL/dw| over a batch (--calib with labels, or spa.torch)"


@register_criterion
class Snip(Gradient):
    name = "snip"
    help = "SNIP connection sensitivity |w·dL/dw| at initialisation (spa.torch, one batch)"


@register_criterion
class Grasp(Gradient):
    name = "grasp"
    help = "GraSP gradient-flow score w·(Hg) at initialisation (spa.torch, one batch)"
    needs = "whg"
    absolute = False


@register_criterion
class Crop(Gradient):
    name = "crop"
    help = "CroP gradient-flow preservation |w·(Hg)| at initialisation (spa.torch, one batch)"
    needs = "whg"
