"""Graphs as paddle2onnx writes them, pruned under the masked oracle (no paddle install).

paddle2onnx keeps every weight in a ``Constant`` node instead of an initializer, targets opset
11/12 by default (no ``HardSwish`` op before 14: ``x * HardSigmoid(x)`` with α = 1/6, β = 0.5),
leaves BatchNormalization unfused after Conv, gives Clip (ReLU6) its bounds as inputs, and
ends in GlobalAveragePool + a Reshape whose target is another Constant node. The tiny network
below is a PP-LCNet / MobileNetV3 block with a squeeze-and-excite gate, a ConvTranspose branch
and a channel Concat.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import Builder, group_of, init_shapes, init_value, input_value, kept_slices
from oracle import group_sizes, prune_checked


def as_constant_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Move every initializer into a ``Constant`` node at the top of the graph."""
    nodes = [onnx.helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=t)
             for t in model.graph.initializer]
    body = list(model.graph.node)
    del model.graph.initializer[:]
    del model.graph.node[:]
    model.graph.node.extend(nodes + body)
    onnx.checker.check_model(model, full_check=True)
    return model


def _hardswish(b: Builder, x: str, opset: int) -> str:
    if opset >= 14:
        return b.op("HardSwish", x)
    return b.op("Mul", x, b.op("HardSigmoid", x, alpha=1 / 6, beta=0.5))


def _conv_bn(b: Builder, x: str, cin: int, cout: int, name: str, **attrs) -> str:
    return b.bn(b.conv(x, cin, cout, bias=False, name=name, **attrs), cout, name=f"{name}_bn")


def lcnet(opset: int, head: tuple[int, int] = (-1, 16)) -> onnx.ModelProto:
    """stem (3→8, /2) → dw (8) → SE (8→2→8) → pw (8→16) → ReLU6 → [ConvT 16→8 ↑2 → Pad →
    conv 8→8 /2, conv 16→8] → Concat (16) → GAP → Reshape ``head`` → Gemm 16→5."""
    b = Builder()
    x = _hardswish(b, _conv_bn(b, "x", 3, 8, "stem", strides=[2, 2]), opset)
    x = _hardswish(b, _conv_bn(b, x, 8, 8, "dw", group=8), opset)
    s = b.op("GlobalAveragePool", x)
    s = b.conv(b.op("Relu", b.conv(s, 8, 2, k=1, name="se_reduce")), 2, 8, k=1, name="se_expand")
    x = b.op("Mul", x, b.op("HardSigmoid", s, alpha=0.2, beta=0.5))
    x = _conv_bn(b, x, 8, 16, "pw")
    x = b.op("Clip", x, b.const(np.float32(0.0), name="relu6_min"),
             b.const(np.float32(6.0), name="relu6_max"))
    up = b.op("ConvTranspose", x, b.weight(16, 8, 2, 2, name="up.w"), b.weight(8, name="up.b"),
              name="up", strides=[2, 2])
    up = b.op("Relu", b.conv(b.op("Pad", up, b.const([0, 0, 0, 0, 0, 0, 1, 1], name="pads")),
                             8, 8, name="down", strides=[2, 2], pads=[1, 1, 0, 0]))
    side = b.op("Relu", b.conv(x, 16, 8, k=1, name="side"))
    y = b.op("GlobalAveragePool", b.op("Concat", up, side, axis=1))
    y = b.op("Reshape", y, b.const(list(head), name="head_shape"), name="head_reshape")
    y = b.gemm(y, 16, 5, name="fc")
    return as_constant_nodes(b.model({"x": ["N", 3, 16, 16]}, {y: ["N", 5]}, opset=opset))


@pytest.mark.parametrize("opset", [11, 12, 14])
def test_lcnet_block_groups(opset):
    m = lcnet(opset)
    assert not m.graph.initializer  # every weight is a Constant node, as paddle2onnx writes
    # stem+dw (8, through the depthwise conv), SE reduce (2), pw (16), up, down, side (8 each);
    # fc's 5 outputs are the graph output.
    assert sorted(group_sizes(m)) == [(2, True), (5, False), (8, True), (8, True), (8, True),
                                      (8, True), (16, True)]
    g = group_of(m, "stem.w", 0)
    assert g.id == group_of(m, "dw.w", 0).id == group_of(m, "se_expand.w", 0).id
    assert group_of(m, "stem_bn.scale", 0).id == g.id


@pytest.mark.parametrize("opset", [11, 12, 14])
@pytest.mark.parametrize("ratio", [0.3, 0.5])
@pytest.mark.parametrize("head", [(-1, 16), (0, -1)], ids=["flat_literal", "flat_copy"])
def test_lcnet_block_prunes_under_the_oracle(tmp_path, opset, ratio, head):
    m = lcnet(opset, head)
    # Exact counts: by default pw's 16 channels, read by the g=1 conv 'side', keep a whole
    # kernel block of 16 (tests/test_kernel_widths.py).
    out = prune_checked(m, tmp_path, ratio=ratio, round_to=1)
    shapes = init_shapes(out.path)
    keep8, keep16 = shapes["stem.w"][0], shapes["pw.w"][0]
    assert keep8 < 8 and keep16 < 16
    assert shapes["dw.w"] == (keep8, 1, 3, 3) and shapes["dw_bn.mean"] == (keep8,)
    assert shapes["se_expand.w"][0] == keep8 and shapes["pw.w"][1] == keep8
    assert shapes["up.w"][0] == keep16 and shapes["side.w"][1] == keep16
    assert shapes["relu6_min"] == shapes["relu6_max"] == ()  # Clip's bounds stay scalars
    # The head Reshape's Constant target follows the concatenated width.
    width = shapes["up.w"][1] + shapes["side.w"][0]
    expected = [0, -1] if head == (0, -1) else [-1, width]
    assert input_value(out.path, "head_reshape", 1).tolist() == expected
    assert shapes["fc.w"] == (5, width)
    rows = kept_slices(_constant(m, "pw_bn.scale"), init_value(out.path, "pw_bn.scale"), 0)
    cols = kept_slices(_constant(m, "up.w")[rows], init_value(out.path, "up.w"), 1)
    np.testing.assert_array_equal(init_value(out.path, "up.b"), _constant(m, "up.b")[cols])


def _constant(model: onnx.ModelProto, name: str) -> np.ndarray:
    node = next(n for n in model.graph.node if n.op_type == "Constant" and n.output[0] == name)
    return onnx.numpy_helper.to_array(node.attribute[0].t)
