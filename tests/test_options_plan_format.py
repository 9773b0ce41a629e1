"""Options declared once, the typed plan recipe (format 2, format 1 still read), the pass
contract of compensation (returns updates, mutates nothing), and the lazy ``spa.prune``."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from spa.api import CheckOptions, PruneOptions, analyze, apply, plan, prune
from spa.choices import HessianSource, Target
from spa.cli import build_parser
from spa.errors import OptionError
from spa.options import flag_of, from_args
from spa.passes.compensation import Compensation
from spa.passes.importance.obspa import OBSPA, OBSPAOptions
from spa.passes.statistics import LayerStatistics
from spa.plan import PLAN_FORMAT, Plan
from spa.recipe import CompensationRecipe
from tests.test_cli import _conv_net

NO_CHECKS = CheckOptions(validate=False, latency=False)


@pytest.fixture()
def model_path(tmp_path: Path) -> Path:
    p = tmp_path / "net.onnx"
    onnx.save(_conv_net(), str(p))
    return p


def test_obspa_defaults_are_declared_once() -> None:
    by_name = {f.name: f for f in dataclasses.fields(PruneOptions)}
    for f in dataclasses.fields(OBSPAOptions):
        assert by_name[f.name].default == f.default
        assert flag_of(by_name[f.name]) is flag_of(f)  # the same declaration, copied
    options = PruneOptions(criterion="obspa", damping=0.05, samples=4)
    # the criterion gets the Hessian source resolved: synthetic, as no --calib data is given
    assert options.criterion_options(OBSPA) == OBSPAOptions(
        hessian=HessianSource.SYNTHETIC, damping=0.05, samples=4)


def test_cli_defaults_are_the_dataclass_defaults(tmp_path: Path) -> None:
    args = build_parser().parse_args(["prune", "m.onnx", "-o", "o.onnx"])
    assert from_args(PruneOptions, args) == PruneOptions()
    assert from_args(CheckOptions, args) == CheckOptions()
    args = build_parser().parse_args(["prune", "m.onnx", "--hidden", "--ratio", "0.4",
                                      "--target", "flops", "--no-compensate", "--check-masked",
                                      "--no-validate", "--input-dim", "h=8", "--ignore", "a*"])
    options = from_args(PruneOptions, args)
    assert (options.hidden_ratio, options.target, options.compensate, options.ignore,
            options.input_dims) == (0.4, Target.FLOPS, False, ("a*",), (("h", 8),))
    checks = from_args(CheckOptions, args)
    assert (checks.validate, checks.check_masked, checks.latency) == (True, True, False)


def test_a_ratio_is_checked_in_one_place() -> None:
    from spa.errors import OptionError

    with pytest.raises(OptionError, match=r"heads ratio must be in \[0, 1\), got 1.5"):
        PruneOptions(heads_ratio=1.5)


def test_an_enum_option_is_taken_by_its_value_or_refused() -> None:
    """``PruneOptions(hessian="calibration")`` means the member, as the CLI's parse does; a
    plain string would compare unequal to every member, and the statistics would silently have
    been drawn from random inputs instead of the calibration data."""
    assert PruneOptions(hessian="calibration").hessian is HessianSource.CALIBRATION
    assert PruneOptions(target="latency").target is Target.LATENCY
    with pytest.raises(OptionError, match="hessian: 'calib' is not one of synthetic"):
        PruneOptions(hessian="calib")


def test_plan_recipe_is_typed_and_round_trips(model_path: Path) -> None:
    options = PruneOptions(ratio=0.5, criterion="obspa", hessian=HessianSource.NOISE, samples=2)
    the_plan = plan(analyze(model_path), options)
    recipe = the_plan.recipe
    assert recipe.compensation == CompensationRecipe(HessianSource.NOISE, 0.1, 2, None, ())
    assert recipe.bias_compensation is None and recipe.target is Target.CHANNELS
    body = json.loads(the_plan.to_json())
    assert body["format"] == PLAN_FORMAT == 2 and "meta" not in body
    assert Plan.from_json(the_plan.to_json()) == the_plan


def test_format_1_plans_are_converted_and_apply_byte_for_byte(model_path: Path,
                                                              tmp_path: Path) -> None:
    options = PruneOptions(ratio=0.5, criterion="obspa", hessian=HessianSource.NOISE, samples=2)
    _, the_plan = prune(model_path, tmp_path / "pruned.onnx", options, NO_CHECKS)
    body = json.loads(the_plan.to_json())
    body["meta"], body["format"] = body.pop("recipe"), 1  # what format 1 wrote
    old = tmp_path / "old.json"
    old.write_text(json.dumps(body))
    assert Plan.load(old) == the_plan
    apply(model_path, old, tmp_path / "again.onnx", NO_CHECKS)
    assert (tmp_path / "again.onnx").read_bytes() == (tmp_path / "pruned.onnx").read_bytes()


def test_compensation_returns_updates_and_mutates_nothing(model_path: Path) -> None:
    analysis = analyze(model_path)
    the_plan = plan(analysis, PruneOptions(ratio=0.5))
    tensors = analysis.model.graph.tensors()
    before = {n: np.array(t.values) for n, t in tensors.items() if hasattr(t, "values")}
    stats = LayerStatistics(source=HessianSource.NOISE, samples=2).run(analysis)
    updates = Compensation(damping=0.1).run(analysis, the_plan, stats)
    assert updates.layers == len(updates.values) >= 1
    for name, values in updates.values.items():
        assert values.shape == before[name].shape and not np.array_equal(values, before[name])
    for name, values in before.items():
        np.testing.assert_array_equal(np.asarray(tensors[name].values), values)


def test_spa_exports_the_api_lazily() -> None:
    code = ("import sys, spa; assert 'onnx' not in sys.modules; "
            "import spa.api; assert spa.prune is spa.api.prune and spa.apply is spa.api.apply "
            "and spa.analyze is spa.api.analyze")
    subprocess.run([sys.executable, "-c", code], check=True)
