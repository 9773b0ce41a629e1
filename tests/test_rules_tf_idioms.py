"""Graph idioms that tf2onnx and jax2onnx write and PyTorch's exporters do not, as tiny graphs
under the masked oracle: Keras ``Dense`` on an NHWC tensor (tf2onnx's Tensordot: flatten to
``[-1, C]``, MatMul, reshape back with a run-time target built in int32 from ``Shape``), and
channels-last per-channel ``Mul``/``Add`` (an unfused BatchNormalization)."""

from __future__ import annotations

import numpy as np
import onnx
from graphs import Builder, group_of, init_shapes, init_value, input_value, kept_slices
from oracle import prune_checked

from spa.coupling.rules.shape import static_factor_groups
from spa.ir.fold import SHAPE_FOLDERS

I32, I64 = onnx.TensorProto.INT32, onnx.TensorProto.INT64


def test_trailing_and_leading_runs_regroup_beside_symbolic_dims():
    # [N, H, W, C] → [-1, C]: C ↔ C although H·W went into the symbolic dim.
    assert static_factor_groups((None, 6, 6, 8), (None, 8)) == [([3], [1])]
    assert static_factor_groups((None, 8), (None, 6, 6, 8)) == [([1], [3])]
    # [B, 2, 3, S] → [B·2, 3, S']: no common static run at the end, the leading 2 is inside B·2.
    assert static_factor_groups((None, 2, 3, None), (None, 3, None)) == []
    # leading runs: [4, 6, N] → [24, M] and [4, 6, N] → [4, M] (6·N = M)
    assert static_factor_groups((4, 6, None), (24, None)) == [([0, 1], [0])]
    assert static_factor_groups((4, 6, None), (4, None)) == [([0], [0])]


def _tensordot(b: Builder, t: str, cin: int, cout: int, read: list[int]) -> str:
    """tf2onnx's Keras Dense on a rank-4 tensor ``t`` (``read``: dims the target copies)."""
    dims = b.op("Cast", b.op("Shape", t, name="shape"), to=I32, name="shape_i32")
    kept = b.op("Gather", dims, b.const(read, dtype=np.int32), axis=0, name="free")
    units = b.const([cout], name="units", dtype=np.int32)
    target = b.op("Cast", b.op("Concat", kept, units, axis=0, name="target"), to=I64)
    flat = b.op("Reshape", t, b.const([-1, cin], name="flat_shape"), name="flat")
    y = b.op("MatMul", flat, b.weight(cin, cout, name="dense.w"), name="dense")
    return b.op("Reshape", y, target, name="unflat")


def _dense_on_nhwc(read: list[int], size: int = 6) -> onnx.ModelProto:
    """Conv c1 (3→8) → NHWC → Dense 8→5 → BN as Mul/Add on the last axis → Relu → NCHW → c2,
    on ``size × size`` images."""
    b = Builder()
    t = b.op("Transpose", b.conv("x", 3, 8, name="c1"), perm=[0, 2, 3, 1])
    y = _tensordot(b, t, 8, 5, read)
    y = b.op("Add", b.op("Mul", y, b.weight(5, name="bn.scale")), b.weight(5, name="bn.shift"))
    y = b.op("Transpose", b.op("Relu", y), perm=[0, 3, 1, 2])
    out = b.conv(y, 5, 4, name="c2")
    return b.model({"x": ["N", 3, size, size]}, {out: ["N", 4, size, size]}, opset=13)


def test_dense_on_nhwc_tensordot(tmp_path):
    m = _dense_on_nhwc(read=[0, 1, 2])
    assert group_of(m, "c1.w", 0).id == group_of(m, "dense.w", 0).id
    g = group_of(m, "dense.w", 1)
    assert g.prunable and g.size == 5 and group_of(m, "bn.scale", 0).id == g.id
    out = prune_checked(m, tmp_path, ratio=0.4)
    shapes = init_shapes(out.path)
    assert shapes["c1.w"] == (5, 3, 3, 3) and shapes["dense.w"] == (5, 3)
    assert shapes["bn.scale"] == shapes["bn.shift"] == (3,) and shapes["c2.w"] == (4, 3, 3, 3)
    rows = kept_slices(init_value(m, "c1.b"), init_value(out.path, "c1.b"), 0)
    cols = kept_slices(init_value(m, "dense.w")[rows], init_value(out.path, "dense.w"), 1)
    np.testing.assert_array_equal(init_value(out.path, "bn.scale"),
                                  init_value(m, "bn.scale")[cols])
    # The literals: [-1, C] of the flattening target, and the int32 units inside the run-time
    # target (read through Concat → Cast), both set to the surviving widths.
    assert input_value(out.path, "flat", 1).tolist() == [-1, 5]
    assert input_value(out.path, "target", 1).tolist() == [3]
    assert input_value(out.path, "target", 1).dtype == np.int32


def test_tensordot_whose_target_reads_the_channel_dim_freezes():
    # The target copies dim 3 (the channels, as many as the width here, so the model is valid)
    # through Shape → Cast → Gather: fail closed.
    m = _dense_on_nhwc(read=[0, 1, 3], size=8)
    g = group_of(m, "c1.w", 0)
    assert not g.prunable and any("'shape'" in r for r in g.frozen), g.frozen


def _keras_flatten(batch_slice: tuple[int, int]) -> onnx.ModelProto:
    """Conv c1 (3→8) → Keras Flatten as tf2onnx writes it → Dense 8·4·4 → 5 → Relu → Dense 5→3.

    The flatten runs on the NHWC view, and tf2onnx's target reads the batch dim from the
    NCHW tensor's Shape through a Gather with the NHWC permutation, a Cast and a Slice.
    """
    b = Builder()
    c = b.conv("x", 3, 8, name="c1")
    nhwc = b.op("Transpose", c, perm=[0, 2, 3, 1])
    dims = b.op("Gather", b.op("Shape", c, name="shape"), b.const([0, 2, 3, 1]), axis=0)
    dims = b.op("Cast", dims, to=I32)
    lead = b.op("Slice", dims, b.const([batch_slice[0]]), b.const([batch_slice[1]]),
                b.const([0]), name="batch")
    target = b.op("Concat", lead, b.const([128], name="features", dtype=np.int32), axis=0,
                  name="flat_target")
    flat = b.op("Reshape", nhwc, b.op("Cast", target, to=I64), name="flatten")
    h = b.op("Relu", b.op("MatMul", flat, b.weight(128, 5, name="fc1.w"), name="fc1"))
    y = b.op("MatMul", h, b.weight(5, 3, name="fc2.w"), name="fc2")
    return b.model({"x": ["N", 3, 4, 4]}, {y: ["N", 3]}, opset=13)


def test_keras_flatten_on_nhwc_couples_channels_innermost(tmp_path):
    m = _keras_flatten(batch_slice=(0, 1))
    g = group_of(m, "c1.w", 0)
    assert g.prunable and g.size == 8 and group_of(m, "fc1.w", 0).id == g.id
    out = prune_checked(m, tmp_path, ratio=0.5)
    rows = kept_slices(init_value(m, "c1.b"), init_value(out.path, "c1.b"), 0)
    # NHWC flatten: feature f = (h·W + w)·C + c, so channel c owns rows c, c + 8, c + 16, …
    fc1 = init_value(m, "fc1.w").reshape(16, 8, 5)[:, rows].reshape(-1, 5)
    kept_units = kept_slices(fc1, init_value(out.path, "fc1.w"), 1)
    np.testing.assert_array_equal(init_value(out.path, "fc1.w"), fc1[:, kept_units])
    assert input_value(out.path, "flat_target", 1).tolist() == [16 * len(rows)]  # the literal 128


def test_keras_flatten_target_that_reads_the_channels_freezes():
    # Positions 3:4 of the permuted shape are dim 1 of the NCHW tensor: its channels.
    m = _keras_flatten(batch_slice=(3, 4))
    g = group_of(m, "c1.w", 0)
    assert not g.prunable and any("'shape'" in r for r in g.frozen), g.frozen


def _tf_same_pad(b: Builder, t: str, k: int, s: int) -> str:
    """timm's ``pad_same`` as TorchScript exports it: the pads of each spatial dim computed in
    float from ``Shape`` at run time, ``max((ceil(i / s) - 1) * s + k - i, 0)``, split in two."""
    pads = []
    for axis in (2, 3):
        size = b.op("Cast", b.op("Gather", b.op("Shape", t), b.const(axis)), to=1)
        total = b.op("Sub", b.op("Add", b.op("Mul", b.op("Sub", b.op("Ceil", b.op(
            "Div", size, b.const(np.float32(s)))), b.const(np.float32(1))),
            b.const(np.float32(s))), b.const(np.float32(k))), size)
        total = b.op("Clip", total, b.const(np.float32(0)), "")
        half = b.op("Cast", b.op("Cast", b.op("Div", total, b.const(np.float32(2))), to=7), to=1)
        pads.append((half, b.op("Sub", total, half)))
    begin_end = [b.op("Unsqueeze", v, b.const([0])) for v in
                 (pads[1][0], pads[1][1], pads[0][0], pads[0][1])]  # torch's F.pad order: W, H
    flat = b.op("Cast", b.op("Concat", *begin_end, axis=0), to=7)
    # torch order [w0, w1, h0, h1] → ONNX [0, 0, h0, w0, 0, 0, h1, w1]
    hw = b.op("Reshape", b.op("Transpose", b.op("Reshape", flat, b.const([2, 2])), perm=[1, 0]),
              b.const([2, 2]))
    rev = b.op("Slice", hw, b.const([-1]), b.const([-3]), b.const([1]), b.const([-1]))
    onnx_pads = b.op("Concat", b.const([[0, 0], [0, 0]]), rev, axis=1)
    return b.op("Pad", t, b.op("Reshape", onnx_pads, b.const([-1])))


def test_tf_same_padding_folds_and_the_depthwise_conv_behind_it_prunes(tmp_path):
    """timm ``tf_efficientnetv2_b0`` (coverage sweep): the run-time pads hid every shape after
    the first ``Pad``; the float shape arithmetic (Ceil, Div, Clip) now folds, the shapes are
    known, the depthwise conv keeps its channels coupled with the conv before it, and the FLOPs
    count sees the spatial dims."""
    b = Builder()
    a = b.op("Relu", b.conv("x", 3, 8, name="cA"))
    dw = b.conv(_tf_same_pad(b, a, 3, 2), 8, 8, group=8, name="dw", pads=[0, 0, 0, 0],
                strides=[2, 2])
    y = b.conv(b.op("Relu", dw), 8, 4, name="cC")
    m = b.model({"x": [1, 3, 7, 7]}, {y: [1, 4, None, None]})
    group = group_of(m, "cA.w", 0)
    assert group.prunable and group_of(m, "dw.w", 0).id == group.id
    out = prune_checked(m, tmp_path, ratio=0.5)
    assert out.report.flops_before == 8 * 49 * 27 + 8 * 16 * 9 + 4 * 16 * 72
    shapes = init_shapes(out.path)
    assert shapes["cA.w"] == (4, 3, 3, 3) and shapes["dw.w"] == (4, 1, 3, 3)
    assert shapes["cC.w"] == (4, 4, 3, 3)


def test_integer_division_folds_toward_zero():
    """ONNX ``Div`` on integers truncates; numpy's ``//`` (used before) floors."""
    div = SHAPE_FOLDERS["Div"]
    assert div(None, [np.array([-3, 3, -4]), np.array(2)]).tolist() == [-1, 1, -2]
    assert div(None, [np.array([7.0], np.float32), np.array(2.0, np.float32)]).tolist() == [3.5]


def test_shapes_known_through_a_long_chain_of_run_time_pads(tmp_path):
    """Each TF-"same" pad reads the shape its predecessor's pad leaves, so each folds one
    re-inference round after the one before (Swin's window padding, stage by stage, needs 8:
    with 4 rounds its FLOPs counted 1.9 of 4.5 GMACs, and the pruned model's count differed
    from the prediction). Ten stages in a row all end with static shapes."""
    b = Builder()
    t = b.op("Relu", b.conv("x", 3, 8, name="c0"))
    for i in range(1, 11):
        padded = _tf_same_pad(b, t, 3, 1)
        t = b.op("Relu", b.conv(padded, 8, 8, name=f"c{i}", pads=[0, 0, 0, 0]))
    y = b.conv(t, 8, 4, name="out")
    m = b.model({"x": [1, 3, 7, 7]}, {y: [1, 4, None, None]})
    out = prune_checked(m, tmp_path, ratio=0.5)
    assert out.report.flops_before == 49 * (8 * 27 + 10 * 8 * 72 + 4 * 72)
    assert out.report.flops_after == 49 * (4 * 27 + 10 * 4 * 36 + 4 * 36)
