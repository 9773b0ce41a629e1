"""Transformer MLPs and the residual stream under the op rules: the gated (Llama) MLP, Gelu and
Erf-Gelu MLPs, weights stored transposed (``MatMul(x, Transpose(Wᵀ))``, ``Gemm`` with
``transB=1``), and the normalisations of the residual stream (LayerNormalization,
RMSNormalization, a decomposed RMSNorm) that freeze the hidden size while heads and MLP prune.

Hidden 16, MLP width 32, 4 heads × head_dim 4, sequence 5, batch 1; every graph is pruned under
the masked oracle, and the surviving rows/columns are read back from the pruned file.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from attn_graphs import (
    HD,
    X3,
    D,
    H,
    S,
    damp,
    damp_heads,
    head_columns,
    kept,
    kept_2d,
    linear,
    merge_heads,
    mha,
    sdpa,
    split_heads,
    weight,
)
from graphs import Builder, group_of, init_shapes, init_value, input_value, node_named
from oracle import prune_checked

from spa.coupling import GroupKind

F = 32  # MLP width
EVEN = list(range(0, F, 2))  # damped neurons: the odd ones survive at mlp_ratio 0.5
ODD = list(range(1, F, 2))


def _neurons_group(m, tensor: str, size: int = F):
    g = group_of(m, tensor, 1)
    assert g.kind is GroupKind.NEURONS and g.size == size and g.prunable, (g.kind, g.size,
                                                                            g.frozen)
    return g


# --- gated and Gelu MLPs ------------------------------------------------------------------
def gated_mlp(b: Builder, x: str) -> str:
    """Llama: ``down(silu(gate(x)) * up(x))``, silu as ``x * Sigmoid(x)``, no biases."""
    gate = linear(b, x, D, F, "gate", bias=False)
    up = linear(b, x, D, F, "up", bias=False)
    act = b.op("Mul", gate, b.op("Sigmoid", gate))
    return linear(b, b.op("Mul", act, up), F, D, "down", bias=False)


def _erf_gelu(b: Builder, h: str) -> str:
    erf = b.op("Erf", b.op("Div", h, b.const(np.float32(math.sqrt(2.0)))))
    return b.op("Mul", b.op("Mul", h, b.op("Add", erf, b.const(np.float32(1.0)))),
                b.const(np.float32(0.5)))


def plain_mlp(b: Builder, x: str, act: str) -> str:
    h = linear(b, x, D, F, "fc1")
    if act == "erf":
        h = _erf_gelu(b, h)
    elif act == "gelu_tanh":
        h = b.op("Gelu", h, approximate="tanh")
    else:
        h = b.op(act, h)
    return linear(b, h, F, D, "fc2")


def test_gated_mlp_gate_and_up_couple(tmp_path):
    b = Builder()
    y = b.op("Add", "x", gated_mlp(b, "x"))
    for n, axis in (("gate.w", 1), ("up.w", 1), ("down.w", 0)):
        damp(b, n, axis, EVEN, 0.01)
    m = b.model(X3, {y: [1, S, D]})
    g = _neurons_group(m, "gate.w")
    assert [mem.space for mem in g.producers] == [("gate.w", 1), ("up.w", 1)]
    assert [mem.space for mem in g.consumers] == [("down.w", 0)]
    out = prune_checked(m, tmp_path, ratio=0.0, mlp_ratio=0.5)
    shapes = init_shapes(out.path)
    assert shapes["gate.w"] == shapes["up.w"] == (D, F // 2) and shapes["down.w"] == (F // 2, D)
    assert kept(m, out.path, "gate.w", 1) == kept(m, out.path, "up.w", 1) == ODD
    assert kept(m, out.path, "down.w", 0) == ODD


@pytest.mark.parametrize("act, opset", [("Gelu", 20), ("gelu_tanh", 20), ("erf", 17),
                                        ("Relu", 17)])
def test_plain_mlp(tmp_path, act, opset):
    b = Builder()
    y = b.op("Add", "x", plain_mlp(b, "x", act))
    for n, axis in (("fc1.w", 1), ("fc1.b", 0), ("fc2.w", 0)):
        damp(b, n, axis, EVEN, 0.01)
    m = b.model(X3, {y: [1, S, D]}, opset=opset)
    g = _neurons_group(m, "fc1.w")
    assert ("fc1.b", 0) in {mem.space for mem in g.members}
    out = prune_checked(m, tmp_path, ratio=0.0, mlp_ratio=0.5)
    assert kept(m, out.path, "fc1.w", 1) == kept(m, out.path, "fc1.b", 0) == ODD
    assert kept(m, out.path, "fc2.w", 0) == ODD
    assert init_shapes(out.path)["fc2.b"] == (D,)


def _fused_gate_up_model(cut: str):
    """Phi-3: one ``gate_up [16, 64]`` projection cut in two; gate column i and up column
    32 + i are one neuron."""
    b = Builder()
    gu = linear(b, "x", D, 2 * F, "gate_up", bias=False)
    if cut == "split":
        gate, up = b.op("Split", gu, b.const([F, F]), outputs=2, name="cut", axis=-1)
    else:
        gate, up = (b.op("Slice", gu, b.const([i * F]), b.const([(i + 1) * F]), b.const([-1]),
                         name=f"cut{i}") for i in range(2))
    h = b.op("Mul", b.op("Mul", gate, b.op("Sigmoid", gate)), up)
    y = b.op("Add", "x", linear(b, h, F, D, "down", bias=False))
    damp(b, "gate_up.w", 1, EVEN + [F + i for i in EVEN], 0.01)
    damp(b, "down.w", 0, EVEN, 0.01)
    return b.model(X3, {y: [1, S, D]})


@pytest.mark.parametrize("cut", ["split", "slice"])
def test_fused_gate_up(tmp_path, cut):
    m = _fused_gate_up_model(cut)
    g = group_of(m, "gate_up.w", 1)
    assert g.size == F and g.prunable
    member = next(mem for mem in g.members if mem.space == ("gate_up.w", 1))
    assert member.channels.tolist() == list(range(F)) * 2
    out = prune_checked(m, tmp_path, ratio=0.5)
    assert kept(m, out.path, "gate_up.w", 1) == ODD + [F + i for i in ODD]
    assert kept(m, out.path, "down.w", 0) == ODD
    if cut == "split":
        assert input_value(out.path, "cut", 1).tolist() == [F // 2, F // 2]
    else:
        assert int(input_value(out.path, "cut1", 1)[0]) == F // 2
        assert int(input_value(out.path, "cut1", 2)[0]) == F


def test_fused_gate_up_is_an_mlp_group(tmp_path):
    m = _fused_gate_up_model("split")
    _neurons_group(m, "gate_up.w")
    out = prune_checked(m, tmp_path, ratio=0.0, mlp_ratio=0.5)
    assert kept(m, out.path, "gate_up.w", 1) == ODD + [F + i for i in ODD]


def test_round_to_rounds_neurons_not_heads(tmp_path):
    """``round_to=8``: an MLP keeping 32 - floor(0.3·32) = 23 neurons keeps 24; heads are whole
    units already and keep 4 - floor(0.3·4) = 3."""
    b = Builder()
    h = b.op("Add", "x", mha(b, "x"))
    y = b.op("Add", h, plain_mlp(b, h, "Relu"))
    m = b.model(X3, {y: [1, S, D]})
    out = prune_checked(m, tmp_path, ratio=0.3, round_to=8)
    shapes = init_shapes(out.path)
    assert shapes["fc1.w"] == (D, 24) and shapes["q.w"] == (D, 3 * HD)


# --- weights stored transposed --------------------------------------------------------------
def _weight_of(path, node: str) -> np.ndarray:
    """The weight a MatMul/Gemm reads (input 1) in the pruned file."""
    return input_value(path, node, 1)


def test_matmul_through_transposed_weight(tmp_path):
    """``x @ Transpose(Wᵀ)`` (TF, some PyTorch exports): the weight is stored ``[out, in]``."""
    b = Builder()
    w1 = weight(b, F, D, name="fc1.wt")
    w2 = weight(b, D, F, name="fc2.wt")
    damp(b, "fc1.wt", 0, EVEN, 0.01)
    damp(b, "fc2.wt", 1, EVEN, 0.01)
    h = b.op("Relu", b.op("MatMul", "x", b.op("Transpose", w1, perm=[1, 0]), name="fc1"))
    y = b.op("Add", "x", b.op("MatMul", h, b.op("Transpose", w2, perm=[1, 0]), name="fc2"))
    m = b.model(X3, {y: [1, S, D]})
    out = prune_checked(m, tmp_path, ratio=0.0, mlp_ratio=0.5)
    w1_new, w2_new = _weight_of(out.path, "fc1"), _weight_of(out.path, "fc2")
    assert w1_new.shape == (D, F // 2) and w2_new.shape == (F // 2, D)
    np.testing.assert_array_equal(w1_new, init_value(m, "fc1.wt").T[:, ODD])
    np.testing.assert_array_equal(w2_new, init_value(m, "fc2.wt").T[ODD])


def _gemm(b: Builder, x: str, n_in: int, n_out: int, name: str) -> str:
    """``Gemm(x, W [n_out, n_in], b, transB=1)`` (torch.nn.Linear on 2-D input)."""
    return b.op("Gemm", x, weight(b, n_out, n_in, name=f"{name}.w"),
                weight(b, n_out, name=f"{name}.b"), name=name, transB=1)


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_attention_and_mlp_with_gemm_trans_b(tmp_path, allocation):
    """x [S, D] (no batch axis): Gemm projections with transB=1 feed a head split, and a Gemm
    MLP; heads and neurons prune by rows of the ``[out, in]`` weights. The global ranking reads
    the family ratios too (it once read ``ratio`` alone, and pruned nothing at 0)."""
    b = Builder()
    q, k, v = (split_heads(b, _gemm(b, "x", D, D, n), H, f"split_{n}") for n in "qkv")
    ctx = merge_heads(b, sdpa(b, q, k, v))  # [1, S, D]
    a = _gemm(b, b.op("Reshape", ctx, b.const([S, D]), name="flat"), D, D, "o")
    h = b.op("Add", "x", a)
    y = b.op("Add", h, _gemm(b, b.op("Relu", _gemm(b, h, D, F, "fc1")), F, D, "fc2"))
    damp_heads(b, {1: 0.01, 2: 0.01}, cols=(), rows=("q", "k", "v"))
    for n in "qkv":
        damp(b, f"{n}.b", 0, head_columns([1, 2]), 0.01)
    damp(b, "o.w", 1, head_columns([1, 2]), 0.01)
    damp(b, "fc1.w", 0, EVEN, 0.01)
    damp(b, "fc1.b", 0, EVEN, 0.01)
    damp(b, "fc2.w", 1, EVEN, 0.01)
    m = b.model({"x": [S, D]}, {y: [S, D]})
    heads = group_of(m, "q.w", 0)
    assert heads.kind is GroupKind.HEADS and heads.size == H and heads.prunable
    g = group_of(m, "fc1.w", 0)
    assert g.kind is GroupKind.NEURONS and g.size == F and g.prunable
    out = prune_checked(m, tmp_path, ratio=0.0, heads_ratio=0.5, mlp_ratio=0.5,
                        allocation=allocation)
    for n in "qkv":
        assert kept(m, out.path, f"{n}.w", 0) == head_columns([0, 3])
        assert kept(m, out.path, f"{n}.b", 0) == head_columns([0, 3])
    assert kept(m, out.path, "o.w", 1) == head_columns([0, 3])
    assert kept(m, out.path, "fc1.w", 0) == kept(m, out.path, "fc1.b", 0) == ODD
    assert kept(m, out.path, "fc2.w", 1) == ODD
    assert input_value(out.path, "flat", 1).tolist() == [S, 2 * HD]
    assert input_value(out.path, "merge", 1).tolist() == [1, S, 2 * HD]


# --- normalisations on the residual stream ---------------------------------------------
def _mean_last(b: Builder, x: str, name: str, opset: int) -> str:
    if opset >= 18:
        return b.op("ReduceMean", x, b.const([-1]), keepdims=1, name=name)
    return b.op("ReduceMean", x, axes=[-1], keepdims=1, name=name)


def _rms_decomposed(b: Builder, x: str, name: str, opset: int) -> str:
    """``x / sqrt(mean(x², -1) + eps) * w``: Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul, Mul."""
    ms = _mean_last(b, b.op("Pow", x, b.const(np.float32(2.0))), f"{name}.mean", opset)
    r = b.op("Reciprocal", b.op("Sqrt", b.op("Add", ms, b.const(np.float32(1e-6)))))
    return b.op("Mul", b.op("Mul", x, r), weight(b, D, name=f"{name}.scale"), name=name)


def _ln_decomposed(b: Builder, x: str, name: str, opset: int) -> str:
    """LayerNorm as exported below opset 17: ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div,
    Mul, Add."""
    c = b.op("Sub", x, _mean_last(b, x, f"{name}.mean", opset))
    var = _mean_last(b, b.op("Pow", c, b.const(np.float32(2.0))), f"{name}.var", opset)
    n = b.op("Div", c, b.op("Sqrt", b.op("Add", var, b.const(np.float32(1e-5)))))
    return b.op("Add", b.op("Mul", n, weight(b, D, name=f"{name}.scale")),
                weight(b, D, name=f"{name}.bias"), name=name)


def _norm(b: Builder, x: str, kind: str, name: str, opset: int) -> str:
    if kind == "none":
        return x
    if kind.startswith("rms_decomposed"):
        return _rms_decomposed(b, x, name, opset)
    if kind == "ln_decomposed":
        return _ln_decomposed(b, x, name, opset)
    params = [weight(b, D, name=f"{name}.scale")]
    if kind == "LayerNormalization":
        params.append(weight(b, D, name=f"{name}.bias"))
    return b.op(kind, x, *params, name=name, axis=-1)


def _block_model(norm: str, opset: int):
    """Pre-norm decoder block between an input and an output projection (so that only the norms
    can freeze the hidden size): ``e = x @ E; h = e + attn(n1(e)); y = h + mlp(n2(h));
    out = nf(y) @ W``."""
    b = Builder()
    e = linear(b, "x", 8, D, "embed", bias=False)
    h = b.op("Add", e, mha(b, _norm(b, e, norm, "n1", opset)))
    y = b.op("Add", h, gated_mlp(b, _norm(b, h, norm, "n2", opset)))
    out = linear(b, _norm(b, y, norm, "nf", opset), D, 8, "head", bias=False)
    damp_heads(b, {1: 0.01, 2: 0.01})
    for n, axis in (("gate.w", 1), ("up.w", 1), ("down.w", 0)):
        damp(b, n, axis, EVEN, 0.01)
    return b.model({"x": [1, S, 8]}, {out: [1, S, 8]}, opset=opset)


NORMS = {  # norm kind → (opset, node whose reason freezes the hidden size)
    "LayerNormalization": (17, "n1"),
    "RMSNormalization": (23, "n1"),
    "rms_decomposed": (17, "n1.mean"),
    "rms_decomposed_opset18": (18, "n1.mean"),
    "ln_decomposed": (13, "n1.mean"),
}


@pytest.mark.parametrize("norm", list(NORMS))
def test_residual_norm_freezes_hidden_heads_and_mlp_prune(tmp_path, norm):
    opset, node = NORMS[norm]
    m = _block_model(norm, opset)
    hidden = group_of(m, "embed.w", 1)
    assert not hidden.prunable
    assert any(f"'{node}'" in r for r in hidden.frozen), hidden.frozen
    assert not any("graph" in r for r in hidden.frozen), hidden.frozen  # the norm, nothing else
    heads = group_of(m, "q.w", 1)
    assert heads.kind is GroupKind.HEADS and heads.size == H and heads.prunable
    _neurons_group(m, "gate.w")
    out = prune_checked(m, tmp_path, ratio=0.0, heads_ratio=0.5, mlp_ratio=0.5)
    shapes = init_shapes(out.path)
    assert shapes["embed.w"] == (8, D) and shapes["n1.scale"] == (D,)
    for n in "qkv":
        assert kept(m, out.path, f"{n}.w", 1) == head_columns([0, 3])
    assert kept(m, out.path, "o.w", 0) == head_columns([0, 3])
    assert kept(m, out.path, "gate.w", 1) == kept(m, out.path, "up.w", 1) == ODD
    assert kept(m, out.path, "down.w", 0) == ODD
    if norm == "RMSNormalization":
        assert node_named(out.path, "n1").op_type == "RMSNormalization"


def test_residual_stream_without_norm_prunes_hidden(tmp_path):
    """Control: with no norm the hidden size is one prunable group across the residual adds."""
    m = _block_model("none", 17)
    hidden = group_of(m, "embed.w", 1)
    assert hidden.prunable and hidden.size == D
    producers = {mem.space for mem in hidden.producers}
    assert producers == {("embed.w", 1), ("o.w", 1), ("down.w", 1)}
    consumers = {mem.space for mem in hidden.consumers}
    assert consumers == {(n, 0) for n in ("q.w", "k.w", "v.w", "gate.w", "up.w", "head.w")}
    out = prune_checked(m, tmp_path, ratio=0.5, heads_ratio=0.5, mlp_ratio=0.5)
    rows = kept(m, out.path, "embed.w", 1)
    assert len(rows) == D // 2
    for n in ("q.w", "k.w", "v.w", "gate.w", "up.w", "head.w"):
        assert kept_2d(m, out.path, n)[0] == rows, n
    assert kept_2d(m, out.path, "o.w") == (head_columns([0, 3]), rows)
    assert kept_2d(m, out.path, "down.w") == (ODD, rows)
    assert kept_2d(m, out.path, "q.w")[1] == head_columns([0, 3])


def test_two_post_norm_layers_have_separate_groups(tmp_path):
    """BERT: two post-norm layers. Each layer has its own head group and MLP group; the
    residual streams between the LayerNorms are frozen, each naming its norms."""
    b = Builder()

    def layer(x: str, p: str) -> str:
        q, k, v = (split_heads(b, linear(b, x, D, D, f"{p}{n}"), H, f"{p}split_{n}")
                   for n in "qkv")
        ctx = sdpa(b, q, k, v, prefix=p)
        a = linear(b, merge_heads(b, ctx, name=f"{p}merge"), D, D, f"{p}o")
        h = b.op("LayerNormalization", b.op("Add", x, a), weight(b, D, name=f"{p}ln1.scale"),
                 weight(b, D, name=f"{p}ln1.bias"), axis=-1, name=f"{p}ln1")
        f = linear(b, b.op("Gelu", linear(b, h, D, F, f"{p}fc1")), F, D, f"{p}fc2")
        return b.op("LayerNormalization", b.op("Add", h, f), weight(b, D, name=f"{p}ln2.scale"),
                    weight(b, D, name=f"{p}ln2.bias"), axis=-1, name=f"{p}ln2")

    y = layer(layer("x", "l0."), "l1.")
    for p in ("l0.", "l1."):
        damp_heads(b, {1: 0.01, 2: 0.01}, cols=(f"{p}q", f"{p}k", f"{p}v"), rows=(f"{p}o",))
        for n, axis in ((f"{p}fc1.w", 1), (f"{p}fc1.b", 0), (f"{p}fc2.w", 0)):
            damp(b, n, axis, EVEN, 0.01)
    m = b.model(X3, {y: [1, S, D]}, opset=20)
    heads = [group_of(m, f"{p}q.w", 1) for p in ("l0.", "l1.")]
    assert heads[0].id != heads[1].id
    assert all(g.kind is GroupKind.HEADS and g.size == H and g.prunable for g in heads)
    assert group_of(m, "l0.fc1.w", 1).id != group_of(m, "l1.fc1.w", 1).id
    between = group_of(m, "l0.fc2.w", 1)  # ln1 → ln2 of layer 0
    assert any("'l0.ln1'" in r for r in between.frozen)
    assert any("'l0.ln2'" in r for r in between.frozen)
    out = prune_checked(m, tmp_path, ratio=0.0, heads_ratio=0.5, mlp_ratio=0.5)
    for p in ("l0.", "l1."):
        for n in "qkv":
            assert kept(m, out.path, f"{p}{n}.w", 1) == head_columns([0, 3])
        assert kept(m, out.path, f"{p}o.w", 0) == head_columns([0, 3])
        assert kept(m, out.path, f"{p}fc1.w", 1) == kept(m, out.path, f"{p}fc2.w", 0) == ODD
        assert input_value(out.path, f"{p}merge", 1).tolist() == [1, S, 2 * HD]
