"""The pipeline: the order of SPA's stages, each visited once.

``prune``: load → analyse → input sizes → statistics → score → allocate → plan → compensate →
rewrite → save → validate. ``apply``: load → analyse (with the plan's recipe) → input sizes →
the saved plan → compensate (statistics recomputed from the recipe) → rewrite → save →
validate. ``dry_run`` stops at the plan. The read-only stages are in
:mod:`spa.pipeline.stages`, the rest in :mod:`spa.pipeline.emit`; the passes themselves are the
pass library (``spa.passes``). Results flow forward as frozen values (the analysis, the layer
statistics, the plan); only the rewrite mutates, and the model never comes back here.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable

from spa.calibration import Calibration
from spa.choices import Target
from spa.coupling.analysis import Analysis
from spa.generation import cache_sizes
from spa.ir.load import LoadedModel
from spa.ir.save import check_output_path
from spa.pipeline.emit import PruneReport, emit
from spa.pipeline.options import CheckOptions, PruneOptions
from spa.pipeline.stages import (
    Latency,
    ModelLike,
    PathLike,
    Planned,
    SaliencySource,
    analyse,
    calibration,
    input_sizes,
    load,
    make_plan,
    makes_inputs,
    recipe_calibration,
    with_tokenizer,
)
from spa.plan import Plan
from spa.report import write_text_atomic

log = logging.getLogger(__name__)
__all__ = ["CheckOptions", "Planned", "Prepared", "PruneOptions", "PruneReport",
           "SaliencySource", "analyse", "analyse_as_planned", "applied", "apply", "dry_run",
           "emit", "finish", "make_plan", "plan", "prepare", "prune"]


def plan(analysis: Analysis, options: PruneOptions = PruneOptions()) -> Plan:
    """Input sizes → statistics → score → allocate, for an analysis made by the caller."""
    dims = input_sizes(analysis, cache_sizes(analysis) | dict(options.input_dims),
                       makes_inputs(options, None))
    return make_plan(analysis, dataclasses.replace(options, input_dims=dims.items)).plan


def dry_run(model: ModelLike, options: PruneOptions = PruneOptions(), *,
            plan_path: PathLike | None = None) -> Plan:
    """Load → analyse → plan, and write no model (``plan_path``: save the plan)."""
    analysis = analyse(load(model), ignore=options.ignore,
                       hidden=options.hidden_ratio is not None)
    the_plan = plan(analysis, options)
    if plan_path is not None:
        write_text_atomic(plan_path, the_plan.to_json() + "\n")
    return the_plan


def prune(model: ModelLike, output: PathLike, options: PruneOptions = PruneOptions(),
          checks: CheckOptions = CheckOptions(), *, plan_path: PathLike | None = None
          ) -> tuple[PruneReport, Plan]:
    t0 = time.perf_counter()
    loaded = load(model)
    check_output_path(output, input_path=loaded.path, input_files=loaded.data_files)
    loading = time.perf_counter() - t0
    prepared = prepare(loaded, options, checks)
    prepared.seconds["load_analyze"] += loading
    return finish(model, prepared, output, plan_path=plan_path)


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A model analysed and planned, not yet written: what :func:`finish` emits. ``seconds``:
    the stages' times so far."""

    analysis: Analysis
    planned: Planned
    options: PruneOptions
    checks: CheckOptions
    calib: Calibration | None
    dims_sizes: dict[str, int]
    dims_from: dict[str, str]
    seconds: dict[str, float]


def prepare(loaded: LoadedModel, options: PruneOptions, checks: CheckOptions, *,
            free: tuple[str, ...] = ()) -> Prepared:
    """Analyse → input sizes → calibration → plan (``free``: graph inputs and outputs that may
    change shape, spa/pipeline/family.py)."""
    t0 = time.perf_counter()
    analysis = analyse(loaded, ignore=options.ignore, hidden=options.hidden_ratio is not None,
                       free=free)
    t1 = time.perf_counter()
    given, cached = dict(options.input_dims) | dict(checks.input_dims), cache_sizes(analysis)
    dims = input_sizes(analysis, cached | given, makes_inputs(options, checks))
    options = with_tokenizer(analysis, dataclasses.replace(options, input_dims=dims.items))
    checks = dataclasses.replace(checks, input_dims=dims.items)
    if options.target is Target.LATENCY:  # the achieved speed-up, timed as the table was
        checks = dataclasses.replace(checks, latency_threads=options.threads,
                                     provider=options.provider)
    calib = calibration(analysis, options.calib, options.calibration, seed=options.seed,
                        dims=dict(options.input_dims))
    t_dims = time.perf_counter()
    planned = make_plan(analysis, options, calib=calib)
    t2 = time.perf_counter()
    return Prepared(analysis, planned, options, checks, calib, dims.sizes,
                    _how(dims.how, cached, given),
                    {"load_analyze": t1 - t0, "input_sizes": t_dims - t1, "plan": t2 - t_dims})


def finish(model: ModelLike, prepared: Prepared, output: PathLike, *,
           plan_path: PathLike | None = None, retry: bool = True) -> tuple[PruneReport, Plan]:
    """Save the plan (``plan_path``), rewrite, save and validate a model :func:`prepare` made;
    a missed latency target is planned and emitted once more (unless not ``retry``: a file of
    a folder, whose plan ties to the others')."""
    t_start = time.perf_counter()
    analysis, planned, options, checks = (prepared.analysis, prepared.planned,
                                          prepared.options, prepared.checks)
    calib = prepared.calib
    if plan_path is not None:
        write_text_atomic(plan_path, planned.plan.to_json() + "\n")
    seconds = dict(prepared.seconds)
    seconds["plan"] += time.perf_counter() - t_start
    report = emit(analysis, planned.plan, output, checks, statistics=planned.statistics,
                  calib=calib, memory=options.calib_memory)
    report.seconds.update(seconds)
    report.input_dims, report.input_dims_from = prepared.dims_sizes, prepared.dims_from
    if planned.latency is not None:
        report.latency_target = planned.latency.summary()
        again = _retry_latency(model, output, options, checks, calib, planned, report) \
            if retry else None
        if again is not None:
            report, planned = again
            if plan_path is not None:
                write_text_atomic(plan_path, planned.plan.to_json() + "\n")
    return report, planned.plan


LATENCY_TOLERANCE = 0.1  # a latency target measured further off than this is planned again


def latency_missed(report: PruneReport) -> float | None:
    """The measured share of the dense latency that a latency target's plan saved, when its
    speed-up misses the asked one by more than ``LATENCY_TOLERANCE``; else None."""
    asked = report.latency_target.get("requested_speedup")
    before, after = report.latency_ms_before, report.latency_ms_after
    if not (asked and before and after):
        return None
    return 1.0 - after / before if abs(before / after / asked - 1.0) > LATENCY_TOLERANCE \
        else None


def _miss(report: PruneReport, asked: float) -> float:
    """How far the measured speed-up is from ``asked``, as |log ratio|."""
    before, after = report.latency_ms_before, report.latency_ms_after
    return abs(math.log(before / after / asked)) if before and after else math.inf


def _retry_latency(model: ModelLike, output: PathLike, options: PruneOptions,
                   checks: CheckOptions, calib, planned: Planned, report: PruneReport
                   ) -> tuple[PruneReport, Planned] | None:
    """Plan a missed latency target once more, the table's savings scaled by what the pruned
    model measured, and emit again; when that lands further from the target (timing noise),
    the first plan is emitted again instead. A model given as a LoadedModel is consumed by the
    first emit: no retry."""
    measured = latency_missed(report)
    if measured is None or planned.latency is None or isinstance(model, LoadedModel):
        return None
    first = planned.latency
    table = first.table.corrected(first.predicted_ms, measured)
    log.warning("latency target missed: %.0f%% of the latency saved, %.0f%% asked; planning "
                "again with the table's savings scaled by %.2f", measured * 100,
                options.ratio * 100, table.scale)

    def emitted(plan_of: Callable[[Analysis], Planned]) -> tuple[PruneReport, Planned]:
        analysis = analyse(load(model), ignore=options.ignore,
                           hidden=options.hidden_ratio is not None)
        planned = plan_of(analysis)
        return emit(analysis, planned.plan, output, checks, statistics=planned.statistics,
                    calib=calib, memory=options.calib_memory), planned

    second, again = emitted(lambda a: make_plan(a, options, calib=calib, table=table))
    tries = {"first_try": _measured(report, first),
             "second_try": _measured(second, again.latency)}
    if _miss(second, first.requested_speedup) > _miss(report, first.requested_speedup):
        log.warning("the second plan measured further from the target: the first is kept")
        second, again = emitted(lambda a: make_plan(a, options, calib=calib,
                                                    table=first.table))
    second.seconds.update({f"first_try_{k}": v for k, v in report.seconds.items()})
    second.input_dims, second.input_dims_from = report.input_dims, report.input_dims_from
    assert again.latency is not None
    second.latency_target = again.latency.summary() | tries
    return second, again


def _measured(report: PruneReport, latency: Latency | None) -> dict:
    return {"predicted_ms": latency.predicted_ms if latency is not None else None,
            "scale": latency.table.scale if latency is not None else None,
            "latency_ms_before": report.latency_ms_before,
            "latency_ms_after": report.latency_ms_after}


def apply(model: ModelLike, the_plan: Plan, output: PathLike,
          checks: CheckOptions = CheckOptions()) -> PruneReport:
    """Apply a saved plan; the analysis runs with the options the plan was made with."""
    loaded = load(model)
    check_output_path(output, input_path=loaded.path, input_files=loaded.data_files)
    return applied(analyse_as_planned(loaded, the_plan), the_plan, output, checks)


def analyse_as_planned(loaded: LoadedModel, the_plan: Plan, *,
                       free: tuple[str, ...] = ()) -> Analysis:
    """The analysis with the options the plan was made with (``free``: as in :func:`prepare`)."""
    recipe = the_plan.recipe
    return analyse(loaded, ignore=recipe.ignore if recipe else (),
                   hidden=recipe.hidden if recipe else False, free=free)


def applied(analysis: Analysis, the_plan: Plan, output: PathLike,
            checks: CheckOptions = CheckOptions()) -> PruneReport:
    """Emit ``the_plan`` on ``analysis`` (consumed), calibrated as its recipe says."""
    recipe = the_plan.recipe
    given, cached = dict(checks.input_dims), cache_sizes(analysis)
    dims = input_sizes(analysis, cached | given, bool(checks.validate or checks.check_masked))
    report = emit(analysis, the_plan, output, dataclasses.replace(checks, input_dims=dims.items),
                  calib=recipe_calibration(analysis, recipe))
    report.input_dims, report.input_dims_from = dims.sizes, _how(dims.how, cached, given)
    return report


def _how(how: dict[str, str], cached: dict[str, int], given: dict[str, int]) -> dict[str, str]:
    """How each symbolic dim was sized, "kv cache" for a decoder's cache dims (``cached``:
    spa.generation.cache_sizes, which spa/inputs.py takes as given) that no flag gave."""
    return how | {k: "kv cache" for k in cached if k in how and k not in given}
