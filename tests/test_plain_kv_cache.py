"""A KV cache joined by plain ops: ``present = Concat(past [B, H, P, d], k [B, H, S, d], axis=2)``.

Decoders exported without onnxruntime's attention ops (transformers through torch.onnx,
optimum) append this step's keys and values to the past cache with a Concat along the
positions, and write the result as the ``present`` graph output. The Concat's rule declares
the pair on the head axis (spa/coupling/rules/slicing.py): the heads prune, and the past input
and present output lose the same heads. Anything else keeps the cache's shape, so its heads
freeze: the past also read by another node, the present not a graph output, a Concat along
the heads.
"""

from __future__ import annotations

import onnx
import pytest
from attn_graphs import (
    HD,
    KV,
    D,
    H,
    S,
    head_columns,
    kept,
    linear,
    merge_heads,
    sdpa,
    split_heads,
)
from graphs import Builder, group_of

from tests.oracle import prune_checked

PAST = "past"  # the symbolic number of past positions


def _cached_attention(*, axis: int = 2, reader: str | None = None,
                      present_out: bool | str = True) -> onnx.ModelProto:
    """Self-attention on ``x [1, S, D]`` whose keys and values are appended to ``past_k`` and
    ``past_v`` ``[1, H, past, HD]`` (``axis``: the Concat's; ``reader``: another node that
    reads ``past_k``: ``Neg``, ``Shape`` to read the past length (axis 2), ``Shape*`` to read
    all dims; ``present_out``: the joined caches are graph outputs, ``"Identity"``: through an
    Identity, named ``present_k.out``)."""
    b = Builder()
    q, k, v = (split_heads(b, linear(b, "x", D, D, n), H, f"split_{n}") for n in "qkv")
    k = b.op("Concat", "past_k", k, name="cat_k", outputs=["present_k"], axis=axis)
    v = b.op("Concat", "past_v", v, name="cat_v", outputs=["present_v"], axis=axis)
    y = linear(b, merge_heads(b, sdpa(b, q, k, v)), D, D, "o")
    cache, present = ([1, H, PAST, HD], [1, H, "total", HD]) if axis == 2 else \
        ([1, PAST, S, HD], [1, "total", S, HD])
    inputs = {"x": [1, S, D], "past_k": cache, "past_v": cache}
    outputs = {y: [1, S, D]}
    if present_out == "Identity":
        outputs |= {b.op("Identity", "present_k", outputs=["present_k.out"]): present,
                    b.op("Identity", "present_v", outputs=["present_v.out"]): present}
    elif present_out:
        outputs |= dict.fromkeys(("present_k", "present_v"), present)
    if reader == "Neg":
        outputs[b.op("Neg", "past_k", name="reader")] = cache
    elif reader is not None:
        dims = b.op("Shape", "past_k", name="reader")
        if reader == "Shape":
            dims = b.op("Gather", dims, b.const([2]))
        outputs[dims] = ([1 if reader == "Shape" else 4], onnx.TensorProto.INT64)
    return b.model(inputs, outputs)


@pytest.mark.parametrize(("kwargs", "suffix"), [({}, ""), ({"reader": "Shape"}, ""),
                                               ({"present_out": "Identity"}, ".out")],
                         ids=["", "past-length-read", "present-through-identity"])
def test_plain_concat_cache_loses_the_pruned_heads(tmp_path, kwargs, suffix):
    """The heads prune with the caches; a Shape that reads the past length (as transformers
    does for the position ids) reads no head, and the past still pairs; so does a present
    written out through an Identity."""
    m = _cached_attention(**kwargs)
    heads = group_of(m, "q.w", 1)
    assert heads.prunable
    assert {("past_k", 1), ("past_v", 1), (f"present_k{suffix}", 1),
            (f"present_v{suffix}", 1)} <= {mem.space for mem in heads.members}
    out = prune_checked(m, tmp_path, ratio=0.0, heads_ratio=0.5, dims={PAST: 3})
    assert out.report.signature_changes == [
        "graph input 'past_k' axis 1: 4 -> 2", "graph input 'past_v' axis 1: 4 -> 2",
        f"graph output 'present_k{suffix}' axis 1: 4 -> 2",
        f"graph output 'present_v{suffix}' axis 1: 4 -> 2"]
    kept_heads = [c // HD for c in kept(m, out.path, "q.w", 1)[::HD]]
    for n in "qkv":
        assert kept(m, out.path, f"{n}.w", 1) == head_columns(kept_heads)
    pruned = onnx.load(out.path).graph
    dims = {vi.name: [d.dim_value or d.dim_param for d in vi.type.tensor_type.shape.dim]
            for vi in (*pruned.input, *pruned.output)}
    assert dims["past_k"] == dims["past_v"] == [1, 2, PAST, HD]
    assert dims[f"present_k{suffix}"][:2] == dims[f"present_v{suffix}"][:2] == [1, 2]


@pytest.mark.parametrize(("kwargs", "why"), [
    ({"reader": "Neg"}, "the past 'past_k' is also read by node 'reader'"),
    ({"reader": "Shape*"}, "the past 'past_k' is also read by node 'reader'"),
    ({"present_out": False}, "'present_k' is no graph output"),
    ({"axis": 1}, None),
], ids=["past-read-twice", "heads-read", "present-not-output", "along-heads"])
def test_other_concat_caches_keep_their_shape(kwargs, why):
    """Fail closed: the past key also read by another node (or its head count read as a
    number), the joined cache not a graph output, or a Concat along the heads: no pair, the
    past keeps its shape, the heads freeze."""
    heads = group_of(_cached_attention(**kwargs), "k.w", 1)
    assert not heads.prunable
    if "axis" in kwargs:  # the joined heads' offsets past the cache are unknown
        assert heads.frozen == ("Reshape node 'split_k': splits axis 2 of 'k.add_out0' into axes "
                                "[2, 3]: the channels follow one factor, and only one that leads "
                                "on to a layer mapping it",)
    else:
        assert "graph input 'past_k' (axis 1) keeps its shape: node 'cat_k' pairs 'past_k' " \
            f"and 'present_k' as a KV cache, but {why}" in heads.frozen


def _repeat_kv(b: Builder, t: str, where: bool) -> str:
    """transformers' ``repeat_kv``: ``[B, KV, T, d] → [B, KV, H/KV, T, d] → [B, H, T, d]``, the
    targets built from ``t``'s own run-time shape; ``where``: the Expand target as TorchScript
    writes ``expand``, ``Where(Equal(s, -1), 1, Reshape(s, [-1]))``."""
    shape = b.op("Shape", t)
    n, total = (b.op("Gather", shape, b.const([a])) for a in (0, 2))
    target = b.op("Concat", n, b.const([KV, H // KV]), total, b.const([HD]), axis=0)
    if where:
        target = b.op("Reshape", target, b.const([-1]))
        target = b.op("Where", b.op("Equal", target, b.const([-1] * 5)), b.const([1] * 5),
                      target)
    wide = b.op("Expand", b.op("Unsqueeze", t, b.const([2])), target)
    return b.op("Reshape", wide, b.op("Concat", n, b.const([H]), total, b.const([HD]), axis=0))


@pytest.mark.parametrize("where", [False, True], ids=["", "torchscript-expand"])
def test_grouped_query_cache_loses_the_pruned_kv_heads(tmp_path, where):
    """Grouped-query attention: KV heads cached, then repeated to the query heads. A KV head
    prunes with its query heads and its cache entries."""
    b = Builder()
    q = split_heads(b, linear(b, "x", D, D, "q"), H, "split_q")
    k, v = (split_heads(b, linear(b, "x", D, KV * HD, n), KV, f"split_{n}") for n in "kv")
    k = b.op("Concat", "past_k", k, name="cat_k", outputs=["present_k"], axis=2)
    v = b.op("Concat", "past_v", v, name="cat_v", outputs=["present_v"], axis=2)
    k, v = (_repeat_kv(b, t, where) for t in (k, v))
    y = linear(b, merge_heads(b, sdpa(b, q, k, v)), D, D, "o")
    m = b.model({"x": [1, S, D], "past_k": [1, KV, PAST, HD], "past_v": [1, KV, PAST, HD]},
                {y: [1, S, D], "present_k": [1, KV, "total", HD],
                 "present_v": [1, KV, "total", HD]})
    heads = group_of(m, "k.w", 1)
    assert heads.prunable and heads.size == KV
    assert {("q.w", 1), ("past_k", 1), ("present_v", 1)} <= {mem.space for mem in heads.members}
    out = prune_checked(m, tmp_path, ratio=0.0, heads_ratio=0.5, dims={PAST: 3})
    assert out.report.signature_changes == [
        "graph input 'past_k' axis 1: 2 -> 1", "graph input 'past_v' axis 1: 2 -> 1",
        "graph output 'present_k' axis 1: 2 -> 1", "graph output 'present_v' axis 1: 2 -> 1"]
    kv = kept(m, out.path, "k.w", 1)
    assert kv in (head_columns([0]), head_columns([1]))
    assert kept(m, out.path, "q.w", 1) == head_columns([2 * (kv[0] // HD), 2 * (kv[0] // HD) + 1])
