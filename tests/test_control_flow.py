"""Control flow fails closed: channels that enter an ``If``, ``Loop`` or ``Scan`` body — as an
explicit input, as loop-carried state, or captured from the outer scope by name (an implicit
input, which the node's input list does not show) — freeze with a reason naming the node, and so
does a weight the body reads. The rest of the model still prunes under the numeric oracle.
(``If`` with explicit reads is in ``test_failclosed.py``.)"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import Builder, group_of, init_shapes
from oracle import prune_checked

from spa.api import PruneOptions, prune
from spa.errors import NothingPrunableError

I64, BOOL = onnx.TensorProto.INT64, onnx.TensorProto.BOOL
X = {"x": [1, 3, 4, 4]}


def _sub_builder(k: int) -> Builder:
    """A builder for a subgraph body whose fresh names cannot clash with the outer graph's
    (a body may not redefine a name of an enclosing scope)."""
    sub = Builder(seed=k)
    sub._n = 1000 * k
    return sub


def _loop_body(build, state_shape=None) -> onnx.GraphProto:
    """A Loop body ``(i, cond, s) → (cond, build(sub, s))``; ``build`` adds nodes to ``sub``."""
    sub = _sub_builder(1)
    cond_out = sub.op("Identity", "cond_in", name="keep_going")
    s_out = build(sub, "s")
    return sub.graph({"i": ([], I64), "cond_in": ([], BOOL), "s": state_shape},
                     {cond_out: ([], BOOL), s_out: state_shape})


def _frozen_by(m: onnx.ModelProto, tensor: str, node: str) -> tuple[str, ...]:
    g = group_of(m, tensor, 0)
    assert not g.prunable and any(f"'{node}'" in r for r in g.frozen), g.frozen
    return g.frozen


def test_loop_carried_channels_freeze(tmp_path):
    """stem → c1 → Loop(2×: s ← 0.5·s + relu(s)) → c2: c1's channels are loop state."""
    b = Builder()
    a = b.stem("x", 3, 8)
    body = _loop_body(lambda sub, s: sub.op(
        "Add", sub.op("Mul", s, sub.const(np.float32(0.5))), sub.op("Relu", s)))
    z = b.op("Loop", b.const(np.int64(2)), "", a, name="loop", body=body)
    y = b.conv(z, 8, 4, name="c2")
    m = b.model(X, {y: [1, 4, 4, 4]})
    reasons = _frozen_by(m, "c1.w", "loop")
    assert any("Loop" in r for r in reasons)
    out = prune_checked(m, tmp_path, ratio=0.5)
    shapes = init_shapes(out.path)
    assert shapes["c1.w"] == (8, 3, 3, 3) and shapes["stem.w"] == (3, 3, 3, 3)


def test_loop_capturing_outer_activation_by_name_freezes(tmp_path):
    """The body reads ``relu(c1)`` from the outer scope by name; the Loop's only explicit input
    is an unrelated accumulator, and its result is a separate output. Pruning c1 would change
    what the body sums, so c1 must freeze although no edge of the outer graph shows it."""
    b = Builder()
    r = b.op("Relu", b.stem("x", 3, 8), name="act")
    y = b.conv(r, 8, 4, name="c2")
    body = _loop_body(lambda sub, s: sub.op("Add", s, sub.op("ReduceSum", r, keepdims=0,
                                                             name="inner_sum")), [])
    total = b.op("Loop", b.const(np.int64(3)), "", b.const(np.float32(0)), name="accumulate",
                 body=body)
    m = b.model(X, {y: [1, 4, 4, 4], total: []})
    assert r not in {i for n in m.graph.node if n.op_type == "Loop" for i in n.input}
    _frozen_by(m, "c1.w", "accumulate")
    out = prune_checked(m, tmp_path, ratio=0.5)
    shapes = init_shapes(out.path)
    assert shapes["c1.w"] == (8, 3, 3, 3) and shapes["stem.w"] == (3, 3, 3, 3)


def test_subgraph_reading_a_weight_freezes_it(tmp_path):
    """A Loop body reads conv c1's weight by name (a weight-norm penalty computed in the graph).
    Slicing c1.w would change it: both groups c1.w spans (c1's outputs, and the stem's channels
    it consumes) freeze; c2's channels, which the body does not see, still prune."""
    b = Builder()
    a = b.op("Relu", b.stem("x", 3, 8))
    y = b.conv(b.op("Relu", b.conv(a, 8, 8, name="c2")), 8, 4, name="c3")
    body = _loop_body(lambda sub, s: sub.op("Add", s, sub.op("ReduceL2", "c1.w", keepdims=0)), [])
    norm = b.op("Loop", b.const(np.int64(2)), "", b.const(np.float32(0)), name="wnorm",
                body=body)
    m = b.model(X, {y: [1, 4, 4, 4], norm: []})
    _frozen_by(m, "c1.w", "wnorm")
    _frozen_by(m, "stem.w", "wnorm")
    out = prune_checked(m, tmp_path, ratio=0.5)
    shapes = init_shapes(out.path)
    assert shapes["c1.w"] == (8, 6, 3, 3) and shapes["stem.w"] == (6, 3, 3, 3)
    assert shapes["c2.w"] == (4, 8, 3, 3) and shapes["c3.w"] == (4, 4, 3, 3)


def _scan_model(implicit: bool) -> onnx.ModelProto:
    """stem → c1 → Scan over H (a running sum along the rows) → c2. With ``implicit`` the scan
    input is the image ``x`` and the body adds c1's output, captured by name, instead."""
    b = Builder()
    a = b.stem("x", 3, 8)
    sub = _sub_builder(2)
    if implicit:
        row = sub.op("Slice", a, sub.const([0]), sub.const([1]), sub.const([2]))
        row = sub.op("Squeeze", row, sub.const([2]))  # c1's first row: [1, 8, 4]
        acc = sub.op("Add", "acc", sub.op("Mul", row, sub.op("ReduceMean", "row_in",
                                                              keepdims=0)))
    else:
        acc = sub.op("Add", "acc", "row_in")
    out = sub.op("Identity", acc)
    state = [1, 8, 4]
    body = sub.graph({"acc": state, "row_in": [1, 3 if implicit else 8, 4]},
                     {acc: state, out: state})
    init = b.const(np.zeros(state, np.float32))
    _, rows = b.op("Scan", init, "x" if implicit else a, outputs=["final", "rows"], name="scan",
                   body=body, num_scan_inputs=1, scan_input_axes=[2], scan_output_axes=[2])
    y = b.conv(rows, 8, 4, name="c2")
    return b.model(X, {y: [1, 4, 4, 4]}, opset=17)


def test_scan_over_channels_freezes(tmp_path):
    m = _scan_model(implicit=False)
    _frozen_by(m, "c1.w", "scan")
    out = prune_checked(m, tmp_path, ratio=0.5)
    shapes = init_shapes(out.path)
    assert shapes["c1.w"] == (8, 3, 3, 3) and shapes["stem.w"] == (3, 3, 3, 3)


def test_scan_capturing_outer_activation_by_name_freezes(tmp_path):
    m = _scan_model(implicit=True)
    _frozen_by(m, "c1.w", "scan")
    out = prune_checked(m, tmp_path, ratio=0.5)
    assert init_shapes(out.path)["stem.w"] == (3, 3, 3, 3)


def test_nested_subgraph_capture_freezes(tmp_path):
    """An ``If`` inside a Loop body reads ``relu(c1)`` from two scopes out."""
    b = Builder()
    r = b.op("Relu", b.stem("x", 3, 8), name="act")
    y = b.conv(r, 8, 4, name="c2")
    branch = _sub_builder(3)
    s = branch.op("ReduceMax", r, keepdims=0, name="deep_read")
    then = branch.graph({}, {s: []})

    def body(sub, acc):
        hit = sub.op("If", sub.op("Greater", acc, sub.const(np.float32(-1))), name="inner_if",
                     then_branch=then, else_branch=then)
        return sub.op("Add", acc, hit)

    total = b.op("Loop", b.const(np.int64(2)), "", b.const(np.float32(0)), name="outer_loop",
                 body=_loop_body(body, []))
    m = b.model(X, {y: [1, 4, 4, 4], total: []})
    _frozen_by(m, "c1.w", "outer_loop")
    out = prune_checked(m, tmp_path, ratio=0.5)
    assert init_shapes(out.path)["stem.w"] == (3, 3, 3, 3)


def test_subgraph_reading_a_bias_vector(tmp_path):
    """The body reads c1's bias, a vector: whether SPA freezes c1 or prunes it while the body
    keeps its own full copy, the numbers must not change (oracle), and the body's sum must be
    over all 8 original entries."""
    b = Builder()
    a = b.op("Relu", b.stem("x", 3, 8))
    y = b.conv(a, 8, 4, name="c2")
    body = _loop_body(lambda sub, s: sub.op("Add", s, sub.op("ReduceSum", "c1.b", keepdims=0)),
                      [])
    total = b.op("Loop", b.const(np.int64(1)), "", b.const(np.float32(0)), name="bias_sum",
                 body=body)
    m = b.model(X, {y: [1, 4, 4, 4], total: []})
    out = prune_checked(m, tmp_path, ratio=0.5)
    from oracle import run_model
    got = run_model(out.path)[total]
    bias = next(onnx.numpy_helper.to_array(t) for t in m.graph.initializer if t.name == "c1.b")
    np.testing.assert_allclose(got, bias.sum(), rtol=1e-5)


def test_branches_that_name_their_shape_ops_alike(tmp_path):
    """🤗 Optimum's merged decoders hold the decoder with and without a cache as the two branches
    of one ``If``, with the same node and tensor names in each. onnx's strict inference with
    data propagation calls a ``Shape`` read in both a conflict ("Data for input 0 already
    exists"), and SPA refused such models as invalid; they are valid, and onnxruntime runs them.
    They now load; the layers outside the ``If`` prune under the oracle."""
    b = Builder()
    r = b.op("Relu", b.stem("x", 3, 8), name="act")
    y = b.conv(r, 8, 4, name="c2")
    nodes = [onnx.helper.make_node("Shape", ["x"], ["dims"], name="/decoder/Shape"),
             onnx.helper.make_node("Reshape", ["x", "dims"], ["same"], name="/decoder/Reshape")]
    branch = onnx.helper.make_graph(
        nodes, "branch", [], [onnx.helper.make_tensor_value_info("same", onnx.TensorProto.FLOAT,
                                                                 None)])
    flag = b.op("Greater", b.op("ReduceSum", "x", keepdims=0), b.const(np.float32(0)))
    z = b.op("If", flag, name="optimum::if", then_branch=branch, else_branch=branch)
    m = b.model(X, {y: [1, 4, 4, 4], z: [1, 3, 4, 4]})
    try:
        onnx.shape_inference.infer_shapes(m, check_type=True, strict_mode=True, data_prop=True)
        raise AssertionError("onnx's strict inference no longer fails here: drop the retry")
    except onnx.shape_inference.InferenceError as exc:
        assert "already exists" in str(exc)
    out = prune_checked(m, tmp_path, ratio=0.5)
    assert init_shapes(out.path)["c1.w"][0] == 4


def test_a_model_whose_layers_are_all_in_a_subgraph(tmp_path):
    """Nothing outside the ``If``: the error says where the layers are."""
    b = Builder()
    sub = _sub_builder(1)
    inner = sub.conv("x", 3, 4, name="inner")
    branch = sub.graph({}, {inner: [1, 4, 4, 4]})
    flag = b.op("Greater", b.op("ReduceSum", "x", keepdims=0), b.const(np.float32(0)))
    z = b.op("If", flag, name="merged", then_branch=branch, else_branch=branch)
    path = tmp_path / "m.onnx"
    onnx.save(b.model(X, {z: [1, 4, 4, 4]}), str(path))
    with pytest.raises(NothingPrunableError, match="its layers are inside the subgraphs of If "
                                                   "node 'merged', which SPA does not prune"):
        prune(path, tmp_path / "out.onnx", PruneOptions(ratio=0.5))
    assert not (tmp_path / "out.onnx").exists()
