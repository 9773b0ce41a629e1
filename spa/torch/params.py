"""Which module parameter each ONNX constant of the analysed graph is.

The front end exports with the dynamo exporter and ``optimize=False``: every parameter and
buffer becomes an initializer named by its qualified name, BatchNorm stays a separate node, and
equal-valued tensors are not merged. (The TorchScript exporter merges equal initializers: a
freshly built ResNet-18 loses 72 of its 102 parameter names, every BatchNorm γ = 1 and β = 0
collapsing into one tensor, so its constants cannot be mapped back.)

Between the initializer and the constant the analysis sees there can be layout ops that SPA's
loader folds (``Transpose`` of a Linear weight feeding a MatMul), and the loader's copies of a
shared vector (``name__spa_copyK``). :class:`ParamMap` follows both, so that the pruned value of a
constant can be written back into its parameter: ``param = inverse_layout(constant)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper

from spa.ir.dtypes import is_floating

if TYPE_CHECKING:
    import onnx
    from torch import nn

_COPY = re.compile(r"^(?P<base>.+)__spa_copy\d+$")


@dataclass(frozen=True)
class Origin:
    """Constant = ``transpose(parameter, perm)`` (perm None: the parameter itself)."""

    param: str
    perm: tuple[int, ...] | None = None

    def to_param(self, value: np.ndarray) -> np.ndarray:
        """The parameter's value given the constant's (undoes the layout op)."""
        if self.perm is None:
            return value
        return np.transpose(value, np.argsort(self.perm))

    def to_constant(self, value: np.ndarray) -> np.ndarray:
        return value if self.perm is None else np.transpose(value, self.perm)


class ParamMap:
    """``origin[constant name] -> Origin`` for the constants of a loaded (normalised) graph."""

    def __init__(self, origins: dict[str, Origin], unmapped: dict[str, str]):
        self.origins = origins
        self.unmapped = unmapped  # constant name -> why it cannot be written back

    @classmethod
    def build(cls, module: nn.Module, exported: onnx.ModelProto, graph: gs.Graph) -> ParamMap:
        names = {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}
        raw = _raw_origins(exported, names)
        origins: dict[str, Origin] = {}
        unmapped: dict[str, str] = {}
        for name, t in graph.tensors().items():
            if not isinstance(t, gs.Constant):
                continue
            m = _COPY.match(name)
            origin = raw.get(m.group("base") if m else name)
            if origin is not None:
                origins[name] = origin
            elif _data(t):
                unmapped[name] = (f"constant '{name}' is not a parameter or buffer of the module "
                                  "(computed in forward?): it cannot be sliced in PyTorch")
        return cls(origins, unmapped)

    def by_param(self) -> dict[str, list[tuple[str, Origin]]]:
        out: dict[str, list[tuple[str, Origin]]] = {}
        for const, origin in sorted(self.origins.items()):
            out.setdefault(origin.param, []).append((const, origin))
        return out


def _data(t: gs.Constant) -> bool:
    """A float constant with varying values. A uniform one (the zero bias dynamo writes for a
    bias-less conv, a ``torch.ones`` made in forward) is made from sizes at run time in the
    module, or else the final torch-vs-ONNX comparison says so."""
    values = np.asarray(t.values)
    return (is_floating(values.dtype) and values.size > 1
            and not np.all(values == values.flat[0]))


def _raw_origins(model: onnx.ModelProto, names: set[str]) -> dict[str, Origin]:
    """Initializers named after parameters, and what Transpose/Identity nodes make of them."""
    origins = {i.name: Origin(i.name) for i in model.graph.initializer if i.name in names}
    for node in model.graph.node:
        if len(node.input) != 1 or len(node.output) != 1 or node.input[0] not in origins:
            continue
        src = origins[node.input[0]]
        if node.op_type == "Identity":
            origins[node.output[0]] = src
        elif node.op_type == "Transpose":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            perm = tuple(int(p) for p in attrs["perm"]) if "perm" in attrs else None
            if perm is None:
                continue  # reversed axes of an unknown rank: not followed
            inner = src.perm or tuple(range(len(perm)))
            origins[node.output[0]] = Origin(src.param, tuple(inner[p] for p in perm))
    return origins
