"""Op rules for onnxruntime's contrib ops (norms, fused activations, FusedMatMul, FusedConv,
Attention, MultiHeadAttention, GroupQueryAttention, RotaryEmbedding, MatMulNBits), each pruned
under the masked oracle where onnxruntime's CPU provider runs it, and loading models that use them
(spa/ir/contrib.py)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import (
    IR_VERSION,
    Builder,
    attr,
    group_of,
    init_shapes,
    init_value,
    kept_slices,
    node_named,
    reasons,
)
from onnx import helper, numpy_helper
from oracle import (
    group_sizes,
    output_error,
    prune_checked,
    prune_obspa,
    with_and_without_update,
)

from spa import validate as val
from spa.api import CheckOptions, PruneOptions, analyze, prune
from spa.coupling import GroupKind
from spa.coupling.analysis import Group
from spa.errors import ModelLoadError

MS = "com.microsoft"
X = [2, 3, 8]


def contrib_model(b: Builder, inputs, outputs) -> onnx.ModelProto:
    """The model of ``b`` importing ``com.microsoft``; not checked here (onnx does not know
    the contrib ops SPA's loader is meant to accept)."""
    imports = [helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)]
    return helper.make_model(b.graph(inputs, outputs), opset_imports=imports,
                             ir_version=IR_VERSION)


def dense(b: Builder, x: str, k: int, n: int, name: str) -> str:
    return b.op("MatMul", x, b.weight(k, n, name=f"{name}.w"), name=name)


def hidden_group(m: onnx.ModelProto) -> Group:
    """The residual-stream group of ``m`` analysed with hidden-size pruning on."""
    (stream,) = [g for g in analyze(m, hidden=True).groups if g.kind is GroupKind.HIDDEN]
    return stream


def prune_hidden(m: onnx.ModelProto, tmp_path: Path, producer: str) -> tuple[Path, list[int]]:
    """Prune half the hidden size (outside the masked oracle: norm statistics change; the
    pruned model is validated and its counts are the prediction); return the written file and
    the kept columns (axis 1) of ``producer``."""
    onnx.save(m, tmp_path / "m.onnx")
    out = tmp_path / "h.onnx"
    report, _ = prune(tmp_path / "m.onnx", out, PruneOptions(ratio=0.0, hidden_ratio=0.5),
                      CheckOptions(latency=False))
    assert report.params_after == report.predicted_params_after < report.params_before
    return out, kept_slices(init_value(m, producer), init_value(out, producer), 1)


# --- loading ------------------------------------------------------------------------------------
def test_default_domain_onnxruntime_op_loads_and_is_checked(tmp_path):
    """SimplifiedLayerNormalization is in the default domain (as onnxruntime-genai writes it),
    which onnx.checker refuses; the loader checks the rest and infers its output's shape."""
    b = Builder()
    h = dense(b, b.op("Relu", dense(b, "x", 8, 16, "fc1")), 16, 8, "fc2")
    y = dense(b, b.op("SimplifiedLayerNormalization", h, b.weight(8, name="n.scale"),
                      name="n", axis=-1, epsilon=1e-5), 8, 4, "head")
    m = contrib_model(b, {"x": X}, {y: [2, 3, 4]})
    with pytest.raises(onnx.checker.ValidationError, match="No Op registered"):
        onnx.checker.check_model(m)
    assert group_sizes(m) == [(16, True), (8, False), (4, False)]
    assert any("SimplifiedLayerNormalization node 'n': normalises over axis 2" in r
               for r in group_of(m, "fc2.w", 1).frozen)
    out = prune_checked(m, tmp_path, ratio=0.5)
    assert init_shapes(out.path)["fc1.w"] == (8, 8)


def test_default_domain_op_neither_knows_is_refused(tmp_path):
    b = Builder()
    y = b.op("NoSuchNormalization", dense(b, "x", 8, 8, "fc"))
    m = contrib_model(b, {"x": X}, {y: [2, 3, 8]})
    with pytest.raises(ModelLoadError, match="No Op registered for NoSuchNormalization"):
        analyze(m)


def test_contrib_outputs_get_shapes_and_unknown_contrib_ops_freeze(tmp_path):
    """The shape of a BiasGelu output comes from onnxruntime's symbolic shape inference, so the
    MatMul after it couples; an op no rule knows (onnxruntime's ``Inverse``) freezes."""
    b = Builder()
    h = b.op("BiasGelu", dense(b, "x", 8, 16, "fc1"), b.weight(16, name="fc1.b"), domain=MS)
    y = b.op("Inverse", dense(b, h, 16, 3, "fc2"), domain=MS, name="inv")
    m = contrib_model(b, {"x": X}, {y: [2, 3, 3]})
    g = group_of(m, "fc1.w", 1)
    assert g.prunable and ("fc2.w", 0) in {mem.space for mem in g.consumers}
    assert any("com.microsoft::Inverse" in r for r in reasons(m))


def test_contrib_shape_that_conflicts_is_left_unknown():
    """A contrib output whose shape cannot be inferred without a conflict (BiasGelu keeps its
    input's 16 channels, the MatMul after it takes 15: onnxruntime's inference fails, and ONNX
    inference would refuse its shape) is no reason to refuse the model: the output stays
    unknown, and the group before it freezes."""
    b = Builder()
    h = b.op("BiasGelu", dense(b, "x", 8, 16, "fc1"), b.weight(16, name="fc1.b"), domain=MS,
             name="gelu")
    m = contrib_model(b, {"x": X}, {dense(b, h, 15, 4, "fc2"): [2, 3, 4]})
    assert not group_of(m, "fc1.w", 1).prunable


# --- norms --------------------------------------------------------------------------------------
SKIP_NORMS = ["SkipLayerNormalization", "SkipSimplifiedLayerNormalization"]


def _skip_norm_model(op: str, *, sum_output: bool = False) -> onnx.ModelProto:
    """``e = x @ E; y = SkipNorm(mlp(e), e) @ H``: the residual stream (8) and the MLP (16)."""
    b = Builder()
    e = dense(b, "x", 4, 8, "embed")
    h = dense(b, b.op("Relu", dense(b, e, 8, 16, "fc1")), 16, 8, "fc2")
    params = [b.weight(8, name="n.gamma")]
    if op == "SkipLayerNormalization":
        params.append(b.weight(8, name="n.beta"))
    params.append(b.weight(8, name="n.bias"))
    outs = ["n_out", "", "", "n_sum"] if sum_output else ["n_out"]
    b.op(op, h, e, *params, outputs=outs, name="n", domain=MS, epsilon=1e-5)
    y = dense(b, "n_out", 8, 4, "head")
    outputs = {y: [2, 3, 4]}
    if sum_output:
        outputs[dense(b, "n_sum", 8, 2, "side")] = [2, 3, 2]
    return contrib_model(b, {"x": [2, 3, 4]}, outputs)


@pytest.mark.parametrize("op", SKIP_NORMS)
@pytest.mark.parametrize("sum_output", [False, True], ids=["out", "out+sum"])
def test_skip_norm_freezes_the_stream_and_the_mlp_prunes(tmp_path, op, sum_output):
    m = _skip_norm_model(op, sum_output=sum_output)
    stream = group_of(m, "embed.w", 1)
    assert not stream.prunable
    assert any(f"{op} node 'n': normalises over axis 2 of 'fc2_out" in r and "--hidden" in r
               for r in stream.frozen), stream.frozen
    assert group_of(m, "fc1.w", 1).prunable
    out = prune_checked(m, tmp_path, ratio=0.5)
    rows = kept_slices(init_value(m, "fc1.w"), init_value(out.path, "fc1.w"), 1)
    assert len(rows) == 8
    assert kept_slices(init_value(m, "fc2.w"), init_value(out.path, "fc2.w"), 0) == rows
    assert init_shapes(out.path)["n.gamma"] == (8,)


@pytest.mark.parametrize("op", SKIP_NORMS)
def test_skip_norm_with_hidden_pruning_slices_its_parameters(tmp_path, op):
    """With --hidden the stream is one group: input, skip, bias, γ, β and the outputs."""
    m = _skip_norm_model(op, sum_output=True)
    spaces = {mem.space for mem in hidden_group(m).members}
    params = ["n.gamma", "n.bias"] + (["n.beta"] if op == "SkipLayerNormalization" else [])
    assert {(p, 0) for p in params} <= spaces and ("embed.w", 1) in spaces
    assert {("head.w", 0), ("side.w", 0), ("fc1.w", 0)} <= spaces
    out, cols = prune_hidden(m, tmp_path, "embed.w")
    assert len(cols) == 4
    for p in params:
        np.testing.assert_array_equal(init_value(out, p), init_value(m, p)[cols])


def test_simplified_layer_norm_with_hidden_pruning(tmp_path):
    b = Builder()
    e = dense(b, "x", 4, 8, "embed")
    n = b.op("SimplifiedLayerNormalization", e, b.weight(8, name="n.scale"), outputs=["n", "r"],
             name="n", axis=-1)[0]
    y = dense(b, n, 8, 4, "head")
    m = contrib_model(b, {"x": [2, 3, 4]}, {y: [2, 3, 4]})
    assert ("n.scale", 0) in {mem.space for mem in hidden_group(m).members}
    out, cols = prune_hidden(m, tmp_path, "embed.w")
    np.testing.assert_array_equal(init_value(out, "n.scale"), init_value(m, "n.scale")[cols])


# --- activations --------------------------------------------------------------------------------
ACTIVATIONS = ["Gelu", "QuickGelu", "BiasGelu", "FastGelu"]


@pytest.mark.parametrize("op", ACTIVATIONS)
def test_fused_activation_between_dense_layers(tmp_path, op):
    b = Builder()
    h = dense(b, "x", 8, 16, "fc1")
    extra = {"Gelu": [], "QuickGelu": [], "BiasGelu": [b.weight(16, name="act.bias")],
             "FastGelu": [b.weight(16, name="act.bias")]}[op]
    attrs = {"alpha": 1.5} if op == "QuickGelu" else {}
    y = dense(b, b.op(op, h, *extra, domain=MS, name="act", **attrs), 16, 4, "fc2")
    m = contrib_model(b, {"x": X}, {y: [2, 3, 4]})
    assert group_sizes(m)[0] == (16, True)
    out = prune_checked(m, tmp_path, ratio=0.5)
    rows = kept_slices(init_value(m, "fc1.w"), init_value(out.path, "fc1.w"), 1)
    assert kept_slices(init_value(m, "fc2.w"), init_value(out.path, "fc2.w"), 0) == rows
    if extra:
        np.testing.assert_array_equal(init_value(out.path, "act.bias"),
                                      init_value(m, "act.bias")[rows])


def test_bias_add_couples_bias_and_skip():
    """``X + bias + skip``: onnxruntime's CPU provider has no BiasAdd kernel (CUDA only), so no
    oracle runs here; the coupling is Add's, whose oracle tests run."""
    b = Builder()
    h = b.op("BiasAdd", dense(b, "x", 8, 16, "fc1"), b.weight(16, name="act.bias"),
             dense(b, "x", 8, 16, "skip"), domain=MS, name="act")
    m = contrib_model(b, {"x": X}, {dense(b, h, 16, 4, "fc2"): [2, 3, 4]})
    g = group_of(m, "fc1.w", 1)
    assert g.prunable and {("act.bias", 0), ("skip.w", 1), ("fc2.w", 0)} <= {
        mem.space for mem in g.members}


# --- FusedMatMul --------------------------------------------------------------------------------
@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
def test_fused_matmul_with_a_constant_weight(tmp_path, trans_a, trans_b):
    """``α · A' @ B'`` twice, with either operand read transposed; MACs are |Y| · K."""
    b = Builder()

    def layer(x: str, k: int, n: int, name: str, t_a: int) -> str:
        w = b.weight(*((n, k) if trans_b else (k, n)), name=f"{name}.w")
        return b.op("FusedMatMul", x, w, domain=MS, name=name, alpha=0.5, transA=t_a,
                    transB=trans_b)

    h = b.op("Relu", layer("x", 8, 16, "f1", trans_a))
    y = layer(h, 16, 4, "f2", 0)
    m = contrib_model(b, {"x": [2, 8, 3] if trans_a else X}, {y: [2, 3, 4]})
    assert group_sizes(m) == [(16, True), (4, False)]
    out = prune_checked(m, tmp_path, ratio=0.5)
    assert out.report.flops_before == 2 * 3 * 16 * 8 + 2 * 3 * 4 * 16
    assert out.report.flops_after == 2 * 3 * 8 * 8 + 2 * 3 * 4 * 8
    n_axis = 0 if trans_b else 1
    rows = kept_slices(init_value(m, "f1.w"), init_value(out.path, "f1.w"), n_axis)
    assert kept_slices(init_value(m, "f2.w"), init_value(out.path, "f2.w"), 1 - n_axis) == rows


def test_fused_matmul_of_two_activations_freezes_the_contracted_axis():
    """Attention scores ``Q @ Kᵀ · scale``: the contracted axis has no weight to zero."""
    b = Builder()
    q, k = dense(b, "x", 8, 16, "q"), dense(b, "x", 8, 16, "k")
    y = b.op("FusedMatMul", q, k, domain=MS, name="scores", alpha=0.25, transB=1)
    m = contrib_model(b, {"x": X}, {y: [2, 3, 3]})
    assert any("FusedMatMul node 'scores': axis 2 of 'q_out0' and axis 2 of 'k_out0' are "
               "summed over" in r for r in group_of(m, "q.w", 1).frozen)


def test_fused_matmul_batch_transpose_freezes_with_the_attribute():
    b = Builder()
    y = b.op("FusedMatMul", dense(b, "x", 8, 16, "fc"), b.weight(16, 4), domain=MS, name="f",
             transBatchA=1)
    m = contrib_model(b, {"x": X}, {y: [2, 3, 4]})
    assert any("transBatchA=1" in r for r in group_of(m, "fc.w", 1).frozen)


# --- FusedConv ----------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ["Relu", "Sigmoid", "LeakyRelu"])
@pytest.mark.parametrize("with_z", [False, True], ids=["", "Z"])
def test_fused_conv(tmp_path, activation, with_z):
    b = Builder()
    ins = ["x", b.weight(8, 3, 3, 3, name="fc.w"), b.weight(8, name="fc.b")]
    if with_z:
        ins.append(b.conv("x", 3, 8, name="z"))
    params = {"activation_params": [0.1]} if activation == "LeakyRelu" else {}
    h = b.op("FusedConv", *ins, domain=MS, name="fc", activation=activation, pads=[1] * 4,
             kernel_shape=[3, 3], **params)
    y = b.conv(h, 8, 4, name="c2")
    m = contrib_model(b, {"x": [1, 3, 6, 6]}, {y: [1, 4, 6, 6]})
    assert group_sizes(m)[0] == (8, True)
    out = prune_checked(m, tmp_path, ratio=0.5)
    assert out.report.flops_before == 36 * 8 * 27 * (2 if with_z else 1) + 36 * 4 * 72
    rows = kept_slices(init_value(m, "fc.w"), init_value(out.path, "fc.w"), 0)
    assert kept_slices(init_value(m, "c2.w"), init_value(out.path, "c2.w"), 1) == rows
    np.testing.assert_array_equal(init_value(out.path, "fc.b"), init_value(m, "fc.b")[rows])
    if with_z:
        assert kept_slices(init_value(m, "z.w"), init_value(out.path, "z.w"), 0) == rows


def test_fused_conv_unknown_activation_freezes_with_the_attribute():
    b = Builder()
    h = b.op("FusedConv", "x", b.weight(8, 3, 3, 3, name="fc.w"), domain=MS, name="fc",
             activation="Mish", pads=[1] * 4)
    m = contrib_model(b, {"x": [1, 3, 6, 6]}, {b.conv(h, 8, 4, name="c2"): [1, 4, 6, 6]})
    assert any("FusedConv node 'fc': attribute activation=Mish" in r
               for r in group_of(m, "fc.w", 0).frozen)


# --- Attention ----------------------------------------------------------------------------------
@pytest.mark.parametrize("sizes", [None, [8, 8, 12]], ids=["thirds", "qkv_hidden_sizes"])
@pytest.mark.parametrize("relative", [False, True], ids=["", "attention_bias"])
def test_attention_prunes_heads(tmp_path, sizes, relative):
    """4 heads of size 2 (V: 3 with ``qkv_hidden_sizes``) between an input and an output
    projection; half the heads go, with their Q, K and V columns, bias and output rows."""
    b = Builder()
    hq, hk, hv = sizes or [8, 8, 8]
    attrs = {"qkv_hidden_sizes": sizes} if sizes else {}
    extra = ["", "", b.weight(1, 4, 4, 4, name="rel")] if relative else []
    h = b.op("Attention", dense(b, "x", 6, 8, "embed"), b.weight(8, hq + hk + hv, name="qkv.w"),
             b.weight(hq + hk + hv, name="qkv.b"), *extra, domain=MS, name="attn", num_heads=4,
             **attrs)
    y = dense(b, h, hv, 6, "o")
    m = contrib_model(b, {"x": [2, 4, 6]}, {y: [2, 4, 6]})
    heads = group_of(m, "qkv.w", 1)
    assert heads.kind is GroupKind.HEADS and heads.size == 4 and heads.prunable
    out = prune_checked(m, tmp_path, ratio=0.0, heads_ratio=0.5)
    node = node_named(out.path, "attn")
    assert attr(node, "num_heads") == 2
    if sizes:
        assert attr(node, "qkv_hidden_sizes") == [4, 4, 6]
    cols = kept_slices(init_value(m, "qkv.w"), init_value(out.path, "qkv.w"), 1)
    kept_heads = sorted({c % hq // (hq // 4) for c in cols[:hq // 2]})
    assert len(kept_heads) == 2
    q = [h * 2 + i for h in kept_heads for i in range(2)]
    v = [hq + hk + h * (hv // 4) + i for h in kept_heads for i in range(hv // 4)]
    assert cols == q + [hq + c for c in q] + v
    assert kept_slices(init_value(m, "o.w"), init_value(out.path, "o.w"), 0) == \
        [c - hq - hk for c in v]
    if relative:
        assert init_shapes(out.path)["rel"] == (1, 2, 4, 4)


@pytest.mark.parametrize(("extra", "attrs", "reason"), [
    (["", "past"], {}, "a KV cache (past input or present output) is not mapped"),
    ([], {"do_rotary": 1}, "attribute do_rotary=1"),
], ids=["past", "do_rotary"])
def test_attention_forms_not_mapped_freeze_with_a_reason(extra, attrs, reason):
    b = Builder()
    h = b.op("Attention", dense(b, "x", 6, 8, "embed"), b.weight(8, 24, name="qkv.w"),
             b.weight(24, name="qkv.b"), *extra, domain=MS, name="attn", num_heads=4, **attrs)
    inputs = {"x": [2, 4, 6]}
    if extra:
        inputs["past"] = [2, 2, 4, 0, 2]
    m = contrib_model(b, inputs, {dense(b, h, 8, 6, "o"): [2, 4, 6]})
    assert any(f"Attention node 'attn': {reason}" in r for r in group_of(m, "qkv.w", 1).frozen)


def test_attention_cache_loses_the_pruned_heads(tmp_path):
    """``past`` ``[2, B, N, P, d]`` (a graph input) and ``present`` ``[2, B, N, P + S, d]`` (a
    graph output) go with the heads: both lose the pruned ones, and the pruned model, fed the
    past at the kept heads, equals the masked original (GPT-2's causal attention)."""
    b = Builder()
    b.op("Attention", dense(b, "x", 6, 8, "embed"), b.weight(8, 24, name="qkv.w"),
         b.weight(24, name="qkv.b"), "", "past", domain=MS, name="attn",
         outputs=["attn_out", "present"], num_heads=4, unidirectional=1)
    m = contrib_model(b, {"x": [1, 4, 6], "past": [2, 1, 4, 3, 2]},
                      {dense(b, "attn_out", 8, 6, "o"): [1, 4, 6], "present": [2, 1, 4, 7, 2]})
    heads = group_of(m, "qkv.w", 1)
    assert {("past", 2), ("present", 2)} <= {mem.space for mem in heads.members}
    assert heads.prunable
    out = prune_checked(m, tmp_path, ratio=0.0, heads_ratio=0.5)
    assert attr(node_named(out.path, "attn"), "num_heads") == 2
    assert out.report.signature_changes == ["graph input 'past' axis 2: 4 -> 2",
                                            "graph output 'present' axis 2: 4 -> 2"]


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["", "bias+attention_bias"])
def test_multi_head_attention_prunes_heads(tmp_path, cross, with_bias):
    """Q, K (8 = 4 heads × 2) and V (12 = 4 × 3) from their own projections; half the heads
    go from each projection's columns, the bias and the output projection's rows."""
    b = Builder()
    kv_in = "mem" if cross else "x"
    q, k, v = dense(b, "x", 6, 8, "q"), dense(b, kv_in, 6, 8, "k"), dense(b, kv_in, 6, 12, "v")
    extra = [b.weight(28, name="mha.b"), "", b.weight(1, 4, 4, 5 if cross else 4, name="rel")] \
        if with_bias else []
    h = b.op("MultiHeadAttention", q, k, v, *extra, domain=MS, name="mha", num_heads=4)
    y = dense(b, h, 12, 6, "o")
    inputs = {"x": [2, 4, 6], **({"mem": [2, 5, 6]} if cross else {})}
    m = contrib_model(b, inputs, {y: [2, 4, 6]})
    heads = group_of(m, "q.w", 1)
    assert heads.kind is GroupKind.HEADS and heads.size == 4 and heads.prunable
    out = prune_checked(m, tmp_path, ratio=0.0, heads_ratio=0.5)
    assert attr(node_named(out.path, "mha"), "num_heads") == 2
    q_cols = kept_slices(init_value(m, "q.w"), init_value(out.path, "q.w"), 1)
    kept_heads = [c // 2 for c in q_cols[::2]]
    assert q_cols == [h * 2 + i for h in kept_heads for i in range(2)]
    assert kept_slices(init_value(m, "k.w"), init_value(out.path, "k.w"), 1) == q_cols
    v_cols = [h * 3 + i for h in kept_heads for i in range(3)]
    assert kept_slices(init_value(m, "v.w"), init_value(out.path, "v.w"), 1) == v_cols
    assert kept_slices(init_value(m, "o.w"), init_value(out.path, "o.w"), 0) == v_cols
    if with_bias:
        np.testing.assert_array_equal(
            init_value(out.path, "mha.b"),
            init_value(m, "mha.b")[q_cols + [8 + c for c in q_cols] + [16 + c for c in v_cols]])
        assert init_shapes(out.path)["rel"][1] == 2


def test_multi_head_attention_with_a_kv_cache_freezes_its_heads():
    b = Builder()
    q, k, v = (dense(b, "x", 6, 8, n) for n in "qkv")
    h = b.op("MultiHeadAttention", q, k, v, "", "", "", "past_k", "past_v", domain=MS,
             outputs=["mha_out", "present_k", "present_v"], name="mha", num_heads=4)
    m = contrib_model(b, {"x": [2, 4, 6], "past_k": [2, 4, 3, 2], "past_v": [2, 4, 3, 2]},
                      {dense(b, h[0], 8, 6, "o"): [2, 4, 6], "present_k": [2, 4, 7, 2],
                       "present_v": [2, 4, 7, 2]})
    assert any("MultiHeadAttention node 'mha': a KV cache" in r
               for r in group_of(m, "q.w", 1).frozen)


# --- MatMulNBits --------------------------------------------------------------------------------
def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack the last axis of ``values`` ``8 // bits`` a byte, low bits first (padded)."""
    per = 8 // bits
    pad = -values.shape[-1] % per
    v = np.concatenate([values, np.zeros((*values.shape[:-1], pad), values.dtype)], -1)
    v = v.reshape(*v.shape[:-1], -1, per).astype(np.uint8)
    return np.bitwise_or.reduce(v << (np.arange(per, dtype=np.uint8) * bits), axis=-1)


def nbits(b: Builder, x: str, k: int, n: int, name: str, *, zero_points: str | None = "packed",
          bits: int = 4, block: int = 16, flat: bool = False) -> str:
    """``x @ W`` with ``W [k, n]`` stored as MatMulNBits does: random ``bits``-bit values,
    scales and zero points per row and block of ``k``; ``flat``: 1-D scales (older files)."""
    blocks = -(-k // block)
    q = b.rng.integers(0, 1 << bits, (n, blocks * block))
    q[:, k:] = 0
    ins = [x, b.const(_pack(q.reshape(n, blocks, block), bits), f"{name}.q", np.uint8)]
    scales = b.rng.uniform(0.02, 0.1, (n, blocks)).astype(np.float32)
    ins.append(b.const(scales.reshape(-1) if flat else scales, f"{name}.s"))
    zp = b.rng.integers(0, 1 << bits, (n, blocks))
    if zero_points == "packed":
        ins.append(b.const(_pack(zp, bits), f"{name}.z", np.uint8))
    elif zero_points == "float":
        ins.append(b.const(zp.astype(np.float32), f"{name}.z"))
    return b.op("MatMulNBits", *ins, domain=MS, name=name, K=k, N=n, bits=bits,
                block_size=block)


def _unpacked(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    per = 8 // bits
    shifts = np.arange(per, dtype=np.uint8) * bits
    values = (packed[..., None] >> shifts) & ((1 << bits) - 1)
    return values.reshape(*packed.shape[:-1], -1)[..., :count]


@pytest.mark.parametrize(("zero_points", "bits"), [  # onnxruntime has no 8-bit float-zp kernel
    ("packed", 4), ("float", 4), (None, 4), ("packed", 8), (None, 8)])
def test_matmul_nbits_mlp_prunes_rows_and_whole_blocks(tmp_path, zero_points, bits):
    """up (32 → 64) → Relu → down (64 → 16), blocks of 16: the 64 neurons are 4 channels of
    16 (one block of ``down`` each); half go, the model stays N-bit."""
    b = Builder()
    y = nbits(b, b.op("Relu", nbits(b, "x", 32, 64, "up", zero_points=zero_points,
                                     bits=bits)), 64, 16, "down", zero_points=zero_points,
              bits=bits)
    b.inits["up.s"][:16] *= 0.01  # the least important channel: a kept set that is no prefix
    b.inits["down.s"][:, 0] *= 0.01
    m = contrib_model(b, {"x": [2, 3, 32]}, {y: [2, 3, 16]})
    assert group_sizes(m) == [(4, True), (16, False)]
    assert group_of(m, "up.q", 0).kind is GroupKind.NEURONS
    out = prune_checked(m, tmp_path, ratio=0.5)
    blob = 16 * bits // 8
    shapes = init_shapes(out.path)
    assert shapes["up.q"] == (32, 2, blob) and shapes["down.q"] == (16, 2, blob)
    assert shapes["down.s"] == (16, 2)
    rows = kept_slices(init_value(m, "up.q"), init_value(out.path, "up.q"), 0)
    kept_blocks = sorted({r // 16 for r in rows})
    assert 0 not in kept_blocks
    assert rows == [k * 16 + i for k in kept_blocks for i in range(16)]
    assert kept_slices(init_value(m, "down.q"), init_value(out.path, "down.q"), 1) == kept_blocks
    np.testing.assert_array_equal(init_value(out.path, "down.s"),
                                  init_value(m, "down.s")[:, kept_blocks])
    if zero_points is not None:
        zp = init_value(m, "down.z")
        want = _unpacked(zp, bits, 4) if zero_points == "packed" else zp
        got = init_value(out.path, "down.z")
        got = _unpacked(got, bits, 2) if zero_points == "packed" else got
        np.testing.assert_array_equal(got, want[:, kept_blocks])
    assert {attr(node_named(out.path, n), a) for n, a in (("up", "N"), ("down", "K"))} == {32}
    scales = 64 * 2 + 16 * 4  # a float zero point as many again
    assert out.report.params_before == 64 * 32 + 16 * 64 + scales * (
        2 if zero_points == "float" else 1)
    assert out.report.flops_before == 2 * 3 * (64 * 32 + 16 * 64)
    assert out.report.flops_after == 2 * 3 * (32 * 32 + 16 * 32)


@pytest.mark.parametrize(("kwargs", "why"), [
    ({"flat": True}, "1-D scales or zero points"),
    ({"bits": 4, "block": 16, "k": 24}, "K=24 is not a whole number of blocks of 16"),
], ids=["flat scales", "partial block"])
def test_matmul_nbits_input_columns_freeze_with_a_reason(kwargs, why):
    """Rows of the first layer could still go, but its consumer's columns cannot."""
    k = kwargs.pop("k", 32)
    b = Builder()
    h = b.op("Relu", dense(b, "x", 8, k, "fc"))
    y = nbits(b, h, k, 16, "down", **kwargs)
    m = contrib_model(b, {"x": [2, 3, 8]}, {y: [2, 3, 16]})
    assert any(f"MatMulNBits node 'down': input columns are pruned in whole quantisation "
               f"blocks, but {why}" in r for r in group_of(m, "fc.w", 1).frozen)


# --- GroupQueryAttention ------------------------------------------------------------------------
def _gqa_model(*, rotary: bool = False, past: bool = False, past_reader: bool = False,
               packed: bool = False, **attrs) -> onnx.ModelProto:
    """4 query heads and 2 KV heads of size 16 (onnxruntime's least with rotary) over a sequence
    of 4 (no cache unless ``past``, then a batch of 1 as onnxruntime needs; ``past_reader``:
    another node reads the past key too; ``packed``: one projection ``[Q | K | V]``)."""
    b, n = Builder(), 1 if past else 2
    if packed:
        q, k, v = dense(b, "x", 6, 128, "qkv"), "", ""
    else:
        q, k, v = dense(b, "x", 6, 64, "q"), dense(b, "x", 6, 32, "k"), dense(b, "x", 6, 32, "v")
    ins = [q, k, v, "past_k" if past else "", "past_v" if past else "",
           b.const(np.full(n, 3 + 3 * past, np.int32), "seqlens_k", np.int32),
           b.const(np.array(4 + 3 * past, np.int32), "total_len", np.int32)]
    if rotary:
        angles = np.arange(7)[:, None] * (0.5 ** np.arange(8))[None, :]
        ins += [b.const(np.cos(angles).astype(np.float32), "cos"),
                b.const(np.sin(angles).astype(np.float32), "sin")]
    outs = ["gqa_out", "present_k", "present_v"] if past else ["gqa_out"]
    b.op("GroupQueryAttention", *ins, domain=MS, name="gqa", outputs=outs, num_heads=4,
         kv_num_heads=2, do_rotary=int(rotary), **attrs)
    outputs = {dense(b, "gqa_out", 64, 6, "o"): [n, 4, 6]}
    inputs = {"x": [n, 4, 6]}
    if past:
        inputs.update(past_k=[n, 2, 3, 16], past_v=[n, 2, 3, 16])
        outputs.update(present_k=[n, 2, 7, 16], present_v=[n, 2, 7, 16])
    if past_reader:
        outputs[b.op("Neg", "past_k", name="reader")] = [n, 2, 3, 16]
    return contrib_model(b, inputs, outputs)


@pytest.mark.parametrize("rotary", [False, True], ids=["", "do_rotary"])
def test_group_query_attention_prunes_kv_heads_with_their_query_heads(tmp_path, rotary):
    m = _gqa_model(rotary=rotary)
    heads = group_of(m, "q.w", 1)
    assert heads.kind is GroupKind.HEADS and heads.size == 2 and heads.prunable
    assert {("k.w", 1), ("v.w", 1), ("o.w", 0)} <= {mem.space for mem in heads.members}
    out = prune_checked(m, tmp_path, ratio=0.0, heads_ratio=0.5)
    node = node_named(out.path, "gqa")
    assert (attr(node, "num_heads"), attr(node, "kv_num_heads")) == (2, 1)
    kv = kept_slices(init_value(m, "k.w"), init_value(out.path, "k.w"), 1)
    (kv_head,) = {c // 16 for c in kv}
    q_cols = [kv_head * 32 + i for i in range(32)]  # its two query heads
    assert kept_slices(init_value(m, "q.w"), init_value(out.path, "q.w"), 1) == q_cols
    assert kept_slices(init_value(m, "o.w"), init_value(out.path, "o.w"), 0) == q_cols
    assert kept_slices(init_value(m, "v.w"), init_value(out.path, "v.w"), 1) == kv


def test_group_query_attention_cache_loses_the_pruned_kv_heads(tmp_path):
    """A decoder's past cache (graph input) and present cache (graph output) go with the KV
    heads: both lose the pruned head, the report lists them, and the pruned model, fed the past
    at the kept heads, equals the masked original at the kept heads."""
    m = _gqa_model(past=True)
    heads = group_of(m, "q.w", 1)
    assert {("past_k", 1), ("present_v", 1)} <= {mem.space for mem in heads.members}
    assert heads.prunable
    out = prune_checked(m, tmp_path, ratio=0.0, heads_ratio=0.5)
    assert out.report.signature_changes == [
        "graph input 'past_k' axis 1: 2 -> 1", "graph input 'past_v' axis 1: 2 -> 1",
        "graph output 'present_k' axis 1: 2 -> 1", "graph output 'present_v' axis 1: 2 -> 1"]
    pruned = onnx.load(out.path)
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
              for vi in (*pruned.graph.input, *pruned.graph.output)}
    assert shapes["past_k"] == [1, 1, 3, 16] and shapes["present_v"] == [1, 1, 7, 16]
    assert shapes["x"] == [1, 4, 6]
    kv = kept_slices(init_value(m, "k.w"), init_value(out.path, "k.w"), 1)
    assert kv in (list(range(16)), list(range(16, 32)))  # one whole KV head
    # Not a token decoder (its input is 'x'): the greedy loop says why it did not run.
    assert "neither token inputs nor KV-cache pasts" in out.report.generation["not_run"]


@pytest.mark.parametrize("past", [False, True], ids=["", "past"])
def test_group_query_attention_packed_qkv_prunes_kv_heads(tmp_path, past):
    """Packed ``[Q | K | V]`` (64, 32, 32 columns): KV head j takes the j-th half of the Q
    columns and the j-th 16 of the K and of the V columns."""
    m = _gqa_model(packed=True, rotary=True, past=past)
    heads = group_of(m, "qkv.w", 1)
    assert heads.kind is GroupKind.HEADS and heads.size == 2 and heads.prunable
    out = prune_checked(m, tmp_path, ratio=0.0, heads_ratio=0.5)
    node = node_named(out.path, "gqa")
    assert (attr(node, "num_heads"), attr(node, "kv_num_heads")) == (2, 1)
    j = kept_slices(init_value(m, "o.w"), init_value(out.path, "o.w"), 0)[0] // 32
    cols = [*range(32 * j, 32 * j + 32), *range(64 + 16 * j, 80 + 16 * j),
            *range(96 + 16 * j, 112 + 16 * j)]
    assert kept_slices(init_value(m, "qkv.w"), init_value(out.path, "qkv.w"), 1) == cols


def test_group_query_attention_cache_read_elsewhere_keeps_the_signature():
    """A past cache that another node reads too is no KV-cache pair: it keeps its shape, and
    the heads freeze naming it (not the op)."""
    heads = group_of(_gqa_model(past=True, past_reader=True), "q.w", 1)
    assert "graph input 'past_k' (axis 1) keeps its shape: node 'gqa' pairs 'past_k' and " \
        "'present_k' as a KV cache, but the past 'past_k' is also read by node 'reader'" \
        in heads.frozen


def test_group_query_attention_quantised_cache_freezes_with_the_attribute():
    m = _gqa_model(k_quant_type="PER_TENSOR")
    assert any("GroupQueryAttention node 'gqa': attribute k_quant_type=PER_TENSOR" in r
               for r in group_of(m, "q.w", 1).frozen)


# --- EmbedLayerNormalization --------------------------------------------------------------------
def _embed_model() -> onnx.ModelProto:
    """BERT's fused embeddings (vocabulary 10, 4 positions, 2 segments, width 8) → a head."""
    b = Builder()
    ids = {"input_ids": ([2, 4], onnx.TensorProto.INT32),
           "segment_ids": ([2, 4], onnx.TensorProto.INT32)}
    b.op("EmbedLayerNormalization", "input_ids", "segment_ids", b.weight(10, 8, name="word"),
         b.weight(4, 8, name="position"), b.weight(2, 8, name="segment"),
         b.weight(8, name="gamma"), b.weight(8, name="beta"), domain=MS, name="eln",
         outputs=["eln_out", "mask_index", "eln_sum"], epsilon=1e-12)
    y = dense(b, b.op("Add", "eln_out", "eln_sum"), 8, 4, "head")
    return contrib_model(b, ids, {y: [2, 4, 4]})


def test_embed_layer_norm_freezes_the_stream_naming_its_statistics():
    stream = group_of(_embed_model(), "word", 1)
    assert not stream.prunable
    assert any("EmbedLayerNormalization node 'eln': normalises over axis 2 of 'eln_out'" in r
               for r in stream.frozen), stream.frozen


def test_embed_layer_norm_with_hidden_pruning_slices_tables_and_norm(tmp_path):
    m = _embed_model()
    stream = hidden_group(m)
    assert {("word", 1), ("position", 1), ("segment", 1), ("gamma", 0), ("beta", 0),
            ("head.w", 0)} <= {mem.space for mem in stream.members} and stream.prunable
    out, cols = prune_hidden(m, tmp_path, "word")
    assert len(cols) == 4
    for name in ("position", "segment"):
        np.testing.assert_array_equal(init_value(out, name), init_value(m, name)[:, cols])
    for name in ("gamma", "beta"):
        np.testing.assert_array_equal(init_value(out, name), init_value(m, name)[cols])


# --- RotaryEmbedding ----------------------------------------------------------------------------
@pytest.mark.parametrize("num_heads", [2, 0], ids=["num_heads", "from_cache"])
def test_rotary_embedding_passes_heads_to_attention(tmp_path, num_heads):
    """Q and K rotated (2 heads of 16) before MultiHeadAttention: heads prune through it."""
    b = Builder()
    angles = np.arange(4)[:, None] * (0.5 ** np.arange(8))[None, :]
    cache = [b.const(np.cos(angles).astype(np.float32), "cos"),
             b.const(np.sin(angles).astype(np.float32), "sin")]
    pos = b.const(np.tile(np.arange(4), (2, 1)), "pos")
    q, k = (b.op("RotaryEmbedding", dense(b, "x", 6, 32, n), pos, *cache, domain=MS,
                 name=f"rot_{n}", num_heads=num_heads) for n in "qk")
    h = b.op("MultiHeadAttention", q, k, dense(b, "x", 6, 32, "v"), domain=MS, name="mha",
             num_heads=2)
    m = contrib_model(b, {"x": [2, 4, 6]}, {dense(b, h, 32, 6, "o"): [2, 4, 6]})
    heads = group_of(m, "q.w", 1)
    assert heads.kind is GroupKind.HEADS and heads.size == 2 and heads.prunable
    out = prune_checked(m, tmp_path, ratio=0.0, heads_ratio=0.5)
    assert attr(node_named(out.path, "rot_q"), "num_heads") == num_heads // 2
    cols = kept_slices(init_value(m, "q.w"), init_value(out.path, "q.w"), 1)
    assert len(cols) == 16 and kept_slices(init_value(m, "k.w"), init_value(out.path, "k.w"),
                                           1) == cols


def test_rotary_embedding_4d_passes_heads(tmp_path):
    """``[B, N, S, H]``: the head axis passes through, head_size (mixed pairwise) does not."""
    b = Builder()
    x = b.op("Reshape", dense(b, "x", 6, 32, "q"), b.const([2, 4, 2, 16]))
    x = b.op("Transpose", x, perm=[0, 2, 1, 3])
    angles = np.arange(4)[:, None] * (0.5 ** np.arange(8))[None, :]
    y = b.op("RotaryEmbedding", x, b.const(np.tile(np.arange(4), (2, 1)), "pos"),
             b.const(np.cos(angles).astype(np.float32), "cos"),
             b.const(np.sin(angles).astype(np.float32), "sin"), domain=MS, name="rot")
    y = b.op("Reshape", b.op("Transpose", y, perm=[0, 2, 1, 3]), b.const([2, 4, 32]))
    m = contrib_model(b, {"x": [2, 4, 6]}, {dense(b, y, 32, 6, "o"): [2, 4, 6]})
    g = group_of(m, "q.w", 1)
    assert g.prunable and g.size == 2
    out = prune_checked(m, tmp_path, ratio=0.5)
    cols = kept_slices(init_value(m, "q.w"), init_value(out.path, "q.w"), 1)
    assert len(cols) == 16 and cols in ([*range(16)], [*range(16, 32)])


def test_rotary_embedding_packed_batching_freezes_with_the_attribute():
    b = Builder()
    angles = np.arange(4)[:, None] * (0.5 ** np.arange(8))[None, :]
    y = b.op("RotaryEmbedding", dense(b, "x", 6, 32, "q"), b.const(np.arange(4), "pos"),
             b.const(np.cos(angles).astype(np.float32), "cos"),
             b.const(np.sin(angles).astype(np.float32), "sin"), domain=MS, name="rot",
             num_heads=2, is_packed_batching=1)
    m = contrib_model(b, {"x": [2, 4, 6]}, {dense(b, y, 32, 6, "o"): [2, 4, 6]})
    assert "RotaryEmbedding node 'rot': attribute is_packed_batching=1 is not mapped" in \
        group_of(m, "q.w", 1).frozen


# --- a decoder block as onnxruntime-genai's builder writes it -----------------------------------
def test_int4_decoder_block_prunes_kv_heads_and_mlp(tmp_path):
    """RMSNorm → int4 Q/K/V → GroupQueryAttention (4 query heads, 2 KV heads of 16) → int4 O →
    SkipSimplifiedLayerNormalization → int4 gated MLP (64 neurons) → residual: the KV heads and
    the MLP prune under the oracle, in 16-channel blocks, and the weights stay int4."""
    b = Builder()
    n1 = b.op("SimplifiedLayerNormalization", "x", b.weight(32, name="n1"), name="n1", axis=-1)
    q, k, v = (nbits(b, n1, 32, width, name) for name, width in (("q", 64), ("k", 32),
                                                                   ("v", 32)))
    attn = b.op("GroupQueryAttention", q, k, v, "", "",
                b.const(np.full(1, 3, np.int32), "seqlens_k", np.int32),
                b.const(np.array(4, np.int32), "total_len", np.int32), domain=MS, name="gqa",
                num_heads=4, kv_num_heads=2)
    o = nbits(b, attn, 64, 32, "o")
    n2, _, _, res = b.op("SkipSimplifiedLayerNormalization", o, "x", b.weight(32, name="n2"),
                         domain=MS, name="n2", outputs=["n2_out", "", "", "res"])
    gate, up = nbits(b, n2, 32, 64, "gate"), nbits(b, n2, 32, 64, "up")
    act = b.op("Mul", b.op("Mul", gate, b.op("Sigmoid", gate)), up)
    y = b.op("Add", res, nbits(b, act, 64, 32, "down"))
    m = contrib_model(b, {"x": [1, 4, 32]}, {y: [1, 4, 32]})
    kinds = Counter(g.kind for g in analyze(m).prunable_groups)
    assert kinds == Counter({GroupKind.HEADS: 1, GroupKind.NEURONS: 1})
    out = prune_checked(m, tmp_path, ratio=0.0, heads_ratio=0.5, mlp_ratio=0.5)
    node = node_named(out.path, "gqa")
    assert (attr(node, "num_heads"), attr(node, "kv_num_heads")) == (2, 1)
    shapes = init_shapes(out.path)
    assert shapes["q.q"][0] == 32 and shapes["k.q"][0] == 16 and shapes["o.q"][1] == 2
    assert shapes["gate.q"][0] == shapes["up.q"][0] == 32 and shapes["down.q"][1] == 2
    assert all(init_value(out.path, f"{n}.q").dtype == np.uint8 for n in ("q", "o", "down"))


# --- FLAP bias compensation into fused biases ---------------------------------------------------
@pytest.mark.parametrize("reader", ["SkipLayerNormalization", "BiasGelu"])
def test_flap_compensation_goes_into_a_fused_bias(tmp_path, reader):
    """fc1's neuron 0 is always gelu(2): FLAP removes it first and folds gelu(2)·W2[0] into the
    bias that the op reading fc2 adds (no Add in the graph), so the pruned model equals the
    original."""
    b = Builder(seed=3)
    w1 = b.rng.standard_normal((3, 4)).astype(np.float32)
    w1[:, 0] = 0.0
    b1 = np.array([2.0, 0.5, -0.2, 0.1], np.float32)
    h = b.op("BiasGelu", b.op("MatMul", "x", b.const(w1, "fc1.w"), name="fc1"),
             b.const(b1, "b1"), domain=MS, name="gelu1")
    z = dense(b, h, 4, 4, "fc2")
    if reader == "BiasGelu":
        y = b.op("BiasGelu", z, b.weight(4, name="b2"), domain=MS, name="gelu2")
        inputs = {"x": [1, 3]}
    else:
        y = b.op("SkipLayerNormalization", z, "s", b.weight(4, name="gamma"),
                 b.weight(4, name="beta"), b.weight(4, name="b2"), domain=MS, name="ln")
        inputs = {"x": [1, 3], "s": [1, 4]}
    src = tmp_path / "m.onnx"
    onnx.save(contrib_model(b, inputs, {y: [1, 4]}), str(src))
    calib = tmp_path / "calib.npz"
    np.savez(calib, **{name: b.rng.standard_normal((24, shape[1])).astype(np.float32)
                       for name, shape in inputs.items()})
    opts = PruneOptions(ratio=0.25, criterion="flap", calib=str(calib), allocation="uniform",
                        reconstruct=False)
    report, plan = prune(src, tmp_path / "c.onnx", opts, CheckOptions(latency=False))
    assert plan.groups[0].keep == (1, 2, 3) and report.compensated_layers == 1
    ref, pruned = val.session(src), val.session(tmp_path / "c.onnx")
    for seed in range(3):
        feeds = val.random_inputs(ref, seed=seed)
        np.testing.assert_allclose(val.run(pruned, feeds)[y], val.run(ref, feeds)[y],
                                   rtol=1e-5, atol=1e-5)


def _nbits_mlp(tmp_path: Path):
    """up (32 → 64) → Relu → down (64 → 16), MatMulNBits in blocks of 16, any batch: the model
    and its analysis (of the saved file)."""
    b = Builder()
    y = nbits(b, b.op("Relu", nbits(b, "x", 32, 64, "up")), 64, 16, "down")
    m = contrib_model(b, {"x": ["N", 3, 32]}, {y: ["N", 3, 16]})
    src = tmp_path / "m.onnx"
    onnx.save(m, str(src))
    return m, analyze(src)


def test_matmul_nbits_sensitivity_is_measured_on_masked_copies(tmp_path):
    """onnxruntime packs a MatMulNBits weight with its scales at a session's first run and keeps
    them, so a fed override of the scales does not reach it (every curve measured 0 then): each
    point of a damage curve equals the damage of its own masked copy of the model."""
    from spa.passes import sensitivity
    from spa.passes.importance import get_criterion

    m, analysis = _nbits_mlp(tmp_path)
    scores = get_criterion("l1").run(analysis)
    x = {"x": np.random.default_rng(0).standard_normal((16, 3, 32)).astype(np.float32)}
    found = sensitivity.Sensitivity().run(analysis, m, scores, x)
    reference = sensitivity._outputs(val.session(m), x)
    assert found.curves
    for gid, curve in found.curves.items():
        group = next(g for g in analysis.groups if g.id == gid)
        for removed, damage in zip(curve.removed, curve.damage):
            plan = sensitivity._one_group_plan(analysis, group, scores, removed)
            copy = val.masked_model(m, analysis, plan)
            want = sensitivity._damage(reference, sensitivity._outputs(val.session(copy), x))
            assert want > 1e-4 and damage == pytest.approx(want, rel=1e-5), (gid, removed)


@pytest.mark.parametrize("zero_points", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_nbits_codes_are_what_onnxruntime_computes(zero_points, bits):
    """spa/ir/nbits.py's layout is onnxruntime's: a weight rounded to the codes of given scales
    and zero points, run by a MatMulNBits session, gives ``x @ dequantize(...)``; rounding is
    to the nearest step (within half a step), and rounding the held weight again gives back
    the same codes."""
    from spa.ir import nbits as nb

    rng = np.random.default_rng(bits)
    k, n, block, top = 64, 24, 16, (1 << bits) - 1
    scales = rng.uniform(0.01, 0.2, (n, k // block)).astype(np.float32)
    zp = rng.integers(0, top + 1, (n, k // block))
    step = np.repeat(scales.astype(np.float64), block, axis=1).T  # [K, N]
    centre = np.repeat(zp if zero_points else np.full(zp.shape, 1 << (bits - 1)), block,
                       axis=1).T
    w = (rng.uniform(0, top, (k, n)) - centre) * step  # inside each block's range
    packed_zp = nb.pack(zp.astype(np.uint8), bits) if zero_points else None
    q = nb.requantize(w, scales, packed_zp, bits, block)
    assert q.shape == (n, k // block, block * bits // 8) and q.dtype == np.uint8
    held = nb.dequantize(q, scales, packed_zp, bits, block, k)
    assert np.all(np.abs(held - w) <= step * 0.5 + 1e-9) and np.abs(held - w).max() > 0
    np.testing.assert_array_equal(nb.requantize(held, scales, packed_zp, bits, block), q)
    _assert_kernel_multiplies_by(held, q, scales, packed_zp, bits, block, rng)


def _assert_kernel_multiplies_by(held: np.ndarray, q: np.ndarray, scales: np.ndarray,
                                 zp: np.ndarray | None, bits: int, block: int, rng) -> None:
    """A MatMulNBits of codes ``q``, ``scales`` and packed ``zp``, run by onnxruntime, computes
    ``x @ held`` (``held``: ``[K, N]``)."""
    k, n = held.shape
    inits = [numpy_helper.from_array(q, "q"), numpy_helper.from_array(scales, "s")]
    ins = ["x", "q", "s"]
    if zp is not None:
        inits.append(numpy_helper.from_array(zp, "z"))
        ins.append("z")
    node = helper.make_node("MatMulNBits", ins, ["y"], domain=MS, K=k, N=n, bits=bits,
                            block_size=block)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(
        "x", onnx.TensorProto.FLOAT, [5, k])], [helper.make_tensor_value_info(
            "y", onnx.TensorProto.FLOAT, [5, n])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                helper.make_opsetid(MS, 1)])
    x = rng.standard_normal((5, k)).astype(np.float32)
    got = val.run(val.session(m), {"x": x})["y"]
    np.testing.assert_allclose(got, x.astype(np.float64) @ held, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("zero_points", ["packed", None])
def test_matmul_nbits_layers_are_refitted_and_stay_n_bit(tmp_path, zero_points):
    """Reconstruction refits a MatMulNBits layer in float and rounds the refit to codes on
    scales and zero points fitted to it block by block (kept only where that beats the pruned
    weights on validation rows): held-out error falls, and the written weights, scales and
    zero points are still 4-bit blocks of the pruned shapes, the scales new."""
    b = Builder()
    h = b.op("Relu", nbits(b, "x", 32, 64, "up", zero_points=zero_points))
    y = nbits(b, h, 64, 16, "down", zero_points=zero_points)
    m = contrib_model(b, {"x": ["N", 3, 32]}, {y: ["N", 3, 16]})
    src, calib = tmp_path / "m.onnx", tmp_path / "c.npz"
    onnx.save(m, str(src))
    np.savez(calib, x=np.random.default_rng(1).standard_normal((200, 3, 32)).astype(np.float32))
    out = tmp_path / "o.onnx"
    report, _ = prune(src, out, PruneOptions(ratio=0.5, calib=str(calib),
                                             allocation="uniform"),
                      CheckOptions(latency=False))
    assert report.reconstruction["kept"] and report.reconstruction["refitted"] >= 1
    before, after = report.fidelity["pruned"], report.fidelity["reconstructed"]
    assert after["relative_error"] < 0.9 * before["relative_error"]
    written = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(out)).graph.initializer}
    assert written["down.q"].dtype == np.uint8 and written["down.q"].shape == (16, 2, 8)
    assert written["down.s"].shape == (16, 2) and written["down.s"].dtype == np.float32
    assert ("down.z" in written) == (zero_points is not None)
    pruned_only = tmp_path / "plain.onnx"
    prune(src, pruned_only, PruneOptions(ratio=0.5, calib=str(calib), allocation="uniform",
                                         reconstruct=False), CheckOptions(latency=False))
    plain = {i.name: numpy_helper.to_array(i)
             for i in onnx.load(str(pruned_only)).graph.initializer}
    assert not np.array_equal(written["down.q"], plain["down.q"])
    assert not np.array_equal(written["down.s"], plain["down.s"])
    if zero_points:
        assert written["down.z"].dtype == np.uint8
        assert written["down.z"].shape == plain["down.z"].shape


def test_matmul_nbits_output_shape_when_onnxruntime_finds_none():
    """SPA's own MatMulNBits shape (onnxruntime's symbolic inference stops early on some
    graphs, an int4 MiniLM's pruned file then counted no multiply-adds): A's dims, the last N."""
    from spa.ir.contrib import _OWN_SHAPES

    node = helper.make_node("MatMulNBits", ["a", "w", "s"], ["y"], domain=MS, K=32, N=64,
                            bits=4, block_size=16)
    a = helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, [2, "seq", 32])
    vi = _OWN_SHAPES["MatMulNBits"](node, {"a": a})
    assert vi is not None and vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_value or d.dim_param for d in vi.type.tensor_type.shape.dim] == [2, "seq", 64]
    assert _OWN_SHAPES["MatMulNBits"](node, {}) is None  # A unknown: nothing made up


@pytest.mark.parametrize("zero_points", ["packed", "float", None])
def test_packed_weight_values_are_what_onnxruntime_multiplies(zero_points):
    """What criteria and OBS read of a MatMulNBits' ``B`` (spa/ir/quant.py's weight_values:
    ``[N, k_blocks, block_size]``) is the weight onnxruntime multiplies by, with packed, float
    or implicit zero points; and rounded back to codes on its own scales it is ``B`` again."""
    import onnx_graphsurgeon as gs

    from spa.ir.quant import layer_weight, packed_weight, weight_values

    b = Builder()
    y = nbits(b, "x", 32, 24, "w", zero_points=zero_points)
    m = contrib_model(b, {"x": [5, 32]}, {y: [5, 24]})
    tensors = gs.import_onnx(m).tensors()
    values = weight_values(tensors["w.q"])
    assert values.shape == (24, 2, 16)
    assert layer_weight(tensors["w.s"]) is tensors["w.q"]  # the consumer space's weights
    x = np.random.default_rng(0).standard_normal((5, 32)).astype(np.float32)
    got = val.run(val.session(m), {"x": x})[y]
    np.testing.assert_allclose(got, x.astype(np.float64) @ values.reshape(24, 32).T,
                               rtol=1e-4, atol=1e-5)
    packed = packed_weight(tensors["w.q"])
    assert packed is not None
    np.testing.assert_array_equal(packed.codes(values), init_value(m, "w.q"))


def test_obspa_update_is_written_in_matmul_nbits_codes(tmp_path):
    """OBSPA sees a MatMulNBits' input columns (its Hessian over ``K``; a block of columns is
    one index of the consumer space) and writes its update of the kept blocks as new codes on
    their own scales and zero points: the model stays 4-bit with the same scales, and on
    samples like the calibration data it answers closer to the original than the same cut
    without the update."""
    b = Builder()
    up = b.op("Relu", nbits(b, "x", 32, 64, "up"))
    y = nbits(b, up, 64, 16, "down")
    m = contrib_model(b, {"x": [1, 3, 32]}, {y: [1, 3, 16]})
    src, calib = tmp_path / "m.onnx", tmp_path / "c.npz"
    onnx.save(m, src)
    rng = np.random.default_rng(5)
    mix = rng.standard_normal((32, 32))  # correlated inputs: the update has cross terms to use
    np.savez(calib, x=(rng.standard_normal((64, 3, 32)) @ mix).astype(np.float32))
    x = (rng.standard_normal((32, 1, 3, 32)) @ mix).astype(np.float32)
    outs, error = with_and_without_update(m, src, calib, x)
    assert error[True] < 0.9 * error[False], error
    same, updated = init_value(outs[False], "down.q"), init_value(outs[True], "down.q")
    assert updated.dtype == np.uint8 and updated.shape == same.shape == (16, 2, 8)
    assert not np.array_equal(updated, same)
    for name in ("down.s", "down.z", "up.q"):
        np.testing.assert_array_equal(init_value(outs[True], name), init_value(outs[False], name))


@pytest.mark.parametrize("criterion", ["wanda", "activation", "flap"])
def test_calibrated_criteria_score_matmul_nbits_blocks_by_their_columns(tmp_path, criterion):
    """The calibrated criteria read a MatMulNBits' input columns and its dequantised weights,
    a block's score the sum of its columns': the MLP keeps the blocks that score highest by
    hand (Wanda ``Σ|W[c]|·‖x_c‖``, activation ``E|x_c|``, FLAP ``‖W[c]‖²·Var x_c``), under the
    numeric oracle (FLAP's bias shift off: MatMulNBits has no bias slot to take it)."""
    from spa.ir.nbits import dequantize

    b = Builder()
    hidden = b.op("Relu", nbits(b, "x", 32, 64, "up"))
    y = nbits(b, hidden, 64, 16, "down")
    m = contrib_model(b, {"x": [1, 3, 32]}, {y: [1, 3, 16]})
    rng = np.random.default_rng(2)
    data = rng.standard_normal((64, 3, 32)).astype(np.float32)
    data *= rng.uniform(0.2, 3.0, 32).astype(np.float32)
    calib = tmp_path / "c.npz"
    np.savez(calib, x=data)
    probe = onnx.ModelProto()
    probe.CopyFrom(m)
    probe.graph.output.append(helper.make_tensor_value_info(hidden, onnx.TensorProto.FLOAT,
                                                            None))
    sess = val.session(probe)
    xs = np.concatenate([val.run(sess, {"x": s[None]})[hidden].reshape(-1, 64) for s in data])
    xs = xs.astype(np.float64)
    w = dequantize(init_value(m, "down.q"), init_value(m, "down.s"), init_value(m, "down.z"),
                   4, 16, 64)  # [K, N]
    column = {"wanda": np.abs(w).sum(1) * np.sqrt((xs ** 2).mean(0)),
              "activation": np.abs(xs).mean(0),
              "flap": (w ** 2).sum(1) * xs.var(0)}[criterion]
    want = sorted(np.argsort(-column.reshape(4, 16).sum(1))[:2].tolist())
    out = prune_checked(m, tmp_path, ratio=0.5, criterion=criterion, calib=str(calib),
                        allocation="uniform", reconstruct=False, compensate=False)
    kept = kept_slices(init_value(m, "down.s"), init_value(out.path, "down.s"), 1)
    assert kept == want, (kept, column.reshape(4, 16).sum(1))


def test_matmul_nbits_sensitivity_sees_the_obs_update(tmp_path):
    """The masked copies a MatMulNBits' damage curve is measured on hold the plan's OBS update
    (new codes of ``B``), as the written model will: with correlated inputs every point of the
    down projection's curve is less damaging with the update than without."""
    from spa.choices import HessianSource
    from spa.passes import sensitivity
    from spa.passes.compensation import Compensation
    from spa.passes.importance import get_criterion
    from spa.passes.statistics import LayerStatistics

    m, analysis = _nbits_mlp(tmp_path)
    rng = np.random.default_rng(4)
    x = {"x": (rng.standard_normal((48, 3, 32)) @ rng.standard_normal((32, 32))
               ).astype(np.float32)}
    stats = LayerStatistics(source=HessianSource.CALIBRATION, samples=1, calib=x).run(analysis)
    assert stats.layers[("down.s", 1)].per == 16 and stats.hessian(("down.s", 1)).shape == (64, 64)
    scores = get_criterion("obspa").run(analysis, stats)
    comp = Compensation(damping=0.1)
    curves = {}
    for update in (None, lambda plan: comp.values(analysis, plan, stats)):
        found = sensitivity.Sensitivity(update=update).run(analysis, m, scores, x)
        gid = next(g.id for g in analysis.groups if any(mm.space == ("down.s", 1)
                                                         for mm in g.members))
        curves[update is None] = found.curves[gid]
    plain, updated = curves[True], curves[False]
    assert plain.removed == updated.removed and len(plain.removed) >= 2
    assert all(u < p for u, p in zip(updated.damage, plain.damage)), (updated, plain)


def test_matmul_nbits_bias_add_is_refitted_with_its_layer(tmp_path):
    """A MatMulNBits without a bias input of its own, followed by an ``Add`` of a constant (as
    onnxruntime's quantiser leaves a Linear's bias), is refitted with that bias: the refit
    changes the ``Add``'s constant, and the held-out error falls (without OBSPA's update, which
    on two layers leaves the refit nothing to add)."""
    b = Builder()
    up = b.op("Add", nbits(b, "x", 32, 64, "up"), b.weight(64, name="up.b"))
    y = b.op("Add", nbits(b, b.op("Relu", up), 64, 16, "down"), b.weight(16, name="down.b"))
    m = contrib_model(b, {"x": [1, 3, 32]}, {y: [1, 3, 16]})
    src, calib = tmp_path / "m.onnx", tmp_path / "c.npz"
    onnx.save(m, src)
    rng = np.random.default_rng(8)
    np.savez(calib, x=(rng.standard_normal((128, 3, 32)) + 0.5).astype(np.float32))
    outs, reports = {}, {}
    for reconstruct in (False, True):
        outs[reconstruct] = tmp_path / f"o{reconstruct}.onnx"
        reports[reconstruct] = prune_obspa(src, outs[reconstruct], calib,
                                           reconstruct=reconstruct, compensate=False)
    fit = reports[True].reconstruction
    assert fit["layers"] == 2 and fit["refitted"] >= 1 and fit["kept"]
    fidelity = reports[True].fidelity
    assert fidelity["reconstructed"]["relative_error"] < fidelity["pruned"]["relative_error"]
    assert not np.allclose(init_value(outs[True], "down.b"), init_value(outs[False], "down.b"))


def test_flap_bias_shift_is_written_into_matmul_nbits(tmp_path):
    """FLAP folds the removed blocks' mean contribution into a MatMulNBits' bias: input 5,
    created after empty optional inputs when the node has none (here no zero points either).
    On inputs with a mean, the cut with the shift answers closer to the original than without,
    and the weights stay 4-bit."""
    b = Builder()
    up = b.op("Relu", nbits(b, "x", 32, 64, "up", zero_points=None))
    y = nbits(b, up, 64, 16, "down", zero_points=None)
    m = contrib_model(b, {"x": [1, 3, 32]}, {y: [1, 3, 16]})
    src, calib = tmp_path / "m.onnx", tmp_path / "c.npz"
    onnx.save(m, src)
    rng = np.random.default_rng(9)
    np.savez(calib, x=(rng.standard_normal((64, 3, 32)) + 1.0).astype(np.float32))
    x = (rng.standard_normal((32, 1, 3, 32)) + 1.0).astype(np.float32)
    error = {}
    for compensate in (True, False):
        out = tmp_path / f"o{compensate}.onnx"
        report = prune_obspa(src, out, calib, criterion="flap", compensate=compensate)
        assert report.compensated_layers == int(compensate)
        error[compensate] = output_error(m, out, x)
        down = node_named(out, "down")
        assert (len(down.input) == 6 and down.input[5] != "") == compensate
        assert not compensate or list(down.input[3:5]) == ["", ""]
    assert error[True] < 0.9 * error[False], error


@pytest.mark.parametrize("zero_points", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_nbits_fitted_scales_hold_the_weight_within_half_a_step(zero_points, bits):
    """Scales (and zero points) fitted to a weight block by block, as reconstruction writes a
    MatMulNBits' refit: every value is held within half a step of its block (nothing clips),
    and onnxruntime's kernel multiplies by what dequantize says is held."""
    from spa.ir import nbits as nb

    rng = np.random.default_rng(bits + zero_points)
    k, n, block = 64, 24, 16
    w = rng.standard_normal((k, n)) * rng.uniform(0.1, 2.0, (1, n))
    scales, zp = nb.fitted_scales(w, bits, block, zero_points)
    assert scales.shape == (n, k // block) and (zp is None) == (not zero_points)
    scales = scales.astype(np.float32)
    q = nb.requantize(w, scales, zp, bits, block)
    held = nb.dequantize(q, scales, zp, bits, block, k)
    step = np.repeat(scales.astype(np.float64), block, axis=1).T
    assert np.all(np.abs(held - w) <= step * (0.5 + 1e-6))
    _assert_kernel_multiplies_by(held, q, scales, zp, bits, block, rng)


@pytest.mark.parametrize("low,high", [(-8, 7), (0, 15), (-128, 127)])
@pytest.mark.parametrize("fixed", [None, 0.0, "centre"])
def test_fitted_steps_hold_each_block_within_half_a_step(low, high, fixed):
    """The scales and zero points fitted to blocks for a signed or unsigned code range (a
    blocked QDQ weight's, int4/uint4/int8): fitted, or around a zero point that stays (0, or
    the range's centre). Each value of a block whose range its zero point can reach is held
    within half a step, the codes in range; the scales are the least that do it (some value
    reaches the end of the range on one side)."""
    from spa.ir import nbits as nb

    rng = np.random.default_rng(high - low)
    blocks = rng.standard_normal((5, 3, 32)) * rng.uniform(0.1, 2.0, (5, 3, 1))
    if fixed == 0.0 and low == 0:
        blocks = np.abs(blocks)  # an unsigned range about 0 holds only what is positive
    zero = (low + high + 1) // 2 if fixed == "centre" else fixed
    scales, zp = nb.fitted_steps(blocks, low, high, zero)
    assert scales.shape == zp.shape == (5, 3) and np.all(scales > 0)
    if zero is not None:
        assert np.all(zp == zero)
    assert np.all(zp == np.rint(zp)) and np.all((low <= zp) & (zp <= high))
    codes = np.rint(blocks / scales[..., None] + zp[..., None])
    assert np.all((low <= codes) & (codes <= high))
    held = (codes - zp[..., None]) * scales[..., None]
    assert np.all(np.abs(held - blocks) <= scales[..., None] * (0.5 + 1e-9))
    ends = blocks / scales[..., None] + zp[..., None]
    if zero is None:  # the block's range spans all the codes
        np.testing.assert_allclose(ends.max(-1) - ends.min(-1), high - low)
    else:  # one end reaches the end of the range on its side
        gap = np.minimum(np.abs(ends.max(-1) - high), np.abs(ends.min(-1) - low))
        assert np.all(gap < 1e-9), gap
