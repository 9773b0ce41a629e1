"""The Python API: ``spa.analyze``, ``spa.plan``, ``spa.dry_run``, ``spa.prune``, ``spa.apply``.

The CLI is a thin shell over these functions. ``prune`` = load → analyse → score → allocate
(a :class:`~spa.plan.Plan`) → :func:`apply_plan`; ``dry_run`` stops at the plan (which carries
the predicted params and FLOPs) and writes no model; ``apply`` = load → analyse → a saved plan →
:func:`apply_plan`. ``apply_plan`` rewrites, re-infers shapes, validates with onnxruntime (and
the numeric oracle with ``check_masked``) *before* writing, then writes atomically.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import logging
import os
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from spa import validate as val
from spa.coupling.analysis import Analysis, CouplingAnalysis
from spa.errors import NothingPrunableError, OptionError
from spa.inputs import InputDims, resolve
from spa.ir import to_onnx
from spa.ir.external import attach_external
from spa.ir.load import LoadedModel, import_graph, load_model, load_proto
from spa.ir.save import (
    Staging,
    check_output_path,
    full_check,
    infer_shapes,
    streamed,
    write_proto,
    write_streamed,
)
from spa.ir.tied import join_ties
from spa.ir.widen import uses_bfloat16, widened
from spa.metrics import CostModel, file_size, latency_ms
from spa.passes.allocation import Allocation, Target
from spa.passes.compensation import BiasCompensation, Compensation
from spa.passes.hessian import HessianSource, collect, consumer_layers, input_stats
from spa.passes.importance import CRITERIA, Criterion, Normalization, Reduction, get_criterion
from spa.passes.importance.calibrated import Calibrated
from spa.passes.importance.obspa import OBSPA
from spa.passes.rewrite import Rewrite
from spa.plan import Plan
from spa.report import report_notes, report_table, write_report, write_text_atomic  # noqa: F401

log = logging.getLogger(__name__)
PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class PruneOptions:
    ratio: float = 0.3
    heads_ratio: float | None = None  # attention heads (default: ratio)
    mlp_ratio: float | None = None  # dense neurons, e.g. MLP widths (default: ratio)
    hidden_ratio: float | None = None  # the residual stream; None: hidden size is not pruned
    target: Target = Target.CHANNELS
    criterion: str = "l1"
    reduction: Reduction = Reduction.MEAN
    normalization: Normalization = Normalization.MEAN
    global_ranking: bool = False
    round_to: int = 1
    min_channels: int = 1
    ignore: tuple[str, ...] = ()
    seed: int = 0
    # OBSPA (criterion "obspa"): where H comes from, its damping, how many synthetic samples,
    # calibration data (arrays named after the graph inputs), and whether to write the update.
    hessian: HessianSource = HessianSource.SYNTHETIC
    damping: float = 0.1
    samples: int = 32
    calib: str | None = None
    compensate: bool = True
    # Sizes of symbolic input dims for the inputs SPA makes (synthetic Hessians): ("H", 224), …;
    # the others are sized by spa/inputs.py, once per run.
    input_dims: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class CheckOptions:
    """What validation runs. ``check_masked``: None (the default) runs the numeric oracle
    whenever it applies to the plan (:func:`spa.validate.oracle_exemption`); True requires it
    (a plan it cannot apply to is then validated without it, with a warning); False turns it
    off (``--no-check``)."""

    validate: bool = True
    check_masked: bool | None = None
    rtol: float = 1e-4
    latency: bool = True
    latency_runs: int = 20
    input_dims: tuple[tuple[str, int], ...] = ()  # symbolic input dims for validation inputs


@dataclass
class PruneReport:
    input: str
    output: str
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    predicted_params_after: int
    predicted_flops_after: int
    bytes_before: int
    bytes_after: int
    groups: int
    groups_pruned: int
    channels_before: int
    channels_after: int
    frozen: list[dict]
    latency_ms_before: float | None = None
    latency_ms_after: float | None = None
    masked_max_abs_diff: float | None = None
    masked_relative_diff: float | None = None
    # What became of the numeric oracle: "held", or why it did not run.
    oracle: str = ""
    compensated_layers: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    # The sizes SPA's made-up inputs gave the symbolic input dims, and how each was chosen
    # ("flag", "metadata", "name", "position", "default", "searched": spa/inputs.py).
    input_dims: dict[str, int] = field(default_factory=dict)
    input_dims_from: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _load(model: PathLike | onnx.ModelProto | LoadedModel) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, onnx.ModelProto):
        return load_proto(model)
    return load_model(model)


def analyze(model: PathLike | onnx.ModelProto | LoadedModel, *, ignore: tuple[str, ...] = (),
            hidden: bool = False) -> Analysis:
    """Coupling analysis; ``hidden`` also makes the residual stream (hidden size) prunable."""
    return CouplingAnalysis(ignore=ignore, hidden=hidden).run(_load(model))


def plan(analysis: Analysis, options: PruneOptions = PruneOptions()) -> Plan:
    """Score and allocate: the plan for ``analysis`` under ``options``."""
    dims = _input_dims(analysis, dict(options.input_dims), _makes_inputs(options, None))
    return _plan(analysis, dataclasses.replace(options, input_dims=dims.items))[0]


def _makes_inputs(options: PruneOptions, checks: CheckOptions | None) -> bool:
    """Whether the run feeds made-up inputs: validation, or OBSPA's data-free Hessians."""
    synthetic = CRITERIA.get(options.criterion) is OBSPA and options.hessian in (
        HessianSource.SYNTHETIC, HessianSource.NOISE)
    return synthetic or (checks is not None and (checks.validate or checks.check_masked))


def _input_dims(analysis: Analysis, given: dict[str, int], needed: bool) -> InputDims:
    """The symbolic input dims sized once per run (spa/inputs.py) when the run makes inputs
    (``needed``) and can prune anything; else just the ``given`` ones. The criterion and
    validation then take the same sizes."""
    if not (needed and analysis.prunable_groups):
        return InputDims(given, dict.fromkeys(given, "flag"))
    loaded = analysis.model  # the original: its file, or the normal form of one in memory
    metadata = {p.key: p.value for p in loaded.proto_header.metadata_props}
    return resolve(loaded.graph.inputs, metadata, given,
                   val.probe(lambda: loaded.path or to_onnx(loaded)))


def _criterion_options(options: PruneOptions) -> dict:
    cls = CRITERIA.get(options.criterion)
    if cls is OBSPA:
        return {"hessian": options.hessian, "damping": options.damping,
                "samples": options.samples, "calib": load_calibration(options.calib),
                "dims": dict(options.input_dims)}
    if cls is not None and issubclass(cls, Calibrated):
        return {"calib": load_calibration(options.calib)}
    return {}


def _gradient_options(analysis: Analysis, options: PruneOptions) -> dict:
    """Saliencies for a gradient criterion on an ONNX file: the model runs in PyTorch on the
    ``--calib`` inputs and labels. Without ``--calib`` the criterion explains what it needs."""
    from spa.passes.importance.gradient import Gradient

    cls = CRITERIA.get(options.criterion)
    if cls is None or not issubclass(cls, Gradient) or options.calib is None:
        return {}
    try:
        from spa.torch.saliency import onnx_saliency
    except ImportError as exc:
        raise OptionError(f"criterion {options.criterion} needs PyTorch "
                          "(pip install 'spa-prune[torch]')") from exc
    return {"saliency": onnx_saliency(to_onnx(analysis.model), load_calibration(options.calib),
                                      cls.needs)}


def load_calibration(path: str | None) -> dict[str, np.ndarray] | None:
    """Arrays named after the graph inputs, first axis = samples (``--calib FILE.npz``)."""
    if path is None:
        return None
    if not Path(path).is_file():
        raise OptionError(f"{path}: no such calibration file")
    if not zipfile.is_zipfile(path):
        raise OptionError(f"{path}: not an .npz file (save arrays with numpy.savez)")
    try:
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise OptionError(f"{path}: not a readable .npz of calibration arrays ({exc})") from exc


def _plan(analysis: Analysis, options: PruneOptions, criterion_options: dict | None = None
          ) -> tuple[Plan, Criterion]:
    """``criterion_options`` adds what only a caller has (the torch front end's saliencies)."""
    if not analysis.prunable_groups:
        raise NothingPrunableError(_nothing_prunable(analysis))
    criterion = get_criterion(options.criterion, reduction=options.reduction,
                              normalization=options.normalization, seed=options.seed,
                              **_criterion_options(options),
                              **(criterion_options or _gradient_options(analysis, options)))
    scores = criterion.run(analysis)
    alloc = Allocation(ratio=options.ratio, target=options.target,
                       global_ranking=options.global_ranking, round_to=options.round_to,
                       min_channels=options.min_channels, heads_ratio=options.heads_ratio,
                       mlp_ratio=options.mlp_ratio, hidden_ratio=options.hidden_ratio)
    meta = {"criterion": options.criterion, "ratio": options.ratio,
            "heads_ratio": options.heads_ratio, "mlp_ratio": options.mlp_ratio,
            "hidden_ratio": options.hidden_ratio,
            "target": options.target.value, "global": options.global_ranking,
            "round_to": options.round_to, "seed": options.seed, "ignore": list(options.ignore)}
    if options.criterion == "obspa" and options.compensate:
        meta["compensation"] = {"hessian": options.hessian.value, "damping": options.damping,
                                "samples": options.samples, "calib": options.calib,
                                "input_dims": dict(options.input_dims)}
    if getattr(criterion, "bias_compensation", False) and options.compensate:
        meta["bias_compensation"] = {"calib": options.calib}
    return alloc.run(analysis, scores, meta), criterion


def _nothing_prunable(analysis: Analysis) -> str:
    """Why no group can be pruned: no nodes at all, or the first few freeze reasons."""
    if not analysis.model.graph.nodes:
        return ("no prunable channel group in the model: its graph has no nodes (the outputs "
                "are inputs or constants)")
    reasons = sorted({r for g in analysis.frozen_groups for r in g.frozen})[:3]
    return "no prunable channel group in the model" + (
        f" (e.g. {'; '.join(reasons)})" if reasons else "")


def dry_run(model: PathLike | onnx.ModelProto | LoadedModel,
            options: PruneOptions = PruneOptions(), *, plan_path: PathLike | None = None
            ) -> Plan:
    """Analyse and plan, and write no model: the plan holds every decision and the predicted
    params/FLOPs (``spa prune --dry-run``). ``plan_path`` saves it for ``spa apply``."""
    analysis = analyze(model, ignore=options.ignore, hidden=options.hidden_ratio is not None)
    the_plan = plan(analysis, options)
    if plan_path is not None:
        write_text_atomic(plan_path, the_plan.to_json() + "\n")
    return the_plan


def _gc_paused(fn):
    """Run ``fn`` with Python's cyclic garbage collector off (as it was, after). A full
    collection walks every object of the process: a graph's hundreds of thousands, 0.1–0.3 s
    per collection on ViT-B/16, for almost no garbage; the cycles a run leaves (graphs, nodes
    and tensors) are collected once it is over."""

    @functools.wraps(fn)
    def paused(*args, **kwargs):
        enabled = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if enabled:
                gc.enable()

    return paused


@_gc_paused
def prune(model: PathLike, output: PathLike, options: PruneOptions = PruneOptions(),
          checks: CheckOptions = CheckOptions(), *, plan_path: PathLike | None = None
          ) -> tuple[PruneReport, Plan]:
    t0 = time.perf_counter()
    loaded = _load(model)
    check_output_path(output, input_path=loaded.path, input_files=loaded.data_files)
    analysis = analyze(loaded, ignore=options.ignore, hidden=options.hidden_ratio is not None)
    t1 = time.perf_counter()
    dims = _input_dims(analysis, dict(options.input_dims) | dict(checks.input_dims),
                       _makes_inputs(options, checks))
    options = dataclasses.replace(options, input_dims=dims.items)
    checks = dataclasses.replace(checks, input_dims=dims.items)
    t_dims = time.perf_counter()
    the_plan, criterion = _plan(analysis, options)
    if plan_path is not None:
        write_text_atomic(plan_path, the_plan.to_json() + "\n")
    t2 = time.perf_counter()
    report = apply_plan(analysis, the_plan, output, checks,
                        hessians=getattr(criterion, "hessians", None),
                        stats=getattr(criterion, "stats", None))
    report.seconds.update(load_analyze=t1 - t0, input_sizes=t_dims - t1, plan=t2 - t_dims)
    report.input_dims, report.input_dims_from = dims.sizes, dims.how
    return report, the_plan


@_gc_paused
def apply(model: PathLike, plan_file: PathLike | Plan, output: PathLike,
          checks: CheckOptions = CheckOptions()) -> PruneReport:
    """Apply a saved plan; the analysis runs with the options the plan was made with."""
    loaded = _load(model)
    check_output_path(output, input_path=loaded.path, input_files=loaded.data_files)
    the_plan = plan_file if isinstance(plan_file, Plan) else Plan.load(plan_file)
    analysis = analyze(loaded, ignore=tuple(the_plan.meta.get("ignore", ())),
                       hidden=the_plan.meta.get("hidden_ratio") is not None)
    dims = _input_dims(analysis, dict(checks.input_dims), checks.validate or checks.check_masked)
    report = apply_plan(analysis, the_plan, output,
                        dataclasses.replace(checks, input_dims=dims.items))
    report.input_dims, report.input_dims_from = dims.sizes, dims.how
    return report


def apply_plan(analysis: Analysis, the_plan: Plan, output: PathLike,
               checks: CheckOptions = CheckOptions(), *,
               hessians: dict | None = None, stats: dict | None = None) -> PruneReport:
    """(Compensate,) rewrite, write to a staging directory, validate, then move into place.
    Mutates ``analysis.model`` (it is consumed).

    A plan made by OBSPA carries its compensation recipe; ``hessians`` saves recomputing them.
    A streamed model (external data, or over 2 GB) is written tensor by tensor and validated
    from its files; the input file stands for the original there.
    """
    the_plan.check_against(analysis)  # before anything (compensation) touches the weights
    loaded = analysis.model
    t0 = time.perf_counter()
    before = CostModel(loaded.graph).count()
    channels_before = sum(g.size for g in analysis.prunable_groups)
    checks, oracle = _oracle_decision(analysis, the_plan, checks)
    checks, widen = _bfloat16_checks(loaded, checks)
    with Staging(output, input_path=loaded.path, input_files=loaded.data_files) as stage:
        sources = _reference_models(analysis, the_plan, checks, stage)
        compensated, shifts = _compensate(analysis, the_plan, hessians, stats)
        Rewrite().run(analysis, the_plan)
        compensated += BiasCompensation().apply(analysis, the_plan, shifts)
        join_ties(loaded.graph, loaded.ties)  # each tensor of the file written once
        if loaded.mapped is not None:  # what the export still reads is mapped again then
            loaded.mapped.release()
        if streamed(loaded):
            write_streamed(loaded, stage.model_path)
            pruned: PathLike | onnx.ModelProto = stage.model_path
            reread = load_model(stage.model_path)
            emitted = reread.graph, reread.ties
        else:
            pruned = infer_shapes(to_onnx(loaded))
            emitted = import_graph(pruned, "the rewritten model")  # its shapes inferred once
        t1 = time.perf_counter()
        report_extra = _validate(*sources, pruned, checks, widen=widen) if sources else {}
        t2 = time.perf_counter()
        # Measured on the emitted model (re-read in normal form), not derived from the plan;
        # its normal form holds each tensor of its file once, as the input's count (read
        # from its file: normal form may fold float shape arithmetic away) does.
        after = CostModel(*emitted).count()
        if isinstance(pruned, onnx.ModelProto):
            full_check(pruned)
            write_proto(pruned, stage.model_path)
        out = stage.commit()
    t3 = time.perf_counter()
    pred = the_plan.prediction
    report = PruneReport(
        input=str(loaded.path or "<memory>"), output=str(out),
        params_before=loaded.params, params_after=after.params,
        flops_before=before.flops, flops_after=after.flops,
        predicted_params_after=pred.params_after if pred else -1,
        predicted_flops_after=pred.flops_after if pred else -1,
        bytes_before=loaded.file_bytes, bytes_after=file_size(out),
        groups=len(analysis.groups), groups_pruned=sum(1 for g in the_plan.groups if g.removed),
        channels_before=channels_before,
        channels_after=sum(len(g.keep) for g in the_plan.groups),
        frozen=[{"group": f.id, "name": f.name, "channels": f.size, "reasons": list(f.reasons)}
                for f in the_plan.frozen],
        seconds={"rewrite": t1 - t0, "validate": t2 - t1, "save": t3 - t2},
        compensated_layers=compensated, oracle=oracle, **report_extra)
    return report


def _oracle_decision(analysis: Analysis, the_plan: Plan, checks: CheckOptions
                     ) -> tuple[CheckOptions, str]:
    """Whether the numeric oracle runs (``checks.check_masked`` made a bool), and the words the
    report gives when it does not."""
    exemption = val.oracle_exemption(analysis, the_plan)
    if checks.check_masked is False:
        why = "off (--no-check)"
    elif not checks.validate and checks.check_masked is None:
        why = "not run (--no-validate)"
    elif exemption is not None:
        why = f"does not apply: {exemption}"
        if checks.check_masked:
            log.warning("the masked oracle does not apply: %s; validating without it",
                        exemption)
    else:
        return dataclasses.replace(checks, validate=True, check_masked=True), "held"
    return dataclasses.replace(checks, check_masked=False), why


def _compensate(analysis: Analysis, the_plan: Plan, hessians: dict | None,
                stats: dict | None) -> tuple[int, dict]:
    """OBSPA's weight update (written now) and FLAP's bias shifts (added after the rewrite),
    as the plan's recipes say."""
    recipe = the_plan.meta.get("compensation")
    bias_recipe = the_plan.meta.get("bias_compensation")
    shifts = {}
    if bias_recipe:
        if not stats:
            stats = input_stats(analysis, consumer_layers(analysis), HessianSource.CALIBRATION,
                                calib=load_calibration(bias_recipe.get("calib")))
        shifts = BiasCompensation().shifts(analysis, the_plan, stats)
    compensated = 0
    if recipe:
        if not hessians:
            hessians = collect(analysis, consumer_layers(analysis),
                               HessianSource(recipe["hessian"]), samples=recipe["samples"],
                               seed=the_plan.meta.get("seed", 0),
                               calib=load_calibration(recipe.get("calib")),
                               dims=recipe.get("input_dims"))
        compensated = Compensation(damping=recipe["damping"]).run(analysis, the_plan, hessians)
    return compensated, shifts


def _reference_models(analysis: Analysis, the_plan: Plan, checks: CheckOptions,
                      stage: Staging) -> tuple | None:
    """What validation compares against, taken before the rewrite: the original model (the
    normal form the analysis ran on), a maker of the masked original (the numeric oracle) and
    the outputs no weight reaches. A streamed model's are written into the staging directory,
    tensor by tensor."""
    if not (checks.validate or checks.check_masked):
        return None
    loaded = analysis.model
    if not streamed(loaded):
        # On disk, not held: onnxruntime reads it when validation starts, after the rewrite.
        original_path = stage.dir / "original.onnx"
        proto = to_onnx(loaded)
        weight_free = val.weight_free_outputs(proto)
        write_proto(proto, original_path)
        del proto
        if not checks.check_masked:
            return original_path, None, weight_free
        return original_path, lambda: val.masked_model(onnx.load(str(original_path)), analysis,
                                                       the_plan), weight_free
    base = loaded.path.parent if loaded.path is not None else None
    refs = to_onnx(loaded, references=True)
    weight_free = val.weight_free_outputs(refs)
    original = _stage_copy(loaded, refs, base, stage, "original")
    if not checks.check_masked:
        return original, None, weight_free
    masked = val.masked_model(refs, analysis, the_plan, base_dir=base)
    masked_path = _stage_copy(loaded, masked, base, stage, "masked")
    return original, lambda: masked_path, weight_free


def _stage_copy(loaded: LoadedModel, model: onnx.ModelProto, base: Path | None,
                stage: Staging, label: str) -> Path:
    """Write ``model`` (external tensors read from ``base``) into ``stage/label/``."""
    graph = gs.import_onnx(model)
    if base is not None:
        attach_external(graph, base)
    path = stage.dir / label / stage.model_path.name
    path.parent.mkdir()
    write_streamed(loaded, path, graph, check=False)
    return path


def _bfloat16_checks(loaded: LoadedModel, checks: CheckOptions) -> tuple[CheckOptions, bool]:
    """Validation of a bfloat16 model runs float32 twins (spa/ir/widen.py: onnxruntime's CPU
    has no bfloat16 kernels), whose latency says nothing of the model's: it is not measured.
    Returns the checks to run and whether to widen."""
    if not (checks.validate or checks.check_masked) or not uses_bfloat16(loaded.graph):
        return checks, False
    log.warning("bfloat16 model: onnxruntime has no bfloat16 kernels on CPU, so validation runs "
                "float32 twins of the original and pruned models (weights widened exactly); "
                "latency is not measured")
    return dataclasses.replace(checks, latency=False), True


def _validate(original: PathLike | onnx.ModelProto, masked, weight_free: set[str],
              pruned: PathLike | onnx.ModelProto, checks: CheckOptions, *,
              widen: bool = False) -> dict:
    """Run the original, then the pruned model (one session at a time: memory), compare:
    signature; shape-valued outputs (``weight_free``) exactly; with the oracle, every output
    against the masked original (integer and bool ones exactly). ``widen``: run their float32
    twins."""
    twin = widened if widen else (lambda model: model)
    extra: dict = {}
    s = val.session(twin(original), what="original model")
    feeds = val.random_inputs(s, dims=dict(checks.input_dims))
    out_orig = val.run(s, feeds)
    if checks.latency:
        extra["latency_ms_before"] = latency_ms(s, feeds, runs=checks.latency_runs)
    s = None
    s = val.session(twin(pruned), what="pruned model")
    out_pruned = val.run(s, feeds)
    if checks.latency:
        extra["latency_ms_after"] = latency_ms(s, feeds, runs=checks.latency_runs)
    s = None
    val.check_signature(out_orig, out_pruned)
    val.check_exact(out_orig, out_pruned, weight_free, what="original")
    if checks.check_masked:
        out_masked = val.run(val.session(twin(masked()), what="masked original"), feeds)
        val.check_exact(out_masked, out_pruned, out_masked, what="masked original")
        c = val.check_close(out_masked, out_pruned, rtol=checks.rtol)
        extra.update(masked_max_abs_diff=c.max_abs, masked_relative_diff=c.relative)
    return extra
