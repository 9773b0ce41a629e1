"""Give-up words of the shape and slicing rules (Reshape, Flatten, Transpose, (Un)Squeeze, Shape;
Concat, Split, Slice, Pad, Resize): one tiny graph per kind of give-up, the words asserted on the
frozen group (or, for an unknown rank, on the rule itself). See ``test_rules_reasons.py``.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import Builder
from reasons import INT64, C, after_stem, behind_unknown_rank, frozen_text, rule_reason

F = np.float32


# --- shape.py ---------------------------------------------------------------------------------
def test_reshape_with_a_target_computed_at_run_time():
    m = after_stem(lambda b, c: b.op("Reshape", c, "target", name="r"), [None, None],
                   inputs={"target": ([2], INT64)})
    assert "Reshape node 'r': input 1 'target' is computed in a way SPA cannot follow" \
        in frozen_text(m, "c1.w")


def test_reshape_target_copying_another_tensors_dim():
    """``c.view(z.shape)``: the channel count is z's, whatever happens to c's channels."""
    m = after_stem(lambda b, c: b.op("Reshape", c, b.op("Shape", "z"), name="r"),
                   [None, C, 16], inputs={"z": ["n", C, 16]})
    assert "Reshape node 'r': entry 1 of input 1 'shape2_out0' copies axis 1 of 'z'" \
        in frozen_text(m, "c1.w")


def test_reshape_between_symbolic_dims():
    """``[1, C, L] → [1, C·L]`` with L symbolic: which output dims the channels land in is not
    known until run time."""
    b = Builder()
    c = b.conv(b.op("Relu", b.conv("x", 3, 6, dims=1, name="stem")), 6, C, dims=1, name="c1")
    y = b.op("Reshape", c, b.const([0, -1]), name="r")
    m = b.model({"x": [1, 3, "L"]}, {y: [1, None]})
    assert "Reshape node 'r': cannot tell which dims of 'c1_out0' [1, 4, ?] become which of " \
        "'r_out0' [1, ?]" in frozen_text(m, "c1.w")


def test_merge_of_two_factors_that_both_lead_to_layers():
    """``[1, 2, 4, H, W] → [1, 8, H, W]`` where the 2 and the 4 are two convs' channels (an
    outer product): the merge keeps the outer factor, and the inner one's channels freeze."""
    b = Builder()
    a = b.op("Unsqueeze", b.conv("x", 3, 2, name="ca"), b.const([2]), name="ua")
    c = b.op("Unsqueeze", b.conv("x", 3, C, name="c1"), b.const([1]), name="ub")
    x = b.op("Reshape", b.op("Mul", a, c, name="outer"), b.const([1, 2 * C, 4, 4]),
             name="merge_pairs")
    m = b.model({"x": [1, 3, 4, 4]}, {b.conv(x, 2 * C, 2, name="c2"): [1, 2, 4, 4]})
    assert "Reshape node 'merge_pairs': merges axes [1, 2] of 'outer_out0' into axis 1: " \
        "the channels follow one factor" in frozen_text(m, "c1.w")


@pytest.mark.parametrize("op, out", [("Squeeze", [None] * 3), ("Unsqueeze", [None] * 5)])
def test_squeeze_with_axes_computed_at_run_time(op, out):
    m = after_stem(lambda b, c: b.op(op, c, "axes", name="sq"), out,
                   inputs={"axes": ([1], INT64)}, opset=13)
    assert f"{op} node 'sq': dynamic axes: input 1 'axes' is not a constant" \
        in frozen_text(m, "c1.w")


def test_shape_whose_channel_count_is_read_as_a_number():
    """With a symbolic batch the shape is not a constant; its product is read as data."""
    b = Builder()
    c = b.stem("x", 3, C)
    count = b.op("ReduceProd", b.op("Cast", b.op("Shape", c, name="shape"), to=7), name="count",
                 keepdims=0)
    y = b.op("Mul", c, b.op("Cast", count, to=onnx.TensorProto.FLOAT))
    m = b.model({"x": ["n", 3, 4, 4]}, {y: ["n", C, 4, 4]})
    assert "Shape node 'shape': the length of axes [0, 1, 2, 3] of 'c1_out0' is read as a " \
        "number by ReduceProd node 'count'" in frozen_text(m, "c1.w")


@pytest.mark.parametrize("op, attrs", [("Transpose", {}), ("Flatten", {}),
                                       ("DepthToSpace", {"blocksize": 2}),
                                       ("SpaceToDepth", {"blocksize": 2})])
def test_shape_ops_behind_an_unknown_rank(op, attrs):
    m = behind_unknown_rank(lambda b, u: b.op(op, u, name="n", **attrs), [None, None])
    assert rule_reason(m, "n") == "unknown rank of input 0 'foo_out0'"


# --- slicing.py -------------------------------------------------------------------------------
def test_concat_after_a_part_of_unknown_length():
    m = after_stem(lambda b, c: b.op("Concat", "z", c, name="cat", axis=1), [1, None, 4, 4],
                   inputs={"z": [1, "k", 4, 4]})
    assert "Concat node 'cat': unknown length of axis 1 of input 0 'z': the offsets of the " \
        "parts from there on are unknown" in frozen_text(m, "c1.w")


def test_split_with_sizes_computed_at_run_time():
    def build(b, c):
        return b.op("Split", c, "sizes", outputs=["a", "rest"], name="split", axis=1)[0]

    m = after_stem(build, [1, None, 4, 4], inputs={"sizes": ([2], INT64)}, opset=13)
    assert "Split node 'split': unknown length of axis 1 of output 0 'a': the offsets of the " \
        "parts from there on are unknown" in frozen_text(m, "c1.w")


@pytest.mark.parametrize("inputs, words", [
    ({"starts": ([1], INT64)}, "dynamic bounds: input 1 'starts' is not a constant"),
    ({}, "slices axis 1 of 'c1_out0' with step 2"),
], ids=["dynamic", "step-2"])
def test_slice_it_does_not_map(inputs, words):
    def build(b, c):
        starts = "starts" if inputs else b.const([0])
        return b.op("Slice", c, starts, b.const([C]), b.const([1]), b.const([2]), name="s")

    m = after_stem(build, [1, None, 4, 4], inputs=inputs)
    assert f"Slice node 's': {words}" in frozen_text(m, "c1.w")


@pytest.mark.parametrize("pads, inputs, words", [
    ("pads", {"pads": ([8], INT64)}, "dynamic pads: input 1 'pads' is not a constant"),
    ([0, 1, 0, 0, 0, 1, 0, 0], {}, "pads axis 1 of 'c1_out0': the padded length is fixed"),
], ids=["dynamic", "channels"])
def test_pad_it_does_not_map(pads, inputs, words):
    def build(b, c):
        return b.op("Pad", c, pads if isinstance(pads, str) else b.const(pads), name="pad")

    m = after_stem(build, [1, None, 4, 4], inputs=inputs)
    assert f"Pad node 'pad': {words}" in frozen_text(m, "c1.w")


def _resize(b, c, *, sizes=None, scales=None, roi=None, **attrs):
    ins = [c, roi or "", b.const(np.asarray(scales, F)) if scales else "", sizes or ""]
    return b.op("Resize", *ins[:4 if sizes else 3], name="rs", **attrs)


@pytest.mark.parametrize("kwargs, inputs, opset, words", [
    ({"scales": [2, 2], "axes": [2, 3]}, {}, 18, "an axes attribute (opset 18)"),
    ({"scales": [1, 1, 2, 2], "roi": "roi", "coordinate_transformation_mode":
      "tf_crop_and_resize"}, {"roi": [8]}, 17, "mode tf_crop_and_resize"),
    ({"sizes": "sizes"}, {"sizes": ([4], INT64)}, 17,
     "dynamic sizes: input 3 'sizes' is not a constant"),
    ({"scales": [1, 2, 1, 1]}, {}, 17, "resizes axis 1 of 'c1_out0'"),
], ids=["axes", "crop", "dynamic-sizes", "channels"])
def test_resize_it_does_not_map(kwargs, inputs, opset, words):
    m = after_stem(lambda b, c: _resize(b, c, **kwargs), [None] * 4, inputs=inputs, opset=opset)
    assert f"Resize node 'rs': {words}" in frozen_text(m, "c1.w")


@pytest.mark.parametrize("op", ["Slice", "Pad", "Split"])
def test_slicing_ops_behind_an_unknown_rank(op):
    def build(b, u):
        if op == "Slice":
            return b.op(op, u, b.const([0]), b.const([2]), b.const([1]), name="n")
        if op == "Pad":
            return b.op(op, u, b.const([0] * 8), name="n")
        return b.op(op, u, b.const([2, 2]), outputs=["a", "b"], name="n", axis=1)[0]

    m = behind_unknown_rank(build, [1, None, 4, 4], opset=13)
    assert rule_reason(m, "n") == "unknown rank of input 0 'foo_out0'"
