"""Calibration criteria (activation, Wanda, FLAP) against hand-computed scores, and FLAP's bias
compensation, which is exact for a channel whose activation never varies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from spa import validate as val
from spa.api import CheckOptions, PruneOptions, analyze, prune
from spa.choices import HessianSource
from spa.errors import OptionError
from spa.passes.importance import Normalization, get_criterion
from spa.passes.statistics import LayerStatistics

RNG = np.random.default_rng(3)
W1 = RNG.standard_normal((3, 4)).astype(np.float32)
B1 = np.array([0.0, 0.5, -0.2, 0.1], np.float32)
W2 = RNG.standard_normal((4, 2)).astype(np.float32)
B2 = np.array([0.3, -0.1], np.float32)
X = RNG.standard_normal((24, 3)).astype(np.float32)


def _mlp(w1: np.ndarray = W1, b1: np.ndarray = B1) -> onnx.ModelProto:
    """x[1,3] → MatMul → Add → Relu → MatMul → Add → y[1,2]: one group of 4 channels."""
    inits = [numpy_helper.from_array(v, k) for k, v in
             {"w1": w1, "b1": b1, "w2": W2, "b2": B2}.items()]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="bias1"),
             helper.make_node("Relu", ["hb"], ["r"], name="act"),
             helper.make_node("MatMul", ["r", "w2"], ["z"], name="fc2"),
             helper.make_node("Add", ["z", "b2"], ["y"], name="bias2")]
    graph = helper.make_graph(nodes, "mlp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _scores(name: str) -> np.ndarray:
    analysis = analyze(_mlp())
    (group,) = analysis.prunable_groups
    crit = get_criterion(name, normalization=Normalization.NONE)
    stats = LayerStatistics(source=HessianSource.CALIBRATION, samples=0,
                            calib={"x": X}).run(analysis)
    return crit.run(analysis, stats).by_group[group.id]


def test_scores_match_hand_computation() -> None:
    r = np.maximum(X.astype(np.float64) @ W1 + B1, 0)  # the consumer layer's input
    w2 = W2.astype(np.float64)
    np.testing.assert_allclose(_scores("activation"), np.abs(r).mean(0), rtol=1e-6)
    np.testing.assert_allclose(_scores("wanda"), np.abs(w2).sum(1) * np.sqrt((r**2).mean(0)),
                               rtol=1e-6)
    np.testing.assert_allclose(_scores("flap"), (w2**2).sum(1) * r.var(0), rtol=1e-5, atol=1e-9)


def test_layers_reading_one_input_get_its_statistics_each() -> None:
    """Two consumers of the hidden activation (fc2 and a second head on it): the batch sums
    are computed once per input and each layer accumulates its own copy over the 24
    one-sample batches (shared arrays would add every batch twice)."""
    model = _mlp()
    w3 = RNG.standard_normal((4, 2)).astype(np.float32)
    model.graph.initializer.append(numpy_helper.from_array(w3, "w3"))
    model.graph.node[4].output[0] = "y0"
    model.graph.node.extend([helper.make_node("MatMul", ["r", "w3"], ["z3"], name="fc3"),
                             helper.make_node("Add", ["y0", "z3"], ["y"], name="join")])
    analysis = analyze(model)
    stats = LayerStatistics(source=HessianSource.CALIBRATION, samples=0,
                            calib={"x": X}).run(analysis)
    r = np.maximum(X.astype(np.float64) @ W1 + B1, 0)
    assert {key for key in stats.inputs} == {("w2", 0), ("w3", 0)}
    for key in (("w2", 0), ("w3", 0)):
        np.testing.assert_allclose(stats.hessian(key), r.T @ r / len(r), rtol=1e-6)
        np.testing.assert_allclose(stats.inputs[key].mean, r.mean(0), rtol=1e-6, atol=1e-9)
    a, b = stats.inputs[("w2", 0)], stats.inputs[("w3", 0)]
    assert a.n == b.n == len(X)
    assert not np.shares_memory(a.gram, b.gram) and not np.shares_memory(a.total, b.total)


def test_calibration_criteria_need_calibration_data() -> None:
    with pytest.raises(OptionError, match="--calib"):
        get_criterion("wanda").run(analyze(_mlp()))


def test_flap_bias_compensation_is_exact_for_a_constant_channel(tmp_path: Path) -> None:
    """Channel 0 is always relu(0 + 2) = 2: FLAP removes it first, and folding 2·W2[0] into
    the next bias makes the pruned model equal the original."""
    w1, b1 = W1.copy(), B1.copy()
    w1[:, 0], b1[0] = 0.0, 2.0
    src = tmp_path / "m.onnx"
    onnx.save(_mlp(w1, b1), str(src))
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=X)
    opts = dict(ratio=0.25, criterion="flap", calib=str(calib), allocation="uniform",
                reconstruct=False)
    rep, plan = prune(src, tmp_path / "c.onnx", PruneOptions(**opts), CheckOptions(latency=False))
    assert plan.groups[0].keep == (1, 2, 3) and rep.compensated_layers == 1
    prune(src, tmp_path / "n.onnx", PruneOptions(**opts, compensate=False),
          CheckOptions(latency=False))
    ref = val.session(src)
    for i in range(4):
        feeds = val.random_inputs(ref, seed=i)
        want = val.run(ref, feeds)["y"]
        got = val.run(val.session(tmp_path / "c.onnx"), feeds)["y"]
        bare = val.run(val.session(tmp_path / "n.onnx"), feeds)["y"]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(bare, want - 2.0 * W2[0], rtol=1e-5, atol=1e-6)


W2S = RNG.standard_normal((4, 3)).astype(np.float32)  # back to the input width
B2S = np.array([0.3, -0.1, 0.2], np.float32)


def _shared_mlp(w1: np.ndarray = W1, b1: np.ndarray = B1) -> onnx.ModelProto:
    """x[N,3] → MLP → MLP → y[N,3], the two MLPs one set of weights (as ALBERT's layers): one
    group of 4 hidden channels, each of w1, b1, w2, b2 read by two nodes."""
    inits = [numpy_helper.from_array(v, k) for k, v in
             {"w1": w1, "b1": b1, "w2": W2S, "b2": B2S}.items()]
    nodes = []
    x = "x"
    for i in range(2):
        nodes += [helper.make_node("MatMul", [x, "w1"], [f"h{i}"], name=f"fc1_{i}"),
                  helper.make_node("Add", [f"h{i}", "b1"], [f"hb{i}"], name=f"bias1_{i}"),
                  helper.make_node("Relu", [f"hb{i}"], [f"r{i}"], name=f"act{i}"),
                  helper.make_node("MatMul", [f"r{i}", "w2"], [f"z{i}"], name=f"fc2_{i}"),
                  helper.make_node("Add", [f"z{i}", "b2"], [x := f"y{i}"], name=f"bias2_{i}")]
    nodes[-1].output[0] = "y"
    graph = helper.make_graph(nodes, "shared_mlp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_a_weight_shared_by_two_layers_gets_the_statistics_of_both_uses() -> None:
    """ALBERT's layers share their weights: the one OBS update of w2 must serve both nodes
    reading it, so its H is over both uses' inputs (it was the last use's alone); FLAP's
    shift needs each use's own mean."""
    analysis = analyze(_shared_mlp())
    stats = LayerStatistics(source=HessianSource.CALIBRATION, samples=0,
                            calib={"x": X}).run(analysis)
    layer = stats.layers[("w2", 0)]
    assert [u.node for u in layer.uses] == ["fc2_0", "fc2_1"]
    x = X.astype(np.float64)
    r0 = np.maximum(x @ W1 + B1, 0)
    r1 = np.maximum((r0 @ W2S + B2S) @ W1 + B1, 0)
    both = np.concatenate([r0, r1])
    np.testing.assert_allclose(stats.hessian(("w2", 0)), both.T @ both / len(both), rtol=1e-6)
    means = stats.inputs[("w2", 0)].means(layer)
    np.testing.assert_allclose(means["fc2_0"], r0.mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(means["fc2_1"], r1.mean(0), rtol=1e-6, atol=1e-9)
    assert stats.inputs[("w2", 0)].n == 2 * len(X)


def test_flap_shifts_the_bias_after_every_use_of_a_shared_weight(tmp_path: Path) -> None:
    """Hidden channel 0 is always relu(0 + 2) = 2, at both uses of the shared MLP: FLAP
    removes it and folds 2·w2[0] into the bias after each use (it shifted the last use's
    alone), and the pruned model equals the original."""
    w1, b1 = W1.copy(), B1.copy()
    w1[:, 0], b1[0] = 0.0, 2.0
    src, calib = tmp_path / "m.onnx", tmp_path / "calib.npz"
    onnx.save(_shared_mlp(w1, b1), str(src))
    np.savez(calib, x=X)
    rep, plan = prune(src, tmp_path / "c.onnx",
                      PruneOptions(ratio=0.25, criterion="flap", calib=str(calib),
                                   allocation="uniform", reconstruct=False),
                      CheckOptions(latency=False))
    assert plan.groups[0].keep == (1, 2, 3) and rep.compensated_layers == 2
    ref, got = val.session(src), val.session(tmp_path / "c.onnx")
    for i in range(4):
        feeds = val.random_inputs(ref, seed=i)
        np.testing.assert_allclose(val.run(got, feeds)["y"], val.run(ref, feeds)["y"],
                                   rtol=1e-5, atol=1e-6)


def _token_mlp() -> onnx.ModelProto:
    """x[N,T,3] → the MLP of :func:`_mlp` per token, its output zeroed at padding
    (attention_mask[N,T] = 0): one group of 4 channels, read per token."""
    inits = [numpy_helper.from_array(v, k) for k, v in
             {"w1": W1, "b1": B1, "w2": W2, "b2": B2,
              "axes": np.array([-1], np.int64)}.items()]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="bias1"),
             helper.make_node("Relu", ["hb"], ["r"], name="act"),
             helper.make_node("MatMul", ["r", "w2"], ["z"], name="fc2"),
             helper.make_node("Add", ["z", "b2"], ["zb"], name="bias2"),
             helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["m", "axes"], ["mu"]),
             helper.make_node("Mul", ["zb", "mu"], ["y"], name="masked")]
    graph = helper.make_graph(
        nodes, "token_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T", 3]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", "T"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "T", 2])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_layer_statistics_leave_out_padding_tokens() -> None:
    # 8 samples of 6 tokens, the last ones padding; padding rows hold large values, as a
    # padded position's activations can.
    x = RNG.standard_normal((8, 6, 3)).astype(np.float32)
    lengths = np.array([6, 2, 3, 1, 4, 5, 2, 3])
    mask = (np.arange(6)[None] < lengths[:, None]).astype(np.int64)
    x[mask == 0] = 5.0
    analysis = analyze(_token_mlp())
    (group,) = analysis.prunable_groups
    stats = LayerStatistics(source=HessianSource.CALIBRATION, samples=0,
                            calib={"x": x, "attention_mask": mask}).run(analysis)
    r = np.maximum(x[mask != 0].astype(np.float64) @ W1 + B1, 0)  # real tokens only
    (inputs,) = stats.inputs.values()
    assert inputs.n == lengths.sum()
    np.testing.assert_allclose(inputs.gram, r.T @ r, rtol=1e-6)
    crit = get_criterion("activation", normalization=Normalization.NONE)
    np.testing.assert_allclose(crit.run(analysis, stats).by_group[group.id], np.abs(r).mean(0),
                               rtol=1e-6)


def test_plans_before_padding_was_skipped_replay_with_padding_rows() -> None:
    from spa.recipe import BiasRecipe, CompensationRecipe

    old = {"hessian": "calibration", "damping": 0.01, "samples": 8, "calib": "c.txt",
           "input_dims": {}}
    comp = CompensationRecipe.from_dict(old)
    assert not comp.skip_padding and comp.to_dict() == old  # a saved plan reads back as it was
    new = CompensationRecipe.from_dict(old | {"skip_padding": True})
    assert new.skip_padding and new.to_dict()["skip_padding"] is True
    assert not BiasRecipe.from_dict({"calib": "c.txt"}).skip_padding
    assert BiasRecipe.from_dict(BiasRecipe("c.txt", True).to_dict()).skip_padding
    # The statistics an old plan's replay computes count every token, padding included.
    x = RNG.standard_normal((8, 5, 3)).astype(np.float32)
    mask = np.array([[1, 1, 0, 0, 0]] * 8, np.int64)
    analysis = analyze(_token_mlp())
    counted = {skip: next(iter(LayerStatistics(
        source=HessianSource.CALIBRATION, samples=0, calib={"x": x, "attention_mask": mask},
        skip_padding=skip).run(analysis).inputs.values())).n for skip in (False, True)}
    assert counted == {False: 40, True: 16}


def test_a_plan_replays_its_padding_choice_byte_for_byte(tmp_path: Path) -> None:
    """OBSPA with a calibration Hessian on a token model: ``spa apply`` of the plan writes the
    pruned file again; the same plan marked as made before padding was skipped writes another."""
    import json

    from spa.api import apply

    src = tmp_path / "m.onnx"
    onnx.save(_token_mlp(), src)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((32, 6, 3)).astype(np.float32)
    mask = (np.arange(6)[None] < rng.integers(1, 7, 32)[:, None]).astype(np.int64)
    x[mask == 0] = 4.0
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=x, attention_mask=mask)
    opts = PruneOptions(ratio=0.5, criterion="obspa", hessian=HessianSource.CALIBRATION,
                        calib=str(calib), reconstruct=False, allocation="uniform", round_to=1)
    checks = CheckOptions(validate=False, latency=False)
    _, the_plan = prune(src, tmp_path / "p.onnx", opts, checks)
    assert the_plan.recipe.compensation.skip_padding
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(the_plan.to_json())
    apply(src, plan_file, tmp_path / "again.onnx", checks)
    assert (tmp_path / "again.onnx").read_bytes() == (tmp_path / "p.onnx").read_bytes()
    body = json.loads(the_plan.to_json())
    del body["recipe"]["compensation"]["skip_padding"]
    plan_file.write_text(json.dumps(body))
    apply(src, plan_file, tmp_path / "old.onnx", checks)
    assert (tmp_path / "old.onnx").read_bytes() != (tmp_path / "p.onnx").read_bytes()
