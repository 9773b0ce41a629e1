"""A GPT-2 after onnxruntime's transformer optimiser prunes heads and MLP under the numeric oracle.

A random-weight two-layer HuggingFace ``GPT2Model`` (hidden 64, 4 heads), in the graph form the
optimiser's GPT-2 attention fusion matches (:mod:`models.legacy_gpt2`; no KV cache), exported at
opset 17, then ``optimize_model(model_type="gpt2")``. The optimiser fuses the causal attention
(``Attention`` with ``unidirectional=1``), the embeddings with the first norm
(``EmbedLayerNormalization``), the residual norms (``SkipLayerNormalization``) and the tanh GELU
(``FastGelu`` with its bias). The same groups prune before and after it: each layer's heads
and MLP neurons; the residual stream stays frozen by its norms.

With a KV cache (``past_<i>`` ``[2, B, N, P, d]`` in, ``present_<i>`` out, as onnxruntime's
GPT-2 tools export it) the fused ``Attention`` reads and writes the cache; a layer's heads
prune with it, and the cache loses those heads on both sides. Layer 0's past is also read by
a ``Shape`` (the past length, for the position ids), which reads no head: it prunes too.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from models.legacy_gpt2 import gpt2_onnx  # noqa: E402
from spa.api import analyze  # noqa: E402
from spa.coupling import GroupKind  # noqa: E402
from tests.oracle import prune_checked, runs_as_onnxruntime  # noqa: E402

HIDDEN, HEADS, LAYERS = 64, 4, 2
FUSED = {"EmbedLayerNormalization": 1, "Attention": LAYERS, "SkipLayerNormalization": 2 * LAYERS,
         "FastGelu": LAYERS}


def _macs(heads: int, mlp: int) -> int:
    """MACs of the model with ``heads`` heads and ``mlp`` MLP neurons a layer, one token: the
    QKV projection, scores and context, output projection, MLP up and down."""
    width = heads * HIDDEN // HEADS
    return LAYERS * (HIDDEN * 3 * width + 2 * width + width * HIDDEN + 2 * HIDDEN * mlp)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from onnxruntime.transformers.optimizer import optimize_model

    d = tmp_path_factory.mktemp("gpt2")
    plain = gpt2_onnx(d / "gpt2.onnx", n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS)
    optimised = optimize_model(str(plain), model_type="gpt2", num_heads=HEADS, hidden_size=HIDDEN)
    optimised.save_model_to_file(str(d / "opt.onnx"))
    cached = gpt2_onnx(d / "past.onnx", n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, past=True)
    optimize_model(str(cached), model_type="gpt2", num_heads=HEADS,
                   hidden_size=HIDDEN).save_model_to_file(str(d / "past_opt.onnx"))
    return {"plain": plain, "optimised": d / "opt.onnx", "cache": d / "past_opt.onnx"}


def test_the_optimiser_fuses_gpt2(models):
    import onnx

    graph = onnx.load(str(models["optimised"])).graph
    fused = Counter(n.op_type for n in graph.node if n.domain == "com.microsoft")
    assert fused == Counter(FUSED)
    assert {a.name: a.i for n in graph.node if n.op_type == "Attention"
            for a in n.attribute} == {"num_heads": HEADS, "unidirectional": 1}


@pytest.mark.parametrize("form", ["plain", "optimised"])
def test_optimised_gpt2_prunes_heads_and_mlp_under_the_oracle(tmp_path, models, form):
    prunable = Counter(g.kind for g in analyze(models[form]).prunable_groups)
    assert prunable == Counter({GroupKind.HEADS: LAYERS, GroupKind.NEURONS: LAYERS})
    # the oracle, and the report's params equal to a count on the files read and written
    out = prune_checked(models[form], tmp_path, heads_ratio=0.5, mlp_ratio=0.5)
    assert sum(len(g.keep) < g.size for g in out.plan.groups) == 2 * LAYERS
    # FLOPs counted by hand on the written model's shapes
    assert (out.report.flops_before, out.report.flops_after) == \
        (_macs(HEADS, 4 * HIDDEN), _macs(HEADS // 2, 2 * HIDDEN))


def test_optimised_gpt2_drops_a_block_under_the_oracle(tmp_path, models):
    """The fused residual norms (``SkipLayerNormalization``) end four blocks; the one dropped
    (the last MLP, by the default score) leaves the plain norm of the stream."""
    out = prune_checked(models["optimised"], tmp_path, ratio=0, drop_blocks=1)
    assert len(out.plan.dropped) == 1
    mlp = 2 * HIDDEN * 4 * HIDDEN
    assert out.report.flops_before - out.report.flops_after == mlp


def test_optimised_gpt2_with_a_kv_cache_prunes_heads_and_the_cache(tmp_path, models):
    """Each layer's heads prune with its cache. Layer 0's cache is also read by the position
    ids' ``Shape``, which reads the past length only (not the heads)."""
    import onnx

    graph = onnx.load(str(models["cache"])).graph
    assert Counter(n.op_type for n in graph.node if n.domain == "com.microsoft") == \
        Counter(FUSED)
    heads = [g for g in analyze(models["cache"]).groups if g.kind is GroupKind.HEADS]
    assert [g.prunable for g in heads] == [True, True]
    out = prune_checked(models["cache"], tmp_path, heads_ratio=0.5, mlp_ratio=0.5,
                        dims={"past": 3})
    assert out.report.signature_changes == [f"graph {side} '{name}_{i}' axis 2: 4 -> 2"
                                            for side, name in (("input", "past"),
                                                               ("output", "present"))
                                            for i in range(LAYERS)]
    pruned = onnx.load(str(out.path)).graph
    assert [a.i for n in pruned.node if n.op_type == "Attention" for a in n.attribute
            if a.name == "num_heads"] == [HEADS // 2] * LAYERS


def test_from_onnx_runs_the_pruned_optimised_gpt2(tmp_path, models):
    """spa recover trains such a model: ``from_onnx`` runs its causal ``Attention``,
    ``EmbedLayerNormalization``, ``SkipLayerNormalization`` and ``FastGelu`` as onnxruntime
    does, dense and pruned."""
    import numpy as np
    import onnxruntime as ort

    out = prune_checked(models["optimised"], tmp_path, heads_ratio=0.5, mlp_ratio=0.5)
    rng = np.random.default_rng(0)
    for model in (models["optimised"], out.path):
        feeds = {}
        for i in ort.InferenceSession(str(model)).get_inputs():
            dtype = np.int32 if "int32" in i.type else np.int64
            feeds[i.name] = (np.ones((2, 7), dtype) if "mask" in i.name
                             else np.tile(np.arange(7, dtype=dtype), (2, 1)) if "position" in i.name
                             else rng.integers(1, 100, (2, 7)).astype(dtype))
        runs_as_onnxruntime(model, feeds)
