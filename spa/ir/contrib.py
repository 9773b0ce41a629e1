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
  the checker checks their attributes; a FusedMatMul that reads an operand transposed has its
  shape computed here from its inputs' (onnxruntime's inference does not know the op).

onnxruntime validates the rest: the contrib nodes' shapes come from its symbolic shape
inference (:func:`contrib_shapes`, run only when the model has such nodes), and every pruned
model is run by onnxruntime before it is written. Catching only the checker's "No Op
registered" message instead would also have skipped the check of everything after that node,
and would depend on the wording of an error; moving the node is exact.

A contrib op whose shape neither can infer leaves its outputs without one; what they touch then
freezes (fail closed), and the rest of the model still loads and prunes.

Only the top-level graph is viewed so (a default-domain onnxruntime op inside an If or Loop
body still fails the checker). The plain-op table is op knowledge outside the rule families
(spa/coupling/rules/contrib_linear.py): it stays here because spa/ir sits below the registry.
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
Dim = int | str | None
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


#: Default-domain ops whose output 0 has input 0's shape, which some onnx versions cannot
#: infer: GroupNormalization-21 is a context-dependent function without an inference function
#: in onnx 1.23, so nothing after it had a shape in a file that carries no value_info.
_SAME_SHAPE = frozenset({"GroupNormalization"})


def shape_stand_ins(light: onnx.ModelProto) -> onnx.ModelProto:
    """In ``light`` (the copy shape inference runs on), each :data:`_SAME_SHAPE` node whose
    schema here has no shape inference becomes ``Identity`` of its input 0, in place; return
    it. Only for inference: the checker checks the op itself."""
    opset = next((o.version for o in light.opset_import if o.domain in ("", "ai.onnx")), None)
    for node in light.graph.node:
        if (node.domain or "") not in ("", "ai.onnx") or node.op_type not in _SAME_SHAPE \
                or opset is None:
            continue
        try:
            schema = onnx.defs.get_schema(node.op_type, opset)
        except onnx.defs.SchemaError:
            continue
        if not schema.has_type_and_shape_inference_function:
            del node.input[1:]
            del node.attribute[:]
            node.op_type = "Identity"
    return light


def _to_plain(node: onnx.NodeProto) -> None:
    """``FusedConv``/``FusedMatMul`` as the plain op of the same output shape: a FusedConv's
    optional 4th input ``Z`` (added after the convolution) has the output's shape. A
    FusedMatMul that reads an operand transposed keeps its own op (:func:`_fused_matmul`)."""
    op, extra = _PLAIN[(node.domain, node.op_type)]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if any(attrs.get(t) for t in _TRANSPOSES):
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
    """Shapes and types of the contrib nodes' outputs that ``light`` (its ONNX shapes already
    inferred) lacks: by onnxruntime's symbolic shape inference, and by :func:`_fused_matmul`.

    onnxruntime's inference stops at the first node it cannot infer; the caller runs ONNX
    inference with what was found and asks again, until nothing more is found. Outputs that
    stay unknown freeze what they touch."""
    g = light.graph
    nodes = [n for n in g.node if (n.domain or "") not in ONNX_DOMAINS]
    if not nodes:  # most models: nothing to read
        return []
    # A graph output's declared shape is the model's contract (a decoder's present cache is
    # ``total_sequence_length`` long where onnxruntime's formula says the past's length).
    known = {vi.name: vi for vi in (*g.input, *g.output, *g.value_info)
             if vi.type.tensor_type.HasField("shape")}
    known.update((t.name, onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims))
                 for t in g.initializer)
    wanted = {o for n in nodes for o in n.output if o and o not in known}
    if not wanted:
        return []
    inferred, ops = _onnxruntime_shapes(light)
    # Only the ops it has a formula for: for others it makes up a shape of the rank it finds.
    from_ort = {o for n in nodes if n.op_type in ops for o in n.output}
    found = {vi.name: vi for vi in inferred if vi.name in wanted & from_ort
             and vi.type.tensor_type.HasField("shape")}
    for node in nodes:
        if node.output and node.output[0] in wanted and node.output[0] not in found:
            shape = _OWN_SHAPES.get(node.op_type)
            vi = shape(node, known) if shape is not None else None
            if vi is not None:
                found[vi.name] = vi
    return list(found.values())


def _onnxruntime_shapes(light: onnx.ModelProto
                        ) -> tuple[list[onnx.ValueInfoProto], frozenset[str]]:
    """The value infos onnxruntime's symbolic shape inference finds, and the op types it
    has formulas for; nothing when it fails."""
    try:
        model, ops = _symbolic(light)
    except Exception as exc:  # noqa: BLE001 — a third-party tool; its failure is not the model's
        log.info("onnxruntime's symbolic shape inference failed (%s): contrib op outputs keep "
                 "unknown shapes", exc)
        return [], frozenset()
    return list(model.graph.value_info), ops


def _fused_matmul(node: onnx.NodeProto, known: dict[str, onnx.ValueInfoProto]
                  ) -> onnx.ValueInfoProto | None:
    """``Y = A' @ B'``: the batch dims broadcast, then ``[M, N]`` (``A'``, ``B'`` transposed
    over their last two axes as ``transA``/``transB`` say); None when an input's shape is
    unknown, an operand is 1-D or batch axes are transposed."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if len(node.input) < 2 or any(attrs.get(t) for t in _TRANSPOSES[2:]) \
            or node.input[0] not in known or node.input[1] not in known:
        return None
    a, b = (value_dims(known[name]) for name in node.input[:2])
    if len(a) < 2 or len(b) < 2:
        return None
    if attrs.get("transA"):
        a[-2:] = a[-1], a[-2]
    if attrs.get("transB"):
        b[-2:] = b[-1], b[-2]
    rank = max(len(a), len(b))
    pad_a: list[Dim] = [1] * (rank - len(a))
    pad_b: list[Dim] = [1] * (rank - len(b))
    batch = [_broadcast(x, y) for x, y in zip(pad_a + a[:-2], pad_b + b[:-2])]
    elem = known[node.input[0]].type.tensor_type.elem_type
    return onnx.helper.make_tensor_value_info(node.output[0], elem, [*batch, a[-2], b[-1]])


def _matmul_nbits(node: onnx.NodeProto, known: dict[str, onnx.ValueInfoProto]
                  ) -> onnx.ValueInfoProto | None:
    """``Y = A @ W`` with ``W [K, N]`` block-quantised: ``A``'s dims, the last one ``N``; None
    when ``A``'s shape is unknown (onnxruntime's inference stops on some graphs before it)."""
    n = next((a.i for a in node.attribute if a.name == "N"), 0)
    if not node.input or node.input[0] not in known or n <= 0:
        return None
    a = value_dims(known[node.input[0]])
    if not a:
        return None
    elem = known[node.input[0]].type.tensor_type.elem_type
    return onnx.helper.make_tensor_value_info(node.output[0], elem, [*a[:-1], n])


#: Contrib ops whose output shape SPA works out itself, where onnxruntime's inference does not.
_OWN_SHAPES = {"FusedMatMul": _fused_matmul, "MatMulNBits": _matmul_nbits}


def _broadcast(x: Dim, y: Dim) -> Dim:
    """The broadcast of two dims (a symbolic one broadcast with a fixed one > 1 is that one)."""
    if x == 1 or x == y:
        return y
    if y == 1:
        return x
    return x if isinstance(x, int) else y if isinstance(y, int) else None


def value_dims(vi: onnx.ValueInfoProto) -> list[Dim]:
    """A typed tensor's dims: a size, a name, or None (not known)."""
    return [d.dim_value if d.HasField("dim_value") else d.dim_param or None
            for d in vi.type.tensor_type.shape.dim]


def fixed_dims(vi: onnx.ValueInfoProto) -> list[int | None]:
    """A typed tensor's fixed sizes, None where a dim is named or not known."""
    return [d if isinstance(d, int) else None for d in value_dims(vi)]


def _symbolic(light: onnx.ModelProto) -> tuple[onnx.ModelProto, frozenset[str]]:
    """``SymbolicShapeInference.infer_shapes`` without its ending, which writes the partial
    model into the working directory and raises when a node stays unknown."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    inference = SymbolicShapeInference(2**31 - 1, True, False, 0)
    inference._preprocess(light)
    while inference.run_:
        inference._infer_impl()
    inference._update_output_from_vi()
    return inference.out_mp_, frozenset(inference.dispatcher_)
