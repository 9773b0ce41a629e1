"""Every give-up of an op rule says why, in words a user can act on (issue #13).

One tiny graph per kind of give-up and rule family: the channels the rule will not map freeze,
and the group's reasons read ``<Op> node '<name>': <why>``. A give-up on an unknown rank leaves
no channel space a group could reach (its tensor has no known length), so those words are read
off the rule itself (``rule_reason``); shapes that shape inference would complete are given to
the rule directly (``reason_on``). Shapes and slicing: ``test_rules_reasons_shape.py``; Einsum:
``test_rules_einsum.py``; integer-domain ops: ``test_rules_quant_ops.py``.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from attn_graphs import X3, D, H, S, linear
from graphs import IR_VERSION, Builder
from onnx import helper
from reasons import (
    INT64,
    C,
    after_dense,
    after_stem,
    behind_unknown_rank,
    frozen_text,
    reason_on,
    rule_reason,
)

from spa.errors import ModelLoadError


# --- conv.py ----------------------------------------------------------------------------------
@pytest.mark.parametrize("op, w_shape", [("Conv", [2, C, 1, 1]), ("ConvTranspose", [C, 2, 1, 1])])
def test_conv_with_a_dynamic_weight(op, w_shape):
    m = after_stem(lambda b, c: b.op(op, c, "w", name="dyn"), [1, 2, 4, 4],
                   inputs={"w": w_shape})
    assert f"{op} node 'dyn': dynamic weight: input 1 'w' is not a constant" \
        in frozen_text(m, "c1.w")


def test_conv_behind_an_unknown_rank():
    m = behind_unknown_rank(lambda b, u: b.op("Conv", u, b.weight(2, C, 1, 1), name="conv"),
                            [1, 2, 4, 4])
    assert rule_reason(m, "conv") == "unknown rank of input 0 'foo_out0'"


# --- elementwise.py ---------------------------------------------------------------------------
def test_elementwise_behind_an_unknown_rank():
    m = behind_unknown_rank(lambda b, u: b.op("Relu", u, name="relu"), [1, C, 4, 4])
    assert rule_reason(m, "relu") == "unknown rank of input 0 'foo_out0'"
    m = behind_unknown_rank(lambda b, u: b.op("Add", u, b.weight(C, 1, 1), name="add"),
                            [1, C, 4, 4])
    assert rule_reason(m, "add") == "unknown rank of input 0 'foo_out0'"


# --- gather.py --------------------------------------------------------------------------------
def test_gather_on_the_channel_axis():
    """Indices that repeat one (distinct ones pick channels: test_rules_shape.py)."""
    m = after_stem(lambda b, c: b.op("Gather", c, b.const([0, 2, 0], "idx"), axis=1,
                                     name="pick"), [1, 3, 4, 4])
    assert "Gather node 'pick': axis 1 of 'c1_out0' is indexed by 'idx': pruning it would " \
        "change what the indices pick" in frozen_text(m, "c1.w")


def test_expand_with_a_target_computed_at_run_time():
    m = after_stem(lambda b, c: b.op("Expand", c, "target", name="ex"), [1, C, 4, 4],
                   inputs={"target": ([4], INT64)})
    assert "Expand node 'ex': input 1 'target' is computed in a way SPA cannot follow" \
        in frozen_text(m, "c1.w")


def test_expand_to_another_tensors_dims():
    """``c.expand(z.shape)``: the channel count is z's, whatever happens to c's channels."""
    m = after_stem(lambda b, c: b.op("Expand", c, b.op("Shape", "z"), name="ex"),
                   ["n", C, 4, 4], inputs={"z": ["n", C, 4, 4]})
    assert "Expand node 'ex': entry 1 of input 1 'shape2_out0' copies axis 1 of 'z'" \
        in frozen_text(m, "c1.w")


def test_tile_with_repeats_computed_at_run_time():
    m = after_stem(lambda b, c: b.op("Tile", c, "reps", name="tile"), [1, None, None, None],
                   inputs={"reps": ([4], INT64)})
    assert "Tile node 'tile': dynamic repeats: input 1 'reps' is not a constant" \
        in frozen_text(m, "c1.w")


def test_gather_behind_an_unknown_rank():
    m = behind_unknown_rank(lambda b, u: b.op("Gather", u, b.const([0]), axis=1, name="g"),
                            [1, 1, 4, 4])
    assert rule_reason(m, "g") == "unknown rank of input 0 'foo_out0'"


# --- linear.py --------------------------------------------------------------------------------
def test_gemm_with_a_dynamic_weight():
    b = Builder()
    h = b.gemm("x", 8, 6, name="fc")
    y = b.op("Gemm", h, "w", name="dyn", transB=1)
    m = b.model({"x": [2, 8], "w": [3, 6]}, {y: [2, 3]})
    assert "Gemm node 'dyn': dynamic weight: input 1 'w' is not a constant" \
        in frozen_text(m, "fc.w")


@pytest.mark.parametrize("build, out, words", [
    (lambda b, h: b.op("MatMul", h, b.weight(5, 8, 3, name="w3"), name="mm"), [5, S, 3],
     "constant input 1 'w3' of rank 3: only a 2-D weight is mapped"),
    (lambda b, h: b.op("MatMul", b.op("Reshape", h, b.const([S * 8]), name="flat"),
                       b.weight(S * 8, 3), name="mm"), [3],
     "1-D input 0 'flat_out0': a vector product"),
    (lambda b, h: b.op("MatMul", h, b.op("Transpose", h, perm=[0, 2, 1], name="t"), name="mm"),
     [1, S, S], "axis 2 of 'fc_out0' and axis 1 of 't_out0' are summed over in a product of two "
     "activations, with no weight to remove a channel at"),
], ids=["batched-constant", "vector", "two-activations"])
def test_matmul_forms_it_does_not_map(build, out, words):
    m = after_dense(build, out)
    assert f"MatMul node 'mm': {words}" in frozen_text(m, "fc.w", 1)


def test_matmul_of_two_constants():
    """A product larger than its factors (low rank) stays computed (spa/ir/computed.py)."""
    b = Builder()
    w = b.op("MatMul", b.weight(8, 2), b.weight(2, 8), name="mm")
    y = b.op("MatMul", "x", w, name="use")
    m = b.model({"x": [1, 8]}, {y: [1, 8]})
    assert rule_reason(m, "mm") == "both inputs are constants"


# --- norm.py ----------------------------------------------------------------------------------
def test_batchnorm_in_training_mode():
    def build(b, c):
        params = [b.weight(C) for _ in range(3)] + [b.weight(C, positive=True)]
        return b.op("BatchNormalization", c, *params, outputs=["y", "mean", "var"],
                    name="bn", training_mode=1)[0]

    m = after_stem(build, [1, C, 4, 4], opset=15)
    assert "BatchNormalization node 'bn': training mode" \
        in frozen_text(m, "c1.w")


def test_layernorm_over_the_channels():
    m = after_dense(lambda b, h: b.op("LayerNormalization", h, b.weight(8), b.weight(8),
                                      name="ln", axis=-1), [1, S, 8])
    assert "LayerNormalization node 'ln': normalises over axis 2 of 'fc_out0': its statistics " \
        "change when channels go (prune the hidden size with --hidden)" in frozen_text(m, "fc.w", 1)


def test_layernorm_with_statistics_outputs():
    m = after_dense(lambda b, h: b.op("LayerNormalization", h, b.weight(8), b.weight(8),
                                      outputs=["y", "mean", "inv_std"], name="ln", axis=-1)[0],
                    [1, S, 8])
    assert "LayerNormalization node 'ln': statistics outputs (Mean/InvStdDev)" \
        in frozen_text(m, "fc.w", 1)


def test_layernorm_over_two_axes_with_hidden():
    m = after_dense(lambda b, h: b.op("LayerNormalization", h, b.weight(S, 8), b.weight(S, 8),
                                      name="ln", axis=1), [1, S, 8])
    text = frozen_text(m, "fc.w", 1, hidden=True)
    assert "LayerNormalization node 'ln': normalises over axes [1, 2] of 'fc_out0': its " \
        "statistics change when channels go" in text and "--hidden" not in text


# --- pool.py ----------------------------------------------------------------------------------
def test_maxpool_with_indices():
    m = after_stem(lambda b, c: b.op("MaxPool", c, outputs=["y", "idx"], name="pool",
                                     kernel_shape=[2, 2])[0], [1, C, 3, 3])
    assert "MaxPool node 'pool': an Indices output" in frozen_text(m, "c1.w")


@pytest.mark.parametrize("op, opset", [("ReduceSum", 13), ("ReduceMean", 18)])
def test_reduction_with_axes_computed_at_run_time(op, opset):
    m = after_stem(lambda b, c: b.op(op, c, "axes", name="red"), [None, None, None, None],
                   inputs={"axes": ([1], INT64)}, opset=opset)
    assert f"{op} node 'red': dynamic axes: input 1 'axes' is not a constant" \
        in frozen_text(m, "c1.w")


def test_reduction_over_the_channels():
    m = after_stem(lambda b, c: b.op("ReduceMax", c, name="red", axes=[1]), [1, 1, 4, 4])
    assert "ReduceMax node 'red': reduces over axis 1 of 'c1_out0': every output mixes all " \
        "its channels" in frozen_text(m, "c1.w")


def test_mean_over_the_last_axis_is_a_norm_statistic():
    m = after_dense(lambda b, h: b.op("ReduceMean", h, name="mean", axes=[-1]), [1, S, 1])
    assert "ReduceMean node 'mean': reduces over axis 2 of 'fc_out0': its statistics change " \
        "when channels go (prune the hidden size with --hidden)" in frozen_text(m, "fc.w", 1)


@pytest.mark.parametrize("op, words", [
    ("Softmax", "normalises over axis 1 of 'c1_out0': every output depends on all its channels"),
    ("ArgMax", "returns positions along axis 1 of 'c1_out0': they change when channels go"),
])
def test_softmax_and_argmax_over_the_channels(op, words):
    out = [1, C, 4, 4] if op == "Softmax" else ([1, 1, 4, 4], INT64)
    m = after_stem(lambda b, c: b.op(op, c, name="n", axis=1), out)
    assert f"{op} node 'n': {words}" in frozen_text(m, "c1.w")


def test_reduction_behind_an_unknown_rank():
    m = behind_unknown_rank(lambda b, u: b.op("ReduceMax", u, name="red", axes=[1]),
                            [1, 1, 4, 4])
    assert rule_reason(m, "red") == "unknown rank of input 0 'foo_out0'"


# --- quant.py ---------------------------------------------------------------------------------
def test_quantize_behind_an_unknown_rank():
    m = behind_unknown_rank(lambda b, u: b.op("QuantizeLinear", u, b.const(np.float32(0.1)),
                                              name="q"), ([1, C, 4, 4], onnx.TensorProto.UINT8))
    assert rule_reason(m, "q") == "unknown rank of input 0 'foo_out0'"


# --- attention.py -----------------------------------------------------------------------------
def _fused(extra_inputs=(), outputs: int | list[str] = 1):
    """3-D Attention: the Q/K/V projections feed it directly (no head split before it)."""
    b = Builder()
    q, k, v = (linear(b, "x", D, D, n) for n in "qkv")
    y = b.op("Attention", q, k, v, *extra_inputs, outputs=outputs, name="attn", q_num_heads=H,
             kv_num_heads=H)
    return b, linear(b, y if isinstance(y, str) else y[0], D, D, "o")


def test_attention_with_a_kv_cache():
    b, y = _fused(["", "past_k", "past_v"], ["y", "present_k", "present_v"])
    cache, present = [1, H, 3, D // H], [1, H, S + 3, D // H]
    m = b.model({**X3, "past_k": cache, "past_v": cache},
                {y: [1, S, D], "present_k": present, "present_v": present}, opset=23)
    assert "Attention node 'attn': KV-cache inputs (past_key/past_value)" \
        in frozen_text(m, "v.w", 1)


def test_attention_with_its_qk_scores_as_an_output():
    b, y = _fused(outputs=["y", "", "", "scores"])
    m = b.model(X3, {y: [1, S, D], "scores": [1, H, S, S]}, opset=23)
    assert "Attention node 'attn': extra outputs" in frozen_text(m, "v.w", 1)


def test_attention_without_head_counts():
    """A 3-D Attention must name its head counts (onnx's shape inference says so too, and the
    loader refuses such a model as invalid); the rule, run on the node alone, does not guess
    them."""
    b = Builder()
    q, k, v = (linear(b, "x", D, D, n) for n in "qkv")
    a = b.op("Attention", q, k, v, name="attn")
    graph = b.graph(X3, {linear(b, a, D, D, "o"): [1, S, D]})
    graph.value_info.append(helper.make_tensor_value_info(a, onnx.TensorProto.FLOAT, [1, S, D]))
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)],
                          ir_version=IR_VERSION)
    with pytest.raises(ModelLoadError, match="q_num_heads"):
        rule_reason(m, "attn")
    shape = [1, S, D]
    assert reason_on("Attention", {"q": shape, "k": shape, "v": shape}, {"y": shape},
                     opset=23) == ("3-D inputs without q_num_heads and kv_num_heads: the heads "
                                   "are not known")


# --- shapes inference left unknown (every family) ---------------------------------------------
W41 = np.ones((2, C, 1, 1), np.float32)
UNKNOWN_LENGTH = "unknown length of axis 1 of output 0 'y'"
UNKNOWN = [  # op, inputs, outputs, attributes, reason
    ("Relu", {"x": [1, C, 4, 4]}, {"y": [1, None, 4, 4]}, {}, UNKNOWN_LENGTH),
    ("Add", {"x": [1, C, 4, 4], "k": np.ones((C, 1, 1), np.float32)}, {"y": [1, None, 4, 4]},
     {}, UNKNOWN_LENGTH),
    ("Transpose", {"x": [1, C, 4, 4]}, {"y": [1, None, 4, 4]}, {"perm": [0, 1, 3, 2]},
     UNKNOWN_LENGTH),
    ("MaxPool", {"x": [1, C, 4, 4]}, {"y": [1, None, 2, 2]}, {"kernel_shape": [2, 2]},
     UNKNOWN_LENGTH),
    ("ReduceMax", {"x": [1, C, 4, 4]}, {"y": [1, None, 1, 1]}, {"axes": [2, 3]},
     UNKNOWN_LENGTH),
    ("Gather", {"x": [1, C, 4, 4], "i": np.zeros(2, np.int64)}, {"y": None}, {"axis": 2},
     "unknown rank of output 0 'y'"),
    ("Concat", {"a": [1, C, 4, 4], "b": [1, 2, 4, 4]}, {"y": [1, None, 4, 4]}, {"axis": 1},
     UNKNOWN_LENGTH),
    ("Slice", {"x": [1, None, 4, 4], "s": np.array([0]), "e": np.array([2]),
               "a": np.array([1])}, {"y": [1, 2, 4, 4]}, {},
     "unknown length of the sliced axis 1 of input 0 'x'"),
    ("Resize", {"x": [1, C, 4, 4], "roi": np.zeros(0, np.float32),
                "sc": np.array([1, 1, 2, 2], np.float32)}, {"y": [1, None, 8, 8]}, {},
     UNKNOWN_LENGTH),
    ("MatMul", {"a": None, "w": np.ones((C, 2), np.float32)}, {"y": [1, 2]}, {},
     "unknown rank of input 0 'a'"),
    ("Gemm", {"a": [2, C, 1], "w": np.ones((C, 2), np.float32)}, {"y": [2, 2]}, {},
     "input 0 'a' of rank 3"),
    ("Conv", {"x": [1, C, 4], "w": W41}, {"y": [1, 2, 4, 4]}, {},
     "input 0 'x' has rank 3 but the weight 4"),
    ("LayerNormalization", {"x": None, "s": np.ones(C, np.float32)}, {"y": None}, {},
     "unknown rank of input 0 'x'"),
    ("Attention", {"q": [1, H, S, 4], "k": None, "v": [1, H, S, 4]}, {"y": [1, H, S, 4]}, {},
     "unknown rank of Q, K, V or the output"),
    ("Attention", {"q": [1, S, D], "k": [1, H, S, 4], "v": [1, H, S, 4]}, {"y": [1, S, D]}, {},
     "Q, K, V and the output have different ranks [3, 4, 4, 3]"),
]


@pytest.mark.parametrize("op, inputs, outputs, attrs, words", UNKNOWN,
                         ids=[f"{u[0]}-{i}" for i, u in enumerate(UNKNOWN)])
def test_unknown_shapes_are_named(op, inputs, outputs, attrs, words):
    """Shapes as a model may carry them when inference gave up part-way: the rule names the
    tensor and axis it could not follow."""
    opset = 23 if op == "Attention" else 17
    assert words in reason_on(op, inputs, outputs, opset=opset, **attrs)
