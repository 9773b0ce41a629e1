"""The quantisation rules op by op: DequantizeLinear of a weight prunes under the oracle (the
QDQ form; more in ``test_quant.py``), and every integer-domain op, in the default and the
``com.microsoft`` domain, freezes the channels it touches with the reason.
"""

from __future__ import annotations

import numpy as np
import pytest
from graphs import Builder, init_shapes
from oracle import prune_checked
from reasons import X, frozen_text

I8, U8, I32, F32 = 3, 2, 6, 1  # onnx.TensorProto element types
MS = "com.microsoft"
WORDS = "integer-domain quantised op: SPA prunes quantised models in QDQ form"


def test_dequantized_weight_prunes_in_its_integer_tensor(tmp_path):
    """``Conv(x, DequantizeLinear(q, s[8], zp[8])) → QuantizeLinear → DequantizeLinear → Conv``:
    the integer weight and its per-channel scales go with the channels, the activation pair
    passes them through."""
    b = Builder()
    q = b.const(b.rng.integers(-100, 100, (8, 3, 3, 3)), "c1.q", dtype=np.int8)
    w = b.op("DequantizeLinear", q, b.const(np.full(8, 0.01, np.float32), "c1.s"),
             b.const(np.zeros(8, np.int8), "c1.zp", dtype=np.int8), axis=0, name="c1.dq")
    h = b.op("Relu", b.op("Conv", "x", w, pads=[1, 1, 1, 1], name="c1"))
    hq, s, z = _quantised(b, h)
    y = b.conv(b.op("DequantizeLinear", hq, s, z), 8, 4, name="c2")
    m = b.model(X, {y: [1, 4, 4, 4]}, opset=13)
    shapes = init_shapes(prune_checked(m, tmp_path, ratio=0.5).path)
    assert shapes["c1.q"] == (4, 3, 3, 3) and shapes["c1.s"] == shapes["c1.zp"] == (4,)
    assert shapes["c2.w"] == (4, 4, 3, 3)


def _quantised(b: Builder, t: str) -> tuple[str, str, str]:
    """``(QuantizeLinear(t), scale, zero point)``, per tensor, uint8."""
    s, z = b.const(np.float32(0.05)), b.const(np.uint8(128), dtype=np.uint8)
    return b.op("QuantizeLinear", t, s, z), s, z


def _default_domain(op: str, b: Builder, c: str) -> tuple[str, list[int | None], int]:
    """A valid node of ``op`` on c1's output ``c [1, 8, 4, 4]``: (output, shape, type)."""
    xq, s, z = _quantised(b, c)
    w = b.const(b.rng.integers(-50, 50, (2, 8, 1, 1)), "w", dtype=np.int8)
    wz = b.const(np.int8(0), dtype=np.int8)
    if op == "ConvInteger":
        return b.op(op, xq, w, z, wz, name="iop"), [1, 2, 4, 4], I32
    if op == "QLinearConv":
        return b.op(op, xq, s, z, w, s, wz, s, z, name="iop"), [1, 2, 4, 4], U8
    m = b.const(b.rng.integers(-50, 50, (4, 2)), "w", dtype=np.int8)
    if op == "MatMulInteger":
        return b.op(op, xq, m, z, wz, name="iop"), [1, 8, 4, 2], I32
    if op == "QLinearMatMul":
        return b.op(op, xq, s, z, m, s, wz, s, z, name="iop"), [1, 8, 4, 2], U8
    return b.op(op, c, outputs=["yq", "ys", "yz"], name="iop")[0], [1, 8, 4, 4], U8


@pytest.mark.parametrize("op", ["ConvInteger", "QLinearConv", "MatMulInteger", "QLinearMatMul",
                                "DynamicQuantizeLinear"])
def test_integer_op_in_the_default_domain(op):
    b = Builder()
    y, shape, elem = _default_domain(op, b, b.stem("x", 3, 8))
    outputs = {y: (shape, elem)}
    if op == "DynamicQuantizeLinear":
        outputs.update(ys=([], F32), yz=([], U8))
    m = b.model(X, outputs, opset=13)
    assert f"{op} node 'iop': {WORDS}" in frozen_text(m, "c1.w")


# com.microsoft ops: which inputs each takes (q: c1's output quantised, f: it in float; s/z: a
# scale/zero point; w: an int8 weight) — the rule reads none of them.
CONTRIB = {
    "QLinearAdd": "qszqszsz", "QLinearMul": "qszqszsz", "QLinearAveragePool": "qszsz",
    "QLinearGlobalAveragePool": "qszsz", "QLinearLeakyRelu": "qszsz", "QLinearSigmoid": "qszsz",
    "QLinearConcat": "szqsz", "QGemm": "qszwsz", "DynamicQuantizeMatMul": "fwsz",
    "MatMulIntegerToFloat": "qwssz",
}


@pytest.mark.parametrize("op", list(CONTRIB))
def test_integer_op_in_the_microsoft_domain(op):
    b = Builder()
    c = b.stem("x", 3, 8)
    xq, s, z = _quantised(b, c)
    w = b.const(b.rng.integers(-50, 50, (8, 2)), "w", dtype=np.int8)
    ins = [{"q": xq, "f": c, "s": s, "z": z, "w": w}[k] for k in CONTRIB[op]]
    y = b.op(op, *ins, domain=MS, name="iop")
    m = b.model(X, {y: ([None] * 4, F32)}, extra_opsets={MS: 1})
    assert f"{op} node 'iop': {WORDS}" in frozen_text(m, "c1.w")
