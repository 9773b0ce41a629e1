"""Hidden-size (residual stream) pruning of transformers, ``--hidden``.

Norms over the hidden axis change their statistics when channels go, so the masked oracle does
not apply. Checked instead: the pruned model runs with the original's output signature, params
and FLOPs are as predicted, and — on a model whose pruned hidden channels were first set to zero
in every weight — the output moves far less than when the same number of live channels go.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

pytest.importorskip("torch")

from models.export import export  # noqa: E402
from spa import validate as val  # noqa: E402
from spa.api import CheckOptions, PruneOptions, analyze, apply, prune  # noqa: E402
from spa.coupling import GroupKind, Role  # noqa: E402
from spa.plan import GroupPlan, Plan  # noqa: E402
from spa.recipe import Recipe  # noqa: E402

MODELS = ["vit", "bert", "gpt"]


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[tuple[str, str], Path]:
    d = tmp_path_factory.mktemp("hidden")
    return {(m, e): export(m, d / f"{m}_{e}.onnx", exporter=e)
            for m in MODELS for e in ("torchscript", "dynamo")}


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("name", MODELS)
def test_hidden_prunes_and_runs(paths, tmp_path: Path, name: str, exporter: str) -> None:
    src = paths[name, exporter]
    assert not [g for g in analyze(src).prunable_groups if g.kind is GroupKind.HIDDEN]
    hidden = [g for g in analyze(src, hidden=True).prunable_groups if g.kind is GroupKind.HIDDEN]
    assert len(hidden) == 1, f"expected one residual-stream group, got {len(hidden)}"
    report, plan = prune(src, tmp_path / "h.onnx", PruneOptions(ratio=0.0, hidden_ratio=0.25),
                         CheckOptions(latency=False))  # validation: runs, same signature
    (gp,) = [g for g in plan.groups if g.id == hidden[0].id]
    assert len(gp.keep) == hidden[0].size - hidden[0].size // 4
    assert report.params_after == report.predicted_params_after < report.params_before
    assert report.flops_after == report.predicted_flops_after < report.flops_before


def test_hidden_fed_by_a_graph_input_stays_frozen(tmp_path: Path) -> None:
    """torch_encoder's residual stream is its float input: inputs never change shape."""
    src = export("torch_encoder", tmp_path / "te.onnx")
    (group,) = [g for g in analyze(src, hidden=True).groups if g.kind is GroupKind.HIDDEN]
    assert group.frozen == ("graph input 'input' (axis 2) keeps its shape",)


def test_a_kind_ratio_that_removes_nothing_says_why(tmp_path: Path, caplog) -> None:
    """``--hidden`` on a model whose residual stream cannot change (torch_encoder's is its
    input), ``--heads-ratio`` on a convnet with no heads: each is a warning naming why, and the
    rest of the plan goes ahead."""
    from graphs import Builder

    src = export("torch_encoder", tmp_path / "te.onnx")
    with caplog.at_level("WARNING", logger="spa.pipeline.stages"):
        prune(src, tmp_path / "h.onnx", PruneOptions(ratio=0.25, hidden_ratio=0.25),
              CheckOptions(latency=False))
    assert caplog.messages == ["--hidden 0.25 removes nothing: no hidden-size group is "
                               "prunable: graph input 'input' (axis 2) keeps its shape"]
    caplog.clear()
    b = Builder()
    y = b.conv(b.op("Relu", b.conv("x", 3, 8, name="c1")), 8, 4, name="c2")
    with caplog.at_level("WARNING", logger="spa.pipeline.stages"):
        report, _ = prune(b.model({"x": [1, 3, 4, 4]}, {y: [1, 4, 4, 4]}), tmp_path / "c.onnx",
                          PruneOptions(ratio=0.5, heads_ratio=0.5), CheckOptions(latency=False))
    assert caplog.messages == ["--heads-ratio 0.5 removes nothing: no attention-head group is "
                               "prunable (the model has none)"]
    assert report.params_after < report.params_before


def _zero_channels(src: Path, dst: Path, removed: np.ndarray) -> None:
    """Zero the removed hidden channels in every constant of the residual-stream group."""
    analysis = analyze(src, hidden=True)
    (group,) = [g for g in analysis.groups if g.kind is GroupKind.HIDDEN]
    model = onnx.load(str(src))
    inits = {i.name: i for i in model.graph.initializer}
    for m in group.members:
        if m.space[0] in inits and m.role is not Role.ACTIVATION:
            arr = numpy_helper.to_array(inits[m.space[0]]).copy()
            index = [slice(None)] * arr.ndim
            index[m.space[1]] = m.indices[np.isin(m.channels, removed)]
            arr[tuple(index)] = 0
            inits[m.space[0]].CopyFrom(numpy_helper.from_array(arr, m.space[0]))
    onnx.save(model, str(dst))


def _change(a: Path, b: Path) -> float:
    sa, sb = val.session(a), val.session(b)
    feeds = val.random_inputs(sa, seed=3)
    return val.closeness(val.run(sa, feeds), val.run(sb, feeds)).relative


@pytest.mark.parametrize("name", ["bert", "gpt"])
def test_zeroed_hidden_channels_barely_move_the_output(paths, tmp_path: Path, name: str) -> None:
    src = paths[name, "torchscript"]
    analysis = analyze(src, hidden=True)
    (group,) = [g for g in analysis.groups if g.kind is GroupKind.HIDDEN]
    removed = np.arange(0, group.size, 4)  # a quarter of the hidden channels
    keep = tuple(int(i) for i in np.setdiff1d(np.arange(group.size), removed))
    plan = Plan(analysis.fingerprint, (GroupPlan(group.id, group.name, group.size, keep),),
                recipe=Recipe.from_meta({"hidden_ratio": 0.25}))
    zeroed = tmp_path / "zeroed.onnx"
    _zero_channels(src, zeroed, removed)
    no_checks = CheckOptions(validate=False, latency=False)
    apply(zeroed, plan, tmp_path / "zeroed_pruned.onnx", no_checks)
    apply(src, plan, tmp_path / "live_pruned.onnx", no_checks)
    dead = _change(zeroed, tmp_path / "zeroed_pruned.onnx")
    live = _change(src, tmp_path / "live_pruned.onnx")
    # Only the norms' statistics differ when the removed channels were already zero.
    assert dead < 0.35 * live, (dead, live)
