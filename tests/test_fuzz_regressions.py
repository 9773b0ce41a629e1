"""Minimal graphs for bugs the fuzzer (``tests/test_fuzz.py``) found, each under the oracle."""

from __future__ import annotations

import numpy as np
from graphs import F32, IR_VERSION, Builder, group_of, init_shapes
from onnx import helper
from oracle import group_sizes, prune_checked

from spa.ir.load import load_proto


def _view(b: Builder, x: str) -> str:
    """``x.view(x.size(0), x.size(1), -1)`` as the TorchScript exporter writes it."""
    head = b.op("Slice", b.op("Shape", x), b.const([0]), b.const([2]))
    return b.op("Reshape", x, b.op("Concat", head, b.const([-1]), axis=0))


def test_shape_of_a_reshape_with_run_time_target_folds(tmp_path):
    """Seed 495. At opset 13 ONNX shape inference leaves the output of a run-time ``view``
    unknown; SPA folds the target and refines the shape, which makes a *second* ``Shape`` (of
    that output) static — it must fold too, or the channels behind it freeze and the FLOPs
    counted before and after pruning disagree with the prediction."""
    b = Builder()
    t = b.op("Softmax", _view(b, b.conv("x", 3, 8, name="c1")), axis=-1)
    t = b.op("Flatten", _view(b, t))
    y = b.op("MatMul", t, b.weight(128, 4, name="fc.w"))
    m = b.model({"x": [1, 3, 4, 4]}, {y: [1, 4]}, opset=13)
    assert not any(n.op == "Shape" for n in load_proto(m).graph.nodes)
    assert group_sizes(m) == [(8, True), (4, False)]
    out = prune_checked(m, tmp_path, ratio=0.5)
    assert out.report.flops_before == 8 * 16 * 27 + 128 * 4
    assert init_shapes(out.path)["fc.w"] == (64, 4)


def test_model_local_function_next_to_a_subgraph(tmp_path):
    """Seed 28. A model with a model-local function *and* an ``If`` made onnx-graphsurgeon's
    function sort recurse forever (RecursionError on load). The function call (an op SPA has no
    rule for) and the ``If`` freeze what they touch; the rest prunes under the oracle."""
    b = Builder()
    swish = helper.make_function("fuzz.custom", "Swish", ["X"], ["Y"],
                                 [helper.make_node("Sigmoid", ["X"], ["s"]),
                                  helper.make_node("Mul", ["X", "s"], ["Y"])],
                                 [helper.make_opsetid("", 17)])
    a = b.op("Swish", b.conv("x", 3, 8, name="cA"), domain="fuzz.custom", name="swish")
    branch = helper.make_graph([helper.make_node("Relu", ["x"], ["r"])], "then", [],
                               [helper.make_tensor_value_info("r", F32, None)])
    cond = b.op("Greater", b.op("ReduceSum", "x", keepdims=0), b.const(np.float32(0)))
    z = b.op("If", cond, name="if", then_branch=branch, else_branch=branch)
    y = b.conv(b.op("Relu", b.conv(z, 3, 8, name="cB")), 8, 4, name="cC")
    graph = b.graph({"x": [1, 3, 4, 4]}, {a: [1, 8, 4, 4], y: [1, 4, 4, 4]})
    m = helper.make_model(graph, ir_version=IR_VERSION, functions=[swish],
                          opset_imports=[helper.make_opsetid("", 17),
                                         helper.make_opsetid("fuzz.custom", 1)])
    assert any("'swish'" in r for r in group_of(m, "cA.w", 0).frozen)
    assert group_of(m, "cB.w", 0).prunable
    out = prune_checked(m, tmp_path, ratio=0.5)
    shapes = init_shapes(out.path)
    assert shapes["cA.w"] == (8, 3, 3, 3) and shapes["cB.w"] == (4, 3, 3, 3)


def test_resize_scales_concatenated_at_run_time(tmp_path):
    """Fuzz seed 139 (a PyTorch net exported without constant folding): ``interpolate``'s
    Resize scales are ``Concat([1., 1.], [2., 2.])``. Unfolded, the Resize froze the channels
    before it and hid every shape after it (the whole model froze); folded, all prune."""
    b = Builder()
    ones = b.op("Constant", value=helper.make_tensor("one", F32, [2], [1.0, 1.0]))
    twos = b.op("Constant", value=helper.make_tensor("two", F32, [2], [2.0, 2.0]))
    x = b.op("Relu", b.conv("x", 3, 8, name="c1"))
    x = b.op("Resize", x, "", b.op("Concat", ones, twos, axis=0), mode="nearest", name="up")
    y = b.gemm(b.op("Flatten", b.conv(x, 8, 4, name="c2")), 4 * 64, 3, name="fc")
    m = b.model({"x": [1, 3, 4, 4]}, {y: [1, 3]})
    assert group_sizes(m) == [(8, True), (4, True), (3, False)]
    out = prune_checked(m, tmp_path, ratio=0.5)
    shapes = init_shapes(out.path)
    assert shapes["c2.w"] == (2, 4, 3, 3) and shapes["fc.w"] == (3, 128)
