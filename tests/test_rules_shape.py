"""Op rules that cut, join, move or re-shape the channel axis: Concat, Split, Slice, pooling and
reductions, Flatten/Reshape into a dense layer, Transpose, Squeeze/Unsqueeze, Pad, Resize,
Dropout. Each graph is pruned under the masked oracle, and every shape constant SPA must rewrite
is read back from the pruned file."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import (
    Builder,
    attr,
    group_of,
    init_shapes,
    init_value,
    input_value,
    kept_slices,
    node_named,
)
from oracle import group_sizes, prune_checked

from spa.api import analyze

INT64_MAX = np.iinfo(np.int64).max
X = {"x": [1, 3, 4, 4]}


def _kept(m, out, name: str, axis: int = 0) -> list[int]:
    return kept_slices(init_value(m, name), init_value(out.path, name), axis)


def _assert_frozen_by(m, tensor: str, node: str) -> None:
    """The group of ``(tensor, 0)`` is frozen and a reason names ``node``."""
    g = group_of(m, tensor, 0)
    assert not g.prunable and any(f"'{node}'" in r for r in g.frozen), g.frozen


# --- Concat / Split / Slice ------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.5, 0.0])
def test_concat_of_three_convs(tmp_path, ratio):
    b = Builder()
    parts = [b.op("Relu", b.conv("x", 3, n, name=f"c{n}")) for n in (4, 6, 8)]
    y = b.conv(b.op("Concat", *parts, axis=1), 18, 4, name="head")
    m = b.model(X, {y: [1, 4, 4, 4]})
    assert sorted(group_sizes(m)) == [(4, False), (4, True), (6, True), (8, True)]
    assert len({group_of(m, f"c{n}.w", 0).id for n in (4, 6, 8)}) == 3
    out = prune_checked(m, tmp_path, ratio=ratio)
    if ratio == 0:
        return
    assert init_shapes(out.path)["head.w"] == (4, 2 + 3 + 4, 3, 3)
    # head's surviving input columns: each source's survivors at that source's offset.
    offsets = {4: 0, 6: 4, 8: 10}
    expected = [offsets[n] + r for n in (4, 6, 8) for r in _kept(m, out, f"c{n}.b")]
    assert _kept(m, out, "head.w", 1) == expected


def _split_graph(opset: int, sizes: list[int] | None, **split_attrs):
    """c1 (3→8) → Split on channels → one conv per part → Add."""
    b = Builder()
    x = b.conv("x", 3, 8, name="c1")
    if sizes is not None and opset >= 13:
        parts = b.op("Split", x, b.const(sizes), outputs=2, name="split", axis=1)
    else:
        parts = b.op("Split", x, outputs=2, name="split", axis=1, **split_attrs)
    n = sizes or [4, 4]
    y = b.op("Add", *(b.conv(p, k, 4, name=f"b{i}") for i, (p, k) in enumerate(zip(parts, n))))
    return b.model(X, {y: [1, 4, 4, 4]}, opset=opset)


def test_split_sizes_input_opset13(tmp_path):
    m = _split_graph(13, [3, 5])
    assert sorted(group_sizes(m)) == [(3, True), (4, False), (5, True)]
    out = prune_checked(m, tmp_path, ratio=0.5)
    assert input_value(out.path, "split", 1).tolist() == [2, 3]
    shapes = init_shapes(out.path)
    assert shapes["c1.w"] == (5, 3, 3, 3)
    assert shapes["b0.w"] == (4, 2, 3, 3) and shapes["b1.w"] == (4, 3, 3, 3)
    rows = _kept(m, out, "c1.b")
    assert _kept(m, out, "b0.w", 1) == [r for r in rows if r < 3]
    assert _kept(m, out, "b1.w", 1) == [r - 3 for r in rows if r >= 3]


def test_split_sizes_attribute_opset11(tmp_path):
    m = _split_graph(11, [3, 5], split=[3, 5])
    out = prune_checked(m, tmp_path, ratio=0.5)
    assert attr(node_named(out.path, "split"), "split") == [2, 3]
    assert init_shapes(out.path)["c1.w"] == (5, 3, 3, 3)


def test_split_equal_num_outputs_opset18(tmp_path):
    m = _split_graph(18, None, num_outputs=2)
    assert sorted(group_sizes(m)) == [(4, False), (4, True), (4, True)]
    out = prune_checked(m, tmp_path, ratio=0.5)
    node = node_named(out.path, "split")
    assert "num_outputs" not in [a.name for a in node.attribute]
    assert input_value(out.path, "split", 1).tolist() == [2, 2]


SLICES = {  # all take channels [lo, lo + 5) of 8
    "axes": (2, dict(starts=[2], ends=[7], axes=[1])),
    "negative": (2, dict(starts=[-6], ends=[-1], axes=[1])),
    "no_axes": (2, dict(starts=[0, 2], ends=[1, 7])),
    "neg_axis_end_max": (3, dict(starts=[3], ends=[INT64_MAX], axes=[-3])),
}


@pytest.mark.parametrize("case", SLICES)
def test_slice_channels(tmp_path, case):
    lo, params = SLICES[case]
    b = Builder()
    x = b.conv("x", 3, 8, name="c1")
    y = b.conv(b.op("Slice", x, *(b.const(v) for v in params.values()), name="slice"), 5, 4,
               name="c2")
    m = b.model(X, {y: [1, 4, 4, 4]})
    # Channels inside the window go with c2's input; those outside are consumed by nobody.
    assert sorted(group_sizes(m)) == [(3, True), (4, False), (5, True)]
    out = prune_checked(m, tmp_path, ratio=0.5)
    rows = _kept(m, out, "c1.b")
    assert len(rows) == 2 + 3
    inside = [r for r in rows if lo <= r < lo + 5]
    assert _kept(m, out, "c2.w", 1) == [r - lo for r in inside]
    axes = input_value(out.path, "slice", 3).tolist()
    k = [a % 4 for a in axes].index(1)
    start = int(input_value(out.path, "slice", 1)[k])
    end = int(input_value(out.path, "slice", 2)[k])
    assert start == sum(r < lo for r in rows) and end - start == len(inside)


def test_slice_by_a_run_time_bound_passes_the_other_axes(tmp_path):
    """``c[:, :, :h // 2]`` with ``h`` read at run time (T5's relative position bias is cut so,
    ``bias[:, :, -length:, :]``, and its heads pass): the bound is not known, but the axes the
    Slice does not cut pass unchanged, so c1's channels prune with c2's input."""
    b = Builder()
    x = b.stem("x", 3, 8)
    half = b.op("Div", b.op("Slice", b.op("Shape", "x"), b.const([2]), b.const([3])),
                b.const([2]))
    cut = b.op("Slice", x, b.const([0]), half, b.const([2]), name="cut")
    y = b.conv(cut, 8, 4, name="c2")
    m = b.model({"x": [1, 3, "h", 4]}, {y: [1, 4, None, 4]})
    assert group_of(m, "c1.w", 0).prunable
    out = prune_checked(m, tmp_path, ratio=0.5, dims={"h": 6})
    assert init_shapes(out.path)["c1.w"][0] == 4 and init_shapes(out.path)["c2.w"][1] == 4


def test_slice_step_2_on_channels_freezes(tmp_path):
    b = Builder()
    x = b.stem("x", 3, 8)
    s = b.op("Slice", x, b.const([0]), b.const([8]), b.const([1]), b.const([2]), name="slice")
    y = b.conv(s, 4, 4, name="c2")
    m = b.model(X, {y: [1, 4, 4, 4]})
    _assert_frozen_by(m, "c1.w", "slice")
    out = prune_checked(m, tmp_path, ratio=0.5)  # the stem still prunes
    shapes = init_shapes(out.path)
    assert shapes["c1.w"] == (8, 3, 3, 3) and shapes["stem.w"] == (3, 3, 3, 3)


@pytest.mark.parametrize("indices", [[5, -8, 2], [1, 3]], ids=["reordered", "in-order"])
def test_gather_picks_channels(tmp_path, indices):
    """``Gather(x, indices, axis=1)`` by constant, distinct indices: output channel ``j`` goes
    with input channel ``indices[j]`` (negative ones counted from the end), the channels no
    index picks go with nothing, and the rewrite renumbers the indices among those kept."""
    b = Builder()
    x = b.conv("x", 3, 8, name="c1")
    picked = b.op("Gather", x, b.const(indices), axis=1, name="pick")
    y = b.conv(picked, len(indices), 4, name="c2")
    m = b.model(X, {y: [1, 4, 4, 4]})
    # Each picked channel is one with c2's input column; the others are consumed by nobody.
    assert sorted(group_sizes(m)) == sorted([(4, False), (len(indices), True),
                                             (8 - len(indices), True)])
    out = prune_checked(m, tmp_path, ratio=0.5)
    rows = _kept(m, out, "c1.b")
    picks = [i % 8 for i in indices]
    kept_picks = [j for j, i in enumerate(picks) if i in rows]
    assert _kept(m, out, "c2.w", 1) == kept_picks and 0 < len(kept_picks) < len(picks)
    assert input_value(out.path, "pick", 1).tolist() == [rows.index(picks[j]) for j in kept_picks]


def test_gather_by_a_scalar_keeps_its_channel(tmp_path):
    """``x[:, 5]``: the channel a scalar index picks stays (its axis is gone, nothing could take
    it along) and the index is renumbered; the other channels are consumed by nobody."""
    b = Builder()
    picked = b.op("Gather", b.stem("x", 3, 8), b.const(5), axis=1, name="pick")
    y = b.op("Unsqueeze", picked, b.const([1]))
    m = b.model(X, {y: [1, 1, 4, 4]})
    frozen = [g for g in analyze(m).groups if not g.prunable
              and any(mem.space == ("c1.w", 0) for mem in g.members)]
    assert [(g.size, g.frozen) for g in frozen] == [(1, (
        "Gather node 'pick' picks channel 5 of axis 1 of 'c1_out0' by a scalar index: it "
        "stays",))]
    out = prune_checked(m, tmp_path, ratio=0.5)
    rows = _kept(m, out, "c1.b")
    assert 5 in rows and len(rows) < 8
    assert input_value(out.path, "pick", 1).tolist() == rows.index(5)


# --- pooling and reductions ------------------------------------------------------------------
POOLS = {
    "MaxPool": ({"kernel_shape": [2, 2], "strides": [2, 2]}, 2, 3),
    "AveragePool": ({"kernel_shape": [2, 2], "strides": [2, 2]}, 2, 3),
    "GlobalAveragePool": ({}, 1, 1),
    "GlobalMaxPool": ({}, 1, 1),
}


@pytest.mark.parametrize("op", POOLS)
def test_pool(tmp_path, op):
    attrs, hw, k = POOLS[op]
    b = Builder()
    y = b.conv(b.op(op, b.op("Relu", b.conv("x", 3, 8, name="c1")), **attrs), 8, 4, k=k,
               name="c2")
    m = b.model(X, {y: [1, 4, hw, hw]})
    assert group_sizes(m) == [(8, True), (4, False)]
    out = prune_checked(m, tmp_path, ratio=0.5)
    assert init_shapes(out.path)["c2.w"] == (4, 4, k, k)
    assert _kept(m, out, "c2.w", 1) == _kept(m, out, "c1.b")


def test_maxpool_indices_output_freezes(tmp_path):
    b = Builder()
    v, idx = b.op("MaxPool", b.stem("x", 3, 8), outputs=["v", "idx"], name="pool",
                  kernel_shape=[2, 2], strides=[2, 2])
    y = b.conv(v, 8, 4, name="c2")
    m = b.model(X, {y: [1, 4, 2, 2], idx: ([1, 8, 2, 2], 7)})  # 7: int64
    _assert_frozen_by(m, "c1.w", "pool")
    out = prune_checked(m, tmp_path, ratio=0.5)
    assert init_shapes(out.path)["c1.w"] == (8, 3, 3, 3)


@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize("keepdims", [1, 0])
def test_reduce_mean_spatial(tmp_path, opset, keepdims):
    b = Builder()
    x = b.op("Relu", b.conv("x", 3, 8, name="c1"))
    if opset >= 18:
        r = b.op("ReduceMean", x, b.const([2, 3]), keepdims=keepdims)
    else:
        r = b.op("ReduceMean", x, axes=[2, 3], keepdims=keepdims)
    if keepdims:
        y, shape, consumer = b.conv(r, 8, 4, k=1, name="head"), [1, 4, 1, 1], (4, 4, 1, 1)
    else:
        y, shape, consumer = b.gemm(r, 8, 4, name="head"), [1, 4], (4, 4)
    m = b.model(X, {y: shape}, opset=opset)
    assert group_sizes(m) == [(8, True), (4, False)]
    out = prune_checked(m, tmp_path, ratio=0.5)
    assert init_shapes(out.path)["head.w"] == consumer


@pytest.mark.parametrize("op, opset", [("ReduceMean", 13), ("ReduceMean", 18), ("ReduceSum", 13)])
def test_reduce_over_channels_freezes(tmp_path, op, opset):
    b = Builder()
    x = b.stem("x", 3, 8)
    if opset >= (13 if op == "ReduceSum" else 18):
        y = b.op(op, x, b.const([1]), name="reduce")
    else:
        y = b.op(op, x, name="reduce", axes=[1])
    m = b.model(X, {y: [1, 1, 4, 4]}, opset=opset)
    _assert_frozen_by(m, "c1.w", "reduce")
    out = prune_checked(m, tmp_path, ratio=0.5)
    assert init_shapes(out.path)["c1.w"] == (8, 3, 3, 3)


# --- Flatten / Reshape into a dense layer -----------------------------------------------------
# Reshape targets given as constants, and what SPA must rewrite them to at ratio 0.5.
LITERAL_TARGETS = {"reshape_1_chw": ([1, 128], [1, 64]), "reshape_-1_chw": ([-1, 128], [-1, 64]),
                   "reshape_0_-1": ([0, -1], [0, -1])}


def _flattened_features(b: Builder, how: str) -> str:
    """Relu(c1 (3→8)) as [1, 128] by Flatten or Reshape; ``how`` names the form."""
    x = b.op("Relu", b.conv("x", 3, 8, name="c1"))
    if how == "flatten":
        return b.op("Flatten", x, axis=1)
    if how in LITERAL_TARGETS:
        return b.op("Reshape", x, b.const(LITERAL_TARGETS[how][0]), name="reshape")
    # x.view(x.size(0), -1) as exported: Concat(Unsqueeze(Gather(Shape(x), 0)), [-1])
    n = b.op("Gather", b.op("Shape", x), b.const(np.int64(0)), axis=0)
    target = b.op("Concat", b.op("Unsqueeze", n, b.const([0])), b.const([-1]), axis=0)
    return b.op("Reshape", x, target, name="reshape")


@pytest.mark.parametrize("how", ["flatten", *LITERAL_TARGETS, "reshape_runtime"])
def test_flatten_into_gemm(tmp_path, how):
    b = Builder()
    y = b.gemm(_flattened_features(b, how), 128, 4, name="fc")
    m = b.model(X, {y: [1, 4]})
    assert group_sizes(m) == [(8, True), (4, False)]  # one channel = 16 features
    out = prune_checked(m, tmp_path, ratio=0.5)
    assert init_shapes(out.path)["fc.w"] == (4, 64)
    rows = _kept(m, out, "c1.b")
    assert _kept(m, out, "fc.w", 1) == [r * 16 + j for r in rows for j in range(16)]
    if how in LITERAL_TARGETS:
        assert input_value(out.path, "reshape", 1).tolist() == LITERAL_TARGETS[how][1]


@pytest.mark.parametrize("how", ["flatten", "reshape_-1_chw", "reshape_0_-1", "reshape_runtime"])
def test_flatten_into_gemm_dynamic_batch(tmp_path, how):
    b = Builder()
    y = b.gemm(_flattened_features(b, how), 128, 4, name="fc")
    m = b.model({"x": ["N", 3, 4, 4]}, {y: ["N", 4]})
    assert group_sizes(m) == [(8, True), (4, False)]
    out = prune_checked(m, tmp_path, ratio=0.5)
    assert init_shapes(out.path)["fc.w"] == (4, 64)


def test_reshape_runtime_target_copying_channel_dim(tmp_path):
    b = Builder()
    x = b.op("Relu", b.conv("x", 3, 8, name="c1"))
    shape = b.op("Shape", x, name="shape")
    dims = [b.op("Unsqueeze", b.op("Gather", shape, b.const(np.int64(i)), axis=0), b.const([0]))
            for i in (0, 1)]
    r = b.op("Reshape", x, b.op("Concat", *dims, b.const([-1]), axis=0))  # [1, 8, 16]
    y = b.op("MatMul", b.weight(4, 8, name="w"), r)
    m = b.model(X, {y: [1, 4, 16]})
    assert group_sizes(m) == [(8, True), (4, False)]
    out = prune_checked(m, tmp_path, ratio=0.5)
    assert init_shapes(out.path)["w"] == (4, 4)


def test_reshape_keeping_channel_axis(tmp_path):
    """[1, 8, 4, 4] → [1, 8, 16] by a literal target: the literal 8 is rewritten."""
    b = Builder()
    x = b.op("Relu", b.conv("x", 3, 8, name="c1"))
    y = b.op("MatMul", b.weight(4, 8, name="w"), b.op("Reshape", x, b.const([1, 8, 16]),
                                                        name="reshape"))
    m = b.model(X, {y: [1, 4, 16]})
    assert group_sizes(m) == [(8, True), (4, False)]
    out = prune_checked(m, tmp_path, ratio=0.5)
    assert init_shapes(out.path)["w"] == (4, 4)
    assert input_value(out.path, "reshape", 1).tolist() == [1, 4, 16]


def test_transpose_to_nhwc_matmul(tmp_path):
    b = Builder()
    x = b.op("Transpose", b.op("Relu", b.conv("x", 3, 8, name="c1")), perm=[0, 2, 3, 1])
    y = b.op("MatMul", x, b.weight(8, 4, name="w"))
    m = b.model(X, {y: [1, 4, 4, 4]})
    assert group_sizes(m) == [(8, True), (4, False)]
    out = prune_checked(m, tmp_path, ratio=0.5)
    assert init_shapes(out.path)["w"] == (4, 4)
    assert _kept(m, out, "w", 0) == _kept(m, out, "c1.b")


@pytest.mark.parametrize("opset", [11, 13])
def test_squeeze_unsqueeze_around_gemm(tmp_path, opset):
    b = Builder()
    x = b.op("GlobalAveragePool", b.op("Relu", b.conv("x", 3, 8, name="c1")))
    axes = {"axes": [2, 3]} if opset < 13 else {}
    extra = [b.const([2, 3])] if opset >= 13 else []
    x = b.op("Squeeze", x, *extra, **axes)
    x = b.op("Relu", b.gemm(x, 8, 6, name="fc"))
    extra = [b.const([2, 3])] if opset >= 13 else []
    y = b.conv(b.op("Unsqueeze", x, *extra, **axes), 6, 4, k=1, name="c2")
    m = b.model(X, {y: [1, 4, 1, 1]}, opset=opset)
    assert sorted(group_sizes(m)) == [(4, False), (6, True), (8, True)]
    out = prune_checked(m, tmp_path, ratio=0.5)
    shapes = init_shapes(out.path)
    assert shapes["fc.w"] == (3, 4) and shapes["c2.w"] == (4, 3, 1, 1)


# --- DepthToSpace / SpaceToDepth / pixel (un)shuffle views --------------------------------------
@pytest.mark.parametrize("mode, taken", [("CRD", lambda c: [4 * c + k for k in range(4)]),
                                         ("DCR", lambda c: [c + 2 * k for k in range(4)])])
def test_depth_to_space(tmp_path, mode, taken):
    """c1's 8 channels are 2 output channels of 4 pixels each: CRD (PyTorch's PixelShuffle)
    takes them in blocks, DCR (the default, TensorFlow's) one from each quarter."""
    b = Builder()
    x = b.op("DepthToSpace", b.stem("x", 3, 8), blocksize=2, mode=mode, name="d2s")
    m = b.model(X, {b.conv(x, 2, 4, name="c2"): [1, 4, 8, 8]})
    assert group_of(m, "c1.w", 0).size == 2
    out = prune_checked(m, tmp_path, ratio=0.5, round_to=1)
    kept = _kept(m, out, "c2.w", axis=1)
    assert len(kept) == 1 and _kept(m, out, "c1.b") == taken(kept[0])


def test_space_to_depth(tmp_path):
    """Input channel c goes to the outputs c, c + 2, c + 4, c + 6 (one per pixel of the 2 × 2
    block)."""
    b = Builder()
    x = b.op("SpaceToDepth", b.stem("x", 3, 2), blocksize=2, name="s2d")
    m = b.model(X, {b.conv(x, 8, 4, name="c2"): [1, 4, 2, 2]})
    assert group_of(m, "c1.w", 0).size == 2
    out = prune_checked(m, tmp_path, ratio=0.5, round_to=1)
    kept = _kept(m, out, "c1.b")
    assert len(kept) == 1 and _kept(m, out, "c2.w", axis=1) == [kept[0] + 2 * k for k in range(4)]


def test_pixel_unshuffle_view(tmp_path):
    """PyTorch writes PixelUnshuffle as ``Reshape [N, C, H/2, 2, W/2, 2]``, ``Transpose``,
    ``Reshape [N, 4C, H/2, W/2]``: the merge's factors are C and two halves of H and W, which
    lead nowhere (a conv's spatial axes freeze), so the channels follow C, in blocks of 4."""
    b = Builder()
    x = b.op("Reshape", b.stem("x", 3, 4), b.const([1, 4, 2, 2, 2, 2]), name="split_pixels")
    x = b.op("Transpose", x, perm=[0, 1, 3, 5, 2, 4], name="pixels_in")
    x = b.op("Reshape", x, b.const([1, 16, 2, 2]), name="merge_pixels")
    m = b.model(X, {b.conv(x, 16, 4, name="c2"): [1, 4, 2, 2]})
    out = prune_checked(m, tmp_path, ratio=0.5, round_to=1)
    kept = _kept(m, out, "c1.b")
    assert len(kept) == 2
    assert _kept(m, out, "c2.w", axis=1) == [4 * c + k for c in kept for k in range(4)]


def test_spatial_factor_merged_outside_the_channels(tmp_path):
    """``[1, C, 4, 4] → [1, C, 2, 2, 4] → [1, 2, C, 2, 4] → [1, 2C, 2, 4]``: the merge's outer
    factor is a half of H, so channel c goes to c and c + C."""
    b = Builder()
    x = b.op("Reshape", b.stem("x", 3, 4), b.const([1, 4, 2, 2, 4]), name="split_rows")
    x = b.op("Transpose", x, perm=[0, 2, 1, 3, 4], name="rows_out")
    x = b.op("Reshape", x, b.const([1, 8, 2, 4]), name="merge_rows")
    m = b.model(X, {b.conv(x, 8, 4, name="c2"): [1, 4, 2, 4]})
    out = prune_checked(m, tmp_path, ratio=0.5, round_to=1)
    kept = _kept(m, out, "c1.b")
    assert len(kept) == 2 and _kept(m, out, "c2.w", axis=1) == kept + [c + 4 for c in kept]


# --- Pad, Resize, Dropout -------------------------------------------------------------------
def test_pad_spatial_only(tmp_path):
    b = Builder()
    x = b.op("Pad", b.op("Relu", b.conv("x", 3, 8, name="c1")), b.const([0, 0, 1, 1, 0, 0, 1, 1]))
    y = b.conv(x, 8, 4, name="c2", pads=[0, 0, 0, 0])
    m = b.model(X, {y: [1, 4, 4, 4]})
    assert group_sizes(m) == [(8, True), (4, False)]
    out = prune_checked(m, tmp_path, ratio=0.5)
    assert init_shapes(out.path)["c2.w"] == (4, 4, 3, 3)


def test_pad_channel_axis_freezes(tmp_path):
    b = Builder()
    x = b.op("Pad", b.stem("x", 3, 8), b.const([0, 1, 0, 0, 0, 1, 0, 0]), name="pad")
    y = b.conv(x, 10, 4, name="c2")
    m = b.model(X, {y: [1, 4, 4, 4]})
    _assert_frozen_by(m, "c1.w", "pad")
    out = prune_checked(m, tmp_path, ratio=0.5)
    assert init_shapes(out.path)["c1.w"] == (8, 3, 3, 3)


@pytest.mark.parametrize("by", ["scales", "sizes"])
def test_resize(tmp_path, by):
    b = Builder()
    x = b.op("Relu", b.conv("x", 3, 8, name="c1"))
    if by == "scales":
        r = b.op("Resize", x, "", b.const([1.0, 1.0, 2.0, 2.0]), name="resize", mode="nearest")
    else:
        r = b.op("Resize", x, "", "", b.const([1, 8, 8, 8]), name="resize", mode="nearest")
    y = b.conv(r, 8, 4, name="c2")
    m = b.model(X, {y: [1, 4, 8, 8]})
    assert group_sizes(m) == [(8, True), (4, False)]
    out = prune_checked(m, tmp_path, ratio=0.5)
    assert init_shapes(out.path)["c2.w"] == (4, 4, 3, 3)
    if by == "sizes":
        assert input_value(out.path, "resize", 3).tolist() == [1, 4, 8, 8]
    else:
        assert input_value(out.path, "resize", 2).tolist() == [1.0, 1.0, 2.0, 2.0]


def test_dropout_inference(tmp_path):
    b = Builder()
    y = b.conv(b.op("Dropout", b.op("Relu", b.conv("x", 3, 8, name="c1"))), 8, 4, name="c2")
    m = b.model(X, {y: [1, 4, 4, 4]}, opset=13)
    assert group_sizes(m) == [(8, True), (4, False)]
    out = prune_checked(m, tmp_path, ratio=0.5)
    assert init_shapes(out.path)["c2.w"] == (4, 4, 3, 3)


# --- shape values that leave the graph (issue #12, item 1) ----------------------------------
I64 = onnx.TensorProto.INT64


def test_shape_graph_output_keeps_its_value(tmp_path):
    """``Shape(y)`` as a second graph output: pruning y's channels would change the output's
    values ([1, 8, 4, 4] → [1, 6, 4, 4]); y's group freezes, and the reason says why."""
    b = Builder()
    y = b.op("Relu", b.conv("x", 3, 8, name="c1"))
    z = b.conv(y, 8, 4, name="c2")
    s = b.op("Shape", y, name="shape")
    m = b.model(X, {z: [1, 4, 4, 4], s: ([4], I64)})
    g = group_of(m, "c1.w", 0)
    assert not g.prunable
    assert any("graph output" in r and "'shape'" in r for r in g.frozen), g.frozen


def test_shape_output_read_through_gather(tmp_path):
    """``Gather(Shape(y), 1)`` is a graph output: the channel count leaves the graph, y freezes;
    ``Gather(Shape(y), 0)`` (the batch) reads no channel dim, and y prunes. (The batch is
    symbolic, so that the loader cannot fold the shape into a constant.)"""
    for index, prunable in ((1, False), (0, True)):
        b = Builder()
        y = b.op("Relu", b.conv("x", 3, 8, name="c1"))
        z = b.conv(y, 8, 4, name="c2")
        n = b.op("Gather", b.op("Shape", y, name="shape"), b.const(np.int64(index)), axis=0)
        m = b.model({"x": ["N", 3, 4, 4]}, {z: ["N", 4, 4, 4], n: ([], I64)})
        assert group_of(m, "c1.w", 0).prunable is prunable
        if prunable:
            out = prune_checked(m, tmp_path, ratio=0.5)
            assert init_shapes(out.path)["c2.w"][1] == 4


def test_run_time_widths_keep_their_declared_dims(tmp_path) -> None:
    """``Reshape(h, Concat(Shape(h)[:1], [-1]))``: the width after it is computed at run time,
    which ONNX inference cannot follow through a symbolic batch. The exporter declared it
    ([N, 32]); the written file declares the pruned width (23) instead of an unknown dim, as
    the file read did (a count on it took unknown dims as 1: an int4 all-MiniLM-L6-v2's
    attention MACs counted 7.0M on the written file, 7.67M predicted)."""
    from onnx import helper

    b = Builder()
    h = b.op("Relu", b.op("MatMul", "x", b.weight(8, 32, name="w1")))
    head = b.op("Shape", h, start=0, end=1)
    shape = b.op("Concat", head, b.const(np.array([-1], np.int64)), axis=0)
    z = b.op("Reshape", h, shape)
    y = b.op("MatMul", z, b.weight(32, 4, name="w2"))
    m = b.model({"x": ["N", 8]}, {y: ["N", 4]})
    m.graph.value_info.append(helper.make_tensor_value_info(z, onnx.TensorProto.FLOAT,
                                                            ["N", 32]))
    out = prune_checked(m, tmp_path, ratio=0.3)
    assert out.report.flops_after == out.report.predicted_flops_after == 8 * 23 + 23 * 4
    written = {vi.name: [d.dim_value or d.dim_param for d in vi.type.tensor_type.shape.dim]
               for vi in onnx.load(out.path).graph.value_info}
    assert written[z] == ["N", 23]
