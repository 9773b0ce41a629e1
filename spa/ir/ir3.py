"""IR version 3: every initializer is also a graph input.

Up to IR 3 an ONNX graph must list each initializer among its inputs too (the initializer is
the input's default value); IR 4 made that optional. onnx-graphsurgeon imports such an input as
the constant it mirrors and drops it from the graph's inputs, so an export lists none of them,
and ``onnx.checker`` refuses the result ("in initializer but not in graph input").

SPA keeps the model's IR version and its rule: the export declares every initializer again as
a graph input, typed and shaped from the initializer itself. The declaration therefore follows
every resize, and the initializers SPA adds (copies of shared constants, new shape constants,
compensation biases) or removes are declared or dropped with them. Declared inputs follow the
real ones, in initializer order.
"""

from __future__ import annotations

import onnx
from onnx import helper

from spa.errors import ValidationError

LAST = 3  # the newest IR version with the rule


def declare_initializers(model: onnx.ModelProto) -> None:
    """Give each initializer of an IR ≤ 3 ``model`` its graph input (in place)."""
    if model.ir_version > LAST:
        return
    graph = model.graph
    declared = {i.name for i in graph.input}
    graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                       for t in graph.initializer if t.name not in declared)


def check_declared(model: onnx.ModelProto) -> None:
    """Raise unless every initializer of an IR ≤ 3 ``model`` is declared, with its shape
    (the checker's own test runs on SPA's weight-less copies, which are IR 4)."""
    if model.ir_version > LAST:
        return
    inputs = {i.name: i.type.tensor_type for i in model.graph.input}
    for t in model.graph.initializer:
        declared = inputs.get(t.name)
        if declared is None or [d.dim_value for d in declared.shape.dim] != list(t.dims) \
                or declared.elem_type != t.data_type:
            raise ValidationError(f"the rewritten model (IR version {model.ir_version}) does not "
                                  f"declare initializer '{t.name}' {list(t.dims)} as a graph "
                                  "input of its type and shape")


__all__ = ["check_declared", "declare_initializers"]
