"""Depth pruning of onnxruntime-genai int4 folders (issue #16's measured target).

4-layer Llama and Qwen2 with GQA (hidden 64, 4 query heads, 2 KV heads, random weights), built
by onnxruntime-genai's builder as int4: each layer's attention and MLP end in a fused residual
norm (``SkipSimplifiedLayerNormalization``), their last layers are ``MatMulNBits``. Pruning the
MLP, the KV heads and a quarter of the 8 blocks keeps the masked oracle and the greedy tokens
of the masked original; the KV caches of the dropped attention blocks leave the signature, the
others are renumbered, and onnxruntime-genai's ``Generator`` runs the output folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
og = pytest.importorskip("onnxruntime_genai")

import onnx  # noqa: E402
from test_genai_folder import _generate, _spa_tokens, build_folder, make_hf  # noqa: E402

from spa.api import CheckOptions, PruneOptions, analyze, apply, dry_run, prune  # noqa: E402
from spa.passes.blocks import find_blocks, kv_pairs  # noqa: E402
from spa.passes.depth import with_depth  # noqa: E402
from spa.plan import DroppedBlock  # noqa: E402

LAYERS = 4
EXACT = 1e-5


@pytest.fixture(scope="module", params=["Llama", "Qwen2"])
def folder(request, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp(request.param)
    return build_folder(make_hf(d, request.param, LAYERS), d / "int4")


def _layer(name: str) -> str:
    """``layers.1/post_attention_layernorm`` of a builder's node name."""
    return "/".join(name.split("/")[2:4])


def test_blocks_are_the_fused_norms_of_each_layer(folder: Path) -> None:
    analysis = analyze(folder)
    blocks = find_blocks(analysis.model.graph, kv_pairs(analysis))
    assert [_layer(b.add) for b in blocks.candidates] == [
        name for i in range(LAYERS) for name in (
            f"layers.{i}/post_attention_layernorm",  # attention i
            f"layers.{i + 1}/input_layernorm" if i + 1 < LAYERS  # MLP i
            else f"layers.{i + 1}/final_norm_layernorm")]
    assert blocks.refused == {}
    attn, mlp = blocks.candidates[2:4]  # layer 1
    assert attn.zero == ("model.layers.1.attn.o_proj.MatMul.weight_scales",)
    assert attn.caches == (("past_key_values.1.key", "present.1.key"),
                           ("past_key_values.1.value", "present.1.value"))
    assert mlp.zero == ("model.layers.1.mlp.down_proj.MatMul.weight_scales",) and not mlp.caches


def test_mlp_kv_heads_and_a_quarter_of_the_blocks(folder: Path, tmp_path: Path) -> None:
    """The measured scores choose: zeroing an attention block of these random models damages the
    final outputs 0.02-0.04 (relative squared error), an MLP block under 1e-4, so the quarter of
    the blocks that goes is the MLP of the last two layers; no cache leaves the signature."""
    out = tmp_path / "pruned"
    report, plan = prune(folder, out, PruneOptions(ratio=0.0, mlp_ratio=0.5, heads_ratio=0.5,
                                                   depth_ratio=0.25),
                         CheckOptions(check_masked=True, latency=False))
    assert [_layer(b.add) for b in plan.dropped] == [
        "layers.3/input_layernorm", "layers.4/final_norm_layernorm"]  # MLP of layers 2 and 3
    assert all(b.score < 1e-3 for b in plan.dropped)
    assert (report.params_before, report.flops_before) == (286_736, 211_456)
    assert report.params_after == report.predicted_params_after < 0.7 * report.params_before
    assert report.flops_after == report.predicted_flops_after < 0.6 * report.flops_before
    assert report.masked_max_abs_diff < EXACT
    g = report.generation
    assert (g["tokens"], g["equal"]) == (32, True) and max(g["logits_max_abs_diff"]) < EXACT
    config = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
    assert [config[k] for k in ("num_hidden_layers", "num_attention_heads",
                                "num_key_value_heads")] == [LAYERS, 2, 1]
    tokens = _generate(out)
    assert len(tokens) == 32 and tokens == _spa_tokens(out / "model.onnx", kv_heads=1)


def test_attention_blocks_leave_with_their_caches_renumbered(folder: Path, tmp_path: Path,
                                                             monkeypatch) -> None:
    """Whatever blocks the scores choose, the folder stays consistent: with a scorer that
    prefers the attention of layers 0 and 1, their caches leave the signature, the others are
    renumbered from 0, ``num_hidden_layers`` follows, and onnxruntime-genai runs the folder.

    The builder's ``accuracy_level=4`` quantises MatMulNBits' activations to int8 per block,
    which turns the float-rounding differences between pruned and masked models (1e-7) into
    1e-3 at a few steps (Qwen2, this plan: from the 15th token, tokens part at the 25th): the
    oracle compares the two at level 0 (spa/pipeline/checks.py's float_activations)."""
    from spa.passes import depth

    def attention_first(original, analysis, zero_sets, inputs, **_):
        return [0.0 if any(f"layers.{i}.attn.o_proj" in z[-1] for i in (0, 1)) else 1.0
                for z in zero_sets]  # each set: the blocks dropped so far, then its own
    monkeypatch.setattr(depth, "zeroed_damage", attention_first)
    out = tmp_path / "pruned"
    report, plan = prune(folder, out, PruneOptions(ratio=0.0, mlp_ratio=0.5, heads_ratio=0.5,
                                                   depth_ratio=0.25),
                         CheckOptions(check_masked=True, latency=False))
    assert [_layer(b.add) for b in plan.dropped] == [
        f"layers.{i}/post_attention_layernorm" for i in (0, 1)]
    assert (report.params_before, report.params_after) == (286_736, 197_968)
    assert (report.flops_before, report.flops_after) == (211_456, 125_440)
    assert report.masked_max_abs_diff < EXACT
    g = report.generation
    assert (g["tokens"], g["equal"]) == (32, True) and max(g["logits_max_abs_diff"]) < EXACT
    assert len(g["dense_logits_relative_diff"]) == 32 and 0 <= g["dense_tokens_equal"] <= 32
    config = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
    assert [config[k] for k in ("num_hidden_layers", "num_attention_heads",
                                "num_key_value_heads")] == [2, 2, 1]
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert [i.name for i in model.graph.input if i.name.startswith("past")] == [
        f"past_key_values.{i}.{kv}" for kv in ("key", "value") for i in range(2)]
    assert "graph input 'past_key_values.2.key' renamed 'past_key_values.0.key'" \
        in report.signature_changes
    tokens = _generate(out)
    assert len(tokens) == 32 and tokens == _spa_tokens(out / "model.onnx", kv_heads=1)


def test_a_whole_layer_drops_through_two_fused_norms(folder: Path, tmp_path: Path) -> None:
    """Layer 1's attention and MLP: its ``post_attention_layernorm`` becomes the plain norm of
    layer 0's output, and layer 2's ``input_layernorm`` the plain norm of that same stream."""
    analysis = analyze(folder)
    blocks = find_blocks(analysis.model.graph, kv_pairs(analysis)).candidates[2:4]
    plan = with_depth(analysis, dry_run(folder, PruneOptions(ratio=0.0)), tuple(
        DroppedBlock(b.add, b.stream, b.branch, b.zero, 0.0, b.caches) for b in blocks))
    report = apply(folder / "model.onnx", plan, tmp_path / "model.onnx",
                   CheckOptions(check_masked=True, latency=False))
    assert report.masked_max_abs_diff < EXACT and report.generation["equal"]
    assert report.params_after == report.predicted_params_after == 248_656  # of 286,736
    assert report.flops_after == report.predicted_flops_after == 174_592  # of 211,456
    written = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    norms = {_layer(n.name): (n.op_type, n.input[0]) for n in written.graph.node
             if "layernorm" in n.name}
    assert "layers.1/post_attention_layernorm" not in norms  # its normalised output is unread
    assert norms["layers.2/input_layernorm"] == ("SimplifiedLayerNormalization",
                                                 "/model/layers.1/input_layernorm/output_3")
    assert norms["layers.3/input_layernorm"][0] == "SkipSimplifiedLayerNormalization"
