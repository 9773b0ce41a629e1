"""Depth pruning (passes/blocks.py, passes/depth.py): whole residual blocks removed.

Every prune runs under the masked oracle (the branch's last layer zeroed: ``x + 0``) and the
third oracle (params and FLOPs of the written file equal the plan's prediction).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from depth_graphs import (
    gqa_decoder,
    gqa_token_decoder,
    kv_decoder,
    prenorm_transformer,
    residual_cnn,
)
from graphs import init_shapes
from oracle import prune_checked, save

from spa.api import CheckOptions, PruneOptions, analyze, apply
from spa.choices import DepthCriterion
from spa.cli import main
from spa.errors import ExitCode, OptionError
from spa.passes.blocks import find_blocks
from spa.plan import Plan

EXACT = 1e-5


def _branch_params(model: onnx.ModelProto, prefixes: tuple[str, ...]) -> int:
    """Parameters of the initializers named ``<prefix>.…`` (a block's branch)."""
    return sum(int(np.prod(s)) for n, s in init_shapes(model).items()
               if n.startswith(prefixes) and not n.endswith(".shape"))


def test_transformer_blocks_are_attention_and_mlp_sub_blocks() -> None:
    blocks = find_blocks(analyze(prenorm_transformer()).model.graph)
    assert [b.add for b in blocks.candidates] == ["l0.res1", "l0.res2", "l1.res1", "l1.res2"]
    attn, mlp = blocks.candidates[:2]
    assert attn.stream == "x" and set(attn.zero) == {"l0.o.w", "l0.o.b"}
    assert set(mlp.zero) == {"l0.down.w", "l0.down.b"}
    assert len(attn.nodes) == 22 and len(mlp.nodes) == 6


@pytest.mark.parametrize("drop", [1, 2])
def test_transformer_drops_blocks_under_the_oracle(tmp_path: Path, drop: int) -> None:
    model = prenorm_transformer(scales={"l1.res2": 0.01, "l0.res2": 0.05})
    done = prune_checked(model, tmp_path, ratio=0.0, drop_blocks=drop)
    assert [b.add for b in done.plan.dropped] == {1: ["l1.res2"], 2: ["l0.res2", "l1.res2"]}[drop]
    assert done.report.masked_max_abs_diff is not None and done.report.masked_max_abs_diff < EXACT
    gone = tuple(f"{b.add[:2]}.{p}." for b in done.plan.dropped for p in ("ln2", "up", "down"))
    assert done.report.params_before - done.report.params_after == _branch_params(model, gone)
    written = onnx.load(str(done.path))
    assert len(model.graph.node) - len(written.graph.node) == 7 * drop  # 6 branch nodes + Add
    names = {n.name for n in written.graph.node}
    assert not names & {b.add for b in done.plan.dropped} and "l0.res1" in names


def test_dropping_an_attention_block_whose_stream_is_the_graph_input(tmp_path: Path) -> None:
    model = prenorm_transformer(scales={"l0.res1": 0.001})
    done = prune_checked(model, tmp_path, ratio=0.0, drop_blocks=1)
    assert [b.add for b in done.plan.dropped] == ["l0.res1"]
    assert done.report.masked_max_abs_diff < EXACT
    params = _branch_params(model, ("l0.ln1.", "l0.q.", "l0.k.", "l0.v.", "l0.o.", "l0.scale"))
    assert done.report.params_before - done.report.params_after == params


def test_cnn_identity_blocks_are_candidates_projection_shortcut_is_not(tmp_path: Path) -> None:
    model = residual_cnn(scales={"b1": 0.01})
    blocks = find_blocks(analyze(model).model.graph)
    assert [b.add for b in blocks.candidates] == ["b0.add", "b1.add", "b2.add"]
    assert set(blocks.candidates[1].zero) == {"b1.bn2.scale", "b1.bn2.bias"}
    done = prune_checked(model, tmp_path, ratio=0.0, drop_blocks=1)
    assert [b.add for b in done.plan.dropped] == ["b1.add"]
    assert done.report.masked_max_abs_diff < EXACT
    branch = _branch_params(model, ("b1.conv1.", "b1.bn1.", "b1.conv2.", "b1.bn2."))
    assert done.report.params_before - done.report.params_after == branch
    names = {n.name for n in onnx.load(str(done.path)).graph.node}
    assert "b1.out" in names and not names & {"b1.add", "b1.conv1", "b1.conv2"}


def test_depth_and_width_in_one_plan_apply_gives_the_same_bytes(tmp_path: Path) -> None:
    model = residual_cnn(scales={"b0": 0.01})
    done = prune_checked(model, tmp_path, ratio=0.3, drop_blocks=1)
    assert [b.add for b in done.plan.dropped] == ["b0.add"]
    assert done.report.groups_pruned > 0
    assert done.report.masked_relative_diff is not None and done.report.masked_relative_diff < 1e-4
    # b0's inner group (conv1 → conv2) goes with the branch: not pruned
    inner = next(g for g in done.plan.groups if "b0.conv1" in g.name)
    assert not inner.removed
    plan_path = tmp_path / "plan.json"
    done.plan.save(plan_path)
    again = Plan.load(plan_path)
    assert again == done.plan
    apply(tmp_path / "model.onnx", again, tmp_path / "again.onnx",
          CheckOptions(check_masked=True, latency=False))
    assert (tmp_path / "again.onnx").read_bytes() == done.path.read_bytes()


def test_transformer_depth_and_width_oracle(tmp_path: Path) -> None:
    done = prune_checked(prenorm_transformer(), tmp_path, ratio=0.25, depth_ratio=0.5)
    assert len(done.plan.dropped) == 2
    assert done.report.masked_relative_diff < 1e-4
    assert len(done.report.dropped_blocks) == 2


def test_the_tiny_branch_is_dropped_first_by_both_criteria() -> None:
    from spa.api import plan

    model = prenorm_transformer(scales={"l0.res2": 100.0, "l1.res1": 1e-3})
    analysis = analyze(model)
    for criterion in DepthCriterion:
        p = plan(analysis, PruneOptions(ratio=0.0, drop_blocks=1, depth_criterion=criterion))
        assert [b.add for b in p.dropped] == ["l1.res1"], criterion
        scores = [b.score for b in p.dropped]
        assert scores[0] < 1e-3


def test_bad_depth_options() -> None:
    with pytest.raises(OptionError, match="give one"):
        PruneOptions(drop_blocks=1, depth_ratio=0.5)
    with pytest.raises(OptionError, match=r"\[0, 1\)"):
        PruneOptions(depth_ratio=1.0)
    with pytest.raises(OptionError, match="at least 0"):
        PruneOptions(drop_blocks=-1)


def test_too_many_blocks_is_exit_2_naming_the_count(tmp_path: Path, capsys) -> None:
    src = save(residual_cnn(), tmp_path / "cnn.onnx")
    out = tmp_path / "out.onnx"
    assert main(["prune", str(src), "-o", str(out), "--drop-blocks", "4"]) == ExitCode.BAD_INPUT
    err = capsys.readouterr().err
    assert "the model has 3 candidate residual blocks" in err and not out.exists()
    argv = ["prune", str(src), "-o", str(out), "--drop-blocks", "1", "--depth-ratio", "0.5"]
    assert main(argv) == ExitCode.BAD_INPUT
    assert "give one" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["prune", str(src), "-o", str(out), "--depth-ratio", "1.5"])
    assert exc.value.code == 2


def test_kv_cache_attention_is_refused_naming_the_node_and_mlp_drops(tmp_path: Path) -> None:
    model = kv_decoder()
    blocks = find_blocks(analyze(model).model.graph)
    assert [b.add for b in blocks.candidates] == ["l0.res2"]
    assert "node 'l0.cache'" in blocks.refused["l0.res1"]
    assert "graph output 'present'" in blocks.refused["l0.res1"]
    done = prune_checked(model, tmp_path, ratio=0.0, drop_blocks=1)
    assert [b.add for b in done.plan.dropped] == ["l0.res2"]
    assert done.report.masked_max_abs_diff < EXACT
    assert [o.name for o in onnx.load(str(done.path)).graph.output] == ["y", "present"]


@pytest.mark.parametrize("op", ["SkipLayerNormalization", "SkipSimplifiedLayerNormalization"])
@pytest.mark.parametrize("sum_output", [False, True], ids=["out", "out+sum"])
def test_fused_residual_norm_becomes_the_plain_norm_of_the_stream(tmp_path: Path, op: str,
                                                                  sum_output: bool) -> None:
    """``SkipNorm(mlp(e), e, γ[, β], bias)``: the MLP feeds ``input``, the stream ``skip``.
    Dropped, the node is the plain norm of ``e`` (same epsilon, γ, β) and its sum output is
    ``e``; the bias goes with the branch (zeroed in the masked original)."""
    from test_rules_contrib import _skip_norm_model

    model = _skip_norm_model(op, sum_output=sum_output)
    blocks = find_blocks(analyze(model).model.graph)
    assert [(b.add, b.stream, b.branch, b.zero) for b in blocks.candidates] == [
        ("n", "embed_out0", "fc2_out0", ("fc2.w", "n.bias"))]
    done = prune_checked(model, tmp_path, ratio=0.0, drop_blocks=1)
    assert done.report.masked_max_abs_diff < EXACT
    written = onnx.load(str(done.path))
    norm = next(n for n in written.graph.node if n.name == "n")
    plain = {"SkipLayerNormalization": "LayerNormalization",
             "SkipSimplifiedLayerNormalization": "SimplifiedLayerNormalization"}[op]
    assert (norm.op_type, norm.domain, list(norm.output)) == (plain, "", ["n_out"])
    assert list(norm.input) == ["embed_out0", "n.gamma"] + (
        ["n.beta"] if op == "SkipLayerNormalization" else [])
    assert onnx.helper.get_attribute_value(norm.attribute[1]) == pytest.approx(1e-5)
    side = [n for n in written.graph.node if n.name.startswith("side")]
    assert [n.input[0] for n in side] == (["embed_out0"] if sum_output else [])
    assert done.report.params_before - done.report.params_after == \
        _branch_params(model, ("fc1.", "fc2.")) + 8  # and the bias; γ (and β) stay


@pytest.mark.parametrize(("slot", "why"), [
    (1, "has its mean or inverse-std output read: the plain norm it would become does not "
        "write it"),
    (3, "is a graph output: dropping the block would rename it")])
def test_fused_residual_norm_outputs_the_plain_norm_lacks_refuse_it(slot: int, why: str) -> None:
    from test_rules_contrib import _skip_norm_model

    model = _skip_norm_model("SkipLayerNormalization")
    node = next(n for n in model.graph.node if n.name == "n")
    node.output.extend([""] * (slot - 1) + [f"n_extra{slot}"])
    model.graph.output.append(onnx.helper.make_tensor_value_info(
        f"n_extra{slot}", onnx.TensorProto.FLOAT, [2, 3, 1 if slot == 1 else 8]))
    blocks = find_blocks(analyze(model).model.graph)
    assert blocks.candidates == ()
    assert why in blocks.refused["n"] and "SkipLayerNormalization node 'n'" in blocks.refused["n"]


def test_a_block_writing_the_graph_output_becomes_identity(tmp_path: Path) -> None:
    model = prenorm_transformer(layers=1, scales={"l0.res2": 1e-3}, final_norm=False)
    done = prune_checked(model, tmp_path, ratio=0.0, drop_blocks=1)
    assert [b.add for b in done.plan.dropped] == ["l0.res2"]
    written = onnx.load(str(done.path))
    last = next(n for n in written.graph.node if n.name == "l0.res2")
    assert last.op_type == "Identity" and list(last.input) == ["l0.res1_out0"]
    assert [o.name for o in written.graph.output] == ["l0.res2_out0"]
    assert done.report.masked_max_abs_diff < EXACT


def test_plans_without_depth_keep_their_json_and_zeroed_copies_agree(tmp_path: Path) -> None:
    """No "dropped" key without depth pruning (plans read and compare as before); the
    overridable-session damage equals that of whole zeroed copies (the float16 path)."""
    from spa.api import plan
    from spa.ir import to_onnx
    from spa.passes.sensitivity import _damage, _outputs, _zeroed, zeroed_damage

    analysis = analyze(residual_cnn(scales={"b1": 0.01}))
    assert '"dropped"' not in plan(analysis, PruneOptions(ratio=0.3)).to_json()
    original = to_onnx(analysis.model)
    blocks = find_blocks(analysis.model.graph).candidates
    x = {"x": np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)}
    fast = zeroed_damage(original, analysis, [b.zero for b in blocks], x)
    dense = _outputs(_zeroed(original, ()), x)
    slow = [_damage(dense, _outputs(_zeroed(original, b.zero), x)) for b in blocks]
    np.testing.assert_allclose(fast, slow, rtol=1e-5)
    assert fast[1] < 0.01 < min(fast[0], fast[2])


def test_a_kv_cache_attention_block_drops_with_its_caches(tmp_path: Path) -> None:
    """GroupQueryAttention with past/present caches (pairs found by the coupling analysis):
    its block goes, and so do its two cache inputs and two cache outputs; the rest of the
    outputs equal the masked original's."""
    model = gqa_decoder(attn_scale=1e-3)
    blocks = find_blocks(analyze(model).model.graph,
                         {"present_k": "past_k", "present_v": "past_v"})
    assert [b.add for b in blocks.candidates] == ["a.res", "m.res"]
    assert blocks.candidates[0].caches == (("past_k", "present_k"), ("past_v", "present_v"))
    done = prune_checked(model, tmp_path, ratio=0.0, drop_blocks=1)
    assert [b.add for b in done.plan.dropped] == ["a.res"]
    assert done.report.masked_max_abs_diff < EXACT
    assert done.report.signature_changes == [
        "graph input 'past_k' removed (dropped block)",
        "graph input 'past_v' removed (dropped block)",
        "graph output 'present_k' removed (dropped block)",
        "graph output 'present_v' removed (dropped block)"]
    written = onnx.load(str(done.path))
    assert [i.name for i in written.graph.input] == ["x"]
    assert [o.name for o in written.graph.output] == ["y"]
    assert not any(n.op_type == "GroupQueryAttention" for n in written.graph.node)
    params = _branch_params(model, ("a.q.", "a.k.", "a.v.", "a.o."))
    assert done.report.params_before - done.report.params_after == params
    # not a token decoder (its input is 'x'): the greedy loop says why it did not run
    assert "neither token inputs nor KV-cache pasts" in done.report.generation["not_run"]


def test_token_decoder_drops_an_attention_layer_and_generates_as_the_masked_original(
        tmp_path: Path) -> None:
    """Depth and KV-head pruning in one plan on a two-layer GroupQueryAttention decoder: layer
    0's attention goes with its caches, layer 1 loses a KV head in both its caches, and 32
    greedy tokens equal the masked original's (the loop feeds the pruned model only the caches
    it keeps); layer 0's heads are not pruned (they go with the branch)."""
    model = gqa_token_decoder(scales={"l0.res1": 1e-3})
    done = prune_checked(model, tmp_path, ratio=0.0, heads_ratio=0.5, drop_blocks=1)
    assert [b.add for b in done.plan.dropped] == ["l0.res1"]
    g = done.report.generation
    assert (g["tokens"], g["equal"]) == (32, True) and max(g["logits_max_abs_diff"]) < EXACT
    # the dense original (its layer-0 attention and layer-1 heads kept) picks 11 of the same
    # 32 tokens; teacher-forced on the pruned model's tokens, its logits differ by ~0.8
    assert g["dense_tokens_equal"] == 11 and len(g["dense_logits_relative_diff"]) == 32
    assert done.report.signature_changes == [
        *(f"graph {s} '{n}.1.{kv}' axis 1: 2 -> 1" for s, n in (
            ("input", "past_key_values"), ("output", "present")) for kv in ("key", "value")),
        *(f"graph {s} '{n}.0.{kv}' removed (dropped block)" for s, n in (
            ("input", "past_key_values"), ("output", "present")) for kv in ("key", "value"))]
    written = onnx.load(str(done.path))
    assert [i.name for i in written.graph.input] == [
        "input_ids", "attention_mask", "past_key_values.1.key", "past_key_values.1.value"]
    gqa = [n for n in written.graph.node if n.op_type == "GroupQueryAttention"]
    assert [n.name for n in gqa] == ["l1.gqa"]
    assert {a.name: a.i for a in gqa[0].attribute} == {"num_heads": 2, "kv_num_heads": 1}
