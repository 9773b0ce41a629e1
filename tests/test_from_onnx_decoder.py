"""``spa.torch.from_onnx`` runs the ops of LLM decoder graphs (spa/torch/decoder_ops.py) as
onnxruntime does: rotary embeddings, GroupQueryAttention on a first prompt and on decode steps
(SwiGLU, which onnxruntime cannot run, against onnx's reference evaluator); gradients reach
the weights that feed every attention op; a tiny Llama built by onnxruntime-genai's builder
runs end to end.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
from onnx import TensorProto, helper

torch = pytest.importorskip("torch")

from interpreted import ours  # noqa: E402
from test_from_onnx_attention import MS, RNG, _agrees, _f32, _model  # noqa: E402

import spa.torch as st  # noqa: E402
from spa import validate as val  # noqa: E402
from spa.torch.interpreter import UnsupportedOpsError  # noqa: E402

# ---- rotary embeddings -----------------------------------------------------------------------
B, H, S, D, MAX = 2, 3, 4, 8, 12
X4 = _f32(B, H, S, D)
X3 = X4.transpose(0, 2, 1, 3).reshape(B, S, H * D)
POS = RNG.integers(0, MAX, (B, S)).astype(np.int64)


def _caches(rotary: int) -> tuple[np.ndarray, np.ndarray]:
    angles = np.arange(MAX)[:, None] * 0.3 ** np.arange(rotary // 2)[None]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


@pytest.mark.parametrize("x", [X4, X3], ids=["BNSH", "BSD"])
@pytest.mark.parametrize("interleaved", [0, 1])
@pytest.mark.parametrize("rotary", [0, 4], ids=["full", "partial"])
def test_onnx_rotary_embedding_matches_onnxruntime(x, interleaved, rotary):
    """ONNX's RotaryEmbedding (opset 23): caches gathered at the position ids, or already per
    position without them; halves or interleaved pairs; partial rotary."""
    cos, sin = _caches(rotary or D)
    attrs = {"interleaved": interleaved, "rotary_embedding_dim": rotary,
             **({"num_heads": H} if x.ndim == 3 else {})}
    feeds = {"x": x, "cos": cos, "sin": sin, "pos": POS}
    _agrees(_model("RotaryEmbedding", list(feeds), feeds, **attrs), feeds)
    per_position = {"x": x, "cos": cos[POS], "sin": sin[POS]}
    _agrees(_model("RotaryEmbedding", list(per_position), per_position, **attrs), per_position)


@pytest.mark.parametrize("x, pos, attrs", [
    (X4, POS, {"interleaved": 1}),
    (X3, np.array([3], np.int64), {"num_heads": H, "scale": 0.5}),
    (X3, POS, {"num_heads": H, "rotary_embedding_dim": 4, "interleaved": 1}),
    (X4, np.array([2], np.int64), {"num_heads": H, "rotary_embedding_dim": 4}),
    (X3, POS, {}),
], ids=["BNSH", "offset-scale", "partial-3D", "partial-offset", "3D-no-heads"])
def test_contrib_rotary_embedding_matches_onnxruntime(x, pos, attrs):
    """onnxruntime's RotaryEmbedding: position ids ``[B, S]`` or an offset ``[1]``; ``scale``
    is ignored, as onnxruntime ignores it; without ``num_heads`` heads are full rotary."""
    cos, sin = _caches(attrs.get("rotary_embedding_dim") or D)
    feeds = {"x": x, "pos": pos, "cos": cos, "sin": sin}
    _agrees(_model("RotaryEmbedding", list(feeds), feeds, domain=MS, **attrs), feeds)


def test_contrib_rotary_embedding_refuses_packed_batching():
    cos, sin = _caches(D)
    feeds = {"x": X3, "pos": POS, "cos": cos, "sin": sin}
    model = _model("RotaryEmbedding", list(feeds), feeds, domain=MS, is_packed_batching=1)
    with pytest.raises(UnsupportedOpsError, match="is_packed_batching"):
        ours(model, feeds)


# ---- GroupQueryAttention ---------------------------------------------------------------------
HQ, HKV, HD = 4, 2, 32


def _gqa_feeds(past: int, s: int, totals: list[int], packed: bool = False,
               rotary: int = 0) -> tuple[list[str], dict[str, np.ndarray]]:
    """Inputs of a GroupQueryAttention node over a cache of ``past`` rows (0: empty) taking
    ``s`` new tokens, ``totals[b]`` tokens in row ``b`` after the step."""
    n = len(totals)
    q, k, v = _f32(n, s, HQ * HD), _f32(n, s, HKV * HD), _f32(n, s, HKV * HD)
    feeds = {"q": np.concatenate([q, k, v], -1)} if packed else {"q": q, "k": k, "v": v}
    feeds |= {"pk": _f32(n, HKV, past, HD), "pv": _f32(n, HKV, past, HD),
              "sl": np.array(totals, np.int32) - 1, "t": np.array(max(totals), np.int32)}
    if rotary:
        feeds["cos"], feeds["sin"] = _caches(rotary)
    names = list(feeds)
    return (names[:1] + ["", ""] + names[1:] if packed else names), feeds


@pytest.mark.parametrize("past, s, totals", [(0, 5, [5, 5]), (5, 1, [6, 6]), (5, 1, [6, 4]),
                                             (4, 3, [7])],
                         ids=["prompt", "decode", "ragged-decode", "chunk"])
@pytest.mark.parametrize("packed, rotary, attrs", [
    (False, 0, {}),
    (True, HD, {"do_rotary": 1}),
    (False, HD // 2, {"do_rotary": 1, "rotary_interleaved": 1}),
    (False, 0, {"local_window_size": 2, "softcap": 2.0, "scale": 0.3}),
    (True, 0, {"smooth_softmax": 1}),
    (False, 0, {"causal": 0}),
], ids=["plain", "packed-rotary", "partial-interleaved-rotary", "window-softcap-scale",
        "smooth", "non-causal"])
def test_group_query_attention_matches_onnxruntime(past, s, totals, packed, rotary, attrs):
    """onnxruntime's GroupQueryAttention as onnxruntime-genai runs it: a first prompt over an
    empty cache, decode steps (rows of different lengths too) and a prompt chunk over a past;
    the output and both present caches."""
    names, feeds = _gqa_feeds(past, s, totals, packed, rotary)
    _agrees(_model("GroupQueryAttention", names, feeds, 3, domain=MS, opset=17, num_heads=HQ,
                   kv_num_heads=HKV, **attrs), feeds)


@pytest.mark.parametrize("step, extra", [
    ((5, 1, [6, 4]), {"ab": _f32(2, 1, 1, 6)}),
    ((5, 1, [6, 4]), {"sink": _f32(HQ)}),
    ((5, 1, [6, 4]), {"pos": np.array([[2], [7]], np.int64)}),
    ((4, 3, [7]), {"pos": np.array([[9, 2, 6]], np.int64)}),
    ((0, 5, [5, 5]), {"pos": np.array([[3, 9, 1, 0, 5], [0, 1, 2, 3, 4]], np.int64)}),
    ((8, 1, [6, 4]), {}),
], ids=["bias", "sink", "decode-positions", "chunk-positions", "prompt-positions",
        "long-past"])
def test_group_query_attention_extra_inputs_match_onnxruntime(step, extra):
    """An attention bias, a sink logit per head, position ids for the rotation (on a first
    prompt onnxruntime reads only the first), a past buffer longer than the sequence (the
    present keeps its length)."""
    names, feeds = _gqa_feeds(*step, rotary=HD)
    slot = {"pos": 9, "ab": 10, "sink": 11}
    for name, value in extra.items():
        names += [""] * (slot[name] - len(names)) + [name]
        feeds[name] = value
    _agrees(_model("GroupQueryAttention", names, feeds, 3, domain=MS, opset=17, num_heads=HQ,
                   kv_num_heads=HKV, softcap=3.0, do_rotary=1), feeds)


@pytest.mark.parametrize("attrs, what", [({"qk_output": 1}, "qk_output"),
                                         ({"k_quant_type": "PER_TENSOR"}, "k_quant_type")])
def test_group_query_attention_refuses_by_name(attrs, what):
    names, feeds = _gqa_feeds(0, 2, [2, 2])
    model = _model("GroupQueryAttention", names, feeds, 3, domain=MS, opset=17,
                   num_heads=HQ, kv_num_heads=HKV, **attrs)
    with pytest.raises(UnsupportedOpsError, match=what):
        ours(model, feeds)


def test_swiglu_matches_the_reference_evaluator():
    """ONNX's SwiGLU (opset 28), which onnxruntime cannot run: ``A · sigmoid(alpha · A) · B``."""
    from onnx.reference import ReferenceEvaluator

    feeds = {"a": _f32(2, 3, 4), "b": _f32(2, 3, 4)}
    model = _model("SwiGLU", list(feeds), feeds, opset=28, alpha=1.5)
    want = ReferenceEvaluator(model).run(None, feeds)[0]
    np.testing.assert_allclose(ours(model, feeds)[0], want, rtol=1e-6, atol=1e-6)

# ---- gradients -------------------------------------------------------------------------------
Case = tuple[onnx.ModelProto, dict[str, np.ndarray]]


def _projected(model: onnx.ModelProto, feeds: dict[str, np.ndarray], width: int,
               *between: onnx.NodeProto) -> Case:
    """``model`` (one node) with its first input made ``MatMul(x, w)``, ``w [8, width]`` a
    weight, passed through the nodes ``between`` (reading ``xw``, the last writing ``xr``);
    its feeds, ``x`` for the first."""
    graph = model.graph
    first = graph.input[0]
    x = _f32(*feeds.pop(first.name).shape[:-1], 8)
    first.CopyFrom(helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape))
    graph.initializer.append(onnx.numpy_helper.from_array(_f32(8, width) * 0.3, "w"))
    node = graph.node[0]
    node.input[0] = "xr" if between else "xw"
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"]), *between, node]
    del graph.node[:]
    graph.node.extend(nodes)
    return model, {"x": x, **feeds}


def _gradient_case(which: str) -> Case:
    """A projection of the queries feeding, through a rotary node, each attention family."""
    cos, sin = _caches(HD)
    if which == "gqa":
        names, feeds = _gqa_feeds(5, 1, [6, 4], packed=True, rotary=HD)
        return _projected(_model("GroupQueryAttention", names, feeds, 3, domain=MS, opset=17,
                                 num_heads=HQ, kv_num_heads=HKV, do_rotary=1), feeds,
                          (HQ + 2 * HKV) * HD)
    heads, kv_heads = (HQ, HKV) if which == "onnx" else (2, 2)
    feeds = {"q": _f32(2, 3, heads * HD), "k": _f32(2, 3, kv_heads * HD),
             "v": _f32(2, 3, kv_heads * HD), "pk": _f32(2, kv_heads, 4, HD),
             "pv": _f32(2, kv_heads, 4, HD), "cos": cos, "sin": sin}
    if which == "onnx":
        feeds["pos"] = np.array([[4, 5, 6]] * 2, np.int64)
        model = _model("Attention", ["q", "k", "v", "", "pk", "pv"], feeds, 3, is_causal=1,
                       q_num_heads=heads, kv_num_heads=kv_heads)
        rotary = helper.make_node("RotaryEmbedding", ["xw", "cos", "sin", "pos"], ["xr"],
                                  num_heads=heads)
    else:
        feeds["pos"] = np.array([4], np.int64)
        model = _model("MultiHeadAttention", ["q", "k", "v", "", "", "", "pk", "pv"], feeds,
                       3, domain=MS, opset=17, num_heads=heads, unidirectional=1)
        rotary = helper.make_node("RotaryEmbedding", ["xw", "pos", "cos", "sin"], ["xr"],
                                  domain=MS, num_heads=heads)
    return _projected(model, feeds, heads * HD, rotary)


@pytest.mark.parametrize("which", ["onnx", "mha", "gqa"])
def test_gradients_reach_the_projection_weight(which):
    """A weight projecting the queries of each attention family gets finite, non-zero
    gradients from the output and the present caches; the module still agrees with
    onnxruntime."""
    model, feeds = _gradient_case(which)
    _agrees(model, feeds)
    module = st.from_onnx(model)
    outs = module(*[torch.from_numpy(feeds[n]) for n in module.input_names])
    sum(o.square().sum() for o in outs).backward()
    grad = module.onnx_tensors()["w"].grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0

# ---- end to end: onnxruntime-genai's builder -------------------------------------------------
@pytest.mark.slow
def test_genai_llama_matches_onnxruntime(tmp_path):
    """A random tiny Llama (2 layers, 4 heads over 2 KV heads) through onnxruntime-genai's
    builder at fp32 (GroupQueryAttention with rotary inside, SkipSimplifiedLayerNormalization):
    the module equals onnxruntime on a prompt over empty caches and on the decode step that
    follows, logits and every present cache."""
    pytest.importorskip("onnxruntime_genai")
    pytest.importorskip("transformers")
    from models import genai_llm

    hf = genai_llm.make_hf(tmp_path, "Llama", 2, vocab=100)
    path = genai_llm.build_folder(hf, tmp_path / "out", precision="fp32") / "model.onnx"
    proto = onnx.load(str(path))
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"} <= {
        n.op_type for n in proto.graph.node}
    module, session = st.from_onnx(proto), val.session(str(path))
    sizes = genai_llm.SMALL
    empty = np.zeros((1, sizes["num_key_value_heads"], 0,
                      sizes["hidden_size"] // sizes["num_attention_heads"]), np.float32)
    ids = np.array([[5, 17, 42, 8, 99, 3]], np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)} | {
        i.name: empty for i in proto.graph.input if i.name.startswith("past_key_values")}
    for _ in range(2):  # the prompt, then one decode step over its caches
        want = val.run(session, feeds)
        with torch.no_grad():
            got = module(*[torch.from_numpy(feeds[n]) for n in module.input_names])
        for name, value in zip(module.output_names, got):
            np.testing.assert_allclose(value.numpy(), want[name], rtol=1e-4, atol=1e-5)
        length = feeds["attention_mask"].shape[1] + 1
        feeds = {"input_ids": want["logits"][:, -1:].argmax(-1).astype(np.int64),
                 "attention_mask": np.ones((1, length), np.int64)} | {
            n.replace("present", "past_key_values"): v for n, v in want.items()
            if n.startswith("present")}
