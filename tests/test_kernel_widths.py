"""Kernel-aware widths (``--round-to auto``, the default; passes/kernel_widths.py): which groups
round to onnxruntime's NCHWc block and which keep their exact counts, on tiny graphs, under the
masked oracle. The suite pins the block to 16 (tests/conftest.py)."""

from __future__ import annotations

import json

import pytest
from graphs import Builder, group_of, init_shapes
from oracle import prune_checked

from spa.api import analyze
from spa.passes.kernel_widths import KernelWidths
from spa.passes.latency import kernel_block
from spa.plan import Plan

BLOCK = 16


def test_the_suite_pins_the_block() -> None:
    assert kernel_block() == BLOCK


def _cnn():
    """``c1`` (3→32) → depthwise ``dw`` (32) → 1×1 ``c2`` (32→24) → 1×1 ``c3`` (24→40) → pool
    → ``fc1`` (Gemm 40→48) → ``fc2`` (48→10). Groups: 32 (c1's output, read by the depthwise
    conv), 24 (c2's output, read by a g=1 conv), 40 (c3's output, read by a Gemm only: padded
    to a block in c3 whatever its count) and 48 (Gemms only)."""
    b = Builder()
    y = b.op("Relu", b.conv("x", 3, 32, name="c1"))
    y = b.op("Relu", b.conv(y, 32, 32, group=32, name="dw"))
    y = b.op("Relu", b.conv(y, 32, 24, k=1, name="c2"))
    y = b.op("Relu", b.conv(y, 24, 40, k=1, name="c3"))
    y = b.op("Flatten", b.op("GlobalAveragePool", y))
    y = b.gemm(b.op("Relu", b.gemm(y, 40, 48, name="fc1")), 48, 10, name="fc2")
    return b.model({"x": [1, 3, 6, 6]}, {y: [1, 10]})


def _steps(m, *spaces):
    steps = KernelWidths(block=BLOCK).run(analyze(m))
    return [steps[group_of(m, t, ax).id] for t, ax in spaces]


def test_conv_groups_round_gemm_groups_do_not() -> None:
    m = _cnn()
    assert _steps(m, ("c1.w", 0), ("c2.w", 0), ("c3.w", 0), ("fc1.w", 0)) == [16, 16, 1, 1]
    assert group_of(m, "dw.w", 0).id == group_of(m, "c1.w", 0).id


@pytest.mark.parametrize("round_to, widths", [
    # exact: 32 - 16, 24 - 12, 40 - 20, 48 - 24
    (1, (16, 12, 20, 24)),
    # auto: the groups blocked convs read keep whole blocks of 16 (12 → 16), the others exact
    ("auto", (16, 16, 20, 24)),
    # an explicit 8 rounds every group: 20 → 24
    (8, (16, 16, 24, 24)),
])
def test_widths_by_round_to(tmp_path, round_to, widths) -> None:
    m = _cnn()
    out = prune_checked(m, tmp_path, ratio=0.5, round_to=round_to)
    shapes = init_shapes(out.path)
    assert tuple(shapes[f"{n}.w"][0] for n in ("c1", "c2", "c3", "fc1")) == widths
    assert shapes["dw.w"] == (widths[0], 1, 3, 3)


def test_default_is_auto(tmp_path) -> None:
    """At ratio 0.3 the depthwise group of 32 keeps 32 - 9 = 23 → 32 (a whole block more), the
    one of 24 keeps 17 → 24 (full), c3's 28 and fc1's 34 stay exact."""
    out = prune_checked(_cnn(), tmp_path, ratio=0.3)
    shapes = init_shapes(out.path)
    assert tuple(shapes[f"{n}.w"][0] for n in ("c1", "c2", "c3", "fc1")) == (32, 24, 28, 34)


def test_plan_records_the_block_and_steps(tmp_path) -> None:
    m = _cnn()
    out = prune_checked(m, tmp_path, ratio=0.5)
    recipe = Plan.from_json(out.plan.to_json()).recipe
    assert recipe is not None and recipe.round_to == BLOCK
    by_name = {g.name: g.id for g in out.plan.groups}
    assert dict(recipe.kernel_steps or ()) == {by_name["c1.w[0]"]: 16, by_name["c2.w[0]"]: 16,
                                               by_name["c3.w[0]"]: 1, by_name["fc1.w[0]"]: 1}
    body = json.loads(out.plan.to_json())
    assert body["recipe"]["round_to_auto"] is True
    exact = prune_checked(m, tmp_path, ratio=0.5, round_to=1, name="exact.onnx")
    assert exact.plan.recipe is not None and exact.plan.recipe.kernel_steps is None
    assert exact.plan.recipe.round_to == 1


def test_grouped_conv_units(tmp_path) -> None:
    """Grouped (not depthwise) convs keep their per-group widths, so the unit of the group is a
    conv group: 4 groups of 16 channels are whole blocks whatever survives (step 1); 16 groups
    of 2 channels need 8 groups for a block (step 8)."""
    for groups, ratio, kept in ((4, 0.5, 32), (16, 0.5, 16), (16, 0.3, 32)):
        b = Builder()
        y = b.op("Relu", b.conv("x", 3, 32 if groups == 16 else 64, name="c1"))
        c = 32 if groups == 16 else 64
        y = b.op("Relu", b.conv(y, c, c, group=groups, name="g"))
        y = b.conv(y, c, 16, k=1, name="c3")
        m = b.model({"x": [1, 3, 4, 4]}, {y: [1, 16, 4, 4]})
        assert _steps(m, ("c1.w", 0)) == [1 if groups == 4 else 8]
        out = prune_checked(m, tmp_path, ratio=ratio, name=f"g{groups}_{ratio}.onnx")
        assert init_shapes(out.path)["c1.w"][0] == kept, (groups, ratio)


def test_small_groups_stay_exact(tmp_path) -> None:
    """A group smaller than the block cannot reach one: its count stays exact."""
    b = Builder()
    y = b.conv(b.op("Relu", b.conv("x", 3, 12, name="c1")), 12, 4, name="c2")
    m = b.model({"x": [1, 3, 4, 4]}, {y: [1, 4, 4, 4]})
    out = prune_checked(m, tmp_path, ratio=0.5)
    assert init_shapes(out.path)["c1.w"][0] == 6


def test_non_float_weights_do_not_round() -> None:
    """The blocked fact needs a constant float32 4-D weight: a 1-D conv's groups stay exact."""
    b = Builder()
    y = b.conv(b.op("Relu", b.conv("x", 3, 32, dims=1, name="c1")), 32, 4, dims=1, name="c2")
    m = b.model({"x": [1, 3, 8]}, {y: [1, 4, 8]})
    assert _steps(m, ("c1.w", 0)) == [1]


def test_apply_on_another_cpu_writes_the_same_model(tmp_path, monkeypatch) -> None:
    """The plan holds the kept channels and the block it was made for: ``spa apply`` where the
    CPU's block differs (8, AVX2) writes the same bytes, while planning there rounds to 8."""
    from spa.api import CheckOptions, apply

    m = _cnn()
    made = prune_checked(m, tmp_path, ratio=0.3)
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(made.plan.to_json())
    monkeypatch.setenv("SPA_KERNEL_BLOCK", "8")
    applied = tmp_path / "applied.onnx"
    apply(tmp_path / "model.onnx", plan_path, applied, CheckOptions(latency=False))
    assert applied.read_bytes() == made.path.read_bytes()
    here = prune_checked(m, tmp_path, ratio=0.3, name="avx2.onnx")
    assert here.plan.recipe is not None and here.plan.recipe.round_to == 8
    assert init_shapes(here.path)["c1.w"][0] == 24  # 23 → 24, where 16 gave 32


@pytest.mark.parametrize("target, ratio", [("flops", 0.5), ("flops", 0.3), ("params", 0.5)])
def test_uniform_target_is_not_overshot(tmp_path, target, ratio) -> None:
    """A params/FLOPs target with uniform allocation: five groups of 32 channels, each a whole
    block either way (16 or 32 kept). Moving every group a block at once, as the bisection on
    rounded counts did, can only remove about 3/4 of the MACs or nothing; rounding each group
    up or down from the exact counts lands near the target, with every count still a block
    multiple."""
    b = Builder()
    y = "x"
    for i, c in enumerate((3, 32, 32, 32, 32, 32)[:-1]):
        y = b.op("Relu", b.conv(y, c, 32, name=f"c{i}"))
    y = b.conv(y, 32, 16, k=1, name="head")
    m = b.model({"x": [1, 3, 8, 8]}, {y: [1, 16, 8, 8]})
    lockstep = prune_checked(m, tmp_path, ratio=ratio, target=target, round_to=1,
                             name="exact.onnx")
    out = prune_checked(m, tmp_path, ratio=ratio, target=target, name=f"{target}.onnx")
    rep = out.report
    before, after = ((rep.flops_before, rep.flops_after) if target == "flops"
                     else (rep.params_before, rep.params_after))
    reached = 1 - after / before
    assert ratio <= reached <= ratio + 0.2, reached
    shapes = init_shapes(out.path)
    assert all(shapes[f"c{i}.w"][0] in (16, 32) for i in range(5))
    # the exact counts meet the target too, closer still
    exact = lockstep.report
    assert 1 - exact.flops_after / exact.flops_before >= (ratio if target == "flops" else 0)


def test_exact_groups_take_back_what_a_block_overshot(tmp_path) -> None:
    """An MNIST-like CNN: c1's 32 channels move a whole block (16 or 32: they feed a blocked
    conv), c2's 64 and fc1's 128 are exact (a Gemm reads them). When rounding c1 down
    overshoots, the exact groups prune less, so the FLOPs cut lands on the target."""
    b = Builder()
    y = b.op("Relu", b.conv("x", 1, 32, name="c1"))
    y = b.op("Flatten", b.op("Relu", b.conv(y, 32, 64, name="c2")))
    y = b.gemm(b.op("Relu", b.gemm(y, 64 * 36, 128, name="fc1")), 128, 10, name="fc2")
    m = b.model({"x": [1, 1, 6, 6]}, {y: [1, 10]})
    out = prune_checked(m, tmp_path, ratio=0.5, target="flops")
    shapes = init_shapes(out.path)
    assert shapes["c1.w"][0] in (16, 32)
    reached = 1 - out.report.flops_after / out.report.flops_before
    assert 0.5 <= reached <= 0.52, reached
