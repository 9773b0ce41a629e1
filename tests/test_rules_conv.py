"""Op rules for Conv and ConvTranspose: plain, grouped, depthwise; 1-D to 3-D.

Every graph is pruned under the masked-original oracle (``prune_checked``), and the pruned file is
read back: weight shapes, ``group`` attributes, and which original channels survived.
"""

from __future__ import annotations

import numpy as np
import pytest
from graphs import Builder, attr, group_of, init_shapes, init_value, kept_slices, node_named
from oracle import group_sizes, prune_checked


def _blocks(kept: list[int], size: int) -> list[int]:
    """The blocks of ``size`` that ``kept`` covers; asserts it covers them whole."""
    blocks = sorted({k // size for k in kept})
    assert kept == [b * size + j for b in blocks for j in range(size)], kept
    return blocks


@pytest.mark.parametrize("dims, spatial", [(1, [8]), (2, [4, 4]), (3, [4, 4, 4])])
def test_conv_plain(tmp_path, dims, spatial):
    b = Builder()
    y = b.conv("x", 3, 8, dims=dims, name="c1")
    y = b.conv(b.op("Relu", y), 8, 4, dims=dims, name="c2")
    m = b.model({"x": [1, 3, *spatial]}, {y: [1, 4, *spatial]})
    assert group_sizes(m) == [(8, True), (4, False)]  # c2's output reaches the graph output
    out = prune_checked(m, tmp_path, ratio=0.5)
    k = (3,) * dims
    assert init_shapes(out.path) == {"c1.w": (4, 3, *k), "c1.b": (4,), "c2.w": (4, 4, *k),
                                     "c2.b": (4,)}
    # c1's surviving rows and c2's surviving columns are the same channels.
    rows = kept_slices(init_value(m, "c1.w"), init_value(out.path, "c1.w"), 0)
    cols = kept_slices(init_value(m, "c2.w"), init_value(out.path, "c2.w"), 1)
    assert rows == cols and len(rows) == 4


def test_conv_plain_ratio_zero_is_identity(tmp_path):
    b = Builder()
    y = b.conv(b.op("Relu", b.conv("x", 3, 8)), 8, 4)
    m = b.model({"x": [1, 3, 4, 4]}, {y: [1, 4, 4, 4]})
    out = prune_checked(m, tmp_path, ratio=0.0)
    assert init_shapes(out.path) == init_shapes(m)


def test_grouped_conv_prunes_whole_groups(tmp_path):
    b = Builder()
    y = b.conv("x", 3, 8, name="c1")
    y = b.conv(b.op("Relu", y), 8, 8, group=4, name="g")  # 4 groups of 2 in, 2 out
    y = b.conv(b.op("Relu", y), 8, 4, name="c3")
    m = b.model({"x": [1, 3, 4, 4]}, {y: [1, 4, 4, 4]})
    g = group_of(m, "c1.w", 0)
    assert g.size == 4 and g.prunable  # one prunable unit per conv group
    assert g.id == group_of(m, "g.w", 0).id == group_of(m, "c3.w", 1).id
    out = prune_checked(m, tmp_path, ratio=0.5)
    shapes = init_shapes(out.path)
    assert shapes["c1.w"] == (4, 3, 3, 3)
    assert shapes["g.w"] == (4, 2, 3, 3)  # within-group input axis unchanged
    assert shapes["c3.w"] == (4, 4, 3, 3)
    assert attr(node_named(out.path, "g"), "group") == 2
    in_blocks = _blocks(kept_slices(init_value(m, "c1.w"), init_value(out.path, "c1.w"), 0), 2)
    out_blocks = _blocks(kept_slices(init_value(m, "g.w"), init_value(out.path, "g.w"), 0), 2)
    assert in_blocks == out_blocks  # group k's inputs and outputs go together


def test_grouped_conv_tying_a_group_to_frozen_channels_says_so(tmp_path, capsys):
    """A grouped Conv's MLP between a graph input and output (SqueezeBERT's, in one layer):
    whole groups take their input and output channels together, so the hidden channels freeze
    with the graph's. The reason names the graph's side; ``via`` (and the error) name the
    grouped Convs that tie them, which the frozen spaces' reasons do not."""
    import onnx

    from spa.api import analyze
    from spa.cli import main
    from spa.pipeline.stages import nothing_prunable

    b = Builder()
    h = b.op("Relu", b.conv("x", 8, 16, k=1, dims=1, group=2, name="up"))
    y = b.conv(h, 16, 8, k=1, dims=1, group=2, name="down")
    m = b.model({"x": [1, 8, 6]}, {y: [1, 8, 6]})
    analysis = analyze(m)
    assert not analysis.prunable_groups
    (tied,) = [g for g in analysis.frozen_groups if g.via]
    assert tied.size == 2 and all("graph" in r for r in tied.frozen)
    assert tied.via == (
        "Conv node 'down' has group=2: SPA removes whole groups, each 8 input and 4 output "
        "channels at once, so its input and output channels are pruned together",
        "Conv node 'up' has group=2: SPA removes whole groups, each 4 input and 8 output "
        "channels at once, so its input and output channels are pruned together")
    assert nothing_prunable(analysis).endswith(f"; channels are tied to frozen ones where "
                                               f"{tied.via[0]}")
    onnx.save(m, str(tmp_path / "m.onnx"))
    assert main(["prune", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx"), "-q"]) == 4
    assert f"where {tied.via[0]}\n" in capsys.readouterr().err
    # a depthwise conv (a group is one channel) ties nothing it does not say
    b = Builder()
    y = b.conv(b.op("Relu", b.conv("x", 8, 8, k=1, dims=1, group=8, name="dw")), 8, 4, k=1,
               dims=1, name="pw")
    assert not any(g.via for g in analyze(b.model({"x": [1, 8, 6]}, {y: [1, 4, 6]})).groups)


def test_depthwise_conv(tmp_path):
    b = Builder()
    y = b.conv("x", 3, 8, name="c1")
    y = b.conv(b.op("Relu", y), 8, 8, group=8, name="dw")
    y = b.conv(b.op("Relu", y), 8, 4, k=1, name="pw")
    m = b.model({"x": [1, 3, 4, 4]}, {y: [1, 4, 4, 4]})
    assert group_sizes(m) == [(8, True), (4, False)]
    out = prune_checked(m, tmp_path, ratio=0.5)
    shapes = init_shapes(out.path)
    assert shapes["dw.w"] == (4, 1, 3, 3) and shapes["dw.b"] == (4,)
    assert shapes["pw.w"] == (4, 4, 1, 1)
    assert attr(node_named(out.path, "dw"), "group") == 4
    rows = kept_slices(init_value(m, "c1.w"), init_value(out.path, "c1.w"), 0)
    assert kept_slices(init_value(m, "dw.w"), init_value(out.path, "dw.w"), 0) == rows


def test_depthwise_conv_channel_multiplier_2(tmp_path):
    b = Builder()
    y = b.conv("x", 3, 4, name="c1")
    y = b.conv(b.op("Relu", y), 4, 8, group=4, name="dw")  # each input channel → 2 outputs
    y = b.conv(b.op("Relu", y), 8, 4, k=1, name="pw")
    m = b.model({"x": [1, 3, 4, 4]}, {y: [1, 4, 4, 4]})
    assert group_sizes(m) == [(4, True), (4, False)]
    out = prune_checked(m, tmp_path, ratio=0.5)
    shapes = init_shapes(out.path)
    assert shapes["c1.w"] == (2, 3, 3, 3)
    assert shapes["dw.w"] == (4, 1, 3, 3)
    assert shapes["pw.w"] == (4, 4, 1, 1)
    assert attr(node_named(out.path, "dw"), "group") == 2
    rows = kept_slices(init_value(m, "c1.w"), init_value(out.path, "c1.w"), 0)
    assert _blocks(kept_slices(init_value(m, "dw.w"), init_value(out.path, "dw.w"), 0), 2) == rows


def test_conv_transpose(tmp_path):
    b = Builder()
    y = b.conv("x", 3, 8, name="c1")
    y = b.conv_t(b.op("Relu", y), 8, 6, name="ct")
    y = b.conv(b.op("Relu", y), 6, 4, name="c3")
    m = b.model({"x": [1, 3, 4, 4]}, {y: [1, 4, 4, 4]})
    assert group_sizes(m) == [(8, True), (6, True), (4, False)]
    assert group_of(m, "ct.w", 0).id == group_of(m, "c1.w", 0).id  # W.0 consumes
    assert group_of(m, "ct.w", 1).id == group_of(m, "c3.w", 1).id  # W.1 produces
    out = prune_checked(m, tmp_path, ratio=0.5)
    shapes = init_shapes(out.path)
    assert shapes["ct.w"] == (4, 3, 3, 3) and shapes["ct.b"] == (3,)
    assert shapes["c3.w"] == (4, 3, 3, 3)


def test_conv_transpose_grouped(tmp_path):
    b = Builder()
    y = b.conv("x", 3, 8, name="c1")
    y = b.conv_t(b.op("Relu", y), 8, 8, group=4, name="ct")  # W: [8, 2, 3, 3]
    y = b.conv(b.op("Relu", y), 8, 4, name="c3")
    m = b.model({"x": [1, 3, 4, 4]}, {y: [1, 4, 4, 4]})
    g = group_of(m, "c1.w", 0)
    assert g.size == 4 and g.prunable and g.id == group_of(m, "c3.w", 1).id
    out = prune_checked(m, tmp_path, ratio=0.5)
    shapes = init_shapes(out.path)
    assert shapes["ct.w"] == (4, 2, 3, 3) and shapes["ct.b"] == (4,)
    assert shapes["c3.w"] == (4, 4, 3, 3)
    assert attr(node_named(out.path, "ct"), "group") == 2
    rows = kept_slices(init_value(m, "c1.w"), init_value(out.path, "c1.w"), 0)
    ct_rows = kept_slices(init_value(m, "ct.w"), init_value(out.path, "ct.w"), 0)
    assert _blocks(rows, 2) == _blocks(ct_rows, 2)
    ct_b = kept_slices(init_value(m, "ct.b"), init_value(out.path, "ct.b"), 0)
    assert _blocks(ct_b, 2) == _blocks(rows, 2)
    c3_cols = kept_slices(init_value(m, "c3.w"), init_value(out.path, "c3.w"), 1)
    assert c3_cols == ct_b
    np.testing.assert_array_equal(init_value(out.path, "ct.b"), init_value(m, "ct.b")[ct_b])


def test_grouped_conv_behind_unknown_channels_freezes(tmp_path):
    """timm ``tf_efficientnetv2_b0`` (coverage sweep): a depthwise conv behind TF-"same" padding
    (a Pad with run-time pads, so its output's channel count is unknown). The conv's output
    channels used to prune while ``group`` stayed at the old count: onnxruntime rejected the
    model ("Output channels M is not divisible by group"). The group cannot be counted, so the
    conv's channels freeze, with the reason; the convs around it still prune."""
    b = Builder()
    a = b.op("Relu", b.conv("x", 3, 8, name="cA"))
    flag = b.op("Cast", b.op("Greater", b.op("ReduceSum", "x", keepdims=0),
                             b.const(np.float32(1e9))), to=7)
    pads = b.op("Mul", flag, b.const([0, 0, 1, 1, 0, 0, 1, 1]))
    padded = b.op("Pad", a, pads)
    dw = b.conv(padded, 8, 16, group=8, name="dw", pads=[0, 0, 0, 0])
    y = b.conv(b.op("Relu", b.conv(b.op("Relu", dw), 16, 8, name="cC")), 8, 4, name="cD")
    m = b.model({"x": [1, 3, 6, 6]}, {y: [1, 4, None, None]})
    assert any("Conv node 'dw': group=8 but the channel count of its input or output is unknown"
               in r for r in group_of(m, dw, 1).frozen)
    assert group_of(m, "cC.w", 0).prunable
    out = prune_checked(m, tmp_path, ratio=0.5)
    shapes = init_shapes(out.path)
    assert shapes["dw.w"] == (16, 1, 3, 3)
    assert attr(node_named(out.path, "dw"), "group") == 8
    assert shapes["cC.w"] == (4, 16, 3, 3)
