"""``spa.torch.from_onnx`` runs the quantisation ops (spa/torch/quant_ops.py and
spa/torch/qlinear_ops.py) as onnxruntime's CPU kernels do.

One node (or a QuantizeLinear feeding the node under test) against onnxruntime: integer outputs
bit for bit, over every pair of 8-bit inputs where the op is element-wise. Bounds where
onnxruntime rounds its own intermediate results: QLinearAdd bit for bit on a CPU with fused
multiply-add, else one step on at most 1e-4 of the entries, MatMulNBits 1e-5 of the output's largest
magnitude (2% with ``accuracy_level=4``, which quantises ``A`` to int8), a QDQ model one output
step on at most 0.1% of its outputs (onnxruntime fuses it into integer kernels, torch runs it in
float). Against numpy or ml_dtypes where onnxruntime lacks a kernel or departs from the spec.
Then gradients (the straight-through estimator) and whole models quantised by onnxruntime.
"""

from __future__ import annotations

import copy
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

from interpreted import ours, theirs  # noqa: E402

import spa.torch as st  # noqa: E402
from spa import validate as val  # noqa: E402
from spa.torch.arrays import torch_array  # noqa: E402
from spa.torch.interpreter import UnsupportedOpsError  # noqa: E402

MS = "com.microsoft"
RNG = np.random.default_rng(0)
T = TensorProto


def _graph(nodes: list[onnx.NodeProto], feeds: dict[str, np.ndarray], consts: dict,
           outputs: list[str], opset: int) -> onnx.ModelProto:
    vi = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
          for n, v in feeds.items()]
    inits = [v if isinstance(v, onnx.TensorProto) else numpy_helper.from_array(v, n)
             for n, v in consts.items()]
    graph = helper.make_graph(nodes, "g", vi, [helper.make_empty_tensor_value_info(o)
                                               for o in outputs], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                   helper.make_opsetid(MS, 1)])


def _model(op_type: str, feeds: dict[str, np.ndarray], consts: dict | None = None,
           opset: int = 21, outputs: int = 1, names: list[str] | None = None,
           domain: str = "", **attrs) -> onnx.ModelProto:
    """One node: inputs ``names`` ("" for an omitted one; default: feeds then consts)."""
    consts = consts or {}
    outs = [f"y{i}" for i in range(outputs)]
    node = helper.make_node(op_type, names if names is not None else [*feeds, *consts], outs,
                            domain=domain, **attrs)
    return _graph([node], feeds, consts, outs, opset)


def _exact(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    got, want = ours(model, feeds), theirs(model, feeds)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, (g.dtype, g.shape, w.dtype, w.shape)
        np.testing.assert_array_equal(g, w)


def _ints(dtype, shape) -> np.ndarray:
    info = np.iinfo(dtype)
    return RNG.integers(info.min, info.max + 1, shape).astype(dtype)


def _f32(*shape, scale: float = 1.0) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def _scales(n: int) -> np.ndarray:
    return RNG.uniform(0.01, 0.1, n).astype(np.float32)


# ---- QuantizeLinear and DequantizeLinear ----------------------------------------------------
X = np.concatenate([_f32(58, scale=4), [0.5, 1.5, 2.5, -0.5, -2.5, 300, -300]]).astype(
    np.float32).reshape(1, 5, 13)  # ties (scale 1 below), and values beyond every range
Q8 = _ints(np.int8, (2, 3, 5))
BLOCK_S, BLOCK_Z = _scales(18).reshape(2, 3, 3), _ints(np.int8, (2, 3, 3)) // 16

QDQ_CASES = [  # op, feeds, consts, opset, attrs
    ("QuantizeLinear", {"x": X}, {"s": np.float32(1.0)}, 10, {}),  # no zero point: uint8
    ("QuantizeLinear", {"x": X}, {"s": np.float32(0.37), "z": np.int8(-3)}, 13, {}),
    ("QuantizeLinear", {"x": X}, {"s": np.float32(1.0), "z": np.uint8(3)}, 19, {}),
    ("QuantizeLinear", {"x": X}, {"s": _scales(5), "z": np.arange(5, dtype=np.uint8)}, 13, {}),
    ("QuantizeLinear", {"x": X}, {"s": _scales(13), "z": np.arange(13, dtype=np.int8)}, 21,
     {"axis": -1}),
    ("QuantizeLinear", {"x": X}, {"s": np.float32([0.003]), "z": np.int16([7])}, 21, {}),
    ("QuantizeLinear", {"x": X}, {"s": np.float32(0.003), "z": np.uint16(300)}, 25, {}),
    ("QuantizeLinear", {"x": X}, {"s": np.float32(0.05)}, 21, {"output_dtype": T.UINT16}),
    ("QuantizeLinear", {"x": X.astype(np.float16)}, {"s": np.float16(0.3), "z": np.int8(1)},
     21, {}),  # divides in float32 before opset 23 ...
    ("QuantizeLinear", {"x": X.astype(np.float16)}, {"s": np.float16(0.3), "z": np.int8(1)},
     23, {}),  # ... in the scale's type from 23 on ...
    ("QuantizeLinear", {"x": X}, {"s": np.float32(0.3), "z": np.int8(1)}, 23,
     {"precision": T.FLOAT16}),  # ... or in ``precision``
    ("QuantizeLinear", {"x": _f32(2, 3, 10, scale=4)}, {"s": BLOCK_S, "z": BLOCK_Z}, 21,
     {"axis": 2, "block_size": 4}),  # 10 entries in blocks of 4: the last one short
    ("DequantizeLinear", {"q": Q8}, {"s": np.float32(0.37), "z": np.int8(-3)}, 10, {}),
    ("DequantizeLinear", {"q": Q8}, {"s": _scales(3), "z": np.int8([1, 2, 3])}, 13, {}),
    ("DequantizeLinear", {"q": Q8}, {"s": _scales(5)}, 21, {"axis": -1}),
    ("DequantizeLinear", {"q": Q8.astype(np.uint16) * 300}, {"s": np.float32(0.001)}, 21, {}),
    ("DequantizeLinear", {"q": _ints(np.int32, (4, 6))}, {"s": np.float32(1e-3),
                                                          "z": np.int32(5)}, 13, {}),
    ("DequantizeLinear", {"q": Q8}, {"s": np.float16(0.37), "z": np.int8(2)}, 19, {}),
    ("DequantizeLinear", {"q": Q8}, {"s": np.float32(0.37)}, 23, {"output_dtype": T.FLOAT16}),
    ("DequantizeLinear", {"q": Q8}, {"s": BLOCK_S[..., :2], "z": BLOCK_Z[..., :2]}, 21,
     {"axis": 2, "block_size": 3}),
    # onnxruntime's contrib ones
    ("QuantizeLinear", {"x": X}, {"s": _scales(5), "z": np.int16(np.arange(5))}, 21,
     {"axis": 1, "domain": MS}),
    ("QuantizeLinear", {"x": X.astype(np.float16)}, {"s": np.float16(0.03), "z": np.int8(1)},
     21, {"domain": MS}),
    ("DequantizeLinear", {"q": Q8}, {"s": _scales(5).astype(np.float16), "z": np.int8(
        [1, 2, 3, 4, 5])}, 21, {"axis": -1, "domain": MS}),
    ("DequantizeLinear", {"q": _ints(np.int32, (3, 4))}, {"s": np.float32(0.03)}, 21,
     {"domain": MS}),
]


@pytest.mark.parametrize("op_type,feeds,consts,opset,attrs", QDQ_CASES)
def test_quantize_dequantize_match_onnxruntime(op_type, feeds, consts, opset, attrs):
    _exact(_model(op_type, feeds, consts, opset, **attrs), feeds)


def _round_trip(qtype: int, x: np.ndarray, *, saturate: int = 1,
                scale: float = 1.0) -> onnx.ModelProto:
    """``x`` quantised to ``qtype`` (``output_dtype``: no zero point) and read back as float
    (onnxruntime cannot hand numpy a 4-bit or most float8 tensors)."""
    nodes = [helper.make_node("QuantizeLinear", ["x", "s"], ["q"], saturate=saturate,
                              output_dtype=qtype),
             helper.make_node("DequantizeLinear", ["q", "one"], ["y"])]
    consts = {"s": np.float32(scale), "one": np.float32(1.0)}
    return _graph(nodes, {"x": x}, consts, ["y"], 21)


@pytest.mark.parametrize("qtype", [T.INT4, T.UINT4])
def test_4bit_through_output_dtype(qtype):
    x = _f32(40, scale=6)
    _exact(_round_trip(qtype, x, scale=0.7), {"x": x})


@pytest.mark.parametrize("domain", ["", MS])
@pytest.mark.parametrize("constant", [False, True])
@pytest.mark.parametrize("qtype,zero_point", [(T.INT4, -2), (T.UINT4, 3)])
def test_4bit_through_zero_point(qtype, zero_point, constant, domain):
    """Without ``output_dtype`` QuantizeLinear quantises to its zero point's type: an int4/uint4
    one (an initializer, or a Constant's value) saturates to [-8, 7] / [0, 15], not to the
    range of the int8/uint8 tensor that holds it (it did before); in a copy of the module too
    (a device move copies its tensors)."""
    x = np.linspace(-12, 12, 97, dtype=np.float32)  # / 0.7: beyond either 4-bit range
    z = helper.make_tensor("z", qtype, [], [zero_point])
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], domain=domain),
             helper.make_node("DequantizeLinear", ["q", "one", "z"], ["y"], domain=domain)]
    consts = {"s": np.float32(0.7), "one": np.float32(1.0)}
    if constant:
        nodes.insert(0, helper.make_node("Constant", [], ["z"], value=z))
    else:
        consts["z"] = z
    model = _graph(nodes, {"x": x}, consts, ["y"], 21)
    _exact(model, {"x": x})
    module = copy.deepcopy(st.from_onnx(model))
    with torch.no_grad():
        got = module(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(got, theirs(model, {"x": x})[0])


FLOAT8 = [T.FLOAT8E4M3FN, T.FLOAT8E4M3FNUZ, T.FLOAT8E5M2, T.FLOAT8E5M2FNUZ]
# the rounding boundaries past each format's largest value, infinities, NaN, subnormals
EDGES = np.array([0, -0.0, 1, 448, 449, 464, 465, 470, 500, 240, 250, 256, 57344, 60000,
                  61439.99, 70000, 1e6, np.inf, -np.inf, -470, -1e6, np.nan, 1e-9, 2e-3,
                  7.6e-6, 1.6e-5, 2.3e-5], np.float32)


@pytest.mark.parametrize("saturate", [1, 0])
@pytest.mark.parametrize("qtype", FLOAT8)
def test_float8(qtype, saturate):
    x = np.concatenate([EDGES, _f32(100, scale=100)])
    _exact(_round_trip(qtype, x, saturate=saturate), {"x": x})


def test_float8_e5m2_overflow_follows_the_spec():
    """Past e5m2's largest value a non-saturating cast gives inf (the spec, ml_dtypes);
    onnxruntime gives NaN where the value rounds up to inf, ``[61440, 65536)``."""
    x = np.array([61440, 63000, 65535, 65536, -61440, 1e6], np.float32)
    model = _round_trip(T.FLOAT8E5M2, x, saturate=0)
    want = x.astype(ml_dtypes.float8_e5m2).astype(np.float32)
    np.testing.assert_array_equal(ours(model, {"x": x})[0], want)
    ort = theirs(model, {"x": x})[0]
    assert np.isnan(ort[[0, 1, 2, 4]]).all() and np.isinf(ort[[3, 5]]).all()


@pytest.mark.parametrize("node,consts,opset,message", [
    (("QuantizeLinear", {"output_dtype": T.FLOAT4E2M1}), {}, 21,
     "QuantizeLinear with output_dtype=FLOAT4E2M1"),
    (("QuantizeLinear", {"precision": T.DOUBLE}), {}, 23, "QuantizeLinear with precision=DOUBLE"),
    (("DequantizeLinear", {"output_dtype": T.DOUBLE}), {}, 23,
     "DequantizeLinear with output_dtype=DOUBLE"),
    (("QuantizeLinear", {}), {"s": np.ones((2, 2), np.float32)}, 21,
     "QuantizeLinear with a 2-D scale and no block_size"),
])
def test_refused_by_name(node, consts, opset, message):
    op_type, attrs = node
    feeds = {"x": _f32(2, 2) if op_type == "QuantizeLinear" else _ints(np.int8, (2, 2))}
    consts = consts or {"s": np.float32(0.1)}
    with pytest.raises(UnsupportedOpsError, match=message):
        ours(_model(op_type, feeds, consts, opset, **attrs), feeds)


# ---- integer kernels ------------------------------------------------------------------------
@pytest.mark.parametrize("x", [_f32(3, 50, scale=4), np.abs(_f32(4, 5)), -np.abs(_f32(4, 5)),
                               np.zeros((2, 3), np.float32), np.float32([-1, 0.5, 3, 1.3])])
def test_dynamic_quantize_linear(x):
    _exact(_model("DynamicQuantizeLinear", {"x": x}, opset=11, outputs=3), {"x": x})


A_U8, B_S8 = _ints(np.uint8, (2, 3, 16)), _ints(np.int8, (16, 5))
X_U8, W_S8 = _ints(np.uint8, (2, 4, 7, 7)), _ints(np.int8, (6, 2, 3, 3))
CONV = {"group": 2, "pads": [1, 0, 2, 1], "strides": [2, 1], "dilations": [1, 2]}
QCONV = {"xs": np.float32(0.0371), "xz": np.uint8(5), "w": W_S8, "ws": np.float32(0.0057),
         "wz": np.int8(0), "ys": np.float32(0.61), "yz": np.uint8(120)}
QMM = {"as": np.float32(0.0371), "az": np.uint8(9), "b": B_S8, "bs": np.float32(0.0057),
       "bz": np.int8(3), "ys": np.float32(0.41), "yz": np.uint8(100)}

INTEGER_CASES = [  # op, feeds, consts, opset, attrs
    ("MatMulInteger", {"a": A_U8}, {"b": B_S8, "az": np.uint8(7), "bz": np.int8(-3)}, 10, {}),
    ("MatMulInteger", {"a": A_U8}, {"b": B_S8, "az": np.uint8(7), "bz": _ints(np.int8, 5)},
     10, {}),
    ("MatMulInteger", {"a": A_U8, "b": _ints(np.uint8, (2, 16, 5))}, {}, 10, {}),
    ("ConvInteger", {"x": X_U8}, {"w": W_S8, "xz": np.uint8(100), "wz": np.int8(3)}, 10, CONV),
    ("ConvInteger", {"x": X_U8}, {"w": _ints(np.uint8, (6, 2, 3, 3))}, 10, {"group": 2}),
    ("QLinearConv", {"x": X_U8}, {**QCONV, "b": _ints(np.int32, 6) // 2**20}, 10, CONV),
    ("QLinearConv", {"x": X_U8}, {**QCONV, "ws": _scales(6), "wz": np.zeros(6, np.int8)}, 10,
     {"group": 2, "pads": [1, 1, 1, 1]}),
    ("QLinearConv", {"x": X_U8}, {**QCONV, "w": _ints(np.uint8, (6, 2, 3, 3)),
                                  "wz": np.uint8(3)}, 10, {"group": 2}),
    ("QLinearConv", {"x": X_U8.view(np.int8)}, {**QCONV, "xz": np.int8(-4),
                                                "yz": np.int8(3)}, 10, {"group": 2}),
    ("QLinearMatMul", {"a": A_U8}, QMM, 10, {}),
    ("QLinearMatMul", {"a": A_U8}, {**QMM, "bs": _scales(5), "bz": _ints(np.int8, 5)}, 21, {}),
    ("QLinearMatMul", {"a": A_U8.view(np.int8)}, {**QMM, "az": np.int8(-9),
                                                  "yz": np.int8(4)}, 21, {}),
    ("QLinearMatMul", {"a": A_U8[0, 0]}, {**QMM, "b": _ints(np.uint8, (16, 5)),
                                          "bz": np.uint8(130)}, 10, {}),
]


@pytest.mark.parametrize("op_type,feeds,consts,opset,attrs", INTEGER_CASES)
def test_integer_kernels_bit_exact(op_type, feeds, consts, opset, attrs):
    _exact(_model(op_type, feeds, consts, opset, **attrs), feeds)


def _centred(t: np.ndarray, zp) -> np.ndarray:
    return t.astype(np.int64) - np.asarray(zp, np.int64)


def test_integer_kernels_where_onnxruntime_has_none():
    """Per-row zero points of MatMulInteger's ``A``, per-channel ones of ConvInteger's ``W``,
    QLinearConv of int8 input with uint8 weights: the spec, against numpy (and a float Conv,
    exact on these small integers)."""
    az = _ints(np.uint8, 3)
    a = {"a": A_U8}
    got = ours(_model("MatMulInteger", a, {"b": B_S8, "az": az}, 10), a)[0]
    np.testing.assert_array_equal(got, _centred(A_U8, az[:, None]) @ B_S8.astype(np.int64))
    x = {"x": X_U8[:, :2, :4, :4]}
    w, wz = _ints(np.uint8, (3, 2, 2, 2)), _ints(np.uint8, 3)
    got = ours(_model("ConvInteger", x, {"w": w, "xz": np.uint8(9), "wz": wz}, 10), x)[0]
    xs = np.lib.stride_tricks.sliding_window_view(_centred(x["x"], 9), (2, 2), axis=(2, 3))
    want = np.einsum("nchwij,ocij->nohw", xs, _centred(w, wz[:, None, None, None]))
    np.testing.assert_array_equal(got, want)
    xq = {"x": X_U8.view(np.int8)}
    consts = {**QCONV, "xz": np.int8(0), "w": _ints(np.uint8, (6, 2, 3, 3)), "wz": np.uint8(0),
              "yz": np.int8(0)}
    got = ours(_model("QLinearConv", xq, consts, 10, group=2), xq)[0]
    float_conv = _model("Conv", {"x": xq["x"].astype(np.float32)},
                        {"w": consts["w"].astype(np.float32)}, 10, group=2)
    acc = theirs(float_conv, {"x": xq["x"].astype(np.float32)})[0]  # exact: small integers
    scale = np.float32(0.0371) * np.float32(0.0057) / np.float32(0.61)
    np.testing.assert_array_equal(got, np.clip(np.round(acc * scale), -128, 127))


def test_qlinear_matmul_float8_refused():
    x = {"a": _f32(2, 4)}
    e4m3 = {"output_dtype": T.FLOAT8E4M3FN}
    nodes = [helper.make_node("QuantizeLinear", ["a", "s"], ["q"], **e4m3),
             helper.make_node("QuantizeLinear", ["zero", "s"], ["z"], **e4m3),
             helper.make_node("Transpose", ["q"], ["q2"]),
             helper.make_node("QLinearMatMul", ["q", "s", "z", "q2", "s", "z", "s", "z"], ["y"])]
    model = _graph(nodes, x, {"s": np.float32(1), "zero": np.float32(0)}, ["y"], 21)
    with pytest.raises(UnsupportedOpsError, match="QLinearMatMul with float8 inputs"):
        ours(model, x)


# ---- onnxruntime's contrib QLinear family ---------------------------------------------------
def _every_pair(dtype) -> tuple[np.ndarray, np.ndarray]:
    values = np.arange(np.iinfo(dtype).min, np.iinfo(dtype).max + 1)
    a, b = np.meshgrid(values, values, indexing="ij")
    return a.reshape(-1).astype(dtype), b.reshape(-1).astype(dtype)


def _binary(op_type: str, dtype, a: np.ndarray, b: np.ndarray) -> tuple[onnx.ModelProto, dict]:
    info = np.iinfo(dtype)
    za, zb, zc = (dtype(v) for v in RNG.integers(info.min, info.max, 3))
    sa, sb, sc = RNG.uniform(0.002, 0.2, 3).astype(np.float32)
    consts = {"sa": sa, "za": za, "sb": sb, "zb": zb, "sc": sc * (20 if "Mul" in op_type else 1),
              "zc": zc}
    feeds = {"a": a, "b": b}
    names = ["a", "sa", "za", "b", "sb", "zb", "sc", "zc"]
    return _model(op_type, feeds, consts, names=names, domain=MS), feeds


@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_qlinear_mul_every_pair(dtype):
    for _ in range(3):
        model, feeds = _binary("QLinearMul", dtype, *_every_pair(dtype))
        _exact(model, feeds)


# onnxruntime's QLinearAdd kernel on a CPU with fused multiply-add (x86-64's AVX2 kernel)
FMA = Path("/proc/cpuinfo").exists() and " fma " in Path("/proc/cpuinfo").read_text()


@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_qlinear_add_every_pair(dtype):
    """Bit for bit with the AVX2 kernel (without the fused multiply-adds, 1 of these 400 000
    entries would differ); other CPUs' kernels: one step on at most 1e-4 of the entries."""
    a, b = _every_pair(dtype)
    values = np.arange(np.iinfo(dtype).min, np.iinfo(dtype).max + 1).astype(dtype)
    layouts = [(a, b), (np.tile(values, (256, 1)), values[:, None].copy()),  # b broadcast
               (values[:, None].copy(), np.tile(values, (256, 1)))]  # a broadcast
    for a, b in layouts * 2:
        model, feeds = _binary("QLinearAdd", dtype, a, b)
        got, want = ours(model, feeds)[0], theirs(model, feeds)[0]
        assert got.dtype == want.dtype and got.shape == want.shape
        diff = np.abs(got.astype(np.int64) - want)
        assert diff.max() <= (0 if FMA else 1) and (diff > 0).mean() <= 1e-4


@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_qlinear_unary_tables(dtype):
    """Every input value; onnxruntime's sigmoid is a polynomial, exact to the rounding on
    these scales (an entry at a rounding boundary could land a step apart)."""
    info = np.iinfo(dtype)
    x = {"x": np.arange(info.min, info.max + 1).astype(dtype)}
    for _ in range(4):
        xs, xz = np.float32(RNG.uniform(0.01, 0.1)), dtype(RNG.integers(info.min, info.max))
        yz = dtype(RNG.integers(info.min, info.max))
        consts = {"xs": xs, "xz": xz, "ys": np.float32(RNG.uniform(0.001, 0.01)), "yz": yz}
        _exact(_model("QLinearSigmoid", x, consts, domain=MS), x)
        consts["ys"] = np.float32(xs * 0.9)
        _exact(_model("QLinearLeakyRelu", x, consts, domain=MS, alpha=0.13), x)


POOLS = [{"kernel_shape": [3, 3]}, {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1],
                                    "count_include_pad": 1},
         {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1},
         {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1, "count_include_pad": 1,
          "pads": [1, 0, 1, 1]},  # overhanging windows still count 9 (onnxruntime's rule)
         {"kernel_shape": [2, 3], "strides": [2, 2], "ceil_mode": 1, "pads": [0, 1, 1, 0]},
         {"kernel_shape": [3], "strides": [2], "pads": [1, 1]},
         {"kernel_shape": [2, 2, 2], "strides": [1, 2, 1]},
         {"kernel_shape": [3, 2], "pads": [1, 0, 1, 1], "channels_last": 1}]


@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("attrs", POOLS)
def test_qlinear_average_pool(attrs, dtype):
    spatial = (8, 9, 7)[:len(attrs["kernel_shape"])]
    x = {"x": _ints(dtype, (2, 5, *spatial))}
    consts = {"xs": np.float32(0.037), "xz": dtype(3), "ys": np.float32(0.05), "yz": dtype(9)}
    _exact(_model("QLinearAveragePool", x, consts, domain=MS, **attrs), x)


@pytest.mark.parametrize("channels_last", [0, 1])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_qlinear_global_average_pool(dtype, channels_last):
    x = {"x": _ints(dtype, (2, 5, 6, 3))}
    consts = {"xs": np.float32(0.037), "xz": dtype(3), "ys": np.float32(0.021), "yz": dtype(5)}
    _exact(_model("QLinearGlobalAveragePool", x, consts, domain=MS,
                  channels_last=channels_last), x)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_qlinear_concat(dtype):
    feeds = {"a": _ints(dtype, (2, 3, 4)), "b": _ints(dtype, (2, 5, 4)),
             "c": _ints(dtype, (2, 1, 4))}
    consts = {"ys": np.float32(0.05), "yz": dtype(7), "as": np.float32(0.05), "az": dtype(7),
              "bs": np.float32(0.031), "bz": dtype(100), "cs": np.float32(0.07), "cz": dtype(7)}
    names = ["ys", "yz", "a", "as", "az", "b", "bs", "bz", "c", "cs", "cz"]
    _exact(_model("QLinearConcat", feeds, consts, names=names, domain=MS, axis=-2), feeds)


B_SCALES = {"per-tensor": (np.float32(0.004), np.int8(3)),
            "per-column": (_scales(5) / 10, _ints(np.int8, 5))}


@pytest.mark.parametrize("granularity", B_SCALES)
def test_products_to_float(granularity):
    bs, bz = B_SCALES[granularity]
    bias = _f32(5)
    a = {"A": A_U8}
    _exact(_model("MatMulIntegerToFloat", a, {"B": B_S8, "as": np.float32(0.031), "bs": bs,
                                              "az": np.uint8(5), "bz": bz, "bias": bias},
                  domain=MS), a)
    half = {"B": B_S8, "as": np.float16(0.031), "bs": bs.astype(np.float16),
            "az": np.uint8(5), "bz": bz, "bias": bias.astype(np.float16)}
    _exact(_model("MatMulIntegerToFloat", a, half, domain=MS), a)
    f = {"A": _f32(2, 3, 16, scale=3)}
    _exact(_model("DynamicQuantizeMatMul", f, {"B": B_S8, "bs": bs, "bz": bz, "bias": bias},
                  domain=MS), f)
    _exact(_model("DynamicQuantizeMatMul", f, {"B": B_S8, "bs": bs}, domain=MS), f)


@pytest.mark.parametrize("granularity", B_SCALES)
def test_qgemm(granularity):
    bs, bz = B_SCALES[granularity]
    a = {"A": A_U8[0, :, :]}
    consts = {"as": np.float32(0.031), "az": np.uint8(5), "B": B_S8.T.copy(), "bs": bs,
              "bz": bz, "C": _ints(np.int32, 5) // 2**20, "ys": np.float32(0.1),
              "yz": np.uint8(3)}
    names = ["A", "as", "az", "B", "bs", "bz", "C"]
    for inputs in (names, [*names, "ys", "yz"], [*names[:6], "", "ys", "yz"]):
        _exact(_model("QGemm", a, consts, names=inputs, domain=MS, transB=1, alpha=0.7), a)
    lone_scale = {**consts, "bz": np.zeros_like(bz)}  # float out, divided by y_scale
    _exact(_model("QGemm", a, lone_scale, names=[*names[:6], "", "ys"], domain=MS,
                  transB=1), a)
    at = {"A": A_U8[0].T.copy()}
    _exact(_model("QGemm", at, consts, names=names[:6], domain=MS, transA=1, transB=1), at)


def test_contrib_refusals():
    x = {"x": _ints(np.uint8, (1, 2, 4, 4))}
    consts = {"xs": np.float32(0.1), "xz": np.uint8(0), "ys": np.float32(0.1), "yz": np.uint8(0)}
    model = _model("QLinearAveragePool", x, consts, domain=MS, kernel_shape=[2, 2],
                   auto_pad="SAME_UPPER")
    with pytest.raises(UnsupportedOpsError, match="QLinearAveragePool with auto_pad=SAME_UPPER"):
        ours(model, x)
    f = {"a": _f32(2, 3)}
    concat = _model("QLinearConcat", f, {"s": np.float32(0.1), "z": np.uint8(0)},
                    names=["s", "z", "a", "s", "z"], domain=MS, axis=0)
    with pytest.raises(UnsupportedOpsError, match="QLinearConcat with float inputs"):
        ours(concat, f)


# ---- MatMulNBits ----------------------------------------------------------------------------
def _nbits(bits: int, K: int, block: int, zero_points: str, **attrs) -> tuple[onnx.ModelProto,
                                                                             dict]:
    N, blocks = 6, -(-K // block)
    consts = {"B": _ints(np.uint8, (N, blocks, block * bits // 8)), "s": _scales(N * blocks)}
    if zero_points == "packed":
        consts["z"] = _ints(np.uint8, (N, -(-blocks * bits // 8)))
    elif zero_points == "float":
        consts["z"] = RNG.uniform(0, 2**bits, (N, blocks)).astype(np.float32)
    names = [*consts] if zero_points != "bias" else ["B", "s", "", "", "bias"]
    if zero_points == "bias":
        consts["bias"] = _f32(N)
    feeds = {"A": _f32(2, 3, K)}
    return _model("MatMulNBits", feeds, consts, names=["A", *names], domain=MS, K=K, N=N,
                  bits=bits, block_size=block, **attrs), feeds


@pytest.mark.parametrize("accuracy_level,bound", [(0, 1e-5), (4, 2e-2)])
@pytest.mark.parametrize("zero_points", ["default", "packed", "float", "bias"])
@pytest.mark.parametrize("bits,K,block", [(4, 64, 32), (4, 70, 16), (2, 128, 64), (8, 48, 16)])
def test_matmul_nbits(bits, K, block, zero_points, accuracy_level, bound):
    """Within ``bound`` × the output's largest magnitude (measured: 5e-7 in float, 1.1% when
    onnxruntime quantises ``A`` to int8 for ``accuracy_level=4``)."""
    if bits == 8 and zero_points == "float":
        pytest.skip("onnxruntime takes float zero points for 2 and 4 bits only")
    model, feeds = _nbits(bits, K, block, zero_points, accuracy_level=accuracy_level)
    got, want = ours(model, feeds)[0], theirs(model, feeds)[0]
    assert got.dtype == want.dtype and got.shape == want.shape == (2, 3, 6)
    assert np.abs(got - want).max() <= bound * np.abs(want).max()


def test_matmul_nbits_omitted_projection():
    feeds = {"A": _f32(2, 3, 64)}
    consts = {"B": np.zeros((0, 2, 16), np.uint8), "s": np.zeros(0, np.float32),
              "bias": np.arange(6, dtype=np.float32)}
    _exact(_model("MatMulNBits", feeds, consts, names=["A", "B", "s", "", "", "bias"],
                  domain=MS, K=64, N=6, bits=4, block_size=32), feeds)


def test_matmul_nbits_refusals():
    for (bits, attrs), message in [((3, {}), "MatMulNBits with bits=3"),
                                   ((4, {"weight_prepacked": 1}),
                                    "MatMulNBits with weight_prepacked=1")]:
        model, feeds = _nbits(bits, 64, 32, "default", **attrs)
        with pytest.raises(UnsupportedOpsError, match=message):
            ours(model, feeds)
    model, feeds = _nbits(4, 64, 32, "default")
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(64, np.int32), "g"))
    model.graph.node[0].input.extend(["", "g"])
    with pytest.raises(UnsupportedOpsError, match="MatMulNBits with g_idx"):
        ours(model, feeds)


# ---- gradients: the straight-through estimator ----------------------------------------------
def _fake_quant(x: np.ndarray, consts: dict, **attrs) -> st.OnnxModule:
    """QuantizeLinear → DequantizeLinear of the input ``x`` with the same scale."""
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **attrs)]
    return st.from_onnx(_graph(nodes, {"x": x}, consts, ["y"], 21))


def test_straight_through_input_gradient():
    """Identity inside the clamp range, zero outside (int8, scale 0.1: [-12.8, 12.7] around the
    zero point 0)."""
    x = np.float32([[-20, -12.8, -3.33, 0, 0.04, 12.7, 12.76, 40]])
    module = _fake_quant(x, {"s": np.float32(0.1), "z": np.int8(0)})
    xt = torch.from_numpy(x).requires_grad_(True)
    y = module(xt)
    y.backward(torch.ones_like(y))
    np.testing.assert_array_equal(xt.grad.numpy(), [[0, 1, 1, 1, 1, 1, 0, 0]])
    np.testing.assert_allclose(y.detach().numpy(), np.clip(np.round(x * 10), -128, 127) / 10,
                               rtol=1e-6)


def test_straight_through_scale_gradient():
    """A per-channel scale is a parameter; its gradient is LSQ's: ``round(x/s) - x/s`` inside
    the range, the clamped level outside, summed over the channel."""
    x = _f32(3, 4, scale=3)
    x[0, 0], x[2, 3] = 40, -50  # outside the range
    s, z = np.float32([0.05, 0.1, 0.2]), np.int8([1, -2, 0])
    module = _fake_quant(x, {"s": s, "z": z}, axis=0)
    scale = module.onnx_tensors()["s"]
    assert isinstance(scale, torch.nn.Parameter)
    module(torch.from_numpy(x)).sum().backward()
    u = x / s[:, None] + z[:, None]
    level = np.round(x / s[:, None]) + z[:, None]
    inside = (level >= -128) & (level <= 127)
    want = (np.clip(level, -128, 127) - z[:, None] - inside * (u - z[:, None])).sum(1)
    np.testing.assert_allclose(scale.grad.numpy(), want, rtol=1e-4, atol=1e-4)


def test_dequantised_weight_passes_gradient_to_its_scale():
    w = _ints(np.int8, (4, 3))
    feeds = {"a": _f32(2, 4)}
    nodes = [helper.make_node("DequantizeLinear", ["w", "s", "z"], ["wf"], axis=1),
             helper.make_node("MatMul", ["a", "wf"], ["y"])]
    consts = {"w": w, "s": _scales(3), "z": np.int8([0, 1, -1])}
    module = st.from_onnx(_graph(nodes, feeds, consts, ["y"], 21))
    module(torch.from_numpy(feeds["a"])).sum().backward()
    want = feeds["a"].sum(0) @ (w.astype(np.float32) - consts["z"])
    np.testing.assert_allclose(module.onnx_tensors()["s"].grad.numpy(), want, rtol=1e-5)


def test_integer_kernels_have_no_gradient_path():
    """Forward only: the output of an integer kernel is an integer tensor."""
    model = _model("QLinearMatMul", {"a": A_U8}, QMM, 10)
    out = st.from_onnx(model)(torch.from_numpy(A_U8))
    assert out.dtype == torch.uint8 and not out.requires_grad


# ---- int4 and float8 initializers -----------------------------------------------------------
@pytest.mark.parametrize("qtype,values", [
    (T.INT4, [-8, -1, 0, 3, 7]), (T.UINT4, [0, 1, 9, 15, 7]),
    (T.FLOAT8E4M3FN, [0.5, -1.25, 448, 0.001953125, -0.0]), (T.FLOAT8E5M2, [3, -57344, 1e-5, 0, 1]),
    (T.BFLOAT16, [1.5, -3.25, 1e30, 0, 7])])
def test_torch_array_reads_ml_dtypes(qtype, values):
    """int4/uint4 widened to int8/uint8 (their values unchanged), float8 and bfloat16 bit for
    bit: what ``numpy_helper.to_array`` gives for them (``ml_dtypes`` arrays)."""
    array = numpy_helper.to_array(helper.make_tensor("t", qtype, [5], values))
    got = torch_array(array)
    want = {T.INT4: torch.int8, T.UINT4: torch.uint8, T.FLOAT8E4M3FN: torch.float8_e4m3fn,
            T.FLOAT8E5M2: torch.float8_e5m2, T.BFLOAT16: torch.bfloat16}[qtype]
    assert got.dtype == want
    np.testing.assert_array_equal(got.double().numpy(), array.astype(np.float64))


def test_torch_array_refuses_float4():
    array = numpy_helper.to_array(helper.make_tensor("t", T.FLOAT4E2M1, [2], [0.5, -6]))
    with pytest.raises(UnsupportedOpsError, match="an initializer of type float4_e2m1fn"):
        torch_array(array)


@pytest.mark.parametrize("qtype", [T.INT4, T.FLOAT8E4M3FN])
def test_quantised_initializer(qtype):
    """An int4 or float8 initializer (an ``ml_dtypes`` array, which torch.from_numpy
    rejects: from_onnx raised TypeError before) is read by value. Unfused: onnxruntime
    turns DequantizeLinear(int4) → MatMul into a kernel that quantises ``a`` to int8 (0.1%
    off)."""
    w = helper.make_tensor("w", qtype, [2, 3], [-8, 7, 3, 1, -2, 0])
    feeds = {"a": _f32(4, 2)}
    nodes = [helper.make_node("DequantizeLinear", ["w", "s"], ["wf"]),
             helper.make_node("MatMul", ["a", "wf"], ["y"])]
    model = _graph(nodes, feeds, {"w": w, "s": np.float32(0.5)}, ["y"], 21)
    want = val.run(val.session(model, fuse_qdq=False), feeds)["y"]
    np.testing.assert_array_equal(ours(model, feeds)[0], want)


# ---- whole models quantised by onnxruntime --------------------------------------------------
def _cnn() -> onnx.ModelProto:
    """Conv-Relu-Conv-GlobalAveragePool-Gemm on 3×8×8 images, 10 outputs."""
    consts = {"w1": _f32(8, 3, 3, 3, scale=0.3), "b1": _f32(8, scale=0.1),
              "w2": _f32(16, 8, 3, 3, scale=0.2), "b2": _f32(16, scale=0.1),
              "wf": _f32(16, 10, scale=0.3), "bf": _f32(10, scale=0.1)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1],
                              strides=[2, 2]),
             helper.make_node("GlobalAveragePool", ["c2"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "wf", "bf"], ["y"])]
    graph = helper.make_graph(
        nodes, "cnn", [helper.make_tensor_value_info("x", T.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", T.FLOAT, ["N", 10])],
        [numpy_helper.from_array(v, n) for n, v in consts.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _quantised_cnn(tmp_path, quant_format: str) -> onnx.ModelProto:
    quantization = pytest.importorskip("onnxruntime.quantization")

    class Reader(quantization.CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter({"x": _f32(1, 3, 8, 8)} for _ in range(8))

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    onnx.save(_cnn(), tmp_path / "float.onnx")
    quantization.quantize_static(
        tmp_path / "float.onnx", tmp_path / "q.onnx", Reader(), per_channel=True,
        quant_format=getattr(quantization.QuantFormat, quant_format))
    return onnx.load(tmp_path / "q.onnx")


def _output_scale(model: onnx.ModelProto) -> float:
    last = next(n for n in model.graph.node if n.output[0] == model.graph.output[0].name)
    inits = {i.name: i for i in model.graph.initializer}
    return float(numpy_helper.to_array(inits[last.input[1]]))


@pytest.mark.parametrize("quant_format,ops,mismatch", [
    ("QDQ", {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm"}, 1e-3),
    ("QOperator", {"QLinearConv", "QLinearGlobalAveragePool", "QGemm"}, 0.0)])
def test_static_quantised_cnn(tmp_path, quant_format, ops, mismatch):
    """QOperator bit for bit. QDQ runs in float in torch, in onnxruntime's fused integer
    kernels: at most one output step apart, on at most ``mismatch`` of the outputs (measured:
    3 of 50000)."""
    model = _quantised_cnn(tmp_path, quant_format)
    assert ops <= {n.op_type for n in model.graph.node}
    x = {"x": _f32(256, 3, 8, 8)}
    got, want = ours(model, x)[0], theirs(model, x)[0]
    steps = np.abs(got - want) / _output_scale(model)
    assert steps.max() <= 1.001 and (steps > 0.5).mean() <= mismatch


def test_qdq_cnn_trains(tmp_path):
    """Adam on an MSE loss lowers it: gradients reach the per-channel weight scales and the
    bias scales (parameters) through the straight-through estimator."""
    module = st.from_onnx(_quantised_cnn(tmp_path, "QDQ"))
    assert {"w1_scale", "w2_scale", "wf_scale"} <= set(module.onnx_names())
    x, target = torch.from_numpy(_f32(64, 3, 8, 8)), torch.from_numpy(_f32(64, 10))
    optimiser = torch.optim.Adam(module.parameters(), lr=1e-4)
    losses = []
    for _ in range(5):
        optimiser.zero_grad()
        loss = torch.nn.functional.mse_loss(module(x), target)
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("weight_type", ["QInt8", "QUInt8"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_dynamic_quantised_mlp(tmp_path, weight_type, per_channel):
    quantization = pytest.importorskip("onnxruntime.quantization")
    consts = {"w1": _f32(16, 32, scale=0.3), "b1": _f32(32, scale=0.1),
              "w2": _f32(32, 4, scale=0.3)}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]),
             helper.make_node("Add", ["h", "b1"], ["hb"]), helper.make_node("Relu", ["hb"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", T.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", T.FLOAT, ["N", 4])],
        [numpy_helper.from_array(v, n) for n, v in consts.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
              tmp_path / "float.onnx")
    quantization.quantize_dynamic(tmp_path / "float.onnx", tmp_path / "q.onnx",
                                  per_channel=per_channel,
                                  weight_type=getattr(quantization.QuantType, weight_type))
    model = onnx.load(tmp_path / "q.onnx")
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= {n.op_type for n in model.graph.node}
    _exact(model, {"x": _f32(64, 16)})
