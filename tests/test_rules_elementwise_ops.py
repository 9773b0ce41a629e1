"""Each element-wise op the registry maps, one by one, under the masked oracle.

``x → Conv c1 (3 → 8) → [into the op's domain] → op → [back to float] → Conv c2 (8 → 4)``: the
op sits on c1's channels, which must prune through it (``prune_checked``: pruned ≡ masked
original). Ops that need a domain get one from ops tested elsewhere (``Tanh`` into (-1, 1),
``|t| + 1`` into [1, ∞)); boolean and integer ops are reached through ``Cast``. N-ary ops take
a per-channel constant ``k [8, 1, 1]``, which must be sliced with the channels. The common cases
(Relu, Add, Mul, …) are in ``test_rules_elementwise.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
from graphs import Builder, init_shapes
from oracle import prune_checked

F32, I32, U8 = 1, 6, 2  # onnx.TensorProto element types


def _unit(b: Builder, t: str) -> str:
    """Into (-0.5, 0.5): Tanh(t) · 0.5."""
    return b.op("Mul", b.op("Tanh", t), b.const(np.float32(0.5)))


def _above_one(b: Builder, t: str) -> str:
    """Into [1, ∞): |t| + 1."""
    return b.op("Add", b.op("Abs", t), b.const(np.float32(1.0)))


def _as(b: Builder, t: str, to: int) -> str:
    return b.op("Cast", t, to=to)


# op → (opset, attributes, how the op is applied to c1's output t)
UNARY = {
    "Abs": (17, {}, None), "Atan": (17, {}, None), "Asinh": (17, {}, None),
    "Sin": (17, {}, None), "Cos": (17, {}, None), "Tan": (17, {}, _unit),
    "Sinh": (17, {}, _unit), "Cosh": (17, {}, _unit), "Exp": (17, {}, _unit),
    "Softsign": (17, {}, None), "Sign": (17, {}, None), "Floor": (17, {}, None),
    "Round": (17, {}, None), "Selu": (17, {"alpha": 1.5, "gamma": 1.1}, None),
    "Celu": (17, {"alpha": 0.8}, None), "Mish": (18, {}, None), "Swish": (24, {"alpha": 1.2}, None),
    "ThresholdedRelu": (17, {"alpha": 0.2}, None), "Shrink": (17, {"lambd": 0.3, "bias": 0.1},
                                                               None),
    "Acos": (17, {}, _unit), "Asin": (17, {}, _unit), "Atanh": (17, {}, _unit),
    "Acosh": (17, {}, _above_one), "Log": (17, {}, _above_one),
}


def _c1_op_c2(build, opset: int) -> tuple:
    b = Builder()
    t = build(b, b.conv("x", 3, 8, name="c1"))
    y = b.conv(t, 8, 4, name="c2")
    return b, b.model({"x": [1, 3, 4, 4]}, {y: [1, 4, 4, 4]}, opset=opset)


def _assert_prunes(m, tmp_path, consts: tuple[str, ...] = ()) -> None:
    out = prune_checked(m, tmp_path, ratio=0.5)
    shapes = init_shapes(out.path)
    assert shapes["c1.w"] == (4, 3, 3, 3) and shapes["c2.w"] == (4, 4, 3, 3)
    for k in consts:  # per-channel constants go with the channels
        assert shapes[k][-3] == 4, (k, shapes[k])


@pytest.mark.parametrize("op", list(UNARY))
def test_unary_float_op(tmp_path, op):
    opset, attrs, pre = UNARY[op]
    _, m = _c1_op_c2(lambda b, t: b.op(op, pre(b, t) if pre else t, **attrs), opset)
    _assert_prunes(m, tmp_path)


@pytest.mark.parametrize("op", ["IsInf", "IsNaN", "Not", "BitwiseNot", "CastLike"])
def test_unary_op_through_casts(tmp_path, op):
    def build(b, t):
        if op == "Not":
            return _as(b, b.op("Not", b.op("Greater", t, b.const(np.float32(0)))), F32)
        if op == "BitwiseNot":
            return _as(b, b.op("BitwiseNot", _as(b, t, I32)), F32)
        if op == "CastLike":
            return b.op("Add", t, b.op("CastLike", _as(b, t, I32), b.const(np.float32(0))))
        return b.op("Add", t, _as(b, b.op(op, t), F32))

    _, m = _c1_op_c2(build, 18)
    _assert_prunes(m, tmp_path)


def _k(b: Builder, dtype=np.float32, positive: bool = False) -> str:
    """The per-channel constant ``k [8, 1, 1]`` of ``dtype`` (bool: random truths)."""
    v = b.rng.standard_normal((8, 1, 1))
    v = np.abs(v) + 0.5 if positive else v
    v = v > 0 if dtype is bool else v * 8 if dtype is np.int32 else v
    return b.const(v.astype(dtype), name="k", dtype=dtype)


NARY = {  # op → how it combines t with the per-channel constant k
    "Max": lambda b, t: b.op("Max", t, _k(b)),
    "Min": lambda b, t: b.op("Min", t, _k(b)),
    "Mean": lambda b, t: b.op("Mean", t, _k(b), t),
    "Sum": lambda b, t: b.op("Sum", t, _k(b), t),
    "Mod": lambda b, t: b.op("Mod", t, _k(b, positive=True), fmod=1),
    "Where": lambda b, t: b.op("Where", b.op("Greater", t, b.const(np.float32(0))), t, _k(b)),
    "Equal": lambda b, t: _as(b, b.op("Equal", b.op("Round", t), b.op("Round", _k(b))), F32),
    "Less": lambda b, t: _as(b, b.op("Less", t, _k(b)), F32),
    "LessOrEqual": lambda b, t: _as(b, b.op("LessOrEqual", t, _k(b)), F32),
    "GreaterOrEqual": lambda b, t: _as(b, b.op("GreaterOrEqual", t, _k(b)), F32),
    "And": lambda b, t: _as(b, b.op("And", _positive(b, t), _k(b, bool)), F32),
    "Or": lambda b, t: _as(b, b.op("Or", _positive(b, t), _k(b, bool)), F32),
    "Xor": lambda b, t: _as(b, b.op("Xor", _positive(b, t), _k(b, bool)), F32),
    "BitShift": lambda b, t: _as(b, b.op("BitShift", _small_uint(b, t),
                                         b.const(np.ones((8, 1, 1), np.uint8), "k", np.uint8),
                                         direction="LEFT"), F32),
    "BitwiseAnd": lambda b, t: _as(b, b.op("BitwiseAnd", _as(b, t, I32), _k(b, np.int32)), F32),
    "BitwiseOr": lambda b, t: _as(b, b.op("BitwiseOr", _as(b, t, I32), _k(b, np.int32)), F32),
    "BitwiseXor": lambda b, t: _as(b, b.op("BitwiseXor", _as(b, t, I32), _k(b, np.int32)), F32),
}


def _positive(b: Builder, t: str) -> str:
    return b.op("Greater", t, b.const(np.float32(0)))


def _small_uint(b: Builder, t: str) -> str:
    """uint8 in [0, 4]: |Tanh(t)| · 4, cast."""
    return _as(b, b.op("Mul", b.op("Abs", b.op("Tanh", t)), b.const(np.float32(4))), U8)


@pytest.mark.parametrize("op", list(NARY))
def test_nary_op_with_a_per_channel_constant(tmp_path, op):
    _, m = _c1_op_c2(NARY[op], 18)
    _assert_prunes(m, tmp_path, consts=("k",))
