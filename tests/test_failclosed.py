"""Fail closed: whatever SPA does not understand freezes the channels it touches, says which node
and why, and leaves every other group prunable (checked under the masked oracle where
onnxruntime can run the graph)."""

from __future__ import annotations

import numpy as np
import onnx
from graphs import Builder, group_of, init_shapes
from oracle import prune_checked

from spa.api import CheckOptions, PruneOptions, analyze, plan, prune

X = {"x": [1, 3, 4, 4]}


def _frozen_reasons(m: onnx.ModelProto, tensor: str) -> tuple[str, ...]:
    g = group_of(m, tensor, 0)
    assert not g.prunable
    return g.frozen


def _two_branches(domain: str, op: str) -> onnx.ModelProto:
    """x → cA (3→8) → domain::op → out_a;  x → cB (3→8) → Relu → cC (8→4) → out_b."""
    b = Builder()
    a = b.op(op, b.conv("x", 3, 8, name="cA"), domain=domain, name="custom")
    y = b.conv(b.op("Relu", b.conv("x", 3, 8, name="cB")), 8, 4, name="cC")
    return b.model(X, {a: [1, 8, 4, 4], y: [1, 4, 4, 4]}, extra_opsets={domain: 1})


def test_unknown_custom_domain_op_freezes_its_group_only(tmp_path):
    m = _two_branches("my.ops", "Foo")
    reasons = _frozen_reasons(m, "cA.w")
    assert any("'custom'" in r and "my.ops::Foo" in r for r in reasons), reasons
    other = group_of(m, "cB.w", 0)
    assert other.prunable and other.size == 8
    the_plan = plan(analyze(m), PruneOptions(ratio=0.5))
    assert {g.name: len(g.keep) for g in the_plan.groups if g.removed} == {other.name: 4}
    frozen = {f.name: f.reasons for f in the_plan.frozen}
    assert any("my.ops::Foo" in r for r in frozen[group_of(m, "cA.w", 0).name])
    # onnxruntime cannot run my.ops::Foo: write without validation, then read the weights back.
    src = tmp_path / "model.onnx"
    onnx.save(m, str(src))
    prune(src, tmp_path / "pruned.onnx", PruneOptions(ratio=0.5),
          CheckOptions(validate=False, latency=False))
    shapes = init_shapes(tmp_path / "pruned.onnx")
    assert shapes["cA.w"] == (8, 3, 3, 3) and shapes["cA.b"] == (8,)
    assert shapes["cB.w"] == (4, 3, 3, 3) and shapes["cC.w"] == (4, 4, 3, 3)


def test_op_without_rule_in_runnable_domain_freezes_under_oracle(tmp_path):
    """com.microsoft::Inverse (of each 4×4 matrix) runs in onnxruntime but has no SPA rule:
    same outcome, checked."""
    m = _two_branches("com.microsoft", "Inverse")
    assert any("com.microsoft::Inverse" in r for r in _frozen_reasons(m, "cA.w"))
    out = prune_checked(m, tmp_path, ratio=0.5)
    shapes = init_shapes(out.path)
    assert shapes["cA.w"] == (8, 3, 3, 3) and shapes["cB.w"] == (4, 3, 3, 3)


def test_merge_of_two_layers_channels_keeps_one_factor(tmp_path):
    """The outer product of two convs' channels (``[1, 2, 1, H, W] · [1, 1, 4, H, W]``, as in
    bilinear pooling) merged into 8 channels: output channel ``4a + b`` needs channel ``a`` of
    one conv and ``b`` of the other. SPA follows one factor of a merge, the outer one, so the
    other conv's channels freeze, and the model still prunes elsewhere under the oracle."""
    b = Builder()
    a = b.op("Unsqueeze", b.conv("x", 3, 2, name="ca"), b.const([2]), name="ua")
    c = b.op("Unsqueeze", b.conv("x", 3, 4, name="cb"), b.const([1]), name="ub")
    x = b.op("Reshape", b.op("Mul", a, c, name="outer"), b.const([1, 8, 4, 4]),
             name="merge_pairs")
    m = b.model(X, {b.conv(x, 8, 4, name="c2"): [1, 4, 4, 4]})
    assert any("'merge_pairs'" in r for r in _frozen_reasons(m, "cb.w"))
    out = prune_checked(m, tmp_path, ratio=0.5, round_to=1)
    shapes = init_shapes(out.path)
    assert shapes["ca.w"] == (1, 3, 3, 3) and shapes["cb.w"] == (4, 3, 3, 3)
    assert shapes["c2.w"] == (4, 4, 3, 3)


def test_softmax_over_channels_freezes(tmp_path):
    b = Builder()
    y = b.conv(b.op("Softmax", b.stem("x", 3, 8), axis=1, name="softmax"), 8, 4, name="c2")
    m = b.model(X, {y: [1, 4, 4, 4]})
    assert any("'softmax'" in r for r in _frozen_reasons(m, "c1.w"))
    out = prune_checked(m, tmp_path, ratio=0.5)
    assert init_shapes(out.path)["c1.w"] == (8, 3, 3, 3)


def test_softmax_over_spatial_axis_does_not_freeze(tmp_path):
    """The counterpart: Softmax over the last axis leaves channels independent."""
    b = Builder()
    y = b.conv(b.op("Softmax", b.conv("x", 3, 8, name="c1"), axis=-1), 8, 4, name="c2")
    m = b.model(X, {y: [1, 4, 4, 4]})
    assert group_of(m, "c1.w", 0).prunable
    out = prune_checked(m, tmp_path, ratio=0.5)
    assert init_shapes(out.path)["c2.w"] == (4, 4, 3, 3)


def test_group_norm_of_one_group_freezes_its_channels(tmp_path):
    """GroupNorm statistics change when channels go (DESIGN.md): with one group over every
    channel nothing can go (whole groups can: tests/test_rules_linear_norm.py); the stem
    still prunes."""
    b = Builder()
    x = b.op("GroupNormalization", b.stem("x", 3, 8), b.weight(8), b.weight(8), num_groups=1,
             name="gn")
    y = b.conv(x, 8, 4, name="c2")
    m = b.model(X, {y: [1, 4, 4, 4]}, opset=21)
    assert any("'gn'" in r for r in _frozen_reasons(m, "c1.w"))
    out = prune_checked(m, tmp_path, ratio=0.5)
    assert init_shapes(out.path)["c1.w"] == (8, 3, 3, 3)


def test_channels_reaching_graph_output_freeze(tmp_path):
    b = Builder()
    r = b.op("Relu", b.stem("x", 3, 8), name="act")
    y = b.conv(r, 8, 4, name="c2")
    m = b.model(X, {r: [1, 8, 4, 4], y: [1, 4, 4, 4]})
    assert any(f"graph output '{r}'" in s for s in _frozen_reasons(m, "c1.w"))
    out = prune_checked(m, tmp_path, ratio=0.5)
    assert init_shapes(out.path)["c1.w"] == (8, 3, 3, 3)


def _if_model(cond_input: bool) -> onnx.ModelProto:
    """stem → c1 → If(cond; then Relu(c1), else Sigmoid(c1)) → c2; the branches read c1's
    output from the outer scope. ``cond`` is a scalar bool graph input or computed from x."""
    b = Builder()
    a = b.stem("x", 3, 8)
    cond = "cond" if cond_input else b.op("Greater", b.op("ReduceSum", "x", keepdims=0),
                                          b.const(np.float32(0)))
    branches = {}
    for key, op in (("then_branch", "Relu"), ("else_branch", "Sigmoid")):
        sub = Builder()
        out = sub.op(op, a, name=f"{key}_{op}")
        branches[key] = sub.graph({}, {out: [1, 8, 4, 4]})
    z = b.op("If", cond, name="if", **branches)
    y = b.conv(z, 8, 4, name="c2")
    inputs = {**X, "cond": ([], onnx.TensorProto.BOOL)} if cond_input else X
    return b.model(inputs, {y: [1, 4, 4, 4]})


def test_if_subgraph_using_channels_freezes(tmp_path):
    m = _if_model(cond_input=False)
    assert any("'if'" in r for r in _frozen_reasons(m, "c1.w"))
    out = prune_checked(m, tmp_path, ratio=0.5)
    shapes = init_shapes(out.path)
    assert shapes["c1.w"] == (8, 3, 3, 3) and shapes["stem.w"] == (3, 3, 3, 3)


def test_scalar_bool_graph_input_is_fed(tmp_path):
    m = _if_model(cond_input=True)
    out = prune_checked(m, tmp_path, ratio=0.5)
    assert init_shapes(out.path)["stem.w"] == (3, 3, 3, 3)
