"""What SPA knows about an op besides its coupling rule, in the form its family file registers it.

An op family registers these with its rule (``@register("Conv", mac=…, layer_input=…,
bias=…)``, spa/coupling/registry.py); the passes look them up through the registry and never
branch on op names:

* **MAC term** (:data:`MacFn`): the multiply-adds of one node as a function of the shapes of
  some of its tensors, so that the cost model (spa/metrics.py) can evaluate it with channel
  spaces cut to a plan's kept indices. None for a node whose shapes are unknown.
* **layer-input accessor** (:data:`LayerInputFn`): for a weight that *consumes* channels, the
  activation whose channels it reads and that activation's channel axis — the ``X`` of OBS's
  ``H = X Xᵀ`` (passes/hessian.py) — as a :class:`LayerInput`, or a plain ``(data, axis)``.
  None when the input slot is not the layer's weight.
* **bias slot** (:class:`BiasSlot`): where FLAP-style bias compensation adds the removed
  channels' mean contribution (passes/compensation.py).
* **added bias** (:data:`AddsBiasFn`): for an op that adds a per-channel constant to one of its
  inputs (``Add``; a fused bias such as ``BiasGelu``'s or ``SkipLayerNormalization``'s), the
  input slot of that constant — where a layer with no bias of its own that it alone reads has
  its bias.
* **slimming scale** (an input slot): the per-channel ``γ`` whose magnitude network slimming
  ranks channels by (criterion ``bn_scale``, passes/importance/structure.py).
* **blocked axes** (:data:`BlockedFn`): the axes of a node's weight (``(tensor name, axis)``)
  whose channel counts the runtime's fast blocked kernels need as multiples of their block
  (onnxruntime's NCHWc convolutions); where the kept widths round to it (passes/kernel_widths.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from spa.coupling.context import static_shape

if TYPE_CHECKING:
    from collections.abc import Sequence

    import onnx_graphsurgeon as gs

Shape = tuple[int, ...]


@dataclass(frozen=True)
class MacTerm:
    """``count(*shapes)`` multiply-adds, ``shapes`` being those of ``tensors`` (name, full shape)
    after the cost model has cut the pruned axes."""

    tensors: tuple[tuple[str, Shape], ...]
    count: Callable[..., int]


@dataclass(frozen=True)
class BiasSlot:
    """Where a layer's bias is: its input ``input`` (created when the node has none), or — with
    ``input`` None — the constant the node that alone reads its output adds to it (a MatMul
    followed by its bias: an ``Add``, or an op with an added-bias fact)."""

    input: int | None


class LayerInput(NamedTuple):
    """What a consumer weight reads: ``data`` at its channel axis ``axis``; ``per`` channels of
    ``data`` for one index of the weight's space (1; a ``MatMulNBits``' quantisation block:
    its space indexes blocks of ``per`` input columns, and its weight values hold them on
    their last axis, spa/ir/quant.py's :func:`~spa.ir.quant.weight_values`)."""

    data: gs.Tensor
    axis: int
    per: int = 1


MacFn = Callable[["gs.Node"], "MacTerm | None"]
# node -> the (weight name, axis) spaces whose channel counts the blocked kernels need whole blocks
BlockedFn = Callable[["gs.Node"], "tuple[tuple[str, int], ...]"]
# (node, input slot of a layer's output) -> the input slot of the constant added to it
AddsBiasFn = Callable[["gs.Node", int], "int | None"]
# (node, input slot of the weight) -> (the activation the weight reads, its channel axis)
LayerInputFn = Callable[["gs.Node", int], "LayerInput | tuple[gs.Tensor, int] | None"]


def dims(t: gs.Tensor) -> Shape | None:
    """``t``'s shape with symbolic dims counted as 1; None when the rank is unknown."""
    s = static_shape(t)
    return None if s is None else tuple(1 if d is None else d for d in s)


def mac_term(tensors: Sequence[gs.Tensor], count: Callable[..., int], *,
             known: Sequence[gs.Tensor] = ()) -> MacTerm | None:
    """The term ``count`` over ``tensors``' shapes; None when one of them, or of ``known`` (the
    node's other tensors the formula assumes), has an unknown rank."""
    if any(dims(t) is None for t in known):
        return None
    shapes = [dims(t) for t in tensors]
    named = tuple((t.name, s) for t, s in zip(tensors, shapes) if s is not None)
    return MacTerm(named, count) if len(named) == len(shapes) else None
