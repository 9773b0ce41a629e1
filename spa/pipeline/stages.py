"""The read-only stages: load → analyse → input sizes → statistics → score → allocate → plan.

Each stage is one function that takes what it needs explicitly and returns a frozen result;
:mod:`spa.pipeline` calls them in order, once each. :func:`make_plan` runs statistics, scoring
and allocation for one analysis and returns the plan together with the layer statistics it
computed (:class:`Planned`), which the compensation then reuses instead of recomputing them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from spa import calibration as calib_data
from spa import validate as val
from spa.calibration import Calibration, CalibrationOptions
from spa.calibration.text import random_tokens
from spa.calibration.text import with_tokenizer as text_tokenizer
from spa.choices import AllocationMethod, HessianSource, Target
from spa.coupling.analysis import Analysis, CouplingAnalysis, GroupKind, has_subgraph
from spa.errors import NothingPrunableError, OptionError
from spa.generation import decoder_feeds
from spa.inputs import InputDims, resolve
from spa.ir import to_onnx
from spa.ir.load import LoadedModel, load_model, load_proto
from spa.ir.save import TOO_BIG_TO_REFIT, one_protobuf
from spa.passes.allocation import Allocation
from spa.passes.compensation import Compensation
from spa.passes.depth import Depth, with_depth
from spa.passes.importance import CRITERIA, Criterion, get_criterion
from spa.passes.importance.gradient import Gradient
from spa.passes.importance.obspa import OBSPA
from spa.passes.kernel_widths import KernelWidths
from spa.passes.latency import LatencyTable
from spa.passes.latency_profile import LatencyProfile
from spa.passes.reconstruction import refits_any
from spa.passes.sensitivity import MIN_SAMPLES, Sensitivities, Sensitivity, WeightUpdate
from spa.passes.statistics import LayerStatistics, LayerStats
from spa.pipeline.options import AUTO, SYNTHETIC, CheckOptions, PruneOptions
from spa.plan import Plan
from spa.recipe import (
    BiasRecipe,
    CalibrationRecipe,
    CompensationRecipe,
    Recipe,
    ReconstructionRecipe,
)

PathLike = str | os.PathLike[str]
log = logging.getLogger(__name__)
ModelLike = PathLike | onnx.ModelProto | LoadedModel
#: Per-weight saliencies (by ONNX constant name) for a gradient criterion, given what the
#: criterion needs ("wg" or "whg"): the PyTorch front end computes them on the user's module.
SaliencySource = Callable[[str], Mapping[str, np.ndarray]]


#: Least-squares rows per layer (passes/reconstruction.py): at least ``RECONSTRUCTION_ROWS``, up
#: to ``RECONSTRUCTION_MAX_ROWS`` while a layer's normal equations cost at most
#: ``RECONSTRUCTION_ROW_MACS`` multiply-adds (65536 rows up to 1024 inputs, the floor from 2896).
RECONSTRUCTION_ROWS = 8192
RECONSTRUCTION_MAX_ROWS = 65536
RECONSTRUCTION_ROW_MACS = 1 << 36


@dataclass(frozen=True)
class Planned:
    """A plan, the layer statistics its criterion read (None when it read none) and the
    sensitivities its allocation spent the budget against (None unless sensitivity)."""

    plan: Plan
    statistics: LayerStats | None
    sensitivities: Sensitivities | None = None
    latency: Latency | None = None


@dataclass(frozen=True)
class Latency:
    """A latency target's table and what it predicts for the plan (milliseconds)."""

    table: LatencyTable
    predicted_ms: float
    requested_speedup: float

    def summary(self) -> dict:
        return self.table.summary() | {"predicted_ms": self.predicted_ms,
                                       "requested_speedup": self.requested_speedup}


def load(model: ModelLike) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, onnx.ModelProto):
        return load_proto(model)
    return load_model(model)


def analyse(model: LoadedModel, *, ignore: tuple[str, ...] = (), hidden: bool = False,
            frozen_tensors: Mapping[str, str] | None = None, free: tuple[str, ...] = ()
            ) -> Analysis:
    """Coupling analysis; ``hidden`` also makes the residual stream (hidden size) prunable;
    ``free``: graph inputs and outputs that may change shape (spa/pipeline/family.py)."""
    return CouplingAnalysis(ignore=ignore, hidden=hidden, frozen_tensors=frozen_tensors,
                            free=free).run(model)


def makes_inputs(options: PruneOptions, checks: CheckOptions | None) -> bool:
    """Whether the run feeds made-up inputs: validation, or OBSPA's data-free Hessians."""
    synthetic = CRITERIA.get(options.criterion) is OBSPA and options.hessian_source in (
        HessianSource.SYNTHETIC, HessianSource.NOISE) or options.calib == SYNTHETIC \
        or options.target is Target.LATENCY
    return synthetic or (checks is not None and bool(checks.validate or checks.check_masked))


def input_sizes(analysis: Analysis, given: dict[str, int], needed: bool) -> InputDims:
    """The symbolic input dims sized once per run (spa/inputs.py) when the run makes inputs
    (``needed``) and can prune anything; else just the ``given`` ones. The statistics and
    validation then take the same sizes."""
    if not (needed and analysis.prunable_groups):
        return InputDims(given, dict.fromkeys(given, "flag"))
    loaded = analysis.model  # the original: its file, or the normal form of one in memory
    metadata = {p.key: p.value for p in loaded.proto_header.metadata_props}
    return resolve(loaded.graph.inputs, metadata, given,
                   val.probe(lambda: loaded.path or to_onnx(loaded)))


SYNTHETIC_SAMPLES = 256
DEPTH_SAMPLES = 16  # synthetic inputs that score residual blocks without --calib


def calibration(analysis: Analysis, path: str | None,
                options: CalibrationOptions = CalibrationOptions(), *, seed: int = 0,
                dims: Mapping[str, int] | None = None) -> Calibration | None:
    """The calibration data (``--calib``), read once and split into train and held-out;
    ``--calib synthetic``: natural-image noise for image inputs (passes/hessian.py), standard
    normal values for other float inputs, sized by ``dims``."""
    if path is None:
        return None
    if path == SYNTHETIC:
        return _synthetic(analysis, options, seed, dict(dims or {}))
    return calib_data.load(path, analysis.model.graph.inputs, options, seed=seed,
                           graph=analysis.model.graph, dims=dims)


def _synthetic(analysis: Analysis, options: CalibrationOptions, seed: int,
               dims: dict[str, int]) -> Calibration:
    """Inputs made from the model itself: model inversion (spa/torch/inversion.py: BatchNorm
    matching, or class-conditional inversion when BN is folded) when PyTorch is installed and
    runs the model, else natural-image noise (with a warning saying why); the kind says
    which."""
    loaded = analysis.model
    tokens = random_tokens(loaded.graph.inputs, SYNTHETIC_SAMPLES, dims,
                           np.random.default_rng([seed, 0x70]), graph=loaded.graph)
    if tokens is not None:  # token inputs only: nothing to invert or to draw as images
        arrays, kind = tokens, "synthetic (random token ids)"
    else:
        arrays, kind = _synthetic_arrays(loaded, seed, dims)
    train, held = calib_data.held_out(calib_data.fitted(arrays, loaded.graph.inputs),
                                      loaded.graph.inputs, options, seed=seed,
                                      graph=loaded.graph, dims=dims)
    return Calibration(train, held, kind, SYNTHETIC, options.held_out_data)


def _synthetic_arrays(loaded: LoadedModel, seed: int, dims: dict[str, int]
                      ) -> tuple[dict[str, np.ndarray], str]:
    """Synthetic samples of a model with inputs other than tokens, and how they were made."""
    model = loaded.path or to_onnx(loaded)
    sess = val.session(model, what="original model")
    one = val.random_inputs(sess, seed=seed, dims=dims)
    pixels = max((v.shape[-1] * v.shape[-2] for v in one.values() if v.ndim == 4), default=0)
    samples = SYNTHETIC_SAMPLES if pixels <= 64 * 64 else SYNTHETIC_SAMPLES // 4
    try:
        from spa.torch.interpreter import UnsupportedOpsError
        from spa.torch.inversion import synthesize
    except ImportError:
        return (_noise_inputs(sess, samples, seed, dims),
                "synthetic (natural-image noise; PyTorch would invert the model)")
    try:
        made = synthesize(model, samples, dims=dims, seed=seed)
    except (UnsupportedOpsError, RuntimeError) as exc:  # RuntimeError: torch's own errors
        # the noise still calibrates (verification judges the model either way): say why the
        # better source was not used rather than stop the prune
        log.warning("model inversion could not run (%s: %s); natural-image noise calibrates "
                    "instead", type(exc).__name__, exc)
        return (_noise_inputs(sess, samples, seed, dims),
                "synthetic (natural-image noise; the model could not be inverted in PyTorch)")
    log.info("synthetic calibration: %s", made.detail)
    return made.arrays, f"synthetic ({made.method} inversion)"


def _noise_inputs(sess, samples: int, seed: int, dims: dict[str, int]) -> dict[str, np.ndarray]:
    """Natural-image noise for image inputs (passes/hessian.py), random values for others."""
    from spa.passes.hessian import natural_images

    rng = np.random.default_rng([seed, 0x5E])
    parts: dict[str, list[np.ndarray]] = {}
    for i in range(samples):
        for k, v in val.random_inputs(sess, seed=seed * 100_003 + i, dims=dims).items():
            if v.ndim == 4 and np.issubdtype(v.dtype, np.floating) and v.shape[1] <= 4:
                v = natural_images(v.shape, rng).astype(v.dtype)
            parts.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in parts.items()}


def with_tokenizer(analysis: Analysis, options: PruneOptions) -> PruneOptions:
    """``options`` with ``--tokenizer`` defaulted to the one saved beside the model when a
    text file calibrates (recorded so in the plan's recipe)."""
    return text_tokenizer(options, options.calib, analysis.model.path)


def recipe_calibration(analysis: Analysis, the_recipe: Recipe | None) -> Calibration | None:
    """The calibration data a saved plan's recipe read (``spa apply``)."""
    if the_recipe is None:
        return None
    cal = the_recipe.calibration
    if cal is not None:
        return calibration(analysis, cal.path, CalibrationOptions(**cal.options), seed=cal.seed,
                           dims=dict(cal.input_dims))
    legacy = next((r.calib for r in (the_recipe.compensation, the_recipe.bias_compensation)
                   if r is not None and r.calib), None)  # plans from before the held-out split
    return calibration(analysis, legacy, CalibrationOptions(held_out=0.0))


def make_plan(analysis: Analysis, options: PruneOptions, *,
              saliency: SaliencySource | None = None,
              calib: Calibration | None = None,
              table: LatencyTable | None = None) -> Planned:
    """Statistics (when the criterion reads them) → score → sensitivities (when the allocation
    spends against them) → allocate: the plan. ``calib``: the calibration data, already read
    (else read here from ``options.calib``); ``table``: a latency target's table, already
    measured (else measured here)."""
    if not analysis.prunable_groups:
        raise NothingPrunableError(nothing_prunable(analysis))
    _warn_unused_kind_ratios(analysis, options)
    if options.calib is not None and options.reconstruct is not False \
            and not one_protobuf(analysis.model):
        if options.reconstruct:  # before any work
            raise OptionError(TOO_BIG_TO_REFIT)
        log.info("reconstruction is off by default for a model over 2 GB: it holds the model "
                 "in memory")
        options = dataclasses.replace(options, reconstruct=False)
    if options.calib is not None and options.reconstruct is None \
            and not refits_any(analysis.model.graph):
        log.info("reconstruction is off: no Conv, Gemm or MatMul has float weights to refit, nor "
                 "a MatMulNBits its blocks")
        options = dataclasses.replace(options, reconstruct=False)
    options = with_tokenizer(analysis, options)
    if calib is None and options.calib is not None:
        calib = calibration(analysis, options.calib, options.calibration, seed=options.seed,
                            dims=dict(options.input_dims))
    criterion = _criterion(analysis, options, saliency, calib)
    source = criterion.statistics_source(calib is not None)
    method = options.allocation_method
    statistics = None
    if source is not None:
        # the sensitivity's compensation is fitted without the validation runs: their sums
        # are kept apart in the same pass
        apart = method is AllocationMethod.SENSITIVITY and \
            source is HessianSource.CALIBRATION and _compensates(criterion, options, source)
        statistics = LayerStatistics(source=source, samples=options.samples, seed=options.seed,
                                     calib=calib.train if calib is not None else None,
                                     dims=dict(options.input_dims),
                                     keep_fitted=apart).run(analysis)
    scores = criterion.run(analysis, statistics)
    sensitivities = None
    if method is AllocationMethod.SENSITIVITY:
        if calib is None:
            raise OptionError("--allocation sensitivity measures each group's damage on "
                              "calibration data: give --calib PATH")
        update, judged = _compensation(analysis, options, criterion, statistics, calib)
        sensitivities = Sensitivity(min_channels=options.min_channels, update=update).run(
            analysis, to_onnx(analysis.model), scores, judged)
        if statistics is not None:  # the emit reads the whole set's alone
            statistics = dataclasses.replace(statistics, fitted=None)
    if table is None and options.target is Target.LATENCY:
        table = latency_table(analysis, options)
    steps = kernel_steps(analysis, options)
    alloc = Allocation(ratio=options.ratio, target=options.target,
                       global_ranking=options.global_ranking, round_to=options.block,
                       min_channels=options.min_channels, heads_ratio=options.heads_ratio,
                       mlp_ratio=options.mlp_ratio, hidden_ratio=options.hidden_ratio,
                       method=method, sensitivities=sensitivities, latency=table, steps=steps)
    plan = alloc.run(analysis, scores, recipe(options, criterion, steps))
    if options.drops_blocks:
        plan = _depth(analysis, plan, options, calib)
    latency = None
    if table is not None:
        pred = plan.prediction
        saved = pred.flops_before - pred.flops_after if pred is not None else 0
        predicted = table.predict({g.id: len(g.keep) for g in plan.groups}, saved)
        latency = Latency(table, predicted, 1.0 / (1.0 - options.ratio))
        log.info("latency target: %.3f ms dense, %.3f ms predicted (%.2fx; %.2fx asked)",
                 table.dense_ms, predicted, table.dense_ms / max(predicted, 1e-9),
                 latency.requested_speedup)
    return Planned(plan, statistics, sensitivities, latency)


def _compensation(analysis: Analysis, options: PruneOptions, criterion: Criterion,
                  statistics: LayerStats | None, calib: Calibration
                  ) -> tuple[WeightUpdate | None, Mapping[str, np.ndarray]]:
    """OBSPA's weight update of a plan, for the sensitivity to measure each group's damage as
    the written model will have it (the removed channels' consumers compensated, not merely
    zeroed), and the samples to measure it on. From calibration Hessians the update is fitted
    without the validation runs (:func:`spa.calibration.validation_runs`) and the damage is
    measured on them: judged on the samples it was fitted to, an update looks as good as it
    overfits (EfficientNet-Lite0 on views of 28 photos: its classifier, fed one pooled row per
    view, lost half its inputs). No update when the recipe compensates nothing, or from other
    statistics than these (the emit recomputes those: spa/pipeline/emit.py). With fewer than
    :data:`~spa.passes.sensitivity.MIN_SAMPLES` validation samples, fitted and measured on all."""
    if statistics is None or not _compensates(criterion, options, statistics.source):
        return None, calib.train
    judged = calib.train
    runs = calib_data.validation_runs(calib_data.sample_count(calib.train))
    if statistics.source is HessianSource.CALIBRATION and runs.sum() >= MIN_SAMPLES:
        judged = {k: np.asarray(v)[runs] for k, v in calib.train.items()}
        # kept apart in the same pass (a free batch axis), else measured again
        statistics = statistics.without_runs() or LayerStatistics(
            source=statistics.source, samples=options.samples, seed=options.seed,
            calib={k: np.asarray(v)[~runs] for k, v in calib.train.items()},
            dims=dict(options.input_dims)).run(analysis)
    comp = Compensation(damping=options.damping, reuse_inverses=True)
    return (lambda plan: comp.values(analysis, plan, statistics)), judged


def _compensates(criterion: Criterion, options: PruneOptions, source: HessianSource) -> bool:
    """Whether plans carry the compensation's update fitted on statistics from ``source``
    (the emit recomputes any other source's)."""
    return bool(criterion.compensation and options.compensate) \
        and source is options.hessian_source


def _depth(analysis: Analysis, plan: Plan, options: PruneOptions,
           calib: Calibration | None) -> Plan:
    """``plan`` with the residual blocks depth pruning drops, scored on the calibration data
    or, without, on synthetic inputs (natural-image noise, random values)."""
    original = to_onnx(analysis.model)
    if calib is not None:
        inputs = calib.train
    else:
        sess = val.session(original, what="original model")
        inputs = _noise_inputs(sess, DEPTH_SAMPLES, options.seed, dict(options.input_dims))
        if analysis.kv_cache:
            inputs = decoder_feeds(inputs)
    choice = Depth(count=options.drop_blocks, ratio=options.depth_ratio,
                   criterion=options.depth_criterion).run(analysis, original, inputs)
    return with_depth(analysis, plan, choice.dropped)


def kernel_steps(analysis: Analysis, options: PruneOptions) -> dict[int, int] | None:
    """``--round-to auto``: each group's step (passes/kernel_widths.py); None: ``round_to``
    in every group."""
    if options.round_to != AUTO:
        return None
    return KernelWidths(block=options.block).run(analysis)


def latency_table(analysis: Analysis, options: PruneOptions) -> LatencyTable:
    """The measured latency table of the model (passes/latency.py), cached on disk."""
    hidden = options.hidden_ratio is not None
    return LatencyProfile(
        reanalyse=lambda loaded: analyse(loaded, ignore=options.ignore, hidden=hidden,
                                         free=analysis.free),
        provider=options.provider, threads=options.threads, dims=dict(options.input_dims),
        block=options.block).run(analysis)


def _criterion(analysis: Analysis, options: PruneOptions,
               saliency: SaliencySource | None, calib: Calibration | None) -> Criterion:
    cls = CRITERIA.get(options.criterion)
    extra: dict = {}
    if cls is not None and cls.Options is not None:
        extra["options"] = options.criterion_options(cls)
    if cls is not None and issubclass(cls, Gradient):
        extra["saliency"] = _saliency(cls, analysis, options, saliency, calib)
    return get_criterion(options.criterion, reduction=options.reduction,
                         normalization=options.normalization, seed=options.seed, **extra)


def _saliency(cls: type[Gradient], analysis: Analysis, options: PruneOptions,
              source: SaliencySource | None, calib: Calibration | None
              ) -> Mapping[str, np.ndarray] | None:
    """Saliencies for a gradient criterion: from the front end's ``source``, or, on an ONNX
    file, the model run in PyTorch on the ``--calib`` inputs and labels. Without either the
    criterion explains what it needs."""
    if source is not None:
        return source(cls.needs)
    if calib is None:
        return None
    try:
        from spa.torch.saliency import onnx_saliency
    except ImportError as exc:
        raise OptionError(f"criterion {options.criterion} needs PyTorch "
                          "(pip install 'spa-prune[torch]')") from exc
    return onnx_saliency(to_onnx(analysis.model), calib.train, cls.needs, calib.tokenizer)


def recipe(options: PruneOptions, criterion: Criterion,
           steps: Mapping[int, int] | None = None) -> Recipe:
    """What the plan records of ``options``: all ``spa apply`` needs to redo the analysis and
    the compensation."""
    comp = bias = None
    if criterion.compensation and options.compensate:
        comp = CompensationRecipe(options.hessian_source, options.damping, options.samples,
                                  options.calib, options.input_dims,
                                  skip_padding=options.hessian_source is HessianSource.CALIBRATION)
    if criterion.bias_compensation and options.compensate:
        bias = BiasRecipe(options.calib, skip_padding=True)
    cal = rec = None
    if options.calib is not None:
        cal = CalibrationRecipe(options.calib, dataclasses.asdict(options.calibration),
                                options.seed, options.input_dims)
        if options.reconstructs:
            rec = ReconstructionRecipe(RECONSTRUCTION_ROWS, options.seed,
                                       RECONSTRUCTION_MAX_ROWS, RECONSTRUCTION_ROW_MACS,
                                       cut_padding=True)
    return Recipe(options.criterion, options.ratio, options.heads_ratio, options.mlp_ratio,
                  options.hidden_ratio, options.target, options.global_ranking,
                  options.block, options.seed, options.ignore, comp, bias,
                  options.allocation_method.value, cal, rec,
                  None if steps is None else tuple(sorted(steps.items())))


KIND_FLAGS = ((GroupKind.HEADS, "heads_ratio", "--heads-ratio", "attention-head"),
              (GroupKind.NEURONS, "mlp_ratio", "--mlp-ratio", "MLP-neuron"),
              (GroupKind.HIDDEN, "hidden_ratio", "--hidden", "hidden-size"))


def _warn_unused_kind_ratios(analysis: Analysis, options: PruneOptions) -> None:
    """A per-kind ratio asked for where no group of that kind can be pruned does nothing: say
    so, with why (the first frozen group of the kind's first reason)."""
    for kind, field_name, flag, what in KIND_FLAGS:
        asked = getattr(options, field_name)
        if not asked or any(g.kind is kind for g in analysis.prunable_groups):
            continue
        frozen = [g for g in analysis.frozen_groups if g.kind is kind]
        why = f": {frozen[0].frozen[0]}" if frozen else ""
        log.warning("%s %g removes nothing: no %s group is prunable%s", flag, asked, what,
                    why or " (the model has none)")


def nothing_prunable(analysis: Analysis) -> str:
    """Why no group can be pruned: no nodes at all, or the first few freeze reasons."""
    if not analysis.model.graph.nodes:
        return ("no prunable channel group in the model: its graph has no nodes (the outputs "
                "are inputs or constants)")
    reasons = sorted({r for g in analysis.frozen_groups for r in g.frozen})[:3]
    holder = next((n for n in analysis.model.graph.nodes if has_subgraph(n)), None)
    if not reasons and holder is not None:
        merged = holder.op == "If" and len(analysis.model.graph.nodes) == 1
        return ("no prunable channel group in the model: its layers are inside the subgraphs of "
                f"{holder.op} node '{holder.name}', which SPA does not prune" + (
                    "; a merged decoder (its graph is one If) is pruned through its two "
                    "branches when its folder is pruned: spa prune folder/ -o out/"
                    if merged else ""))
    via = sorted({r for g in analysis.frozen_groups for r in g.via})[:1]
    return "no prunable channel group in the model" + (
        f" (e.g. {'; '.join(reasons)})" if reasons else "") + (
        f"; channels are tied to frozen ones where {via[0]}" if via else "")
