"""Op rules for dense layers (Gemm, MatMul with a constant weight) and per-channel norms
(BatchNormalization, InstanceNormalization, GroupNormalization, PRelu), each pruned under the
masked oracle."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import Builder, group_of, init_shapes, init_value, kept_slices
from onnx import helper
from oracle import group_sizes, prune_checked


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias_shape", [(8,), (1, 8)], ids=["N", "1N"])
def test_gemm(tmp_path, trans_b, bias_shape):
    b = Builder()
    y = b.gemm("x", 16, 8, trans_b=trans_b, bias_shape=bias_shape, name="g1")
    y = b.gemm(b.op("Relu", y), 8, 4, trans_b=trans_b, name="g2")
    m = b.model({"x": [2, 16]}, {y: [2, 4]})
    assert group_sizes(m) == [(8, True), (4, False)]
    out = prune_checked(m, tmp_path, ratio=0.5)
    shapes = init_shapes(out.path)
    assert shapes["g1.w"] == ((4, 16) if trans_b else (16, 4))
    assert shapes["g1.b"] == bias_shape[:-1] + (4,)
    assert shapes["g2.w"] == (4, 4)
    n_axis = 0 if trans_b else 1
    rows = kept_slices(init_value(m, "g1.w"), init_value(out.path, "g1.w"), n_axis)
    assert kept_slices(init_value(m, "g2.w"), init_value(out.path, "g2.w"), 1 - n_axis) == rows
    assert kept_slices(init_value(m, "g1.b"), init_value(out.path, "g1.b"), -1) == rows


def test_gemm_ratio_zero_is_identity(tmp_path):
    b = Builder()
    y = b.gemm(b.op("Relu", b.gemm("x", 16, 8)), 8, 4)
    m = b.model({"x": [2, 16]}, {y: [2, 4]})
    out = prune_checked(m, tmp_path, ratio=0.0)
    assert init_shapes(out.path) == init_shapes(m)


def test_matmul_constant_right_3d(tmp_path):
    """[B, S, K] @ [K, N] + bias, twice: the last axis is the channel axis."""
    b = Builder()
    y = b.op("Add", b.op("MatMul", "x", b.weight(16, 8, name="w1")), b.weight(8, name="b1"))
    y = b.op("MatMul", b.op("Relu", y), b.weight(8, 4, name="w2"))
    m = b.model({"x": [2, 3, 16]}, {y: [2, 3, 4]})
    assert group_sizes(m) == [(8, True), (4, False)]
    out = prune_checked(m, tmp_path, ratio=0.5)
    assert init_shapes(out.path) == {"w1": (16, 4), "b1": (4,), "w2": (4, 4)}


def test_matmul_constant_left(tmp_path):
    """W @ X with X: [B, K, L] — channels on axis -2."""
    b = Builder()
    y = b.op("MatMul", b.weight(8, 16, name="w1"), "x")
    y = b.op("MatMul", b.weight(4, 8, name="w2"), b.op("Relu", y))
    m = b.model({"x": [2, 16, 5]}, {y: [2, 4, 5]})
    assert group_sizes(m) == [(8, True), (4, False)]
    out = prune_checked(m, tmp_path, ratio=0.5)
    assert init_shapes(out.path) == {"w1": (4, 16), "w2": (4, 4)}
    rows = kept_slices(init_value(m, "w1"), init_value(out.path, "w1"), 0)
    assert kept_slices(init_value(m, "w2"), init_value(out.path, "w2"), 1) == rows


def test_batch_norm_between_convs(tmp_path):
    b = Builder()
    y = b.bn(b.conv("x", 3, 8, name="c1"), 8, name="bn")
    y = b.conv(b.op("Relu", y), 8, 4, name="c2")
    m = b.model({"x": [1, 3, 4, 4]}, {y: [1, 4, 4, 4]})
    g = group_of(m, "c1.w", 0)
    assert g.size == 8 and g.prunable
    assert {m_.space for m_ in g.members} >= {(f"bn.{p}", 0)
                                                for p in ("scale", "bias", "mean", "var")}
    out = prune_checked(m, tmp_path, ratio=0.5)
    shapes = init_shapes(out.path)
    rows = kept_slices(init_value(m, "c1.w"), init_value(out.path, "c1.w"), 0)
    for p in ("scale", "bias", "mean", "var"):
        assert shapes[f"bn.{p}"] == (4,)
        np.testing.assert_array_equal(init_value(out.path, f"bn.{p}"),
                                      init_value(m, f"bn.{p}")[rows])
    assert shapes["c2.w"] == (4, 4, 3, 3)


def test_instance_norm_between_convs(tmp_path):
    b = Builder()
    y = b.op("InstanceNormalization", b.conv("x", 3, 8, name="c1"), b.weight(8, name="in.scale"),
             b.weight(8, name="in.bias"))
    y = b.conv(b.op("Relu", y), 8, 4, name="c2")
    m = b.model({"x": [1, 3, 4, 4]}, {y: [1, 4, 4, 4]})
    assert group_sizes(m) == [(8, True), (4, False)]
    out = prune_checked(m, tmp_path, ratio=0.5)
    shapes = init_shapes(out.path)
    assert shapes["in.scale"] == shapes["in.bias"] == (4,)
    assert shapes["c2.w"] == (4, 4, 3, 3)


def test_group_normalization_loses_whole_groups(tmp_path):
    """Statistics per group of 2 channels: a whole group leaves the others' unchanged, so the
    8 channels prune 2 at a time, with the scale and bias, and num_groups follows."""
    b = Builder()
    y = b.op("GroupNormalization", b.conv("x", 3, 8, name="c1"), b.weight(8, name="gn.scale"),
             b.weight(8, name="gn.bias"), num_groups=4, name="gn")
    y = b.conv(b.op("Relu", y), 8, 4, name="c2")
    m = b.model({"x": [1, 3, 4, 4]}, {y: [1, 4, 4, 4]}, opset=21)
    assert group_sizes(m) == [(4, True), (4, False)]  # 4 groups of 2 channels
    out = prune_checked(m, tmp_path, ratio=0.5, round_to=1)
    shapes = init_shapes(out.path)
    assert shapes["gn.scale"] == shapes["gn.bias"] == (4,)
    assert shapes["c1.w"] == (4, 3, 3, 3) and shapes["c2.w"] == (4, 4, 3, 3)
    gn, = [n for n in onnx.load(str(out.path)).graph.node if n.op_type == "GroupNormalization"]
    assert {a.name: helper.get_attribute_value(a) for a in gn.attribute}["num_groups"] == 2


def test_prelu_per_channel_slope(tmp_path):
    b = Builder()
    y = b.op("PRelu", b.conv("x", 3, 8, name="c1"), b.weight(8, 1, 1, name="slope"))
    y = b.conv(y, 8, 4, name="c2")
    m = b.model({"x": [1, 3, 4, 4]}, {y: [1, 4, 4, 4]})
    assert group_of(m, "slope", 0).id == group_of(m, "c1.w", 0).id
    out = prune_checked(m, tmp_path, ratio=0.5)
    assert init_shapes(out.path)["slope"] == (4, 1, 1)
    rows = kept_slices(init_value(m, "c1.w"), init_value(out.path, "c1.w"), 0)
    np.testing.assert_array_equal(init_value(out.path, "slope"), init_value(m, "slope")[rows])
