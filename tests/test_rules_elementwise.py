"""Op rules for element-wise ops: unary activations, broadcasting arithmetic with per-channel
constants, residual adds and squeeze-and-excite, each pruned under the masked oracle."""

from __future__ import annotations

import numpy as np
import pytest
from graphs import Builder, group_of, init_shapes, init_value, kept_slices
from oracle import group_sizes, prune_checked

# (op, attributes, extra constant inputs, opset)
UNARY = [
    ("Relu", {}, [], 17),
    ("LeakyRelu", {"alpha": 0.1}, [], 17),
    ("Sigmoid", {}, [], 17),
    ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}, [], 17),
    ("HardSwish", {}, [], 17),
    ("Tanh", {}, [], 17),
    ("Softplus", {}, [], 17),
    ("Elu", {"alpha": 0.7}, [], 17),
    ("Erf", {}, [], 17),
    ("Gelu", {"approximate": "tanh"}, [], 20),
    ("Clip", {}, [np.float32(-0.5), np.float32(0.8)], 13),
    ("Identity", {}, [], 17),
    ("Cast", {"to": 1}, [], 17),  # to float
]


def _conv_op_conv(b: Builder, op: str, *extra: str, **attrs) -> str:
    """x → Conv c1 (3→8) → op → Conv c2 (8→4)."""
    return b.conv(b.op(op, b.conv("x", 3, 8, name="c1"), *extra, **attrs), 8, 4, name="c2")


@pytest.mark.parametrize("op, attrs, extra, opset", UNARY, ids=[u[0] for u in UNARY])
def test_unary(tmp_path, op, attrs, extra, opset):
    b = Builder()
    bounds = [b.const(v) for v in extra]
    y = _conv_op_conv(b, op, *bounds, **attrs)
    m = b.model({"x": [1, 3, 4, 4]}, {y: [1, 4, 4, 4]}, opset=opset)
    assert group_sizes(m) == [(8, True), (4, False)]
    out = prune_checked(m, tmp_path, ratio=0.5)
    shapes = init_shapes(out.path)
    assert shapes["c1.w"] == (4, 3, 3, 3) and shapes["c2.w"] == (4, 4, 3, 3)
    assert [shapes[n] for n in bounds] == [()] * len(bounds)  # Clip's bounds stay scalars


@pytest.mark.parametrize("op", ["Add", "Mul", "Sub", "Div"])
@pytest.mark.parametrize("shape", [(1, 8, 1, 1), (8, 1, 1)], ids=["1C11", "C11"])
def test_per_channel_constant(tmp_path, op, shape):
    b = Builder()
    k = b.weight(*shape, name="k", positive=True)  # positive: a safe divisor
    y = _conv_op_conv(b, op, k)
    m = b.model({"x": [1, 3, 4, 4]}, {y: [1, 4, 4, 4]})
    assert group_of(m, "k", len(shape) - 3).id == group_of(m, "c1.w", 0).id
    out = prune_checked(m, tmp_path, ratio=0.5)
    new_shape = tuple(4 if d == 8 else d for d in shape)
    assert init_shapes(out.path)["k"] == new_shape
    rows = kept_slices(init_value(m, "c1.w"), init_value(out.path, "c1.w"), 0)
    np.testing.assert_array_equal(init_value(out.path, "k").reshape(-1),
                                  init_value(m, "k").reshape(-1)[rows])


def test_residual_add_is_one_group(tmp_path):
    b = Builder()
    a = b.op("Relu", b.conv("x", 3, 8, name="c1"))
    r = b.op("Add", a, b.conv(a, 8, 8, name="c2"))
    y = b.conv(r, 8, 4, name="c3")
    m = b.model({"x": [1, 3, 4, 4]}, {y: [1, 4, 4, 4]})
    g = group_of(m, "c1.w", 0)
    assert g.id == group_of(m, "c2.w", 0).id == group_of(m, "c2.w", 1).id \
        == group_of(m, "c3.w", 1).id
    assert len(g.producers) == 2 and g.size == 8
    assert group_sizes(m) == [(8, True), (4, False)]
    out = prune_checked(m, tmp_path, ratio=0.5)
    shapes = init_shapes(out.path)
    assert shapes["c1.w"] == (4, 3, 3, 3) and shapes["c2.w"] == (4, 4, 3, 3)
    assert shapes["c3.w"] == (4, 4, 3, 3)
    rows1 = kept_slices(init_value(m, "c1.b"), init_value(out.path, "c1.b"), 0)
    rows2 = kept_slices(init_value(m, "c2.b"), init_value(out.path, "c2.b"), 0)
    assert rows1 == rows2  # both branches lose the same channels


def test_squeeze_excite(tmp_path):
    """x * Sigmoid(Conv1x1(Relu(Conv1x1(GlobalAveragePool(x)))))."""
    b = Builder()
    x = b.op("Relu", b.conv("x", 3, 8, name="c1"))
    s = b.conv(b.op("GlobalAveragePool", x), 8, 2, k=1, name="se1")
    s = b.op("Sigmoid", b.conv(b.op("Relu", s), 2, 8, k=1, name="se2"))
    y = b.conv(b.op("Mul", x, s), 8, 4, name="c3")
    m = b.model({"x": [1, 3, 4, 4]}, {y: [1, 4, 4, 4]})
    g = group_of(m, "c1.w", 0)
    assert g.id == group_of(m, "se2.w", 0).id == group_of(m, "se1.w", 1).id \
        == group_of(m, "c3.w", 1).id
    assert sorted(group_sizes(m)) == [(2, True), (4, False), (8, True)]
    out = prune_checked(m, tmp_path, ratio=0.5)
    shapes = init_shapes(out.path)
    assert shapes["se1.w"] == (1, 4, 1, 1) and shapes["se2.w"] == (4, 1, 1, 1)
    assert shapes["c1.w"] == (4, 3, 3, 3) and shapes["c3.w"] == (4, 4, 3, 3)
    rows = kept_slices(init_value(m, "c1.w"), init_value(out.path, "c1.w"), 0)
    assert kept_slices(init_value(m, "se2.b"), init_value(out.path, "se2.b"), 0) == rows
