"""Weights dequantised by plain ops (spa/ir/quant_chain.py): ``int8 → Cast → (Sub zp) → Mul s
(→ Transpose)`` prunes in its integer tensor, with its per-channel scales and zero points, under
the masked oracle, and stays integer in the same chain of ops; a chain whose scale cannot be
sliced freezes with the reason.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from graphs import Builder, init_shapes, init_value, kept_slices, with_nodes_first
from oracle import RTOL, output_error, prune_checked, prune_obspa, with_and_without_update

from spa.api import analyze
from spa.ir.packed import own_dtype

F32 = onnx.TensorProto.FLOAT


def chain(b: Builder, w: np.ndarray, axis: int | None, name: str, *, zero: bool = False,
          perm: list[int] | None = None, dtype=np.int8) -> str:
    """Quantise ``w`` (stored transposed by ``perm`` when given) per channel along ``axis`` of
    the stored integers (per tensor when None) into ``dtype`` and dequantise it with plain
    ops."""
    info = ml_dtypes.iinfo(dtype)
    mid, half = (int(info.max) + int(info.min) + 1) // 2, (int(info.max) - int(info.min)) // 2
    stored = np.transpose(w, np.argsort(perm)) if perm is not None else w
    shape = [1] * stored.ndim
    if axis is not None:
        shape[axis] = stored.shape[axis]
    other = tuple(a for a in range(stored.ndim) if a != axis)
    scale = (np.abs(stored).max(axis=other if axis is not None else None) / (half * 0.8))
    scale = scale.astype(np.float32).reshape(shape)
    zp = mid + np.round(b.rng.uniform(-half / 6, half / 6, scale.shape)).astype(np.float32) \
        if zero or mid else np.zeros(scale.shape, np.float32)
    q = np.clip(np.round(stored / scale) + zp, info.min, info.max).astype(dtype)
    x = b.op("Cast", b.const(q, f"{name}.q", dtype=dtype), to=F32, name=f"{name}.cast")
    if zero or mid:
        x = b.op("Sub", x, b.const(zp, f"{name}.zp"), name=f"{name}.sub")
    w_out = b.op("Mul", x, b.const(scale, f"{name}.s"), name=f"{name}.mul")
    return b.op("Transpose", w_out, perm=perm, name=f"{name}.t") if perm is not None else w_out


def mlp(*, axis1: int | None = 1, axis2: int | None = None, zero: bool = False,
        perm: bool = False, dtype=np.int8, dims: tuple[int, int, int] = (8, 16, 4)
        ) -> onnx.ModelProto:
    """``x [2, 8] → MatMul(chain w1 [8, 16]) → Relu → MatMul(chain w2 [16, 4])`` (widths
    ``dims``); with ``perm`` w1 is stored ``[16, 8]`` and transposed after its Mul. 4-bit
    integers need opset 21."""
    n_in, hidden, n_out = dims
    b = Builder()
    w1 = b.rng.standard_normal((n_in, hidden)).astype(np.float32)
    t = [1, 0] if perm else None
    h = b.op("Relu", b.op("MatMul", "x", chain(b, w1, axis1, "l1", zero=zero, perm=t,
                                               dtype=dtype), name="l1"))
    w2 = chain(b, b.rng.standard_normal((hidden, n_out)).astype(np.float32), axis2, "l2",
               zero=zero, dtype=dtype)
    y = b.op("MatMul", h, w2, name="l2")
    return b.model({"x": [2, n_in]}, {y: [2, n_out]},
                   opset=21 if np.dtype(dtype) in (ml_dtypes.int4, ml_dtypes.uint4) else 17)


def _ops(path) -> list[str]:
    return sorted(n.op_type for n in onnx.load(str(path)).graph.node)


@pytest.mark.parametrize("zero", [False, True])
def test_matmul_per_channel_scale_prunes_in_int8(tmp_path, zero):
    m = mlp(zero=zero)
    out = prune_checked(m, tmp_path, ratio=0.5)
    assert out.report.masked_relative_diff <= RTOL
    shapes = init_shapes(out.path)
    assert shapes["l1.q"] == (8, 8) and shapes["l1.s"] == (1, 8)  # per-channel scale sliced
    assert shapes["l2.q"] == (8, 4) and shapes["l2.s"] == (1, 1)  # per tensor: untouched
    if zero:
        assert shapes["l1.zp"] == (1, 8)
    assert init_value(out.path, "l1.q").dtype == init_value(out.path, "l2.q").dtype == np.int8
    assert _ops(out.path) == _ops(tmp_path / "model.onnx")  # the same chain, still integer
    cols = kept_slices(init_value(m, "l1.q"), init_value(out.path, "l1.q"), 1)
    assert kept_slices(init_value(m, "l2.q"), init_value(out.path, "l2.q"), 0) == cols
    assert out.report.params_before == 8 * 16 + 16 + 16 * 4 + 1  # zero points are not params


def test_per_tensor_scales_prune_the_integers_alone(tmp_path):
    out = prune_checked(mlp(axis1=None, zero=True), tmp_path, ratio=0.25)
    shapes = init_shapes(out.path)
    assert shapes["l1.q"] == (8, 12) and shapes["l2.q"] == (12, 4)
    assert shapes["l1.s"] == shapes["l1.zp"] == (1, 1)


def test_per_input_channel_scale_of_the_consumer_is_sliced(tmp_path):
    """l2 scaled per input row (axis 0, the pruned axis of a consumer): its scales go too."""
    out = prune_checked(mlp(axis2=0), tmp_path, ratio=0.5)
    assert init_shapes(out.path)["l2.s"] == (8, 1)


def test_transposed_chain_prunes_its_stored_integers(tmp_path):
    """``q [16, 8] → Cast → Mul s[16, 1] → Transpose → MatMul``: the channels are q's rows; the
    rows of q and s go with l1's output channels, l2's input rows."""
    m = mlp(axis1=0, perm=True)
    out = prune_checked(m, tmp_path, ratio=0.5)
    assert init_shapes(out.path)["l1.q"] == (8, 8) and init_shapes(out.path)["l1.s"] == (8, 1)
    rows = kept_slices(init_value(m, "l1.q"), init_value(out.path, "l1.q"), 0)
    assert kept_slices(init_value(m, "l2.q"), init_value(out.path, "l2.q"), 0) == rows
    assert "Transpose" in _ops(out.path)


def conv_net(*, zero: bool) -> onnx.ModelProto:
    """``x → Conv(chain w [8, 3, 3, 3], per out-channel s[8, 1, 1, 1]) → Relu → Conv (float)``."""
    b = Builder()
    w = chain(b, b.rng.standard_normal((8, 3, 3, 3)).astype(np.float32), 0, "c1", zero=zero)
    h = b.op("Relu", b.op("Conv", "x", w, b.weight(8, name="c1.b"), pads=[1] * 4, name="c1"))
    y = b.conv(h, 8, 4, name="c2")
    return b.model({"x": [1, 3, 6, 6]}, {y: [1, 4, 6, 6]})


@pytest.mark.parametrize("zero", [False, True])
def test_conv_weight_chain_prunes_per_output_channel(tmp_path, zero):
    out = prune_checked(conv_net(zero=zero), tmp_path, ratio=0.5)
    shapes = init_shapes(out.path)
    assert shapes["c1.q"] == (4, 3, 3, 3) and shapes["c1.s"] == (4, 1, 1, 1)
    assert shapes["c1.b"] == (4,)
    assert shapes["c2.w"] == (4, 4, 3, 3)
    assert init_value(out.path, "c1.q").dtype == np.int8


def _frozen(m: onnx.ModelProto, tensor: str, axis: int) -> str:
    groups = [g for g in analyze(m).groups if any(s.space == (tensor, axis) for s in g.members)]
    assert len(groups) == 1 and groups[0].frozen and not groups[0].prunable
    return "\n".join(groups[0].frozen)


def test_element_wise_scale_freezes_with_the_reason(tmp_path):
    """A scale per element ``[8, 16]`` has no per-channel form: l1's channels freeze, saying
    why, and its integers stay integer (the Cast is not folded into float)."""
    b = Builder()
    h0 = b.op("Relu", b.op("MatMul", "x", b.weight(8, 8, name="l0.w"), name="l0"))
    q = b.const(b.rng.integers(-100, 100, (8, 16)), "l1.q", dtype=np.int8)
    s = b.const(np.full((8, 16), 0.01, np.float32), "l1.s")
    w = b.op("Mul", b.op("Cast", q, to=F32), s, name="l1.mul")
    h = b.op("Relu", b.op("MatMul", h0, w, name="l1"))
    h2 = b.op("Relu", b.op("MatMul", h, b.weight(16, 16, name="l2.w"), name="l2"))
    y = b.op("MatMul", h2, b.weight(16, 4, name="l3.w"), name="l3")
    m = b.model({"x": [2, 8]}, {y: [2, 4]})
    text = _frozen(m, "l0.w", 1)
    assert "MatMul node 'l1': input 1 'l1.mul_out0' " in text
    assert "is dequantised from integers by plain ops, but its scale of shape [8, 16] on " \
           "integers [8, 16] is neither per-tensor nor per-channel along one axis" in text
    out = prune_checked(m, tmp_path, ratio=0.5)  # l2's group still prunes
    assert init_shapes(out.path)["l2.w"] == (16, 8)
    assert init_value(out.path, "l1.q").dtype == np.int8 and "Cast" in _ops(out.path)



def test_gemm_weight_chain_with_trans_b(tmp_path):
    """``Gemm(x, Cast(q [16, 8]) · s [16, 1], transB=1)``: output rows of q and their scales go
    with the units the next Gemm's (per-tensor, zero-pointed) input columns lose."""
    b = Builder()
    w1 = chain(b, b.rng.standard_normal((16, 8)).astype(np.float32), 0, "g1")
    h = b.op("Relu", b.op("Gemm", "x", w1, b.weight(16, name="g1.b"), transB=1, name="g1"))
    w2 = chain(b, b.rng.standard_normal((4, 16)).astype(np.float32), None, "g2", zero=True)
    y = b.op("Gemm", h, w2, transB=1, name="g2")
    m = b.model({"x": [2, 8]}, {y: [2, 4]})
    out = prune_checked(m, tmp_path, ratio=0.25)
    shapes = init_shapes(out.path)
    assert shapes["g1.q"] == (12, 8) and shapes["g1.s"] == (12, 1) and shapes["g1.b"] == (12,)
    assert shapes["g2.q"] == (4, 12) and shapes["g2.zp"] == (1, 1)



INT4 = {onnx.TensorProto.INT4: ml_dtypes.int4, onnx.TensorProto.UINT4: ml_dtypes.uint4}
needs_4bit = pytest.mark.skipif(not own_dtype(onnx.TensorProto.INT4),
                                reason="this onnx reads int4 unpacked into int8")


def _packed(path, name: str) -> onnx.TensorProto:
    return next(t for t in onnx.load(str(path)).graph.initializer if t.name == name)


def _assert_4bit(path, data_type: int, shapes: dict[str, tuple[int, ...]]) -> None:
    """The named integers of ``path`` are ``data_type`` of these shapes, two values a byte."""
    for name, shape in shapes.items():
        t = _packed(path, name)
        assert (t.data_type, tuple(t.dims)) == (data_type, shape)
        assert len(t.raw_data) == -(-int(np.prod(shape)) // 2)


@needs_4bit
@pytest.mark.parametrize("data_type", list(INT4))
@pytest.mark.parametrize(("axis1", "axis2", "perm"), [(1, None, False), (None, 0, False),
                                                       (0, 0, True)])
def test_4bit_chains_prune_and_stay_packed(tmp_path, data_type, axis1, axis2, perm):
    """int4 (zero points 0 ± 1) and uint4 (8 ± 1) chains, scaled along the pruned axis, the
    other one, or per tensor, and through a Transpose: the integers are sliced with their
    scales and zero points and written 4-bit, two values a byte (an int8 l1.q: 64 bytes)."""
    m = mlp(axis1=axis1, axis2=axis2, perm=perm, zero=True, dtype=INT4[data_type])
    out = prune_checked(m, tmp_path, ratio=0.5)
    _assert_4bit(out.path, data_type, {"l1.q": (8, 8), "l2.q": (8, 4)})  # l1.q [16, 8]: perm
    shapes = init_shapes(out.path)
    scale1 = {1: (1, 8), None: (1, 1), 0: (8, 1)}[axis1]
    assert shapes["l1.s"] == shapes["l1.zp"] == scale1
    assert shapes["l2.s"] == shapes["l2.zp"] == {None: (1, 1), 0: (8, 1)}[axis2]
    assert _ops(out.path) == _ops(tmp_path / "model.onnx")
    axis = 0 if perm else 1
    kept = kept_slices(init_value(m, "l1.q"), init_value(out.path, "l1.q"), axis)
    assert kept_slices(init_value(m, "l2.q"), init_value(out.path, "l2.q"), 0) == kept
    assert out.report.params_after == 8 * 8 + 8 * 4 + sum(np.prod(shapes[s])
                                                          for s in ("l1.s", "l2.s"))


@needs_4bit
@pytest.mark.parametrize("data_type", list(INT4))
def test_4bit_odd_counts_end_in_half_a_byte(tmp_path, data_type):
    """``[5, 13]`` and ``[13, 3]`` integers (65 and 39 values, a half byte each) keep 7
    channels: ``[5, 7]`` and ``[7, 3]``, 35 and 21 values in 18 and 11 bytes."""
    m = mlp(zero=True, dtype=INT4[data_type], dims=(5, 13, 3))
    out = prune_checked(m, tmp_path, ratio=6 / 13)
    _assert_4bit(out.path, data_type, {"l1.q": (5, 7), "l2.q": (7, 3)})
    cols = kept_slices(init_value(m, "l1.q"), init_value(out.path, "l1.q"), 1)
    assert (init_value(out.path, "l2.q") == init_value(m, "l2.q")[cols]).all()


@pytest.mark.parametrize("dtype", [np.int8, pytest.param(ml_dtypes.uint4, marks=needs_4bit)])
def test_chains_in_external_data(tmp_path, dtype):
    """A model whose integers, scales and zero points are all in a data file: the masked
    original reads the chain from there, and the pruned integers are written to the output's
    data file (4-bit ones packed: 64 × 8 values, 256 bytes)."""
    m = mlp(zero=True, dtype=dtype, dims=(64, 16, 8))
    path = tmp_path / "model.onnx"
    onnx.save(m, str(path), save_as_external_data=True, location="model.onnx.data",
              size_threshold=0)
    out = prune_checked(path, tmp_path, ratio=0.5)
    t = next(t for t in onnx.load(str(out.path), load_external_data=False).graph.initializer
             if t.name == "l1.q")
    length = next(int(e.value) for e in t.external_data if e.key == "length")
    assert tuple(t.dims) == (64, 8) and length == 64 * 8 * np.dtype(dtype).itemsize // (
        2 if dtype is ml_dtypes.uint4 else 1)


def _chain_mlp(tmp_path, perm: bool):
    """``x [2, 8] → MatMul(chain l1) → Relu → MatMul(chain l2) → MatMul(chain l3)``, int8 with
    zero points; l2 stored transposed (``[24, 32]``, scaled per stored row) when ``perm``; the
    model saved, calibration data and samples like it written beside it."""
    b = Builder()
    w1, w2, w3 = (b.rng.standard_normal(s).astype(np.float32) for s in ((8, 32), (32, 24),
                                                                        (24, 6)))
    h = b.op("Relu", b.op("MatMul", "x", chain(b, w1, 1, "l1", zero=True), name="l1"))
    h = b.op("MatMul", h, chain(b, w2, 0 if perm else 1, "l2", zero=True,
                                perm=[1, 0] if perm else None), name="l2")
    y = b.op("MatMul", b.op("Relu", h), chain(b, w3, 1, "l3", zero=True), name="l3")
    m = b.model({"x": [2, 8]}, {y: [2, 6]})
    src, calib = tmp_path / "m.onnx", tmp_path / "c.npz"
    onnx.save(m, str(src))
    rng = np.random.default_rng(4)
    mix = rng.standard_normal((8, 8))
    np.savez(calib, x=(rng.standard_normal((256, 8)) @ mix).astype(np.float32))
    return m, src, calib, (rng.standard_normal((64, 2, 8)) @ mix).astype(np.float32)


@pytest.mark.parametrize("perm", [False, True])
def test_reconstruction_refits_chained_weights_in_their_integers(tmp_path, perm):
    """Reconstruction refits a layer whose weight a chain of plain ops dequantises, as a
    DequantizeLinear's: fitted in float on the dequantised weight (through the Transpose) and
    rounded to new codes on its own scales and zero points, the chain's ops run right before
    their layer (a later layer is fitted on the refit, not on the old codes). Held-out error
    falls; the model stays int8 in the same chain of ops with its zero points, and a scale
    changes only where the refit's codes would clip (it widens)."""
    m, src, calib, x = _chain_mlp(tmp_path, perm)
    plain, refit = tmp_path / "plain.onnx", tmp_path / "refit.onnx"
    prune_obspa(src, plain, calib, compensate=False)  # the update alone is the fit of l2's
    report = prune_obspa(src, refit, calib, compensate=False, reconstruct=True)  # rows
    assert report.reconstruction["kept"] and report.reconstruction["refitted"] >= 2
    before, after = report.fidelity["pruned"], report.fidelity["reconstructed"]
    assert after["relative_error"] < 0.9 * before["relative_error"], (before, after)
    assert output_error(m, refit, x) < 0.9 * output_error(m, plain, x)
    assert _ops(refit) == _ops(src)
    changed = [n for n in ("l1.q", "l2.q", "l3.q")
               if not np.array_equal(init_value(refit, n), init_value(plain, n))]
    assert len(changed) >= 2, changed
    for name in ("l1", "l2", "l3"):
        assert init_value(refit, f"{name}.q").dtype == np.int8
        np.testing.assert_array_equal(init_value(refit, f"{name}.zp"),
                                      init_value(plain, f"{name}.zp"))
        assert np.all(init_value(refit, f"{name}.s") >= init_value(plain, f"{name}.s"))


@pytest.mark.parametrize("perm", [False, True])
def test_obspa_update_is_written_in_the_chains_integers(tmp_path, perm):
    """OBSPA's update reaches a chain's integers as a DequantizeLinear's do: computed on the
    dequantised weight (through the Transpose, when the consumer's chain has one: stored
    ``[6, 32]``, scaled per stored row) and written as new codes on its own scales and zero
    points. On samples like the calibration data the model answers closer to the original
    than the same cut without the update; it stays int8, scales and zero points as they were."""
    b = Builder()
    w1, w2 = b.rng.standard_normal((8, 32)), b.rng.standard_normal((32, 6))
    h = b.op("Relu", b.op("MatMul", "x", chain(b, w1.astype(np.float32), 1, "l1", zero=True),
                          name="l1"))
    w2_out = chain(b, w2.astype(np.float32), 0 if perm else 1, "l2", zero=True,
                   perm=[1, 0] if perm else None)
    m = b.model({"x": [2, 8]}, {b.op("MatMul", h, w2_out, name="l2"): [2, 6]})
    src, calib = tmp_path / "m.onnx", tmp_path / "c.npz"
    onnx.save(m, str(src))
    rng = np.random.default_rng(4)
    mix = rng.standard_normal((8, 8))
    np.savez(calib, x=(rng.standard_normal((256, 8)) @ mix).astype(np.float32))
    x = (rng.standard_normal((64, 2, 8)) @ mix).astype(np.float32)
    outs, error = with_and_without_update(m, src, calib, x)
    assert error[True] < 0.9 * error[False], error
    same, updated = init_value(outs[False], "l2.q"), init_value(outs[True], "l2.q")
    assert updated.dtype == np.int8 and updated.shape == same.shape == ((6, 16) if perm
                                                                        else (16, 6))
    assert not np.array_equal(updated, same)
    for name in ("l2.s", "l2.zp", "l1.q"):
        np.testing.assert_array_equal(init_value(outs[True], name), init_value(outs[False], name))


def test_reconstruction_runs_each_chain_right_before_its_layer(tmp_path):
    """A chain's ops placed at the top of the graph move, in their order, to just before the
    layer that reads the weight (as a DequantizeLinear does: a weight computed early would be
    held from before the refits above it), and the layer is run to from its chain's Cast."""
    from spa.passes.reconstruction import _layers, _weights_by_their_layers

    top = with_nodes_first(_chain_mlp(tmp_path, True)[0],
                           lambda n: n.name.split(".")[-1] in ("cast", "sub", "mul", "t"))
    moved = _weights_by_their_layers(top)
    order = [n.name for n in moved.graph.node]
    for name, ops in (("l1", ("cast", "sub", "mul")), ("l2", ("cast", "sub", "mul", "t")),
                      ("l3", ("cast", "sub", "mul"))):
        at = order.index(name)
        assert order[at - len(ops):at] == [f"{name}.{op}" for op in ops], order
    layers = {la.node: la for la in _layers(moved)}
    assert [la.weight for la in layers.values()] == ["l1.q", "l2.q", "l3.q"]
    assert layers["l2"].out_axis == 0  # l2's outputs are the rows of its stored [24, 32]
    for name in ("l1", "l2", "l3"):
        assert layers[name].fed_at == order.index(f"{name}.cast") < layers[name].index
    assert _weights_by_their_layers(moved) is moved
