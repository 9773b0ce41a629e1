"""Models that use onnxruntime's contrib ops: what onnx.checker and shape inference see of them.

onnxruntime runs ops that onnx does not define: its contrib ops (``com.microsoft``:
``SkipLayerNormalization``, ``BiasGelu``, ``MatMulNBits``, …) and a few it registers in the
default domain (``SimplifiedLayerNormalization``, which onnxruntime-genai's builder writes
there). onnx.checker skips nodes of a domain it does not know, but refuses a default-domain op
it lacks ("No Op registered for …"), and ONNX shape inference leaves every contrib output
without a shape, which would freeze everything after the first one.

So the checker and ONNX shape inference run on a copy of the model, :func:`onnx_view`, where

* a default-domain node that onnx lacks **and onnxruntime defines** moves to a private domain:
  the checker then checks every standard node and skips it, like any contrib node. A
  default-domain op neither knows stays where it is, and the checker refuses it as before;
* ``FusedMatMul`` and ``FusedConv`` (a MatMul or Conv with an activation folded in, whose
  output shape is their plain op's) are replaced by the plain op, so that ONNX infers them and
  the checker checks their attributes.

onnxruntime validates the rest: the contrib nodes' shapes come from its symbolic shape
inference (:func:`contrib_shapes`, run only when the model has such nodes), and every pruned
model is run by onnxruntime before it is written. Catching only the checker's "No Op
registered" message instead would also have skipped the check of everything after that node,
and would depend on the wording of an error; moving the node is exact.

A contrib op whose shape neither can infer leaves its outputs without one; what they touch then
freezes (fail closed), and the rest of the model still loads and prunes.
"""

from __future__ import annotations

import functools
import logging

import onnx

log = logging.getLogger(__name__)

ONNX_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")
# Where default-domain onnxruntime ops go in the copy that onnx checks (no real op lives there).
PRIVATE_DOMAIN = "spa.onnxruntime"
# contrib op → the standard op with its output shape, and the attributes only the contrib op has
_PLAIN = {("com.microsoft", "FusedConv"): ("Conv", ("activation", "activation_params")),
          ("com.microsoft", "FusedMatMul"): ("MatMul", ("alpha",))}
_TRANSPOSES = ("transA", "transB", "transBatchA", "transBatchB")


@functools.cache
def onnxruntime_ops() -> frozenset[tuple[str, str]]:
    """``(domain, op_type)`` of every op onnxruntime defines (``""`` for the default domain)."""
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as ort
        schemas = ort.get_all_operator_schema()
    except (ImportError, AttributeError):  # a build without schemas: nothing is moved
        return frozenset()
    return frozenset(("" if s.domain in ("", "ai.onnx") else s.domain, s.name) for s in schemas)


def onnx_view(light: onnx.ModelProto) -> onnx.ModelProto:
    """Turn ``light`` (a weight-less copy, spa/ir/load.py) into what onnx can check and infer,
    in place (see the module docstring); return it."""
    moved = False
    for node in light.graph.node:
        domain = node.domain or ""
        if domain in ("", "ai.onnx") and not onnx.defs.has(node.op_type) \
                and ("", node.op_type) in onnxruntime_ops():
            node.domain = PRIVATE_DOMAIN
            moved = True
        elif (domain, node.op_type) in _PLAIN:
            _to_plain(node)
    if moved and all(o.domain != PRIVATE_DOMAIN for o in light.opset_import):
        light.opset_import.append(onnx.helper.make_opsetid(PRIVATE_DOMAIN, 1))
    return light


def _to_plain(node: onnx.NodeProto) -> None:
    """``FusedConv``/``FusedMatMul`` as the plain op of the same output shape, when it has one:
    a FusedConv's optional 4th input ``Z`` (added after the convolution) has the output's
    shape; a FusedMatMul with transposes keeps its own op (its outputs stay unknown)."""
    op, extra = _PLAIN[(node.domain, node.op_type)]
    attrs = {a.name: a for a in node.attribute}
    if any(onnx.helper.get_attribute_value(attrs[t]) for t in _TRANSPOSES if t in attrs):
        return
    kept = [a for a in node.attribute if a.name not in extra and a.name not in _TRANSPOSES]
    del node.attribute[:]
    node.attribute.extend(kept)
    del node.input[3:]
    node.op_type, node.domain = op, ""


def has_contrib(model: onnx.ModelProto) -> bool:
    """Whether a top-level node of ``model`` is outside onnx's domains."""
    return any((n.domain or "") not in ONNX_DOMAINS for n in model.graph.node)


def contrib_shapes(light: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The shapes and types of the contrib nodes' outputs in ``light`` (its ONNX shapes already
    inferred), by onnxruntime's symbolic shape inference; ``[]`` when it cannot run.

    It stops at the first node it cannot infer: the contrib outputs after that one stay
    unknown (and what they touch freezes)."""
    wanted = {o for n in light.graph.node if (n.domain or "") not in ONNX_DOMAINS
              for o in n.output if o}
    if not wanted:
        return []
    try:
        inferred = _symbolic(light)
    except Exception as exc:  # noqa: BLE001 — a third-party tool; its failure is not the model's
        log.info("onnxruntime's symbolic shape inference failed (%s): contrib op outputs keep "
                 "unknown shapes", exc)
        return []
    return [vi for vi in inferred.graph.value_info
            if vi.name in wanted and vi.type.tensor_type.HasField("shape")]


def _symbolic(light: onnx.ModelProto) -> onnx.ModelProto:
    """``SymbolicShapeInference.infer_shapes`` without its ending, which writes the partial
    model into the working directory and raises when a node stays unknown."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    inference = SymbolicShapeInference(2**31 - 1, True, False, 0)
    inference._preprocess(light)
    while inference.run_:
        inference._infer_impl()
    inference._update_output_from_vi()
    return inference.out_mp_
