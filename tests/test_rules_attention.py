"""Attention under the op rules: multi-head self-attention as exported op by op (head split by
Reshape, scores and context by MatMul of activations), reshape-target and score forms, QK norms,
attention masks, fused QKV projections, rotary embeddings, and head_dim (never pruned on its
own). Grouped-query attention and the fused ``Attention`` op: ``test_rules_attention_gqa.py``.

Hidden 16 = 4 heads × head_dim 4, sequence 5, batch 1. Heads are ranked by damping some of them
(L1 criterion), so each test knows which whole heads survive: blocks of 4 columns of Q/K/V and
the matching 4 rows of the output projection. Every graph is pruned under the masked oracle.
"""

from __future__ import annotations

import numpy as np
import pytest
from attn_graphs import (
    HD,
    RANKING,
    SCALE,
    X3,
    D,
    H,
    S,
    assert_heads_kept,
    damp,
    damp_heads,
    head_columns,
    heads_group,
    kept,
    linear,
    merge_heads,
    mha,
    residual_norm,
    sdpa,
    split_heads,
    weight,
)
from graphs import Builder, group_of, init_shapes, init_value, input_value
from oracle import prune_checked

from spa.api import analyze
from spa.coupling import GroupKind

KEPT_AT = {0.25: [0, 2, 3], 0.5: [0, 3], 0.75: [3]}  # heads kept at each heads_ratio



# --- multi-head self-attention -------------------------------------------------------------
def _mha_model(mask=None, mask_input=None):
    b = Builder()
    y = residual_norm(b, "x", mha(b, "x", mask=mask(b) if mask else None))
    damp_heads(b, RANKING)
    inputs = {**X3, **({"mask": mask_input} if mask_input else {})}
    return b.model(inputs, {y: [1, S, D]})


@pytest.mark.parametrize("heads_ratio", sorted(KEPT_AT))
def test_mha_prunes_whole_heads(tmp_path, heads_ratio):
    m = _mha_model()
    g = heads_group(m)
    spaces = {mem.space for mem in g.members}
    assert {("k.w", 1), ("v.w", 1), ("o.w", 0), ("q.b", 0)} <= spaces
    hidden = group_of(m, "o.w", 1)  # the residual stream: LayerNorm and the graph input
    assert not hidden.prunable and any("'ln'" in r for r in hidden.frozen), hidden.frozen
    out = prune_checked(m, tmp_path, ratio=0.0, heads_ratio=heads_ratio)
    heads = KEPT_AT[heads_ratio]
    assert_heads_kept(m, out.path, heads)
    n = len(heads)
    assert init_shapes(out.path)["o.w"] == (n * HD, D)
    for split in ("split_q", "split_k", "split_v"):
        assert input_value(out.path, split, 1).tolist() == [1, S, n, HD]
    assert input_value(out.path, "merge", 1).tolist() == [1, S, n * HD]
    assert input_value(out.path, "scale_mul", 1) == np.float32(SCALE)  # head_dim unchanged
    assert init_shapes(out.path)["ln.scale"] == (D,)


def test_mha_ratio_zero_is_identity(tmp_path):
    m = _mha_model()
    out = prune_checked(m, tmp_path, ratio=0.0, heads_ratio=0.0)
    assert init_shapes(out.path) == init_shapes(m)


TARGETS = {  # (split target, merge target) before → after keeping 2 heads
    "literal": (([1, S, H, HD], [1, S, D]), ([1, S, 2, HD], [1, S, 2 * HD])),
    "zeros": (([0, 0, H, HD], [0, 0, D]), ([0, 0, 2, HD], [0, 0, 2 * HD])),
    "infer_heads": (([1, S, -1, HD], [1, S, -1]), ([1, S, -1, HD], [1, S, -1])),
    "infer_head_dim": (([1, S, H, -1], [1, -1, D]), ([1, S, 2, -1], [1, -1, 2 * HD])),
    "dynamic_batch": (([-1, S, H, HD], [0, 0, -1]), ([-1, S, 2, HD], [0, 0, -1])),
}


@pytest.mark.parametrize("form", list(TARGETS))
def test_mha_reshape_target_forms(tmp_path, form):
    (split, merge), (split_after, merge_after) = TARGETS[form]
    b = Builder()
    q, k, v = (split_heads(b, linear(b, "x", D, D, n), H, f"split_{n}", target=split)
               for n in "qkv")
    y = linear(b, merge_heads(b, sdpa(b, q, k, v), target=merge), D, D, "o")
    damp_heads(b, RANKING)
    batch = "N" if form == "dynamic_batch" else 1
    m = b.model({"x": [batch, S, D]}, {residual_norm(b, "x", y): [batch, S, D]})
    heads_group(m)
    out = prune_checked(m, tmp_path, ratio=0.0, heads_ratio=0.5)
    assert_heads_kept(m, out.path, [0, 3])
    for n in "qkv":
        assert input_value(out.path, f"split_{n}", 1).tolist() == split_after
    assert input_value(out.path, "merge", 1).tolist() == merge_after


SCORE_FORMS = ["k_perm_0231", "scale_q", "div_scale", "per_head_scale"]


@pytest.mark.parametrize("form", SCORE_FORMS)
def test_mha_score_forms(tmp_path, form):
    """Kᵀ straight from the head split (perm 0,2,3,1), the scale on q, a Div, and a per-head
    temperature ``[H, 1, 1]`` that must be sliced with the heads."""
    b = Builder()
    q, k, v = (linear(b, "x", D, D, n) for n in "qkv")
    q, v = split_heads(b, q, H, "split_q"), split_heads(b, v, H, "split_v")
    if form == "k_perm_0231":
        kt = split_heads(b, k, H, "split_k", perm=(0, 2, 3, 1))
    else:
        kt = b.op("Transpose", split_heads(b, k, H, "split_k"), perm=[0, 1, 3, 2])
    if form == "scale_q":
        q = b.op("Mul", q, b.const(np.float32(SCALE)))
    s = b.op("MatMul", q, kt)
    if form == "div_scale":
        s = b.op("Div", s, b.const(np.float32(1 / SCALE)))
    elif form == "per_head_scale":
        s = b.op("Mul", s, b.const(np.array([0.5, 0.6, 0.7, 0.8], np.float32).reshape(H, 1, 1),
                                   "head_scale"))
    elif form != "scale_q":
        s = b.op("Mul", s, b.const(np.float32(SCALE)))
    ctx = b.op("MatMul", b.op("Softmax", s, axis=-1), v)
    y = residual_norm(b, "x", linear(b, merge_heads(b, ctx), D, D, "o"))
    damp_heads(b, RANKING)
    m = b.model(X3, {y: [1, S, D]})
    heads_group(m)
    out = prune_checked(m, tmp_path, ratio=0.0, heads_ratio=0.5)
    assert_heads_kept(m, out.path, [0, 3])
    assert input_value(out.path, "split_k", 1).tolist() == [1, S, 2, HD]
    if form == "per_head_scale":
        assert init_value(out.path, "head_scale").reshape(-1).tolist() == \
            pytest.approx([0.5, 0.8])


@pytest.mark.parametrize("batch", ["N", 1])
def test_mha_runtime_shape_targets_and_scale(tmp_path, batch):
    """TorchScript style: Reshape targets ``Concat(Shape(x)[0], Shape(x)[1], [4], [4])`` and the
    scale ``1 / Sqrt(Cast(Shape(q)[3]))`` computed at run time. With a dynamic batch the Concat
    stays and its head-count literal is rewritten; with a static one SPA folds it to a constant.
    """
    b = Builder()

    def dim(t: str, i: int) -> str:
        d = b.op("Gather", b.op("Shape", t), b.const(np.int64(i)), axis=0)
        return b.op("Unsqueeze", d, b.const([0]))

    def split(t: str, n: str) -> str:
        target = b.op("Concat", dim(t, 0), dim(t, 1), b.const([H]), b.const([HD]), axis=0,
                      name=f"target_{n}")
        return b.op("Transpose", b.op("Reshape", t, target, name=f"split_{n}"),
                    perm=[0, 2, 1, 3])

    q, k, v = (split(linear(b, "x", D, D, n), n) for n in "qkv")
    hd = b.op("Cast", b.op("Gather", b.op("Shape", q), b.const(np.int64(3)), axis=0), to=1)
    scale = b.op("Div", b.const(np.float32(1.0)), b.op("Sqrt", hd))
    s = b.op("Mul", b.op("MatMul", q, b.op("Transpose", k, perm=[0, 1, 3, 2])), scale)
    t = b.op("Transpose", b.op("MatMul", b.op("Softmax", s, axis=-1), v), perm=[0, 2, 1, 3])
    target = b.op("Concat", dim(t, 0), dim(t, 1), b.const([D]), axis=0, name="target_merge")
    y = linear(b, b.op("Reshape", t, target, name="merge"), D, D, "o")
    damp_heads(b, RANKING)
    m = b.model({"x": [batch, S, D]}, {residual_norm(b, "x", y): [batch, S, D]})
    heads_group(m)
    out = prune_checked(m, tmp_path, ratio=0.0, heads_ratio=0.5)
    assert_heads_kept(m, out.path, [0, 3])
    if batch == "N":
        for n in "qkv":
            assert input_value(out.path, f"target_{n}", 2).tolist() == [2]
            assert input_value(out.path, f"target_{n}", 3).tolist() == [HD]
        assert input_value(out.path, "target_merge", 2).tolist() == [2 * HD]
    else:
        for n in "qkv":
            assert input_value(out.path, f"split_{n}", 1).tolist() == [1, S, 2, HD]
        assert input_value(out.path, "merge", 1).tolist() == [1, S, 2 * HD]


QK_NORMS = {  # (op, opset, where): per-head norms over head_dim (Qwen3, OLMo, ...)
    "rms_before_transpose": ("RMSNormalization", 23, "split"),
    "rms_after_transpose": ("RMSNormalization", 23, "transpose"),
    "layernorm": ("LayerNormalization", 17, "split"),
    "rms_decomposed": ("decomposed", 17, "split"),
}


def _qk_norm(b: Builder, t: str, op: str, name: str, width: int) -> str:
    scale = weight(b, width, name=f"{name}.scale")
    if op == "decomposed":
        ms = b.op("ReduceMean", b.op("Mul", t, t), axes=[-1], keepdims=1, name=f"{name}.mean")
        rms = b.op("Sqrt", b.op("Add", ms, b.const(np.float32(1e-6))))
        return b.op("Mul", b.op("Div", t, rms), scale, name=name)
    extra = [weight(b, width, name=f"{name}.bias")] if op == "LayerNormalization" else []
    return b.op(op, t, scale, *extra, axis=-1, name=name)


def _qk_norm_model(op: str, opset: int, where: str):
    b = Builder()

    def heads(n: str) -> str:
        t = linear(b, "x", D, D, n)
        normed = n != "v"
        if normed and where == "hidden":
            t = _qk_norm(b, t, op, f"{n}_norm", D)
        r = b.op("Reshape", t, b.const([1, S, H, HD]), name=f"split_{n}")
        if normed and where == "split":
            r = _qk_norm(b, r, op, f"{n}_norm", HD)
        r = b.op("Transpose", r, perm=[0, 2, 1, 3])
        return _qk_norm(b, r, op, f"{n}_norm", HD) if normed and where == "transpose" else r

    q, k, v = (heads(n) for n in "qkv")
    y = residual_norm(b, "x", linear(b, merge_heads(b, sdpa(b, q, k, v)), D, D, "o"))
    damp_heads(b, RANKING)
    return b.model(X3, {y: [1, S, D]}, opset=opset)


@pytest.mark.parametrize("case", list(QK_NORMS))
def test_qk_norm_over_head_dim(tmp_path, case):
    """A norm over head_dim inside each head leaves the heads free: its [HD] scale stays."""
    m = _qk_norm_model(*QK_NORMS[case])
    heads_group(m)
    out = prune_checked(m, tmp_path, ratio=0.0, heads_ratio=0.5)
    assert_heads_kept(m, out.path, [0, 3])
    assert init_shapes(out.path)["q_norm.scale"] == init_shapes(out.path)["k_norm.scale"] == (HD,)


def test_qk_norm_over_all_heads_freezes_heads():
    """OLMo-style RMSNorm over the whole q/k projection (all heads at once): its statistics run
    over the heads, so the heads freeze, naming the norms."""
    m = _qk_norm_model("RMSNormalization", 23, "hidden")
    g = group_of(m, "v.w", 1)
    assert g.kind is GroupKind.HEADS and not g.prunable
    assert any("'q_norm'" in r for r in g.frozen) and any("'k_norm'" in r for r in g.frozen)
    assert not group_of(m, "q.w", 1).prunable


@pytest.mark.parametrize("axis", [-1, 3, None])
def test_softmax_opset11_coerces_to_2d(tmp_path, axis):
    """Before opset 13 Softmax normalises over the flattened axes ``axis..-1``; its default axis
    is 1, the head axis: the scores then mix heads and the heads must freeze."""
    b = Builder()
    q, k, v = (split_heads(b, linear(b, "x", D, D, n), H, f"split_{n}") for n in "qkv")
    ctx = sdpa(b, q, k, v, softmax_axis=axis)
    y = b.op("Add", "x", linear(b, merge_heads(b, ctx), D, D, "o"))
    damp_heads(b, RANKING)
    m = b.model(X3, {y: [1, S, D]}, opset=11)
    g = group_of(m, "q.w", 1)
    if axis is None:
        assert not g.prunable and any("'softmax'" in r for r in g.frozen), g.frozen
        return
    assert g.prunable and g.size == H
    out = prune_checked(m, tmp_path, ratio=0.0, heads_ratio=0.5)
    assert_heads_kept(m, out.path, [0, 3])


# --- attention masks -----------------------------------------------------------------------
def _const_mask(shape):
    return lambda b: weight(b, *shape, name="mask", scale=1.0)


@pytest.mark.parametrize("shape", [[1, 1, 1, S], [1, 1, S, S], [S, S]], ids=str)
def test_mha_broadcast_mask_constant(tmp_path, shape):
    m = _mha_model(mask=_const_mask(shape))
    heads_group(m)
    out = prune_checked(m, tmp_path, ratio=0.0, heads_ratio=0.5)
    assert_heads_kept(m, out.path, [0, 3])
    np.testing.assert_array_equal(init_value(out.path, "mask"), init_value(m, "mask"))


@pytest.mark.parametrize("shape", [[1, H, S, S], [H, S, S], [1, H, 1, S]], ids=str)
def test_mha_per_head_mask_constant_is_sliced(tmp_path, shape):
    """Per-head additive masks or biases (ALiBi: ``[1, H, 1, S]``) go with the heads."""
    m = _mha_model(mask=_const_mask(shape))
    axis = len(shape) - 3
    g = heads_group(m)
    assert ("mask", axis) in {mem.space for mem in g.members}
    out = prune_checked(m, tmp_path, ratio=0.0, heads_ratio=0.5)
    assert_heads_kept(m, out.path, [0, 3])
    np.testing.assert_array_equal(init_value(out.path, "mask"),
                                  np.take(init_value(m, "mask"), [0, 3], axis=axis))


def test_mha_broadcast_mask_input(tmp_path):
    m = _mha_model(mask=lambda b: "mask", mask_input=[1, 1, 1, S])
    heads_group(m)
    out = prune_checked(m, tmp_path, ratio=0.0, heads_ratio=0.5)
    assert_heads_kept(m, out.path, [0, 3])


def test_mha_per_head_mask_input_freezes_heads():
    """A graph input keeps its shape: a per-head mask fed from outside freezes the heads."""
    m = _mha_model(mask=lambda b: "mask", mask_input=[1, H, S, S])
    g = group_of(m, "q.w", 1)
    assert g.kind is GroupKind.HEADS and not g.prunable
    assert any("graph input 'mask'" in r for r in g.frozen), g.frozen


# --- fused QKV projection -------------------------------------------------------------------
def _qkv_columns(heads: list[int]) -> list[int]:
    return [c for p in range(3) for c in head_columns(heads, offset=p * D)]


def _fused_qkv_model(style: str):
    b = Builder()
    qkv = linear(b, "x", D, 3 * D, "qkv")
    if style == "split":
        parts = b.op("Split", qkv, b.const([D, D, D]), outputs=3, name="split", axis=-1)
        y = mha(b, "x", qkv=tuple(parts))
    elif style == "split_num_outputs":  # torch.chunk, opset 18
        parts = b.op("Split", qkv, outputs=3, name="split", axis=-1, num_outputs=3)
        y = mha(b, "x", qkv=tuple(parts))
    elif style == "slice":  # nn.MultiheadAttention's in_proj, sliced
        parts = [b.op("Slice", qkv, b.const([i * D]), b.const([(i + 1) * D]), b.const([-1]),
                      name=f"slice{i}") for i in range(3)]
        y = mha(b, "x", qkv=tuple(parts))
    else:  # timm: [1, S, 3, H, HD] → [3, 1, H, S, HD] → unbind by Gather
        r = b.op("Reshape", qkv, b.const([1, S, 3, H, HD]), name="split_qkv")
        t = b.op("Transpose", r, perm=[2, 0, 3, 1, 4])
        q, k, v = (b.op("Gather", t, b.const(np.int64(i)), axis=0, name=f"unbind{i}")
                   for i in range(3))
        y = linear(b, merge_heads(b, sdpa(b, q, k, v)), D, D, "o")
    for h, f in RANKING.items():
        damp(b, "qkv.w", 1, _qkv_columns([h]), f)
        damp(b, "qkv.b", 0, _qkv_columns([h]), f)
        damp(b, "o.w", 0, head_columns([h]), f)
    opset = 18 if style == "split_num_outputs" else 17
    return b.model(X3, {residual_norm(b, "x", y): [1, S, D]}, opset=opset)


@pytest.mark.parametrize("style", ["split", "split_num_outputs", "slice", "timm"])
def test_fused_qkv(tmp_path, style):
    m = _fused_qkv_model(style)
    g = heads_group(m, "qkv.w")
    qkv = next(mem for mem in g.members if mem.space == ("qkv.w", 1))
    assert qkv.indices.tolist() == list(range(3 * D))  # all three parts, one group
    assert qkv.channels.tolist() == [c // HD % H for c in range(3 * D)]
    out = prune_checked(m, tmp_path, ratio=0.0, heads_ratio=0.5)
    assert kept(m, out.path, "qkv.w", 1) == _qkv_columns([0, 3])
    assert kept(m, out.path, "qkv.b", 0) == _qkv_columns([0, 3])
    assert kept(m, out.path, "o.w", 0) == head_columns([0, 3])
    assert input_value(out.path, "merge", 1).tolist() == [1, S, 2 * HD]
    if style.startswith("split"):
        assert input_value(out.path, "split", 1).tolist() == [2 * HD] * 3
        assert input_value(out.path, "split_q", 1).tolist() == [1, S, 2, HD]
    elif style == "slice":
        for i in range(3):
            bounds = [int(input_value(out.path, f"slice{i}", j)[0]) for j in (1, 2)]
            assert bounds == [i * 2 * HD, (i + 1) * 2 * HD]
    else:
        assert input_value(out.path, "split_qkv", 1).tolist() == [1, S, 3, 2, HD]


# --- rotary embedding ----------------------------------------------------------------------
def _rotate_half(b: Builder, t: str, how: str, axis: int = -1) -> str:
    """``Concat(-x2, x1)`` of the two halves of the last axis, cut by Slice or by Split."""
    half = HD // 2
    if how == "split":
        x1, x2 = b.op("Split", t, b.const([half, half]), outputs=2, axis=axis)
    else:
        x1 = b.op("Slice", t, b.const([0]), b.const([half]), b.const([axis]))
        x2 = b.op("Slice", t, b.const([half]), b.const([HD]), b.const([axis]))
    return b.op("Concat", b.op("Neg", x2), x1, axis=axis)


def _cos_sin(b: Builder, shape: tuple[int, ...]) -> tuple[str, str]:
    if "cos" not in b.inits:
        weight(b, *shape, name="cos", scale=1.0)
        weight(b, *shape, name="sin", scale=1.0)
    return "cos", "sin"


def _rope(how: str):
    """``t·cos + rotate_half(t)·sin`` on ``[1, H, S, HD]`` with cos/sin tables ``[S, HD]``;
    ``partial``: only the first half of head_dim rotates (GPT-NeoX rotary_pct = 0.5)."""

    def apply(b: Builder, t: str) -> str:
        if how == "partial":
            rot = b.op("Slice", t, b.const([0]), b.const([HD // 2]), b.const([-1]))
            rest = b.op("Slice", t, b.const([HD // 2]), b.const([HD]), b.const([-1]))
            cos, sin = _cos_sin(b, (S, HD // 2))
            x1 = b.op("Slice", rot, b.const([0]), b.const([HD // 4]), b.const([-1]))
            x2 = b.op("Slice", rot, b.const([HD // 4]), b.const([HD // 2]), b.const([-1]))
            turned = b.op("Concat", b.op("Neg", x2), x1, axis=-1)
            rot = b.op("Add", b.op("Mul", rot, cos), b.op("Mul", turned, sin))
            return b.op("Concat", rot, rest, axis=-1)
        cos, sin = _cos_sin(b, (S, HD))
        return b.op("Add", b.op("Mul", t, cos), b.op("Mul", _rotate_half(b, t, how), sin))

    return apply


@pytest.mark.parametrize("how", ["slice", "split", "partial"])
def test_rotary_rotate_half(tmp_path, how):
    b = Builder()
    y = residual_norm(b, "x", mha(b, "x", rope=_rope(how)))
    damp_heads(b, RANKING)
    m = b.model(X3, {y: [1, S, D]})
    heads_group(m)
    out = prune_checked(m, tmp_path, ratio=0.0, heads_ratio=0.5)
    assert_heads_kept(m, out.path, [0, 3])
    for t in ("cos", "sin"):
        np.testing.assert_array_equal(init_value(out.path, t), init_value(m, t))
    assert input_value(out.path, "split_q", 1).tolist() == [1, S, 2, HD]


def test_rotary_before_head_transpose(tmp_path):
    """Rotary on ``[1, S, H, HD]`` (before the transpose) with cos/sin ``[S, 1, HD]``."""
    b = Builder()

    def heads_then_rope(t: str, n: str) -> str:
        r = b.op("Reshape", t, b.const([1, S, H, HD]), name=f"split_{n}")
        if n != "v":
            cos, sin = _cos_sin(b, (S, 1, HD))
            r = b.op("Add", b.op("Mul", r, cos), b.op("Mul", _rotate_half(b, r, "slice"), sin))
        return b.op("Transpose", r, perm=[0, 2, 1, 3])

    q, k, v = (heads_then_rope(linear(b, "x", D, D, n), n) for n in "qkv")
    y = residual_norm(b, "x", linear(b, merge_heads(b, sdpa(b, q, k, v)), D, D, "o"))
    damp_heads(b, RANKING)
    m = b.model(X3, {y: [1, S, D]})
    heads_group(m)
    out = prune_checked(m, tmp_path, ratio=0.0, heads_ratio=0.5)
    assert_heads_kept(m, out.path, [0, 3])
    assert init_shapes(out.path)["cos"] == (S, 1, HD)

def test_rotary_cache_gathered_by_position_ids(tmp_path):
    """HF Llama: cos/sin caches ``[max_pos, HD]`` gathered by a ``position_ids`` input and
    unsqueezed to ``[1, 1, S, HD]``. The caches look like embedding tables (their head_dim axis
    is frozen by the scores MatMul); the heads still prune and the caches stay whole."""
    b = Builder()
    cos, sin = (b.op("Unsqueeze", b.op("Gather", weight(b, 16, HD, name=f"{n}_cache", scale=1.0),
                                       "position_ids", axis=0), b.const([1]))
                for n in ("cos", "sin"))

    def rope(b: Builder, t: str) -> str:
        return b.op("Add", b.op("Mul", t, cos), b.op("Mul", _rotate_half(b, t, "slice"), sin))

    y = residual_norm(b, "x", mha(b, "x", rope=rope))
    damp_heads(b, RANKING)
    m = b.model({**X3, "position_ids": ([1, S], 7)}, {y: [1, S, D]})  # 7: int64
    heads_group(m)
    out = prune_checked(m, tmp_path, ratio=0.0, heads_ratio=0.5)
    assert_heads_kept(m, out.path, [0, 3])
    for n in ("cos_cache", "sin_cache"):
        np.testing.assert_array_equal(init_value(out.path, n), init_value(m, n))


# --- head_dim is never pruned on its own ---------------------------------------------------
def _prefix_mlp(b: Builder) -> str:
    """A prunable MLP (16 → 8 → 16) in front, so that something can be pruned."""
    h = b.op("Relu", linear(b, "x", D, 8, "fc1"))
    return linear(b, h, 8, D, "fc2")


def test_scores_output_freezes_heads_not_head_dim(tmp_path):
    """Q @ Kᵀ is the graph output: the head axis reaches it (frozen); the contracted head_dim
    axis is never a channel space of its own: Q/K columns are grouped by head, never by
    position within a head."""
    b = Builder()
    x = _prefix_mlp(b)
    q, k = (split_heads(b, linear(b, x, D, D, n), H, f"split_{n}") for n in "qk")
    s = b.op("MatMul", q, b.op("Transpose", k, perm=[0, 1, 3, 2]), name="scores")
    m = b.model(X3, {s: [1, H, S, S]})
    g = group_of(m, "q.w", 1)
    assert g.size == H and not g.prunable
    assert any("graph output" in r for r in g.frozen), g.frozen
    q_member = next(mem for mem in g.members if mem.space == ("q.w", 1))
    assert q_member.channels.tolist() == [c // HD for c in range(D)]  # heads, not c % HD
    assert group_of(m, "k.w", 1).id == g.id
    out = prune_checked(m, tmp_path, ratio=0.5)
    shapes = init_shapes(out.path)
    assert shapes["q.w"] == shapes["k.w"] == (8, D)  # hidden rows prune, head columns do not
    assert shapes["fc1.w"] == (D, 4)
    assert input_value(out.path, "split_q", 1).tolist() == [1, S, H, HD]


def test_heads_merged_away_keeps_head_dim(tmp_path):
    """The context is averaged over heads, and the output projection reads head_dim: heads are
    frozen by the ReduceMean. V's head_dim, averaged over heads and then read by 'o', may go
    jointly in every head with the matching rows of 'o' (the oracle checks it); the head_dim of
    Q and K, contracted in the scores, never goes."""
    b = Builder()
    x = _prefix_mlp(b)
    q, k, v = (split_heads(b, linear(b, x, D, D, n), H, f"split_{n}") for n in "qkv")
    ctx = b.op("ReduceMean", sdpa(b, q, k, v), axes=[1], keepdims=0, name="head_mean")
    y = linear(b, ctx, HD, D, "o")  # [1, S, HD] @ [HD, D]
    m = b.model(X3, {y: [1, S, D]})
    g = group_of(m, "q.w", 1)
    assert g.size == H and not g.prunable
    assert any("'head_mean'" in r for r in g.frozen), g.frozen
    (vd,) = [grp for grp in analyze(m).groups if any(mem.space == ("o.w", 0)
                                                      for mem in grp.members)]
    v_member = next(mem for mem in vd.members if mem.space == ("v.w", 1))
    assert vd.prunable and v_member.channels.tolist() == [c % HD for c in range(D)]
    out = prune_checked(m, tmp_path, ratio=0.5)
    shapes = init_shapes(out.path)
    assert shapes["o.w"] == (HD // 2, D)
    assert shapes["v.w"] == (8, D // 2)
    assert shapes["q.w"] == shapes["k.w"] == (8, D)


def test_single_head_freezes_qk_dims_prunes_value_dims(tmp_path):
    """One head (``[1, S, 1, D]``): Q/K's dims are contracted in the scores, so they freeze
    (naming the scores MatMul); V's dims are not contracted: each reaches one row of the output
    projection and nothing else, so V columns and O rows prune together as plain neurons (exact
    under the oracle). This is the only way value dims prune: with several heads, see above."""
    b = Builder()
    q, k, v = (split_heads(b, linear(b, "x", D, D, n), 1, f"split_{n}", target=[1, S, 1, D])
               for n in "qkv")
    ctx = merge_heads(b, sdpa(b, q, k, v), target=[1, S, D])
    m = b.model(X3, {residual_norm(b, "x", linear(b, ctx, D, D, "o")): [1, S, D]})
    for n in "qk":
        g = group_of(m, f"{n}.w", 1)
        assert not g.prunable and any("'scores'" in r for r in g.frozen), g.frozen
    g = group_of(m, "v.w", 1)
    assert g.kind is GroupKind.NEURONS and g.size == D and g.prunable
    assert ("o.w", 0) in {mem.space for mem in g.consumers}
    out = prune_checked(m, tmp_path, ratio=0.5)
    shapes = init_shapes(out.path)
    assert shapes["q.w"] == shapes["k.w"] == (D, D)
    assert shapes["v.w"] == (D, D // 2)
    assert kept(m, out.path, "v.w", 1) == kept(m, out.path, "o.w", 0)
    assert input_value(out.path, "split_v", 1).tolist() == [1, S, 1, D // 2]
    assert input_value(out.path, "split_q", 1).tolist() == [1, S, 1, D]


def test_heads_inner_in_split_prune_whole_heads(tmp_path):
    b = Builder()

    def split(t: str, n: str) -> str:  # column c = d·H + h
        r = b.op("Reshape", t, b.const([1, S, HD, H]), name=f"split_{n}")
        return b.op("Transpose", r, perm=[0, 3, 1, 2])

    q, k, v = (split(linear(b, "x", D, D, n), n) for n in "qkv")
    t = b.op("Transpose", sdpa(b, q, k, v), perm=[0, 2, 3, 1])
    merged = b.op("Reshape", t, b.const([1, S, D]), name="merge")
    y = residual_norm(b, "x", linear(b, merged, D, D, "o"))
    m = b.model(X3, {y: [1, S, D]})
    v_group = group_of(m, "v.w", 1)
    v_member = next(mem for mem in v_group.members if mem.space == ("v.w", 1))
    assert v_member.channels.tolist() != [c // H for c in range(D)], "head_dim pruned alone"
    g = heads_group(m)
    assert {("k.w", 1), ("v.w", 1), ("o.w", 0)} <= {mem.space for mem in g.members}
    out = prune_checked(m, tmp_path, ratio=0.0, heads_ratio=0.5)
    heads = sorted({c % H for c in kept(m, out.path, "q.w", 1)})
    interleaved = sorted(d * H + h for d in range(HD) for h in heads)
    for n in "qkv":
        assert kept(m, out.path, f"{n}.w", 1) == interleaved
    assert input_value(out.path, "split_v", 1).tolist() == [1, S, HD, 2]
