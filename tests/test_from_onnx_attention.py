"""``spa.torch.from_onnx`` runs the attention ops of transformer graphs
(spa/torch/attention_ops.py) as onnxruntime does: ONNX's Attention and the contrib Attention
and MultiHeadAttention, with their KV caches, masks and causal offsets. One node at a time,
every output against onnxruntime's CPU kernels.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
from onnx import TensorProto, helper

torch = pytest.importorskip("torch")

from interpreted import ours  # noqa: E402

from spa import validate as val  # noqa: E402

MS = "com.microsoft"
RNG = np.random.default_rng(0)


def _f32(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def _model(op_type: str, names: list[str], feeds: dict[str, np.ndarray], outputs: int = 1,
           consts: dict[str, np.ndarray] | None = None, domain: str = "", opset: int = 23,
           skip: tuple[int, ...] = (), **attrs) -> onnx.ModelProto:
    """One node of inputs ``names`` ("" for an omitted one): ``feeds`` are graph inputs,
    ``consts`` initializers; outputs ``y0, y1, ...`` but for those at ``skip``."""
    vi = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
          for n, v in feeds.items()]
    outs = ["" if i in skip else f"y{i}" for i in range(outputs)]
    node = helper.make_node(op_type, names, outs, domain=domain, **attrs)
    results = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs if o]
    inits = [onnx.numpy_helper.from_array(v, n) for n, v in (consts or {}).items()]
    graph = helper.make_graph([node], "g", vi, results, inits)
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(MS, 1)] if domain else [])
    return helper.make_model(graph, opset_imports=imports)


def _agrees(model: onnx.ModelProto, feeds: dict[str, np.ndarray], tol: float = 1e-5) -> None:
    """Every output equals onnxruntime's, shape and values."""
    want = list(val.run(val.session(model), feeds).values())
    got = ours(model, feeds)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol)


# ---- ONNX Attention with a past --------------------------------------------------------------
Q, K, V = _f32(2, 4, 3, 8), _f32(2, 2, 3, 8), _f32(2, 2, 3, 8)
PK, PV = _f32(2, 2, 5, 8), _f32(2, 2, 5, 8)
K6 = _f32(2, 2, 6, 8)


def _flat(t: np.ndarray) -> np.ndarray:
    return t.transpose(0, 2, 1, 3).reshape(t.shape[0], t.shape[2], -1)


_BOOL = RNG.random((3, 8)) > 0.3
_BOOL[1] = False  # a row that sees no key: a zero row in every output


@pytest.mark.parametrize("mode", [0, 1, 2, 3])
@pytest.mark.parametrize("q, k, mask, attrs", [
    (Q, K, None, {"is_causal": 1}),
    (Q, K6, None, {"is_causal": 1, "softcap": 1.5}),
    (_flat(Q), _flat(K), _BOOL, {"q_num_heads": 4, "kv_num_heads": 2, "is_causal": 1}),
    (Q, K, _f32(1, 4, 3, 8), {"softcap": 2.0, "scale": 0.4}),
], ids=["causal", "cross-causal-softcap", "3D-bool-mask", "float-mask"])
def test_onnx_attention_with_past_matches_onnxruntime(q, k, mask, attrs, mode):
    """Opset 23's Attention with past_key/past_value: present = past ++ new; the causal
    triangle shifts by the past length (key ``j`` seen from query ``i`` iff ``j <= i + P``,
    also when the new keys outnumber the queries); the four qk_matmul_output modes."""
    feeds = {"q": q, "k": k, "v": k, "m": mask, "pk": PK, "pv": PV}
    names = [n if v is not None else "" for n, v in feeds.items()]
    feeds = {n: v for n, v in feeds.items() if v is not None}
    _agrees(_model("Attention", names, feeds, 4, qk_matmul_output_mode=mode, **attrs), feeds)


@pytest.mark.parametrize("opset, attrs", [
    (24, {"is_causal": 1}), (24, {}), (25, {"is_causal": 1, "left_window_size": 1}),
    (25, {"left_window_size": 2, "right_window_size": 1}),
])
def test_onnx_attention_nonpad_and_windows_match_onnxruntime(opset, attrs):
    """Opset 24's nonpad_kv_seqlen (the causal offset is ``nonpad - S`` per row; a row with
    fewer keys than queries sees nothing at first) and opset 25's windows."""
    feeds = {"q": Q, "k": K6, "v": K6, "n": np.array([5, 2], np.int64)}
    names = ["q", "k", "v", "", "", "", "n"]
    _agrees(_model("Attention", names, feeds, 4, opset=opset, skip=(1, 2),
                   qk_matmul_output_mode=3, **attrs), feeds)


def test_onnx_attention_windows_shift_with_a_past():
    """The window sits at the absolute position ``P + i`` of query ``i``."""
    feeds = {"q": Q, "k": K, "v": V, "pk": PK, "pv": PV}
    names = ["q", "k", "v", "", "pk", "pv"]
    _agrees(_model("Attention", names, feeds, 4, opset=25, is_causal=1, left_window_size=3,
                   qk_matmul_output_mode=3), feeds)


@pytest.mark.parametrize("mask", [RNG.random((3, 5)) > 0.2, _f32(3, 5)], ids=["bool", "float"])
def test_onnx_attention_pads_a_short_mask_as_the_spec_says(mask):
    """A mask shorter than past + new keys: the keys past its end are masked out (the spec;
    onnxruntime refuses it, so onnx's reference evaluator is the oracle)."""
    from onnx.reference import ReferenceEvaluator

    feeds = {"q": Q, "k": K, "v": V, "m": mask, "pk": PK, "pv": PV}
    model = _model("Attention", list(feeds), feeds, 4, qk_matmul_output_mode=3)
    for got, want in zip(ours(model, feeds), ReferenceEvaluator(model).run(None, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ---- contrib MultiHeadAttention and Attention with a past ------------------------------------
XQ, XK = _f32(2, 3, 8), _f32(2, 3, 8)
MPK, MPV = _f32(2, 2, 4, 4), _f32(2, 2, 4, 4)
BIAS = _f32(24)
KEYS = (np.arange(7)[None] < np.array([[6], [7]])).astype(np.int32)


@pytest.mark.parametrize("bias, mask, attrs", [
    (False, None, {"unidirectional": 1}),
    (True, KEYS, {"unidirectional": 1, "scale": 0.3}),
    (True, np.array([5, 7], np.int32), {"mask_filter_value": -1000.0}),
])
def test_multi_head_attention_with_past_matches_onnxruntime(bias, mask, attrs):
    """MultiHeadAttention with BNSH past_key/past_value: present = past ++ new, a key mask over
    past and new keys (``mask_filter_value`` added), ``unidirectional`` shifted by the past
    length (those keys excluded: the lowest float in the ``qk`` output)."""
    feeds = {"q": XQ, "k": XK, "v": XK, "m": mask, "pk": MPK, "pv": MPV}
    names = ["q", "k", "v", "b" if bias else "", "m" if mask is not None else "", "", "pk",
             "pv"]
    feeds = {n: v for n, v in feeds.items() if v is not None}
    model = _model("MultiHeadAttention", names, feeds, 4, {"b": BIAS} if bias else {},
                   domain=MS, opset=17, num_heads=2, **attrs)
    _agrees(model, feeds)


@pytest.mark.parametrize("form", ["packed-qkv", "packed-kv", "BNSH-kv"])
def test_multi_head_attention_packed_forms_match_onnxruntime(form):
    """Packed QKV ``[B, S, heads, 3, d]``, packed KV ``[B, L, heads, 2, d]``, 4-D key and
    value: onnxruntime's CPU kernel runs the last only, so the packed ones are checked against
    its result on the same values unpacked."""
    qkv = _f32(2, 5, 2, 3, 4)
    q, k, v = (_flat(qkv[:, :, :, i].transpose(0, 2, 1, 3)) for i in range(3))
    separate = {"q": q, "k": k, "v": v}
    want = val.run(val.session(_model("MultiHeadAttention", list(separate), separate,
                                      domain=MS, opset=17, num_heads=2)), separate)["y0"]
    if form == "packed-qkv":
        feeds = {"q": qkv}
    elif form == "packed-kv":
        feeds = {"q": q, "k": np.ascontiguousarray(qkv[:, :, :, 1:])}
    else:
        feeds = {"q": q, **{n: np.ascontiguousarray(qkv[:, :, :, i].transpose(0, 2, 1, 3))
                            for n, i in (("k", 1), ("v", 2))}}
    model = _model("MultiHeadAttention", list(feeds), feeds, domain=MS, opset=17, num_heads=2)
    if form == "BNSH-kv":
        _agrees(model, feeds)
    np.testing.assert_allclose(ours(model, feeds)[0], want, rtol=1e-5, atol=1e-5)


W, WB = (_f32(8, 24) * 0.3), _f32(24)


@pytest.mark.parametrize("mask, past, attrs", [
    (None, True, {"unidirectional": 1}),
    (KEYS, True, {"unidirectional": 1}),
    (None, False, {"scale": 0.5}),
])
def test_contrib_attention_with_past_matches_onnxruntime(mask, past, attrs):
    """The contrib Attention with ``past`` ``[2, B, heads, P, d]``: present stacks past ++
    new keys and values; ``unidirectional`` shifted by the past length; or, without a past
    (onnxruntime takes one or the other), an attention bias."""
    feeds = {"x": XQ, "m": mask, "past": np.stack([_f32(2, 2, 4, 4), _f32(2, 2, 4, 4)])
             if past else None, "ab": None if past else _f32(1, 2, 3, 3)}
    names = ["x", "w", "b", *(n if v is not None else "" for n, v in list(feeds.items())[1:])]
    feeds = {n: v for n, v in feeds.items() if v is not None}
    _agrees(_model("Attention", names, feeds, 2, {"w": W, "b": WB}, domain=MS, opset=17,
                   num_heads=2, **attrs), feeds)


def test_contrib_attention_refuses_a_shared_buffer():
    from spa.torch.interpreter import UnsupportedOpsError

    feeds = {"x": XQ, "past": np.zeros((2, 2, 2, 6, 4), np.float32)}
    model = _model("Attention", ["x", "w", "b", "", "past"], feeds, 2, {"w": W, "b": WB},
                   domain=MS, opset=17, num_heads=2, past_present_share_buffer=1)
    with pytest.raises(UnsupportedOpsError, match="past_present_share_buffer"):
        ours(model, feeds)
