"""Quantised graphs in QDQ form (spa/coupling/rules/quant.py, spa/ir/quant.py).

Weights reached through ``DequantizeLinear`` are pruned in their integer tensor together with
their per-axis scales and zero points; activation Quantize/Dequantize pairs pass channels
through; the model stays quantised. Everything runs under the masked oracle, whose masked
original writes the zero point into a removed channel's integer slice (``q = zp`` ⇒ ``w = 0``).
Blocked quantisation (opset 21) prunes its blocked axis in whole blocks; integer-domain ops
freeze with a reason.
"""

from __future__ import annotations

import logging
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from graphs import Builder, init_shapes, init_value, kept_slices, reasons, with_nodes_first
from onnx import TensorProto, helper, numpy_helper
from oracle import RTOL, output_error, prune_checked, prune_obspa, with_and_without_update

from spa import validate as val
from spa.api import analyze, plan
from spa.errors import NothingPrunableError
from spa.ir.load import load_proto
from spa.ir.packed import own_dtype
from spa.ir.quant import dequantize, quantized_weight

X = {"x": [1, 3, 6, 6]}


def qweight(b: Builder, w: np.ndarray, axis: int | None, name: str, *, zero: int = 0,
            bits: type = np.int8) -> str:
    """Quantise ``w`` (per-axis along ``axis``, per-tensor when None) and dequantise it in the
    graph: ``DequantizeLinear(q, scale, zp) → float``; return the DQ output."""
    info = ml_dtypes.iinfo(bits)
    other = tuple(a for a in range(w.ndim) if a != axis) if axis is not None else None
    scale = (np.abs(w).max(axis=other) / min(100, int(info.max) - zero)).astype(np.float32)
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = w.shape[axis]
    zp = np.full(scale.shape, zero, bits)
    q = np.clip(np.round(w / scale.reshape(shape)) + zero, info.min, info.max).astype(bits)
    attrs = {"axis": axis} if axis is not None else {}
    return b.op("DequantizeLinear", b.const(q, f"{name}.q", dtype=bits),
                b.const(scale, f"{name}.s"), b.const(zp, f"{name}.zp", dtype=bits),
                name=f"{name}.dq", **attrs)


def qdq(b: Builder, x: str, name: str) -> str:
    """Activation QDQ pair, per-tensor uint8 (what quantize_static puts around activations)."""
    s, zp = b.const(np.float32(0.05), f"{name}.s"), b.const(np.uint8(128), f"{name}.zp",
                                                             dtype=np.uint8)
    return b.op("DequantizeLinear", b.op("QuantizeLinear", x, s, zp, name=f"{name}.q"), s, zp,
                name=f"{name}.dq")


def _qconv(b: Builder, x: str, cin: int, cout: int, name: str, *, axis: int | None = 0) -> str:
    w = qweight(b, b.rng.standard_normal((cout, cin, 3, 3)).astype(np.float32), axis, name)
    return b.op("Conv", x, w, b.weight(cout, name=f"{name}.b"), name=name, pads=[1, 1, 1, 1])


def conv_net(axis2: int | None = 0) -> onnx.ModelProto:
    """``x → QDQ → Conv(DQ w1, per out-channel) → Relu → QDQ → Conv(DQ w2, axis2) → y``."""
    b = Builder()
    h = _qconv(b, qdq(b, "x", "in"), 3, 8, "c1")
    y = _qconv(b, qdq(b, b.op("Relu", h), "act"), 8, 4, "c2", axis=axis2)
    return b.model(X, {y: [1, 4, 6, 6]})


def test_conv_weights_through_dequantize_prune_in_int8(tmp_path: Path) -> None:
    m = conv_net()
    out = prune_checked(m, tmp_path, ratio=0.5)
    assert out.report.masked_relative_diff <= RTOL
    shapes = init_shapes(out.path)
    assert shapes["c1.q"] == (4, 3, 3, 3) and shapes["c1.s"] == (4,) and shapes["c1.zp"] == (4,)
    assert shapes["c1.b"] == (4,) and shapes["c2.q"] == (4, 4, 3, 3)
    assert shapes["c2.s"] == (4,) and shapes["act.s"] == ()  # c2's out-channels, per-tensor
    assert init_value(out.path, "c1.q").dtype == np.int8  # still quantised, nothing folded
    pruned = onnx.load(str(out.path))
    assert sorted(n.op_type for n in pruned.graph.node) == sorted(n.op_type for n in m.graph.node)
    rows = kept_slices(init_value(m, "c1.q"), init_value(out.path, "c1.q"), 0)
    assert len(rows) == 4
    np.testing.assert_array_equal(init_value(out.path, "c1.s"), init_value(m, "c1.s")[rows])
    assert kept_slices(init_value(m, "c2.q"), init_value(out.path, "c2.q"), 1) == rows


def test_per_input_channel_scales_are_sliced_with_the_input_channels(tmp_path: Path) -> None:
    """A consumer weight quantised along its input axis (axis 1): its scale loses the removed
    input channels' entries, and the oracle still holds."""
    m = conv_net(axis2=1)
    out = prune_checked(m, tmp_path, ratio=0.5)
    assert init_shapes(out.path)["c2.s"] == (4,) and init_shapes(out.path)["c2.q"][1] == 4
    rows = kept_slices(init_value(m, "c2.q"), init_value(out.path, "c2.q"), 1)
    np.testing.assert_array_equal(init_value(out.path, "c2.s"), init_value(m, "c2.s")[rows])


@pytest.mark.parametrize("axis", [1, None])
def test_matmul_weights_per_column_and_per_tensor(tmp_path: Path, axis: int | None) -> None:
    b = Builder()
    h = b.op("MatMul", "x", qweight(b, b.rng.standard_normal((16, 12)), axis, "fc1"), name="fc1")
    h = qdq(b, b.op("Relu", b.op("Add", h, b.weight(12, name="fc1.b"))), "act")
    y = b.op("MatMul", h, qweight(b, b.rng.standard_normal((12, 5)), axis, "fc2"), name="fc2")
    m = b.model({"x": [2, 16]}, {y: [2, 5]})
    out = prune_checked(m, tmp_path, ratio=0.25)
    shapes = init_shapes(out.path)
    assert shapes["fc1.q"] == (16, 9) and shapes["fc2.q"] == (9, 5)
    assert shapes["fc1.s"] == ((9,) if axis == 1 else ())
    assert shapes["fc2.s"] == ((5,) if axis == 1 else ())  # the output's columns stay


@pytest.mark.skipif(not own_dtype(TensorProto.INT4), reason="this onnx reads int4 as int8")
@pytest.mark.parametrize(("bits", "data_type", "zero"), [(ml_dtypes.int4, TensorProto.INT4, 0),
                                                         (ml_dtypes.uint4, TensorProto.UINT4, 8)])
def test_4bit_weights_through_dequantize_stay_packed(tmp_path: Path, bits: type, data_type: int,
                                                     zero: int) -> None:
    """int4 and uint4 ``DequantizeLinear`` weights (opset 21), scaled per output column and per
    input row: pruned in their integers, scales and zero points, written 4-bit, two values a
    byte (SPA could not load such a file: it took their bytes for one value each)."""
    b = Builder()
    h = b.op("MatMul", "x", qweight(b, b.rng.standard_normal((16, 12)), 1, "fc1", zero=zero,
                                    bits=bits), name="fc1")
    h = b.op("Relu", b.op("Add", h, b.weight(12, name="fc1.b")))
    y = b.op("MatMul", h, qweight(b, b.rng.standard_normal((12, 5)), 0, "fc2", zero=zero,
                                  bits=bits), name="fc2")
    out = prune_checked(b.model({"x": [2, 16]}, {y: [2, 5]}, opset=21), tmp_path, ratio=0.25)
    written = {t.name: t for t in onnx.load(str(out.path)).graph.initializer}
    for name, dims in (("fc1.q", [16, 9]), ("fc2.q", [9, 5]), ("fc1.zp", [9]), ("fc2.zp", [9])):
        t = written[name]
        assert (t.data_type, list(t.dims)) == (data_type, dims)
        assert len(t.raw_data) == -(-int(np.prod(dims)) // 2)  # fc2.q: 45 values, 23 bytes
    assert out.report.params_after == 16 * 9 + 9 * 5 + 9 + 9 + 9  # q, scales, bias: values


def test_importance_reads_the_dequantised_weights() -> None:
    """L1 scores of a quantised model equal those of the float model holding the dequantised
    weights: criteria see ``(q − zp) · scale``, not the integers."""
    m = conv_net()
    quant = analyze(m)
    floats = _dequantised_copy(m)
    assert plan(quant).groups and plan(quant).groups[0].keep == plan(analyze(floats)).groups[0].keep
    from spa.passes.importance import get_criterion

    a = get_criterion("l1").run(quant).by_group
    b = get_criterion("l1").run(analyze(floats)).by_group
    assert a.keys() == b.keys() and a
    for g in a:
        np.testing.assert_allclose(a[g], b[g], rtol=1e-6)


def _dequantised_copy(m: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with each weight DequantizeLinear replaced by its float result."""
    graph = load_proto(m).graph
    out = onnx.ModelProto()
    out.CopyFrom(m)
    del out.graph.node[:]
    inits = []
    for node in m.graph.node:
        t = graph.tensors().get(node.output[0])
        w = quantized_weight(t)
        if node.op_type == "DequantizeLinear" and w is not None:
            inits.append(numpy_helper.from_array(dequantize(w), node.output[0]))
        else:
            out.graph.node.append(node)
    out.graph.initializer.extend(inits)
    return out


def test_masked_original_writes_the_zero_point(tmp_path: Path) -> None:
    """The oracle's masked original zeroes a removed input channel of a quantised consumer by
    setting ``q = zp`` there (zero points nonzero here), and leaves every other slice alone."""
    b = Builder()
    h = b.op("MatMul", "x", qweight(b, b.rng.standard_normal((6, 4)), 1, "fc1", zero=3),
             name="fc1")
    y = b.op("MatMul", b.op("Relu", h), qweight(b, b.rng.standard_normal((4, 3)), 1, "fc2",
                                                zero=-5), name="fc2")
    m = b.model({"x": [1, 6]}, {y: [1, 3]})
    analysis = analyze(m)
    the_plan = plan(analysis, __import__("spa.api").api.PruneOptions(ratio=0.5))
    gone = sorted(set(range(4)) - set(the_plan.groups[0].keep))
    masked = val.masked_model(m, analysis, the_plan)
    q = init_value(masked, "fc2.q")
    assert (q[gone] == -5).all()
    keep = the_plan.groups[0].keep
    np.testing.assert_array_equal(q[list(keep)], init_value(m, "fc2.q")[list(keep)])
    np.testing.assert_array_equal(init_value(masked, "fc1.q"), init_value(m, "fc1.q"))
    prune_checked(m, tmp_path, ratio=0.5)  # and the pruned model equals it


def test_obspa_compensation_is_written_in_the_int8_codes(tmp_path: Path) -> None:
    """OBSPA's update is computed on the dequantised weights and written as new codes of the
    integer tensor on its own scales and zero points: the model stays int8 with the same
    scales, and on samples like the calibration data it answers closer to the original than
    the same cut without the update."""

    m = conv_net()
    src, calib = tmp_path / "m.onnx", tmp_path / "c.npz"
    onnx.save(m, str(src))
    rng = np.random.default_rng(3)
    np.savez(calib, x=rng.standard_normal((64, 3, 6, 6)).astype(np.float32))
    x = rng.standard_normal((32, 1, 3, 6, 6)).astype(np.float32)
    outs, error = with_and_without_update(m, src, calib, x)
    assert error[True] < 0.9 * error[False], error
    same, updated = init_value(outs[False], "c2.q"), init_value(outs[True], "c2.q")
    assert updated.dtype == np.int8 and updated.shape == same.shape
    assert not np.array_equal(updated, same)
    np.testing.assert_array_equal(init_value(outs[True], "c2.s"), init_value(outs[False], "c2.s"))


def blocked_weight(b: Builder, w: np.ndarray, block: int, name: str, *,
                   bits: type = ml_dtypes.uint4) -> str:
    """``w [K, N]`` quantised in blocks of ``block`` rows per column (opset 21's blocked
    DequantizeLinear, axis 0, as onnxruntime's MatMulNBitsQuantizer writes int4 in QDQ form):
    asymmetric, a scale and zero point per block and column; return the DQ output."""
    info = ml_dtypes.iinfo(bits)
    k, n = w.shape
    blocks = w.reshape(-1, block, n)
    low, high = blocks.min(1), blocks.max(1)
    scale = ((high - low) / (int(info.max) - int(info.min))).astype(np.float32)
    zp = np.clip(np.round(info.min - low / scale), info.min, info.max)
    q = np.clip(np.round(blocks / scale[:, None]) + zp[:, None], info.min, info.max)
    return b.op("DequantizeLinear", b.const(q.reshape(k, n).astype(bits), f"{name}.q", dtype=bits),
                b.const(scale, f"{name}.s"), b.const(zp.astype(bits), f"{name}.zp", dtype=bits),
                name=f"{name}.dq", axis=0, block_size=block)


def _blocked_mlp(b: Builder, bits: type = ml_dtypes.uint4, k2: int = 16) -> tuple[str, str]:
    """x [1, 3, 8] → fc1 (8 → k2, blocks of 4) → Relu → fc2 (k2 → 6, blocks of 4): fc1's
    outputs are fc2's blocked input rows."""
    w1 = blocked_weight(b, b.rng.standard_normal((8, k2)).astype(np.float32), 4, "fc1",
                        bits=bits)
    w2 = blocked_weight(b, b.rng.standard_normal((k2, 6)).astype(np.float32), 4, "fc2",
                        bits=bits) if k2 % 4 == 0 else None
    h = b.op("Relu", b.op("MatMul", "x", w1, name="fc1"))
    if w2 is None:  # a last block of 2 rows: the scale has ⌈k2 / 4⌉ rows
        w = b.rng.standard_normal((k2, 6)).astype(np.float32)
        q = np.clip(np.round(w * 4) + 8, 0, 15).astype(bits)
        w2 = b.op("DequantizeLinear", b.const(q, "fc2.q", dtype=bits),
                  b.const(np.full((-(-k2 // 4), 6), 0.25, np.float32), "fc2.s"),
                  b.const(np.full((-(-k2 // 4), 6), 8, bits), "fc2.zp", dtype=bits),
                  name="fc2.dq", axis=0, block_size=4)
    return b.op("MatMul", h, w2, name="fc2"), h


@pytest.mark.parametrize("bits", [ml_dtypes.uint4, ml_dtypes.int4, np.int8])
def test_blocked_quantisation_prunes_whole_blocks(tmp_path: Path, bits) -> None:
    """Blocked DequantizeLinear (int4 in QDQ form): fc1's 16 outputs are fc2's input rows in
    blocks of 4, so the MLP is a group of 4 channels of 4 neurons; half go under the numeric
    oracle. fc1's columns and their blocked scales are sliced index by index, fc2's rows and
    scales block by block, and the integers keep their type."""
    b = Builder()
    y, _ = _blocked_mlp(b, bits)
    m = b.model({"x": [1, 3, 8]}, {y: [1, 3, 6]}, opset=21)
    (group,) = analyze(m).prunable_groups
    assert group.size == 4
    out = prune_checked(m, tmp_path, ratio=0.5, criterion="l1")
    shapes = init_shapes(out.path)
    assert shapes["fc1.q"] == (8, 8) and shapes["fc1.s"] == (2, 8)
    assert shapes["fc2.q"] == (8, 6) and shapes["fc2.s"] == (2, 6) and shapes["fc2.zp"] == (2, 6)
    blocks = kept_slices(init_value(m, "fc2.s"), init_value(out.path, "fc2.s"), 0)
    rows = [r for k in blocks for r in range(4 * k, 4 * k + 4)]
    np.testing.assert_array_equal(init_value(out.path, "fc2.q"), init_value(m, "fc2.q")[rows])
    np.testing.assert_array_equal(init_value(out.path, "fc1.q"),
                                  init_value(m, "fc1.q")[:, rows])
    q = onnx.load(str(out.path)).graph.initializer
    kinds = {i.name: i.data_type for i in q}
    assert kinds["fc2.q"] == kinds["fc2.zp"] == onnx.helper.np_dtype_to_tensor_dtype(
        np.dtype(bits))


def test_blocked_quantisation_with_a_part_block_freezes_with_a_reason() -> None:
    """A blocked axis that is no whole number of blocks (18 rows, blocks of 4: the last holds
    2) cannot go block by block: its channels freeze, and the reason says why."""
    b = Builder()
    y, _ = _blocked_mlp(b, k2=18)
    m = b.model({"x": [1, 3, 8]}, {y: [1, 3, 6]}, opset=21)
    assert not analyze(m).prunable_groups
    assert any("not a whole number of blocks of 4" in r and "fc2.dq" in r for r in reasons(m))


def test_blocked_codes_take_the_obs_update_and_the_refit(tmp_path: Path) -> None:
    """OBSPA's update and reconstruction's refit (each alone: on this two-layer net the refit
    finds nothing to add to the update, which is already the least-squares fit of the same
    rows) reach blocked int4 weights as new codes: the update on its own blocks' scales and
    zero points, the refit on ones fitted to it block by block (as a MatMulNBits' refit).
    Each lowers the output error against the original on samples like the calibration data."""

    b = Builder()
    y, _ = _blocked_mlp(b, k2=32)
    m = b.model({"x": [1, 3, 8]}, {y: [1, 3, 6]}, opset=21)
    src, calib = tmp_path / "m.onnx", tmp_path / "c.npz"
    onnx.save(m, str(src))
    rng = np.random.default_rng(6)
    mix = rng.standard_normal((8, 8))
    np.savez(calib, x=(rng.standard_normal((96, 3, 8)) @ mix).astype(np.float32))
    x = (rng.standard_normal((48, 1, 3, 8)) @ mix).astype(np.float32)
    error, outs = {}, {}
    for name, compensate, reconstruct in (("plain", False, False), ("obs", True, False),
                                          ("refit", False, True)):
        out = tmp_path / f"{name}.onnx"
        report = prune_obspa(src, out, calib, reconstruct=reconstruct, compensate=compensate)
        assert report.compensated_layers == int(compensate)
        assert not reconstruct or report.reconstruction["refitted"] >= 1
        outs[name], error[name] = out, output_error(m, out, x)
    assert error["obs"] < 0.9 * error["plain"] and error["refit"] < 0.9 * error["plain"], error
    for name in ("fc2.s", "fc2.zp"):
        plain = init_value(outs["plain"], name)
        np.testing.assert_array_equal(init_value(outs["obs"], name), plain)
        refit = init_value(outs["refit"], name)
        assert refit.dtype == plain.dtype and refit.shape == plain.shape
        assert not np.array_equal(refit, plain)
    for name in ("obs", "refit"):
        assert not np.array_equal(init_value(outs[name], "fc2.q"),
                                  init_value(outs["plain"], "fc2.q"))


def test_integer_domain_ops_freeze_with_a_reason(tmp_path: Path) -> None:
    """QLinearConv (QOperator form): its channels freeze, the reason says why, and a model of
    nothing else is 'nothing prunable' with that reason."""
    b = Builder()
    xs, xz = b.const(np.float32(0.05), "xs"), b.const(np.uint8(128), "xz", dtype=np.uint8)
    ws = b.const(np.full(8, 0.01, np.float32), "ws")
    wz = b.const(np.zeros(8, np.int8), "wz", dtype=np.int8)
    w = b.const(b.rng.integers(-100, 100, (8, 3, 3, 3)).astype(np.int8), "w", dtype=np.int8)
    xq = b.op("QuantizeLinear", "x", xs, xz, name="qx")
    yq = b.op("QLinearConv", xq, xs, xz, w, ws, wz, xs, xz, name="qconv", pads=[1, 1, 1, 1])
    y = b.op("DequantizeLinear", yq, xs, xz, name="dqy")
    y = b.op("Conv", b.op("Relu", y), b.weight(4, 8, 1, 1, name="c2.w"), name="c2")
    m = b.model(X, {y: [1, 4, 6, 6]})
    assert any("QLinearConv node 'qconv': integer-domain" in r for r in reasons(m))
    with pytest.raises(NothingPrunableError, match="integer-domain"):
        plan(analyze(m))


# --- quantize_static output of reference CNNs ---------------------------------------------------
def _quantize_static(name: str, out_dir: Path) -> Path:
    ort_q = pytest.importorskip("onnxruntime.quantization")
    pytest.importorskip("torch")
    from models.export import export

    src = export(name, out_dir / f"{name}.onnx", exporter="torchscript")
    inp = onnx.load(str(src)).graph.input[0]
    shape = [d.dim_value or 1 for d in inp.type.tensor_type.shape.dim]

    class Reader(ort_q.CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(0)
            self.batches = [{inp.name: rng.standard_normal(shape).astype(np.float32)}
                            for _ in range(4)]

        def get_next(self):
            return self.batches.pop() if self.batches else None

    dst = out_dir / f"{name}_qdq.onnx"
    logging.getLogger().setLevel(logging.ERROR)  # quantize_static warns about pre-processing
    ort_q.quantize_static(str(src), str(dst), Reader(), quant_format=ort_q.QuantFormat.QDQ,
                          per_channel=True, weight_type=ort_q.QuantType.QInt8,
                          activation_type=ort_q.QuantType.QUInt8)
    return dst


@pytest.mark.parametrize("name", ["resnet_basic", "mobilenetv2"])
def test_quantize_static_models_prune_under_the_oracle(tmp_path: Path, name: str) -> None:
    src = _quantize_static(name, tmp_path)
    original = onnx.load(str(src))
    n_groups = len(analyze(src).prunable_groups)
    assert n_groups >= 8  # the same channel groups as the float model, not frozen by QDQ
    for ratio in (0.3, 0.6):
        out = prune_checked(src, tmp_path, ratio=ratio, name=f"pruned{ratio}.onnx")
        assert out.report.masked_relative_diff <= RTOL
        assert out.report.params_after <= (1 - ratio / 2) * out.report.params_before
        pruned = onnx.load(str(out.path))
        ops = [n.op_type for n in pruned.graph.node]
        assert ops.count("DequantizeLinear") == [n.op_type for n in original.graph.node].count(
            "DequantizeLinear")
        inits = {t.name: t for t in pruned.graph.initializer}
        for node in pruned.graph.node:
            if node.op_type == "DequantizeLinear" and node.input[0].endswith("_quantized") \
                    and len(inits[node.input[1]].dims) == 1:  # per-channel weight or bias
                q, s = inits[node.input[0]], inits[node.input[1]]
                assert q.data_type in (TensorProto.INT8, TensorProto.INT32)
                assert s.dims[0] == q.dims[0]  # axis 0: scales follow the kept channels


def test_dequantize_linear_is_kept_in_the_normal_form() -> None:
    """Loading does not fold a DequantizeLinear of constants into a float weight."""
    graph = load_proto(conv_net()).graph
    assert sum(n.op == "DequantizeLinear" for n in graph.nodes) == 4
    assert helper.tensor_dtype_to_np_dtype(TensorProto.INT8) == graph.tensors()["c1.q"].dtype


@pytest.mark.parametrize("form", ["per_axis", "per_tensor", "blocked"])
def test_dequantize_matches_the_onnx_reference(form: str) -> None:
    """spa.ir.quant.dequantize computes what DequantizeLinear computes (onnx's reference)."""
    from onnx.reference import ReferenceEvaluator

    rng = np.random.default_rng(1)
    q = rng.integers(-128, 128, (6, 5)).astype(np.int8)
    shape, attrs = {"per_axis": ((5,), {"axis": 1}), "per_tensor": ((), {}),
                    "blocked": ((3, 5), {"axis": 0, "block_size": 2})}[form]
    scale = rng.uniform(0.01, 0.1, shape).astype(np.float32)
    zp = rng.integers(-3, 3, shape).astype(np.int8)
    b = Builder()
    y = b.op("DequantizeLinear", b.const(q, "q", dtype=np.int8), b.const(scale, "s"),
             b.const(zp, "zp", dtype=np.int8), name="dq", **attrs)
    b.op("Identity", y, name="out", outputs=["y"])
    m = b.model({}, {"y": [6, 5]}, opset=21)
    expected = ReferenceEvaluator(m).run(None, {})[0]
    w = quantized_weight(load_proto(m).graph.tensors()[y])
    np.testing.assert_allclose(dequantize(w), expected, rtol=1e-6)


def test_quantised_model_with_external_data(tmp_path: Path) -> None:
    """Integer weights in a data file: mapped, sliced, masked (q = zp read from the file) and
    written to the output's data file, still int8."""
    src = tmp_path / "src"
    src.mkdir()
    onnx.save_model(conv_net(), str(src / "m.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="m.onnx.data", size_threshold=0)
    out = prune_checked(src / "m.onnx", tmp_path, ratio=0.5)
    inits = {t.name: t for t in onnx.load(str(out.path), load_external_data=False)
             .graph.initializer}
    assert inits["c1.q"].data_type == TensorProto.INT8
    assert inits["c1.q"].data_location == TensorProto.EXTERNAL
    assert list(inits["c1.q"].dims) == [4, 3, 3, 3] and list(inits["c2.q"].dims) == [4, 4, 3, 3]


def test_quantize_static_model_is_refitted_in_its_integers(tmp_path: Path) -> None:
    """With calibration data, reconstruction refits a QDQ model's layers through their
    DequantizeLinear: each Conv's int8 weight and int32 bias get new codes on their own scales
    and zero points (kept where that beats the pruned weights on validation rows), a channel's
    weight scale widened where the refit's codes would clip, and its bias scale by the same
    factor. Held-out error falls, the model stays quantised, and the input file is left as it
    was."""
    from spa.api import CheckOptions, PruneOptions, prune

    src = _quantize_static("resnet_basic", tmp_path)
    before = src.read_bytes()
    inp = onnx.load(str(src)).graph.input[0]
    shape = [d.dim_value or 1 for d in inp.type.tensor_type.shape.dim]
    calib = tmp_path / "calib.npz"
    rng = np.random.default_rng(1)
    np.savez(calib, **{inp.name: rng.standard_normal((96, *shape[1:])).astype(np.float32)})
    runs = {}
    for refit in (False, True):
        out = tmp_path / f"refit_{refit}.onnx"
        report, _ = prune(src, out, PruneOptions(ratio=0.5, calib=str(calib),
                                                 allocation="uniform", reconstruct=refit),
                          CheckOptions(latency=False))
        runs[refit] = report, {t.name: numpy_helper.to_array(t)
                               for t in onnx.load(str(out)).graph.initializer}
    (plain_report, plain), (report, refitted) = runs[False], runs[True]
    assert report.reconstruction["kept"] and report.reconstruction["refitted"] >= 3
    pruned, after = report.fidelity["pruned"], report.fidelity["reconstructed"]
    assert pruned == plain_report.fidelity["pruned"]
    assert after["relative_error"] < 0.9 * pruned["relative_error"]
    assert plain.keys() == refitted.keys()
    changed = [n for n in plain if not np.array_equal(plain[n], refitted[n])]
    assert changed and all(refitted[n].dtype in (np.int8, np.int32, np.float32) for n in changed)
    assert any(refitted[n].dtype == np.int32 for n in changed)  # a bias, in its codes
    assert report.reconstruction["layers"] == 16  # 15 Conv and the Gemm (a dequantised bias)
    model = onnx.load(str(tmp_path / "refit_True.onnx"))
    scale_of = {n.output[0]: n.input[1] for n in model.graph.node
                if n.op_type == "DequantizeLinear"}
    for node in model.graph.node:
        if node.op_type == "Conv" and len(node.input) > 2:
            ws, bs = scale_of[node.input[1]], scale_of[node.input[2]]
            assert np.all(refitted[ws] >= plain[ws])  # scales only widen
            np.testing.assert_allclose(refitted[bs] / plain[bs], refitted[ws] / plain[ws],
                                       rtol=1e-6)
    assert src.read_bytes() == before


def test_a_refit_beyond_a_channels_codes_widens_its_scale_and_its_bias_scale() -> None:
    """Reconstruction's codec for a per-channel int8 weight: a channel whose refit the codes
    cannot reach (channel 0: twice its old range) gets the least scale that reaches it, about
    its zero point, and holds it within half a step; the other channels keep their scales and
    codes. The int32 bias of that layer takes the same factor on its scale."""
    from spa.passes.reconstruction import QDQ

    rng = np.random.default_rng(2)
    old_scale = np.full(4, 0.01, np.float32)
    w = rng.uniform(-1.2, 1.2, (4, 6)).astype(np.float64)
    w[0] *= 2.0  # channel 0 reaches 2.4: 240 steps of 0.01, beyond int8
    codes = np.clip(np.rint(w / 0.01), -127, 127).astype(np.int8)
    weights = {"q": numpy_helper.from_array(codes, "q"),
               "s": numpy_helper.from_array(old_scale, "s"),
               "bq": numpy_helper.from_array(np.zeros(4, np.int32), "bq"),
               "bs": numpy_helper.from_array(np.full(4, 1e-4, np.float32), "bs")}
    codec, bias = QDQ("s", None, 0), QDQ("bs", None, 0)
    out, held = codec.requantized(w, "q", weights, widen=True)
    scale = out["s"]
    assert scale[0] == pytest.approx(max(-w[0].min() / 128, w[0].max() / 127), rel=1e-6)
    np.testing.assert_array_equal(scale[1:], old_scale[1:])
    assert np.all(np.abs(held - w) <= scale.astype(np.float64)[:, None] * (0.5 + 1e-6))
    plain, _ = codec.requantized(w, "q", weights)  # without widening: channel 0 clips
    assert "s" not in plain and np.abs(plain["q"][0]).max() == 127
    np.testing.assert_array_equal(out["q"][1:], plain["q"][1:])
    ratio = scale.astype(np.float64) / old_scale
    b_out, _ = bias.requantized(np.full(4, 0.05), "bq", weights, rescale=ratio)
    np.testing.assert_allclose(b_out["bs"], 1e-4 * ratio, rtol=1e-6)


def test_reconstruction_runs_each_weight_dequantisation_after_the_refits_before_it() -> None:
    """The pruned model is run a segment at a time, refitting a layer between two. A weight's
    DequantizeLinear placed early in the graph (all at the top, here) would run before the
    layers above it are refitted, and its output be held: the layers after them would be
    fitted to weights the written model no longer has (EfficientNet-Lite0 in int8: held-out
    agreement 0.179 → 0.000 with such fits, 0.761 without). Reconstruction moves each one to
    just before its layer and runs the model to it, not past it."""
    from spa.passes.reconstruction import _layers, _weights_by_their_layers

    top = with_nodes_first(conv_net(), lambda n: n.op_type == "DequantizeLinear"
                           and n.input[0].endswith(".q"))
    moved = _weights_by_their_layers(top)
    order = [n.name for n in moved.graph.node]
    assert order.index("c1.dq") == order.index("c1") - 1
    assert order.index("c2.dq") == order.index("c2") - 1
    assert [n.name for n in top.graph.node][:2] == ["c1.dq", "c2.dq"]  # the input is a copy
    layers = {la.node: la for la in _layers(moved)}
    for name in ("c1", "c2"):
        assert layers[name].weight == f"{name}.q" and layers[name].codec is not None
        assert layers[name].fed_at == order.index(f"{name}.dq") < layers[name].index
    assert _weights_by_their_layers(moved) is moved  # nothing left to move
