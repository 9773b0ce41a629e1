"""--target latency: the latency table (passes/latency.py), its cache and prediction, the
allocator spending milliseconds, --round-to auto and --provider. Numbers, not timings: the
timed parts are checked for their structure (what was timed, what was read back), and the
arithmetic on tables written by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from spa.api import PruneOptions, analyze
from spa.choices import AllocationMethod, Target
from spa.cli import main
from spa.coupling import GroupKind
from spa.errors import OptionError
from spa.passes.allocation import Allocation, importance_curves
from spa.passes.importance import get_criterion
from spa.passes.latency import (
    GroupLatency,
    LatencyTable,
    check_provider,
    fit_points,
    kernel_block,
    snap,
)
from spa.passes.latency_profile import LatencyProfile
from spa.pipeline.options import parse_round_to
from spa.pipeline.stages import analyse


def _convs(width: int = 16) -> onnx.ModelProto:
    """x[1,3,16,16] → conv1 → Relu → conv2 → Relu → conv3 → y: two prunable groups of
    ``width`` channels (conv1's and conv2's outputs)."""
    rng = np.random.default_rng(0)
    shapes = {"w1": (width, 3, 3, 3), "w2": (width, width, 3, 3), "w3": (4, width, 1, 1)}
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in shapes.items()]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1] * 4),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "w3"], ["y"], name="conv3")]
    graph = helper.make_graph(
        nodes, "convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16, 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _table(groups: dict[int, GroupLatency], dense: float = 10.0,
           points: tuple = ()) -> LatencyTable:
    return LatencyTable("k", "CPUExecutionProvider", 1, (), dense, groups, points)


# --- kernel block, provider, widths ---------------------------------------------------------


def test_kernel_block_from_cpuinfo_flags() -> None:
    intel = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw\n"
    assert kernel_block(intel) == 16
    assert kernel_block("flags\t: fpu sse2 avx avx2 fma\n") == 8
    assert kernel_block("flags\t: fpu sse2 sse4_2\n") == 1
    assert kernel_block("Features\t: fp asimd evtstrm\n") == 1  # ARM: no NCHWc blocks
    assert kernel_block("model name: avx512f in the name, not in the flags\n") == 1


def test_round_to_auto_is_this_cpus_block() -> None:
    assert parse_round_to("auto") == "auto"
    assert parse_round_to("4") == 4
    assert PruneOptions(round_to="auto").block == kernel_block()
    assert PruneOptions().block == kernel_block()  # auto is the default
    assert PruneOptions(round_to=4).block == 4


def test_snap_rounds_kept_widths_up_to_the_block() -> None:
    assert [snap(w, 64, 16) for w in (48, 40, 17, 1)] == [48, 48, 32, 16]
    assert snap(5, 12, 16) == 5  # a group narrower than the block is left alone
    assert snap(70, 64, 16) == 64


def test_unavailable_provider_is_an_error_naming_the_available_ones(tmp_path: Path) -> None:
    with pytest.raises(OptionError, match="CPUExecutionProvider"):
        check_provider("NoSuchExecutionProvider")
    path = tmp_path / "m.onnx"
    onnx.save(_convs(), path)
    code = main(["prune", str(path), "-o", str(tmp_path / "p.onnx"), "--target", "latency",
                 "--provider", "NoSuchExecutionProvider", "-q"])
    assert code == 2
    assert not (tmp_path / "p.onnx").exists()


# --- prediction arithmetic on tables written by hand ----------------------------------------


def test_group_saving_is_interpolated_and_flat_below_the_narrowest_width() -> None:
    g = GroupLatency("g", 64, (48, 32, 16), (1.0, 3.0, 4.0), 100.0)
    assert g.saved(64) == 0.0
    assert g.saved(56) == pytest.approx(0.5)
    assert g.saved(40) == pytest.approx(2.0)
    assert g.saved(16) == pytest.approx(4.0)
    assert g.saved(4) == pytest.approx(4.0)  # nothing measured there: no more claimed


def test_prediction_is_dense_minus_savings_plus_the_fitted_overlap() -> None:
    a = GroupLatency("a", 64, (32,), (2.0,), 1000.0)
    b = GroupLatency("b", 32, (16,), (1.0,), 500.0)
    table = _table({0: a, 1: b})  # no whole-model points: α = 1, β = 0
    assert table.predict({0: 32, 1: 16}, macs_saved=0.0) == pytest.approx(7.0)
    # y = f − β·I exactly with β = 1e-3: the fit recovers it, and the overlap comes back.
    points = ((3.0 - 1e-3 * 4000, 3.0, 4000.0), (1.5 - 1e-3 * 1000, 1.5, 1000.0))
    assert fit_points(list(points)) == pytest.approx((1.0, 1e-3))
    table = _table({0: a, 1: b}, points=points)
    # Σ c·(n − k) = 1000·32 + 500·16 = 40000 MACs counted; the plan saves 30000 in all.
    assert table.predict({0: 32, 1: 16}, macs_saved=30000.0) == pytest.approx(10 - 3 + 10)
    assert table.predict({0: 64}, macs_saved=0.0) == pytest.approx(10.0)


def test_fit_never_adds_time_for_overlap() -> None:
    # The whole model saves more than the groups' sum, more so the more they overlap: the
    # free fit's β would be negative; it is 0, and α alone scales the sum (Σfy / Σff).
    assert fit_points([(3.0, 3.0, 100.0), (7.0, 6.0, 400.0)]) == pytest.approx((51 / 45, 0.0))
    assert fit_points([(5.0, 3.0, 100.0), (9.0, 6.0, 400.0)]) == pytest.approx((11 / 6, 0.005))


def test_table_round_trips_through_json() -> None:
    table = _table({3: GroupLatency("g", 8, (6, 4), (0.5, 1.0), 12.5)},
                   points=((1.0, 1.5, 10.0),))
    back = LatencyTable.from_json(table.to_json())
    assert back == table


# --- the allocator under a latency price ----------------------------------------------------


def _allocate(analysis, table: LatencyTable, ratio: float, **kw):
    scores = get_criterion("l1").run(analysis)
    return Allocation(ratio=ratio, target=Target.LATENCY, method=AllocationMethod.GLOBAL,
                      latency=table, **kw).run(analysis, scores)


def test_allocator_spends_the_budget_where_milliseconds_are_cheap() -> None:
    analysis = analyze(_convs())
    g1, g2 = sorted(analysis.prunable_groups, key=lambda g: g.id)
    # g1 saves nothing measurable, g2 saves 4 ms at half width: the time comes from g2.
    table = _table({g1.id: GroupLatency("g1", 16, (12, 8, 4), (0.0, 0.0, 0.0), 0.0),
                    g2.id: GroupLatency("g2", 16, (12, 8, 4), (2.0, 4.0, 5.0), 0.0)})
    plan = _allocate(analysis, table, ratio=0.35)
    kept = {g.id: len(g.keep) for g in plan.groups}
    assert kept[g1.id] == 16
    # 3.5 ms (35% of 10) is reached at 9 channels, between 12 (2 ms) and 8 (4 ms) ...
    assert kept[g2.id] == 9
    # ... and, with round_to 4, at the first multiple of 4 past it.
    plan = _allocate(analysis, table, ratio=0.35, round_to=4)
    assert {g.id: len(g.keep) for g in plan.groups} == {g1.id: 16, g2.id: 8}
    assert table.predict(kept, 0.0) <= 10.0 * 0.65 + 1e-9


def test_allocator_never_stops_at_a_width_measured_slower_than_a_wider_one() -> None:
    analysis = analyze(_convs())
    g1, g2 = sorted(analysis.prunable_groups, key=lambda g: g.id)
    # g2 at 8 channels measured slower (0.5 ms saved) than at 12 (1 ms); 4 saves 3 ms.
    table = _table({g1.id: GroupLatency("g1", 16, (12, 8, 4), (0.0, 0.0, 0.0), 0.0),
                    g2.id: GroupLatency("g2", 16, (12, 8, 4), (1.0, 0.5, 3.0), 0.0)},
                   dense=10.0)
    for ratio in (0.05, 0.1, 0.2, 0.3):
        plan = _allocate(analysis, table, ratio=ratio, round_to=4)
        k = {g.id: len(g.keep) for g in plan.groups}[g2.id]
        saved = table.groups[g2.id].saved(k)
        assert all(table.groups[g2.id].saved(w) < saved for w in range(k + 1, 17)), (ratio, k)


def test_as_fast_wider_is_the_widest_width_saving_as_much() -> None:
    g = GroupLatency("g", 16, (12, 8, 4), (1.0, 0.5, 3.0), 0.0)
    assert [g.as_fast_wider(k) for k in (16, 12, 10, 8, 6, 4)] == [16, 12, 12, 12, 6, 4]
    # a width that saves nothing (or costs time) is not worth its channels: full width
    assert GroupLatency("z", 16, (8,), (-0.2,), 0.0).as_fast_wider(8) == 16


def test_uniform_latency_allocation_never_keeps_a_width_measured_slower_than_a_wider_one(
        ) -> None:
    """The same table as above, one channel ratio searched for every group (``uniform``):
    g2 never stays at 8 or 10 (12 saves more), and g1, which saves nothing, stays whole."""
    analysis = analyze(_convs())
    g1, g2 = sorted(analysis.prunable_groups, key=lambda g: g.id)
    table = _table({g1.id: GroupLatency("g1", 16, (12, 8, 4), (0.0, 0.0, 0.0), 0.0),
                    g2.id: GroupLatency("g2", 16, (12, 8, 4), (1.0, 0.5, 3.0), 0.0)},
                   dense=10.0)
    scores = get_criterion("l1").run(analysis)
    for ratio in (0.05, 0.1, 0.2, 0.3):
        plan = Allocation(ratio=ratio, target=Target.LATENCY, method=AllocationMethod.UNIFORM,
                          latency=table).run(analysis, scores)
        k = {g.id: len(g.keep) for g in plan.groups}
        assert k[g1.id] == 16
        saved = table.groups[g2.id].saved(k[g2.id])
        assert all(table.groups[g2.id].saved(w) < saved for w in range(k[g2.id] + 1, 17)), (
            ratio, k)


def test_importance_curve_is_the_sum_of_the_lowest_scores() -> None:
    analysis = analyze(_convs())
    scores = get_criterion("l1").run(analysis)
    curves = importance_curves(analysis, scores)
    for g in analysis.prunable_groups:
        s = np.sort(scores.by_group[g.id])
        assert curves[g.id].at(0) == 0.0
        assert curves[g.id].at(3) == pytest.approx(s[:3].sum())


def test_latency_target_without_a_table_is_an_error() -> None:
    with pytest.raises(OptionError, match="latency table"):
        Allocation(ratio=0.3, target=Target.LATENCY)


# --- the measured table: keyed, cached, reused ----------------------------------------------


def test_table_is_built_once_then_read_from_the_cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SPA_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "m.onnx"
    onnx.save(_convs(), path)
    analysis = analyze(str(path))
    made: list[int] = []

    def counting(model: bytes):
        from spa import validate as val
        made.append(len(model))
        return val.session(model, threads=1, spin=False)

    profile = LatencyProfile(reanalyse=analyse, block=4, runs=3, session=counting)
    first = profile.run(analysis)
    assert not first.cached and made  # timed: sessions were made
    assert {g.id for g in analysis.prunable_groups} == set(first.groups)
    for row in first.groups.values():
        assert row.kept == (12, 8, 4)  # 3/4, 1/2, 1/4 of 16, multiples of the block
        assert row.macs_per_channel > 0
    assert len(first.points) == 3  # the whole model at each width
    files = list((tmp_path / "cache" / "latency").glob("*.json"))
    assert [f.stem for f in files] == [first.key]

    def refuse(model: bytes):
        raise AssertionError("a cached table must not time anything")

    second = LatencyProfile(reanalyse=analyse, block=4, runs=3, session=refuse).run(analysis)
    assert second.cached
    assert json.loads(second.to_json()) == json.loads(first.to_json())
    # Another thread count is another key: the cache is not read for it.
    other = LatencyProfile(reanalyse=analyse, block=4, runs=3, threads=2, session=refuse)
    assert other.key(analysis) != first.key
    with pytest.raises(AssertionError, match="must not time"):
        other.run(analysis)


def test_cli_latency_target_reports_requested_and_predicted_speedup(
        tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SPA_CACHE_DIR", str(tmp_path / "cache"))
    path, out, report = tmp_path / "m.onnx", tmp_path / "p.onnx", tmp_path / "r.json"
    onnx.save(_convs(32), path)
    code = main(["prune", str(path), "-o", str(out), "--target", "latency", "--ratio", "0.25",
                 "--round-to", "8", "--report", str(report), "-q"])
    assert code == 0
    r = json.loads(report.read_text())
    t = r["latency_target"]
    assert t["requested_speedup"] == pytest.approx(1 / 0.75)
    assert t["groups_timed"] == 2 and not t["cached"]
    assert 0 < t["predicted_ms"] <= t["dense_ms"]
    assert r["latency_ms_before"] > 0 and r["latency_ms_after"] > 0
    assert r["masked_relative_diff"] < 1e-4  # the numeric oracle held
    # every kept width is a multiple of the round-to block
    pruned = onnx.load(out)
    widths = [numpy_helper.to_array(i).shape[0] for i in pruned.graph.initializer
              if i.name in ("w1", "w2")]
    assert all(w % 8 == 0 for w in widths)


# --- the report -----------------------------------------------------------------------------


def _report(before: float, after: float, target: dict | None = None, off_block: int = 0):
    from spa.pipeline.emit import PruneReport

    return PruneReport("m.onnx", "p.onnx", 100, 50, 1000, 500, 50, 500, 400, 200, 2, 2, 32, 16,
                       [], latency_ms_before=before, latency_ms_after=after,
                       latency_target=target or {}, off_block_groups=off_block)


def test_report_warns_when_the_pruned_model_measures_slower() -> None:
    """The hint blames the blocked conv kernels only when some pruned group left them."""
    from spa.report import report_notes

    (note,) = report_notes(_report(2.0, 2.5, off_block=3))
    assert note.startswith("warning: the pruned model measures slower") and "2.500" in note
    assert "3 pruned group(s) left whole kernel blocks" in note
    (note,) = report_notes(_report(2.0, 2.5))
    assert "left whole kernel blocks" not in note and "timing noise" in note
    assert report_notes(_report(2.0, 1.0)) == []


@pytest.mark.parametrize("round_to, off", [(1, 1), ("auto", 0)])
def test_report_counts_groups_off_the_kernel_blocks(tmp_path, round_to, off) -> None:
    """A conv group of 32 pruned to 23 (exact) leaves the blocks of 16; auto keeps 32 or 16;
    a Gemm group never counts."""
    from graphs import Builder
    from oracle import prune_checked

    b = Builder()
    y = b.op("Relu", b.conv("x", 3, 32, name="c1"))
    y = b.op("Flatten", b.op("GlobalAveragePool", b.conv(y, 32, 8, k=1, name="c2")))
    y = b.gemm(b.op("Relu", b.gemm(y, 8, 40, name="fc1")), 40, 4, name="fc2")
    m = b.model({"x": [1, 3, 6, 6]}, {y: [1, 4]})
    out = prune_checked(m, tmp_path, ratio=0.3, round_to=round_to)
    assert out.report.off_block_groups == off


def test_report_shows_requested_predicted_and_measured_speedup() -> None:
    from spa.report import latency_lines, report_notes

    target = {"requested_speedup": 2.0, "dense_ms": 10.0, "predicted_ms": 5.0, "cached": True,
              "seconds": 0.1}
    asked, measured = latency_lines(_report(8.0, 5.0, target))
    assert "2.00x faster asked; table predicts 2.00x" in asked and "from cache" in asked
    assert measured == "measured speed-up: 1.60x (prediction error +25.0%)"
    (note,) = report_notes(_report(8.0, 5.0, target))  # 1.6x is short of 0.9 × 2x
    assert "1.60x measured, 2.00x asked" in note
    assert latency_lines(_report(8.0, 5.0)) == []  # no latency target, no lines
    # the table itself predicts 1.25x of 2x: the target was out of reach, the table not wrong
    short = target | {"predicted_ms": 8.0}
    (note,) = report_notes(_report(8.0, 5.0, short))
    assert "2.00x asked is out of reach" in note and "predicted at 1.25x" in note
    assert "measures 1.60x" in note


def test_a_missed_target_is_planned_again_with_the_measured_correction() -> None:
    from spa.pipeline import latency_missed

    table = _table({0: GroupLatency("a", 64, (32,), (4.0,), 0.0)})
    assert table.predict({0: 32}, 0.0) == pytest.approx(6.0)
    # Measured: the plan saved 20% of the dense latency, the table said 40%: savings halve.
    fixed = table.corrected(predicted_ms=6.0, measured_share=0.2)
    assert fixed.scale == pytest.approx(0.5)
    assert fixed.predict({0: 32}, 0.0) == pytest.approx(8.0)
    assert LatencyTable.from_json(fixed.to_json()).scale == 1.0  # the cache keeps the measured
    target = {"requested_speedup": 2.0}
    assert latency_missed(_report(10.0, 5.4, target)) is None  # 1.85x: within 10% of 2x
    assert latency_missed(_report(10.0, 8.0, target)) == pytest.approx(0.2)
    assert latency_missed(_report(10.0, 4.0, target)) == pytest.approx(0.6)  # overshoot too
    assert latency_missed(_report(10.0, 8.0)) is None  # no latency target


def test_report_tells_of_a_second_plan_and_which_one_was_kept() -> None:
    from spa.report import latency_lines

    tries = {"first_try": {"latency_ms_before": 10.0, "latency_ms_after": 8.0, "scale": 1.0},
             "second_try": {"latency_ms_before": 10.0, "latency_ms_after": 5.0, "scale": 0.5}}
    target = {"requested_speedup": 2.0, "dense_ms": 10.0, "predicted_ms": 5.0, "cached": True,
              "seconds": 0.1, "scale": 0.5, **tries}
    line = latency_lines(_report(10.0, 5.0, target))[1]
    assert line == ("first plan measured 1.25x; planned again with the table's savings "
                    "scaled by 0.50: 2.00x")
    kept_first = latency_lines(_report(10.0, 8.0, target | {"scale": 1.0}))[1]
    assert kept_first.endswith("further off: the first plan is kept")


def test_report_latency_uses_the_given_clock() -> None:
    """latency_ms times with the clock it is given (the checks pass ``time.thread_time`` for a
    one-thread CPU session): a fake clock that ticks 2 ms per read gives 2 ms a run."""
    import itertools

    from spa.metrics import latency_ms

    class Session:
        runs = 0

        def run(self, *_):
            Session.runs += 1

    ticks = itertools.count(step=0.002)
    assert latency_ms(Session(), {}, runs=5, warmup=1, clock=lambda: next(ticks)) == \
        pytest.approx(2.0)
    assert Session.runs == 6


def test_interleaved_rounds_run_every_model_once_per_round() -> None:
    """Each round runs every session once, in turn, after the warm-up runs: a drift of the
    machine falls on both models alike."""
    import itertools

    from spa.metrics import interleaved_times

    order: list[str] = []

    class Session:
        def __init__(self, name: str) -> None:
            self.name = name

        def run(self, *_):
            order.append(self.name)

    ticks = itertools.count(step=0.001)
    a, b = interleaved_times((Session("a"), {}), (Session("b"), {}), runs=3, warmup=2,
                             clock=lambda: next(ticks))
    assert order == ["a", "a", "b", "b"] + ["a", "b"] * 3
    assert a == b == [pytest.approx(1.0)] * 3


def test_checks_time_dense_and_pruned_interleaved_below_the_size_bound(
        tmp_path: Path, monkeypatch) -> None:
    """Validation times the dense and the pruned model in interleaved rounds (timed one after
    the other inside ``spa prune``, all-MiniLM-L6-v2 pruned for 2x measured x1.84, against
    x1.98-x2.00 interleaved); above ``INTERLEAVED_BYTES`` together, one session at a time."""
    import spa.pipeline.checks as checks

    rounds: list[int] = []
    real = checks.interleaved_times

    def spy(*pairs, **kwargs):
        rounds.append(len(pairs))
        return real(*pairs, **kwargs)

    monkeypatch.setattr(checks, "interleaved_times", spy)
    path = _saved(tmp_path, _convs())
    out = tmp_path / "p.onnx"
    report = tmp_path / "r.json"
    argv = ["prune", str(path), "-o", str(out), "--ratio", "0.5", "--report", str(report), "-q"]
    assert main(argv) == 0
    assert rounds == [2]
    body = json.loads(report.read_text())
    assert body["latency_ms_before"] > 0 and body["latency_ms_after"] > 0
    monkeypatch.setattr(checks, "INTERLEAVED_BYTES", 0)
    rounds.clear()
    assert main(argv) == 0
    assert rounds == []
    assert json.loads(report.read_text())["latency_ms_after"] > 0


def test_values_shape_inference_leaves_unsized_are_sized_by_a_run(tmp_path: Path) -> None:
    """Shape inference stops short on some exports (all-MiniLM-L6-v2's dynamo export: no
    LayerNorm output had a shape, so no group was timed and ``--target latency`` pruned
    nothing); one onnxruntime run sizes what it left, and the group can be timed."""
    from spa.ir.save import infer_shapes
    from spa.passes.latency_subgraph import group_nodes

    shaped = infer_shapes(_convs())
    for v in shaped.graph.value_info:  # as if inference had stopped at relu1
        if v.name in ("r1", "c2"):
            v.CopyFrom(helper.make_tensor_value_info(v.name, TensorProto.FLOAT,
                                                     ["a", 16, "b", "c"]))
    profile = LatencyProfile(reanalyse=analyse, block=4, runs=3)
    path = tmp_path / "m.onnx"
    onnx.save(_convs(), path)
    second = next(g for g in analyze(str(path)).prunable_groups
                  if any(m.space[0] == "c2" for m in g.members))
    assert "no fixed shape to r1" in group_nodes(shaped.graph, second)[1]
    sized = profile._sized(shaped)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in sized.graph.value_info}
    assert shapes["r1"] == shapes["c2"] == [1, 16, 16, 16]
    assert group_nodes(sized.graph, second)[1] == ""
    assert profile._sized(sized) is sized  # nothing left to size: no run


def test_head_groups_are_timed_in_whole_heads_down_to_the_narrowest_width(
        tmp_path: Path, monkeypatch) -> None:
    """A head group's widths are heads, not kernel blocks (12 heads snapped to AVX2's block of
    8 were timed at 8 heads only; these 4 heads at a block of 4 had no width at all, so
    ``--target latency`` could not prune a head), and every group is also timed at its
    narrowest width, one block or one head (else the allocator claims no time below a quarter
    of a group)."""
    from attn_graphs import X3, D, H, mha
    from graphs import Builder

    monkeypatch.setenv("SPA_CACHE_DIR", str(tmp_path / "cache"))
    b = Builder()
    analysis = analyze(str(_saved(tmp_path, b.model(X3, {mha(b, "x"): [1, 5, D]}))))
    heads = next(g for g in analysis.prunable_groups if g.kind is GroupKind.HEADS)
    assert heads.size == H == 4
    table = LatencyProfile(reanalyse=analyse, block=4, runs=3).run(analysis)
    assert table.groups[heads.id].kept == (3, 2, 1)  # ¾, ½, ¼ and the narrowest: one head
    convs = analyze(str(_saved(tmp_path, _convs(width=32))))
    rows = LatencyProfile(reanalyse=analyse, block=4, runs=3).run(convs).groups.values()
    assert all(row.kept == (24, 16, 8, 4) for row in rows)  # … and one block of 4


def _saved(tmp_path: Path, model: onnx.ModelProto) -> Path:
    path = tmp_path / f"{model.graph.name or 'model'}.onnx"
    onnx.save(model, path)
    return path
