"""Grouped-query attention and the fused ``Attention`` op (opset 23) under the op rules.

GQA: 4 query heads read 2 key/value heads, repeated by Unsqueeze + Expand + Reshape (HF
``repeat_kv``), by Tile (interleaved or cyclic), Concat or Gather; a KV head and the query heads
that read it are one channel. The fused op: the 4-D form (heads already split) and the 3-D form
with ``q_num_heads``/``kv_num_heads``, with masks and attributes. Hidden 16 = 4 heads ×
head_dim 4, sequence 5, batch 1; every graph is pruned under the masked oracle.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from attn_graphs import (
    HD,
    KV,
    RANKING,
    X3,
    D,
    H,
    S,
    damp,
    damp_heads,
    head_columns,
    heads_group,
    kept,
    linear,
    merge_heads,
    residual_norm,
    sdpa,
    split_heads,
    weight,
)
from graphs import Builder, attr, group_of, init_shapes, init_value, input_value, node_named
from oracle import prune_checked

from spa import validate as val
from spa.api import analyze
from spa.coupling import GroupKind


# --- grouped-query attention ---------------------------------------------------------------
def _repeat_kv(b: Builder, t: str, how: str, name: str) -> str:
    """``[1, KV, S, HD] → [1, H, S, HD]``."""
    if how == "tile_cyclic":  # query head h reads KV head h % KV
        return b.op("Tile", t, b.const([1, H // KV, 1, 1]), name=f"tile_{name}")
    if how == "concat":  # torch.cat([k] * n_rep, dim=1): cyclic too
        return b.op("Concat", *[t] * (H // KV), axis=1, name=f"concat_{name}")
    u = b.op("Unsqueeze", t, b.const([2]))
    if how == "expand":  # HF repeat_kv
        e = b.op("Expand", u, b.const([1, KV, H // KV, S, HD]), name=f"expand_{name}")
    elif how == "expand_ones":
        e = b.op("Expand", u, b.const([1, 1, H // KV, 1, 1]), name=f"expand_{name}")
    else:
        e = b.op("Tile", u, b.const([1, 1, H // KV, 1, 1]), name=f"tile_{name}")
    return b.op("Reshape", e, b.const([1, H, S, HD]), name=f"rep_{name}")


def _gqa_model(how: str, dead_kv: int):
    b = Builder()
    q = split_heads(b, linear(b, "x", D, D, "q"), H, "split_q")
    k, v = (split_heads(b, linear(b, "x", D, KV * HD, n), KV, f"split_{n}") for n in "kv")
    ctx = sdpa(b, q, _repeat_kv(b, k, how, "k"), _repeat_kv(b, v, how, "v"))
    y = linear(b, merge_heads(b, ctx), D, D, "o")
    readers = _readers(how, dead_kv)
    damp_heads(b, dict.fromkeys(readers, 0.01), cols=("q",))
    damp_heads(b, {dead_kv: 0.01}, cols=("k", "v"), rows=())
    return b.model(X3, {residual_norm(b, "x", y): [1, S, D]})


def _kv_of(how: str, h: int) -> int:
    """The KV head that query head ``h`` reads."""
    return h % KV if how in ("tile_cyclic", "concat") else h // (H // KV)


def _readers(how: str, kv: int) -> list[int]:
    """The query heads that read KV head ``kv``."""
    return [h for h in range(H) if _kv_of(how, h) == kv]


@pytest.mark.parametrize("dead_kv", [0, 1])
@pytest.mark.parametrize("how", ["expand", "expand_ones", "tile", "tile_cyclic", "concat"])
def test_gqa_kv_head_goes_with_its_query_heads(tmp_path, how, dead_kv):
    m = _gqa_model(how, dead_kv)
    g = heads_group(m, "q.w", size=KV)
    assert group_of(m, "k.w", 1).id == group_of(m, "v.w", 1).id == g.id
    q = next(mem for mem in g.members if mem.space == ("q.w", 1))
    assert q.channels.tolist() == [_kv_of(how, c // HD) for c in range(D)]
    out = prune_checked(m, tmp_path, ratio=0.0, heads_ratio=0.5)
    live = 1 - dead_kv
    assert kept(m, out.path, "q.w", 1) == head_columns(_readers(how, live))
    assert kept(m, out.path, "o.w", 0) == head_columns(_readers(how, live))
    for n in "kv":
        assert kept(m, out.path, f"{n}.w", 1) == head_columns([live])
        assert input_value(out.path, f"split_{n}", 1).tolist() == [1, S, 1, HD]
    assert input_value(out.path, "split_q", 1).tolist() == [1, S, 2, HD]
    assert input_value(out.path, "merge", 1).tolist() == [1, S, 2 * HD]
    if how == "expand":
        assert input_value(out.path, "expand_k", 1).tolist() == [1, 1, 2, S, HD]
    if how == "expand_ones":
        assert input_value(out.path, "expand_k", 1).tolist() == [1, 1, 2, 1, 1]
    if how == "tile_cyclic":
        assert input_value(out.path, "tile_k", 1).tolist() == [1, 2, 1, 1]
    elif how != "concat":
        assert input_value(out.path, "rep_k", 1).tolist() == [1, 2, S, HD]


def test_gqa_repeat_by_gather_slices_indices(tmp_path):
    """KV heads repeated by ``Gather(k, [0, 0, 1, 1], axis=1)``: the gathered KV axis is not
    pruned (it would change what the indices point at), but the indices go with the query
    heads, so query heads prune and the index constant is sliced with them."""
    b = Builder()
    q = split_heads(b, linear(b, "x", D, D, "q"), H, "split_q")
    k, v = (b.op("Gather", split_heads(b, linear(b, "x", D, KV * HD, n), KV, f"split_{n}"),
                 b.const([0, 0, 1, 1], f"idx_{n}"), axis=1) for n in "kv")
    y = residual_norm(b, "x", linear(b, merge_heads(b, sdpa(b, q, k, v)), D, D, "o"))
    damp_heads(b, RANKING, cols=("q",))
    m = b.model(X3, {y: [1, S, D]})
    g = heads_group(m, "q.w")
    assert {("idx_k", 0), ("idx_v", 0), ("o.w", 0)} <= {mem.space for mem in g.members}
    assert not group_of(m, "k.w", 1).prunable
    out = prune_checked(m, tmp_path, ratio=0.0, heads_ratio=0.5)
    assert kept(m, out.path, "q.w", 1) == kept(m, out.path, "o.w", 0) == head_columns([0, 3])
    assert init_value(out.path, "idx_k").tolist() == init_value(out.path, "idx_v").tolist() \
        == [0, 1]
    assert init_shapes(out.path)["k.w"] == init_shapes(out.path)["v.w"] == (D, KV * HD)


def test_mqa_kv_broadcast_by_matmul(tmp_path):
    """Multi-query attention: one KV head ``[1, 1, S, HD]`` broadcast by the MatMuls. Query
    heads prune; the single KV head's head_dim is contracted or merged away, so it freezes."""
    b = Builder()
    q = split_heads(b, linear(b, "x", D, D, "q"), H, "split_q")
    k, v = (split_heads(b, linear(b, "x", D, HD, n), 1, f"split_{n}") for n in "kv")
    y = residual_norm(b, "x", linear(b, merge_heads(b, sdpa(b, q, k, v)), D, D, "o"))
    damp_heads(b, RANKING, cols=("q",))
    m = b.model(X3, {y: [1, S, D]})
    g = heads_group(m, "q.w")
    assert {mem.space for mem in g.producers} == {("q.w", 1)}
    for n in "kv":
        assert not group_of(m, f"{n}.w", 1).prunable
    out = prune_checked(m, tmp_path, ratio=0.0, heads_ratio=0.5)
    assert kept(m, out.path, "q.w", 1) == kept(m, out.path, "o.w", 0) == head_columns([0, 3])
    assert init_shapes(out.path)["k.w"] == init_shapes(out.path)["v.w"] == (D, HD)
    assert input_value(out.path, "split_k", 1).tolist() == [1, S, 1, HD]


@pytest.mark.parametrize("scalar", [False, True], ids=["list", "scalar"])
def test_mqa_fused_qkv_key_and_value_picked_by_gather(tmp_path, scalar):
    """Falcon-7B as 🤗 Optimum exports it: one projection ``[D, (H + 2)·HD]`` viewed
    ``[1, S, H + 2, HD]``; the query heads are ``Slice(0, -2)``, the key and value heads
    ``Gather([-2])`` and ``Gather([-1])`` (scalars, dropping the axis, in Falcon-40B's layout).
    The query heads prune under the oracle, the key and value heads stay, and the Gathers'
    indices are renumbered among the kept heads."""
    b = Builder()
    fused = b.op("Reshape", linear(b, "x", D, (H + 2) * HD, "qkv"), b.const([1, S, H + 2, HD]),
                 name="split")
    q = b.op("Slice", fused, b.const([0]), b.const([-2]), b.const([2]), name="q_slice")

    def picked(at: int, n: str) -> str:
        g = b.op("Gather", fused, b.const(at if scalar else [at], f"idx_{n}"), axis=2,
                 name=f"pick_{n}")
        return b.op("Unsqueeze", g, b.const([2])) if scalar else g

    k, v = (b.op("Transpose", t, perm=[0, 2, 1, 3])
            for t in (picked(-2, "k"), picked(-1, "v")))
    context = sdpa(b, b.op("Transpose", q, perm=[0, 2, 1, 3]), k, v)
    y = residual_norm(b, "x", linear(b, merge_heads(b, context), D, D, "o"))
    damp_heads(b, RANKING, cols=("qkv",))
    m = b.model(X3, {y: [1, S, D]})
    groups = [g for g in analyze(m).groups if any(mem.space == ("qkv.w", 1) for mem in g.members)]
    assert [(g.kind, g.size) for g in groups if g.prunable] == [(GroupKind.HEADS, H)]
    assert [g.size for g in groups if not g.prunable] == [1, 1]  # the key and the value head
    out = prune_checked(m, tmp_path, ratio=0.0, heads_ratio=0.5)
    assert kept(m, out.path, "qkv.w", 1) == head_columns([0, 3, 4, 5])
    assert kept(m, out.path, "o.w", 0) == head_columns([0, 3])
    assert input_value(out.path, "pick_k", 1).tolist() == (2 if scalar else [2])
    assert input_value(out.path, "pick_v", 1).tolist() == (3 if scalar else [3])


def test_fused_qkv_gqa_split(tmp_path):
    """One [16, 32] projection split [16, 8, 8] into 4 query and 2 KV heads (Phi-3 style)."""
    b = Builder()
    qkv = linear(b, "x", D, D + 2 * KV * HD, "qkv")
    q, k, v = b.op("Split", qkv, b.const([D, KV * HD, KV * HD]), outputs=3, name="split",
                   axis=-1)
    q = split_heads(b, q, H, "split_q")
    k, v = (split_heads(b, t, KV, f"split_{n}") for t, n in ((k, "k"), (v, "v")))
    ctx = sdpa(b, q, _repeat_kv(b, k, "expand", "k"), _repeat_kv(b, v, "expand", "v"))
    y = residual_norm(b, "x", linear(b, merge_heads(b, ctx), D, D, "o"))
    dead = head_columns([2, 3]) + head_columns([1], offset=D) + head_columns([1], offset=D + 8)
    damp(b, "qkv.w", 1, dead, 0.01)
    damp(b, "o.w", 0, head_columns([2, 3]), 0.01)
    m = b.model(X3, {y: [1, S, D]})
    heads_group(m, "qkv.w", size=KV)
    out = prune_checked(m, tmp_path, ratio=0.0, heads_ratio=0.5)
    live = head_columns([0, 1]) + head_columns([0], offset=D) + head_columns([0], offset=D + 8)
    assert kept(m, out.path, "qkv.w", 1) == live
    assert kept(m, out.path, "o.w", 0) == head_columns([0, 1])
    assert input_value(out.path, "split", 1).tolist() == [2 * HD, HD, HD]


# --- the fused Attention op (opset 23) ------------------------------------------------------
def _fused_attention_model(form: str, kv: int, mask_shape=None, **attrs):
    b = Builder()
    q, k, v = (linear(b, "x", D, n * HD, c) for c, n in zip("qkv", (H, kv, kv)))
    mask = [weight(b, *mask_shape, name="mask", scale=1.0)] if mask_shape else []
    if form == "4d":
        q, k, v = (split_heads(b, t, n, f"split_{c}") for t, c, n in zip((q, k, v), "qkv",
                                                                         (H, kv, kv)))
        y = merge_heads(b, b.op("Attention", q, k, v, *mask, name="attn", **attrs))
    else:
        y = b.op("Attention", q, k, v, *mask, name="attn", q_num_heads=H, kv_num_heads=kv,
                 **attrs)
    y = residual_norm(b, "x", linear(b, y, D, D, "o"))
    readers = [h for h in range(H) if h // (H // kv) in (1, 2)]
    damp_heads(b, dict.fromkeys(readers, 0.01), cols=("q",))
    damp_heads(b, dict.fromkeys({1, 2} & set(range(kv)), 0.01), cols=("k", "v"), rows=())
    return b.model(X3, {y: [1, S, D]}, opset=23)


@pytest.mark.parametrize("form", ["4d", "3d"])
@pytest.mark.parametrize("kv", [H, KV], ids=["mha", "gqa"])
def test_fused_attention_op(tmp_path, form, kv):
    m = _fused_attention_model(form, kv)
    heads_group(m, size=kv)
    out = prune_checked(m, tmp_path, ratio=0.0, heads_ratio=0.5)
    q_heads = [0, 3] if kv == H else [0, 1]
    kv_heads = [0, 3] if kv == H else [0]
    assert kept(m, out.path, "q.w", 1) == head_columns(q_heads)
    assert kept(m, out.path, "o.w", 0) == head_columns(q_heads)
    for n in "kv":
        assert kept(m, out.path, f"{n}.w", 1) == head_columns(kv_heads)
    node = node_named(out.path, "attn")
    if form == "3d":
        assert attr(node, "q_num_heads") == len(q_heads)
        assert attr(node, "kv_num_heads") == len(kv_heads)
    else:
        assert input_value(out.path, "split_k", 1).tolist() == [1, S, len(kv_heads), HD]
        assert input_value(out.path, "merge", 1).tolist() == [1, S, len(q_heads) * HD]


@pytest.mark.parametrize("kv", [H, KV], ids=["mha", "gqa"])
@pytest.mark.parametrize("form", ["4d", "3d"])
def test_fused_attention_per_head_mask(tmp_path, form, kv):
    m = _fused_attention_model(form, kv, mask_shape=[1, H, S, S])
    assert ("mask", 1) in {mem.space for mem in heads_group(m, size=kv).members}
    out = prune_checked(m, tmp_path, ratio=0.0, heads_ratio=0.5)
    q_heads = [0, 3] if kv == H else [0, 1]
    assert kept(m, out.path, "q.w", 1) == head_columns(q_heads)
    np.testing.assert_array_equal(init_value(out.path, "mask"),
                                  init_value(m, "mask")[:, q_heads])


@pytest.mark.parametrize("kv", [H, KV], ids=["mha", "gqa"])
@pytest.mark.parametrize("form", ["4d", "3d"])
def test_fused_attention_per_head_mask_3d(tmp_path, form, kv):
    m = _fused_attention_model(form, kv, mask_shape=[H, S, S])
    g = group_of(m, "q.w", 1)
    if g.prunable:  # then the mask must go with the heads
        assert ("mask", 0) in {mem.space for mem in g.members}
    out = prune_checked(m, tmp_path, ratio=0.0, heads_ratio=0.5)
    q_heads = [0, 3] if kv == H else [0, 1]
    np.testing.assert_array_equal(init_value(out.path, "mask"), init_value(m, "mask")[q_heads])


def test_fused_attention_with_present_outputs_fails_closed():
    """KV-cache outputs (present_key/value) are not mapped by the rule: the heads freeze."""
    b = Builder()
    q, k, v = (split_heads(b, linear(b, "x", D, D, n), H, f"split_{n}") for n in "qkv")
    y = b.op("Attention", q, k, v, outputs=["y", "present_key", "present_value"], name="attn")[0]
    y = residual_norm(b, "x", linear(b, merge_heads(b, y), D, D, "o"))
    m = b.model(X3, {y: [1, S, D], "present_key": [1, H, S, HD], "present_value": [1, H, S, HD]},
                opset=23)
    g = group_of(m, "q.w", 1)
    # Nothing maps the head axis past the head split, so the split itself is where it stops.
    assert not g.prunable and any(f"'{n}'" in r for r in g.frozen for n in ("attn", "split_q"))
    assert not any(grp.prunable for grp in analyze(m).groups if grp.producers)


_ORT_MASK_ERROR = "inconsistent q_sequence_length (between attn_mask and Q)"


def _skip_if_onnxruntime_rejects(m) -> None:
    """Skip when onnxruntime cannot run the (valid) original: its CPU Attention kernel (1.31)
    wants ``attn_mask.shape[-2] == q_sequence_length``, so a ``[1, 1, 1, S]`` key-padding mask
    broadcast over the query axis is rejected."""
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    try:
        sess.run(None, val.random_inputs(sess))
    except Exception as exc:  # onnxruntime raises its own Fail type
        if _ORT_MASK_ERROR not in str(exc):
            raise
        pytest.skip(f"onnxruntime {ort.__version__} CPU Attention (opset 23) rejects an "
                    f"attn_mask broadcast over the query axis: {_ORT_MASK_ERROR}")


ATTENTION_EXTRAS = {  # extra inputs/attributes of the fused op, left as they are
    "broadcast_mask": ({"mask_shape": [1, 1, S, S]}, {}),
    "key_padding_mask": ({"mask_shape": [1, 1, 1, S]}, {}),
    "mask_2d": ({"mask_shape": [S, S]}, {}),
    "causal": ({}, {"is_causal": 1}),
    "scale_attr": ({}, {"scale": 0.3}),
}


@pytest.mark.parametrize("extra", list(ATTENTION_EXTRAS))
@pytest.mark.parametrize("form", ["4d", "3d"])
def test_fused_attention_extras(tmp_path, form, extra):
    kwargs, attrs = ATTENTION_EXTRAS[extra]
    m = _fused_attention_model(form, KV, **kwargs, **attrs)
    heads_group(m, size=KV)
    _skip_if_onnxruntime_rejects(m)
    out = prune_checked(m, tmp_path, ratio=0.0, heads_ratio=0.5)
    assert kept(m, out.path, "q.w", 1) == head_columns([0, 1])
    assert kept(m, out.path, "k.w", 1) == head_columns([0])
    node = node_named(out.path, "attn")
    for name, value in attrs.items():
        assert attr(node, name) == pytest.approx(value)
    if "mask_shape" in kwargs:
        np.testing.assert_array_equal(init_value(out.path, "mask"), init_value(m, "mask"))
