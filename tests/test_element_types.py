"""bfloat16 and float8 weights are analysed, pruned and validated like float32 ones.

numpy has neither type: onnx reads them as ``ml_dtypes`` arrays, and onnx-graphsurgeon keeps
their ONNX enum as a tensor's dtype (spa/ir/dtypes.py reads all three spellings). A bfloat16
model is validated through float32 twins (spa/ir/widen.py: onnxruntime's CPU has no bfloat16
kernels); float8 weights reach their layer through DequantizeLinear or Cast, which onnxruntime
runs. In every case the pruned file keeps each weight's element type, its parameters are
counted, the masked oracle holds, and the file passes the full check.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import Builder, init_shapes
from onnx import TensorProto, helper, numpy_helper
from oracle import ROUNDING, oracle_relative, prune_checked, save

from spa import validate as val
from spa.api import CheckOptions, PruneOptions, analyze, prune
from spa.cli import main
from spa.errors import ExitCode, ValidationError
from spa.ir.widen import widened

BF16 = TensorProto.BFLOAT16


def _narrowed(b: Builder, data_type: int) -> None:
    """Store every float initializer of ``b`` as ``data_type``."""
    np_type = helper.tensor_dtype_to_np_dtype(data_type)
    for name, value in b.inits.items():
        if value.dtype == np.float32:
            b.inits[name] = value.astype(np_type)


def _bf16_conv_net() -> onnx.ModelProto:
    """x (float32) → Cast → Conv 3→8 → Relu → Conv 8→4 → Cast → y, in bfloat16 (Conv takes
    bfloat16 from opset 22)."""
    b = Builder()
    x = b.op("Cast", "x", to=BF16, name="to_bf16")
    h = b.conv(b.op("Relu", b.conv(x, 3, 8, name="c1")), 8, 4, name="c2")
    b.op("Cast", h, to=TensorProto.FLOAT, name="to_f32", outputs=["y"])
    _narrowed(b, BF16)
    return b.model({"x": [1, 3, 6, 6]}, {"y": [1, 4, 6, 6]}, opset=22)


def _bf16_mlp() -> onnx.ModelProto:
    """bfloat16 in and out: x → MatMul 8→16 → Relu → MatMul 16→4 → y."""
    b = Builder()
    h = b.op("Relu", b.op("MatMul", "x", b.weight(8, 16, name="fc1.w"), name="fc1"))
    b.op("MatMul", h, b.weight(16, 4, name="fc2.w"), name="fc2", outputs=["y"])
    _narrowed(b, BF16)
    return b.model({"x": ([2, 8], BF16)}, {"y": ([2, 4], BF16)}, opset=17)


def _float8_conv_net(data_type: int, through: str) -> onnx.ModelProto:
    """Conv 3→8 → Relu → Conv 8→4 whose weights are float8, read through ``through``
    (DequantizeLinear with a float8 zero point, or Cast)."""
    b = Builder()
    np_type = helper.tensor_dtype_to_np_dtype(data_type)
    weights = []
    for name, shape in (("c1.w", (8, 3, 3, 3)), ("c2.w", (4, 8, 3, 3))):
        q = b.const(b.rng.standard_normal(shape).astype(np_type), name=f"{name}.q", dtype=np_type)
        if through == "DequantizeLinear":
            zero = b.const(np.zeros((), np_type), name=f"{name}.zp", dtype=np_type)
            weights.append(b.op("DequantizeLinear", q, b.const(np.float32(0.5)), zero))
        else:
            weights.append(b.op("Cast", q, to=TensorProto.FLOAT))
    h = b.op("Conv", "x", weights[0], b.weight(8, name="c1.b"), name="c1", pads=[1] * 4)
    b.op("Conv", b.op("Relu", h), weights[1], name="c2", pads=[1] * 4, outputs=["y"])
    return b.model({"x": [1, 3, 6, 6]}, {"y": [1, 4, 6, 6]}, opset=21)


def _types(path: Path) -> dict[str, int]:
    return {t.name: t.data_type for t in onnx.load(str(path)).graph.initializer}


@pytest.mark.parametrize("build", [_bf16_conv_net, _bf16_mlp])
def test_bfloat16_prunes_under_the_oracle(tmp_path: Path, build) -> None:
    model = build()
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    out = prune_checked(model, tmp_path, ratio=0.5)
    assert out.report.params_before == params  # bfloat16 weights are parameters
    assert out.report.latency_ms_before is None  # a float32 twin's latency is not the model's
    assert set(_types(out.path).values()) == {BF16}
    onnx.checker.check_model(onnx.load(str(out.path)), full_check=True)


def test_bfloat16_through_the_command(tmp_path: Path, capsys, caplog) -> None:
    """``spa prune --check-masked`` on a bfloat16 file: exit 0, the oracle holds, the note
    says how it was validated, and ``--json`` leaves one JSON document on stdout."""
    src, out = save(_bf16_conv_net(), tmp_path / "bf16.onnx"), tmp_path / "pruned.onnx"
    assert main(["prune", str(src), "-o", str(out), "--check-masked", "--ratio", "0.5"]) \
        == ExitCode.OK
    std = capsys.readouterr()
    assert oracle_relative(std.out) <= ROUNDING
    assert "validation runs float32 twins" in caplog.text
    assert init_shapes(out)["c1.w"] == (4, 3, 3, 3)
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    assert main(["analyze", str(src), "--json"]) == ExitCode.OK
    assert json.loads(capsys.readouterr().out)["params"] == 8 * 27 + 8 + 4 * 72 + 4
    assert main(["prune", str(src), "-o", str(out), "--json", "--criterion", "obspa"]) \
        == ExitCode.OK  # Hessians are collected from the twin too
    assert json.loads(capsys.readouterr().out)["params_after"] < 8 * 27 + 8 + 4 * 72 + 4
    assert set(_types(out).values()) == {BF16}  # OBS updates are written back in bfloat16


def test_float32_twin_is_exact_and_runs() -> None:
    model = _bf16_mlp()
    twin = widened(model)
    kinds = {t.data_type for t in twin.graph.initializer}
    kinds |= {v.type.tensor_type.elem_type for v in (*twin.graph.input, *twin.graph.output)}
    assert kinds == {TensorProto.FLOAT}
    for a, b in zip(model.graph.initializer, twin.graph.initializer):
        np.testing.assert_array_equal(numpy_helper.to_array(a).astype(np.float32),
                                      numpy_helper.to_array(b))
    sess = val.session(twin)
    assert val.run(sess, val.random_inputs(sess))["y"].shape == (2, 4)


FLOAT8 = ["FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ"]


@pytest.mark.parametrize("through", ["DequantizeLinear", "Cast"])
@pytest.mark.parametrize("type_name", FLOAT8)
def test_float8_weights_prune_under_the_oracle(tmp_path: Path, type_name: str,
                                               through: str) -> None:
    data_type = getattr(TensorProto, type_name)
    model = _float8_conv_net(data_type, through)
    assert analyze(model).groups  # counted and analysed, not a crash
    out = prune_checked(model, tmp_path, ratio=0.5)
    scalars = 4 if through == "DequantizeLinear" else 0  # two scales and two zero points
    assert out.report.params_before == 8 * 27 + 8 + 4 * 72 + scalars
    onnx.checker.check_model(onnx.load(str(out.path)), full_check=True)
    if through == "DequantizeLinear":  # the float8 weight is sliced in its own type
        assert _types(out.path)["c1.w.q"] == data_type
        assert init_shapes(out.path)["c1.w.q"] == (4, 3, 3, 3)


# --- float16 ---------------------------------------------------------------------------------

F16 = TensorProto.FLOAT16


def _f16_mlp(seed: int = 0) -> onnx.ModelProto:
    """float16 in and out: x → MatMul 8→16 → Add → Relu → MatMul 16→4 → Add → y."""
    b = Builder(seed)
    h = b.op("Add", b.op("MatMul", "x", b.weight(8, 16, name="fc1.w"), name="fc1"),
             b.weight(16, name="fc1.b"))
    z = b.op("MatMul", b.op("Relu", h), b.weight(16, 4, name="fc2.w"), name="fc2")
    b.op("Add", z, b.weight(4, name="fc2.b"), outputs=["y"])
    _narrowed(b, F16)
    return b.model({"x": (["N", 8], F16)}, {"y": (["N", 4], F16)}, opset=17)


def test_float16_oracle_compares_float32_twins(tmp_path: Path) -> None:
    """float16 rounds at 5e-4 per value, so pruned and masked models that add in different
    orders differ at the oracle's 1e-4 though both are right. The oracle compares their
    float32 twins (and says so); the float16 files themselves still run for the latency, and
    keep their element type."""
    src = save(_f16_mlp(), tmp_path / "f16.onnx")
    out = tmp_path / "pruned.onnx"
    report, _ = prune(src, out, PruneOptions(ratio=0.5),
                      CheckOptions(check_masked=True, latency_runs=3))
    assert report.oracle.startswith("held on float32 twins")
    assert report.masked_relative_diff is not None and report.masked_relative_diff <= ROUNDING
    assert report.latency_ms_before is not None and report.latency_ms_after is not None
    assert set(_types(out).values()) == {F16}
    assert init_shapes(out)["fc1.w"] == (8, 8)


def test_float16_oracle_on_twins_catches_a_wrong_slice(tmp_path: Path) -> None:
    """The twins are made of the files compared: a pruned float16 model whose kept hidden
    channels are in another order in one layer than in the next fails the oracle."""
    from spa.pipeline.checks import run_checks

    src = save(_f16_mlp(), tmp_path / "f16.onnx")
    good = prune_checked(src, tmp_path, ratio=0.5).path
    wrong = onnx.load(str(good))
    w = next(t for t in wrong.graph.initializer if t.name == "fc1.w")
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w)[:, ::-1].copy(), "fc1.w"))
    wrong_path = save(wrong, tmp_path / "wrong.onnx")
    masked = tmp_path / "masked.onnx"
    # the masked original of the right slice is the right pruned model itself here
    onnx.save(onnx.load(str(good)), str(masked))
    checks = CheckOptions(check_masked=True, latency=False)
    ok = run_checks(good, lambda: masked, set(), good, checks, half=True)
    assert ok["masked_relative_diff"] == 0.0
    with pytest.raises(ValidationError, match="masked original"):
        run_checks(good, lambda: masked, set(), wrong_path, checks, half=True)


@pytest.mark.parametrize("criterion", ["l1", "obspa"])
def test_float16_weights_are_refitted_on_calibration_data(tmp_path: Path, criterion) -> None:
    """With ``--calib``, a float16 model's layers are refitted (in float64, judged as float16
    holds the values) and its Hessians collected at its own element type: before, neither
    ran (OBSPA stopped at onnxruntime refusing float32-typed float16 outputs)."""
    src = save(_f16_mlp(), tmp_path / "f16.onnx")
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(3).standard_normal((256, 8)).astype(np.float16))
    out = tmp_path / "pruned.onnx"
    report, _ = prune(src, out, PruneOptions(ratio=0.5, calib=str(calib), criterion=criterion),
                      CheckOptions(latency=False))
    assert report.reconstruction["refitted"] >= 1
    assert set(_types(out).values()) == {F16}
    assert report.fidelity["reconstructed"]["relative_error"] \
        < report.fidelity["pruned"]["relative_error"]
