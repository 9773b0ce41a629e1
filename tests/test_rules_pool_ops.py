"""Each pooling, reduction and normalisation-over-an-axis op the registry maps, one by one,
under the masked oracle: applied to c1's channels away from the channel axis (over H and W),
the channels pass through and prune; over the channel axis they freeze, with the reason
(``test_rules_reasons.py``). Also ``Upsample`` (opset 9).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import Builder, init_shapes
from oracle import prune_checked

F32 = 1  # onnx.TensorProto.FLOAT


def _prunes_through(build, *, opset: int = 17, size: int = 4) -> onnx.ModelProto:
    """``x → Conv c1 (3 → 8) → build → Conv c2 (8 → 4)``; ``size``: the spatial size after
    ``build``."""
    b = Builder()
    y = b.conv(build(b, b.conv("x", 3, 8, name="c1")), 8, 4, name="c2")
    return b.model({"x": [1, 3, 4, 4]}, {y: [1, 4, size, size]}, opset=opset)


def _check(m, tmp_path) -> None:
    """c1's channels prune through the op under the masked oracle."""
    shapes = init_shapes(prune_checked(m, tmp_path, ratio=0.5).path)
    assert shapes["c1.w"] == (4, 3, 3, 3) and shapes["c2.w"] == (4, 4, 3, 3)


@pytest.mark.parametrize("op", ["ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp",
                                "ReduceMin", "ReduceMax", "ReduceProd", "ReduceSumSquare"])
def test_reduction_over_the_spatial_axes(tmp_path, op):
    def build(b, t):
        positive = b.op("Add", b.op("Abs", t), b.const(np.float32(1))) if op == "ReduceLogSum" \
            else t
        return b.op("Mul", t, b.op(op, positive, axes=[2, 3], keepdims=1, name="red"))

    _check(_prunes_through(build), tmp_path)


@pytest.mark.parametrize("op", ["ArgMin", "ArgMax"])
def test_arg_reduction_over_a_spatial_axis(tmp_path, op):
    def build(b, t):
        return b.op("Add", t, b.op("Cast", b.op(op, t, axis=3, keepdims=1), to=F32))

    _check(_prunes_through(build), tmp_path)


@pytest.mark.parametrize("op, opset", [("Hardmax", 13), ("LogSoftmax", 13),
                                       ("LpNormalization", 17)])
def test_normalisation_over_the_last_axis(tmp_path, op, opset):
    _check(_prunes_through(lambda b, t: b.op(op, t, axis=-1), opset=opset), tmp_path)


def test_lp_pools(tmp_path):
    def build(b, t):
        pooled = b.op("LpPool", t, kernel_shape=[3, 3], pads=[1, 1, 1, 1], p=2)
        return b.op("Mul", pooled, b.op("GlobalLpPool", t, p=2))

    _check(_prunes_through(build), tmp_path)


def test_upsample(tmp_path):
    def build(b, t):
        return b.op("Upsample", t, b.const(np.asarray([1, 1, 2, 2], np.float32)),
                    mode="nearest")

    _check(_prunes_through(build, opset=9, size=8), tmp_path)
