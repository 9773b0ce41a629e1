"""Recurrent layers (spa/coupling/rules/rnn.py): hidden units of RNN, GRU and LSTM prune with
their rows in every gate, their recurrence columns and the next layer's input columns, under the
masked oracle; ``hidden_size`` is rewritten; what the rule does not map freezes with the reason.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import Builder, attr, init_shapes, init_value, kept_slices, node_named
from oracle import prune_checked
from reasons import frozen_text

from spa.api import analyze

GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}
T, N, IN = 3, 2, 4


def recurrent(b: Builder, op: str, x: str, inp: int, hidden: int, name: str, *,
              dirs: int = 1, states: bool = True, peepholes: bool = False,
              **attrs) -> list[str]:
    """``op`` with random weights, biases and (when ``states``) constant initial states;
    outputs ``[Y, Y_h(, Y_c)]``."""
    g = GATES[op]
    ins = [x, b.weight(dirs, g * hidden, inp, name=f"{name}.W"),
           b.weight(dirs, g * hidden, hidden, name=f"{name}.R"),
           b.weight(dirs, 2 * g * hidden, name=f"{name}.B"), ""]
    if states:
        ins.append(b.weight(dirs, N, hidden, name=f"{name}.h0"))
        if op == "LSTM":
            ins.append(b.weight(dirs, N, hidden, name=f"{name}.c0"))
    if peepholes:
        ins += [""] * (7 - len(ins)) + [b.weight(dirs, 3 * hidden, name=f"{name}.P")]
    outs = [f"{name}.y", f"{name}.yh"] + ([f"{name}.yc"] if op == "LSTM" else [])
    direction = "bidirectional" if dirs == 2 else "forward"
    return b.op(op, *ins, outputs=outs, name=name, hidden_size=hidden, direction=direction,
                **attrs)


def head(b: Builder, t: str, hidden: int) -> str:
    """``Y_h [1, N, H] → Squeeze → Gemm 'fc' (H → 5)``."""
    return b.gemm(b.op("Squeeze", t, b.const([0])), hidden, 5, name="fc")


@pytest.mark.parametrize("op", ["RNN", "GRU", "LSTM"])
def test_hidden_units_prune_with_every_gate_and_the_next_layer(tmp_path, op):
    b = Builder()
    out = recurrent(b, op, "x", IN, 8, "rnn", peepholes=op == "LSTM")
    m = b.model({"x": [T, N, IN]}, {head(b, out[1], 8): [N, 5]})
    done = prune_checked(m, tmp_path, ratio=0.5)
    shapes, g = init_shapes(done.path), GATES[op]
    assert shapes["rnn.W"] == (1, g * 4, IN) and shapes["rnn.R"] == (1, g * 4, 4)
    assert shapes["rnn.B"] == (1, 2 * g * 4) and shapes["rnn.h0"] == (1, N, 4)
    assert shapes["fc.w"] == (5, 4)
    if op == "LSTM":
        assert shapes["rnn.c0"] == (1, N, 4) and shapes["rnn.P"] == (1, 12)
    assert attr(node_named(done.path, "rnn"), "hidden_size") == 4
    units = kept_slices(init_value(m, "fc.w"), init_value(done.path, "fc.w"), 1)
    rows = [k * 8 + j for k in range(g) for j in units]  # gate-major: every gate of a unit
    assert kept_slices(init_value(m, "rnn.W"), init_value(done.path, "rnn.W"), 1) == rows
    r = init_value(m, "rnn.R")[:, rows][:, :, units]
    np.testing.assert_array_equal(init_value(done.path, "rnn.R"), r)


@pytest.mark.parametrize("linear_before_reset", [0, 1])
def test_bidirectional_gru_into_a_merged_reshape(tmp_path, linear_before_reset):
    """``Y [T, 2, N, 6] → Transpose → Reshape [T, N, 12] → MatMul``: unit ``j`` is column ``j``
    of each direction's half; the Reshape target is rewritten."""
    b = Builder()
    y = recurrent(b, "GRU", "x", IN, 6, "gru", dirs=2,
                  linear_before_reset=linear_before_reset)[0]
    merged = b.op("Reshape", b.op("Transpose", y, perm=[0, 2, 1, 3]), b.const([T, N, 12]))
    out = b.op("MatMul", merged, b.weight(12, 5, name="fc.w"), name="fc")
    m = b.model({"x": [T, N, IN]}, {out: [T, N, 5]})
    done = prune_checked(m, tmp_path, ratio=0.5)
    shapes = init_shapes(done.path)
    assert shapes["gru.W"] == (2, 9, IN) and shapes["gru.R"] == (2, 9, 3)
    assert shapes["gru.B"] == (2, 18) and shapes["fc.w"] == (6, 5)
    assert attr(node_named(done.path, "gru"), "hidden_size") == 3


def test_two_layer_lstm_prunes_both_layers(tmp_path):
    """``LSTM 'l1' (8) → Y → Squeeze dirs → LSTM 'l2' (6) → Y_h → Gemm``: l1's units go from
    l2's input columns, l2's from the Gemm's."""
    b = Builder()
    y1 = recurrent(b, "LSTM", "x", IN, 8, "l1")[0]
    x2 = b.op("Squeeze", y1, b.const([1]))
    out = recurrent(b, "LSTM", x2, 8, 6, "l2")
    m = b.model({"x": [T, N, IN]}, {head(b, out[1], 6): [N, 5]})
    assert sum(g.prunable for g in analyze(m).groups) == 2
    done = prune_checked(m, tmp_path, ratio=0.5)
    shapes = init_shapes(done.path)
    assert shapes["l1.W"] == (1, 16, IN) and shapes["l2.W"] == (1, 12, 4)
    assert shapes["l2.R"] == (1, 12, 3) and shapes["fc.w"] == (5, 3)
    assert [attr(node_named(done.path, n), "hidden_size") for n in ("l1", "l2")] == [4, 3]


def test_batch_first_layout_freezes_naming_the_attribute():
    """``x → MatMul 'pre' (3 → 4) → Relu → LSTM(layout=1)``: the units of 'pre' that the LSTM
    reads freeze, and say which attribute."""
    b = Builder()
    h = b.op("Relu", b.op("MatMul", "x", b.weight(3, IN, name="pre.w"), name="pre"))
    out = recurrent(b, "LSTM", h, IN, 8, "rnn", states=False, layout=1)
    m = b.model({"x": [N, T, 3]}, {out[1]: [N, 1, 8]})
    assert "LSTM node 'rnn': layout=1 (batch-first) is not mapped" in frozen_text(m, "pre.w", 1)


def test_zero_initial_state_built_at_run_time(tmp_path):
    """``ConstantOfShape(Concat([1], N from Shape(x), [8]))`` as the LSTM's initial states (what
    PyTorch exports with a dynamic batch): the literal 8 is rewritten with the units."""
    b = Builder()
    batch = b.op("Unsqueeze", b.op("Gather", b.op("Shape", "x"), b.const(1)), b.const([0]))
    dims = b.op("Concat", b.const([1]), batch, b.const([8]), axis=0)
    zeros = b.op("ConstantOfShape", dims, value=onnx.helper.make_tensor("v", 1, [1], [0.0]),
                 name="zeros")
    g = GATES["LSTM"]
    ins = ["x", b.weight(1, g * 8, IN, name="rnn.W"), b.weight(1, g * 8, 8, name="rnn.R"),
           b.weight(1, 2 * g * 8, name="rnn.B"), "", zeros, zeros]
    out = b.op("LSTM", *ins, outputs=["rnn.y", "rnn.yh", "rnn.yc"], name="rnn", hidden_size=8)
    m = b.model({"x": [T, "n", IN]}, {head(b, out[1], 8): ["n", 5]})
    done = prune_checked(m, tmp_path, ratio=0.5, dims={"n": 3})
    assert init_shapes(done.path)["rnn.W"] == (1, 16, IN)
    assert attr(node_named(done.path, "rnn"), "hidden_size") == 4
