"""The stages after the plan: compensate → rewrite → save → validate, each once.

:func:`compensate` turns the plan's recipes and the layer statistics into weight updates and
bias shifts (read-only; statistics the planning computed are reused, a saved plan's are
recomputed from its recipe). :func:`emit` then rewrites (the one mutating step: it writes the
updates, slices, adds the shifts), re-infers shapes, validates with onnxruntime (and the
numeric oracle) *before* writing, and writes atomically. A streamed model (external data, or
over 2 GB) is written tensor by tensor and validated from its files; the input file stands for
the original there.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from spa import fidelity
from spa.calibration import Calibration
from spa.choices import HessianSource
from spa.coupling.analysis import Analysis
from spa.errors import OptionError
from spa.generation import SignatureChange, config_mismatch, signature_change
from spa.ir import to_onnx
from spa.ir.load import import_graph, load_model, with_contrib_shapes
from spa.ir.save import (
    TOO_BIG_TO_REFIT,
    Staging,
    full_check,
    infer_shapes,
    known_dims,
    one_protobuf,
    streamed,
    write_proto,
    write_streamed,
)
from spa.ir.tied import join_ties
from spa.memory import release
from spa.metrics import CostModel, cut_shapes, file_size
from spa.passes.compensation import BiasCompensation, BiasShifts, Compensation, WeightUpdates
from spa.passes.kernel_widths import KernelWidths
from spa.passes.latency import kernel_block
from spa.passes.reconstruction import Reconstruction
from spa.passes.rewrite import Rewrite
from spa.passes.statistics import LayerStatistics, LayerStats
from spa.pipeline.checks import (
    bfloat16_checks,
    float16_oracle,
    oracle_decision,
    reference_models,
    run_checks,
)
from spa.pipeline.options import CheckOptions
from spa.plan import Plan, kept_indices

PathLike = str | os.PathLike[str]
log = logging.getLogger(__name__)


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
    # What became of the numeric oracle: "held" (on float32 twins for a float16 model, and
    # says so), or why it did not run.
    oracle: str = ""
    compensated_layers: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    # The sizes SPA's made-up inputs gave the symbolic input dims, and how each was chosen
    # ("flag", "metadata", "name", "position", "default", "searched": spa/inputs.py; "kv cache":
    # a decoder's cache dims, spa.generation.cache_sizes).
    input_dims: dict[str, int] = field(default_factory=dict)
    input_dims_from: dict[str, str] = field(default_factory=dict)
    # How the budget was spread, and the calibration data (kind, samples for calibration and
    # held out) when there was some.
    allocation: str = "uniform"
    calibration: dict = field(default_factory=dict)
    # Held-out fidelity against the dense model after each stage ("pruned", "reconstructed",
    # "recovered"): spa/fidelity.py's measures.
    fidelity: dict[str, dict[str, float]] = field(default_factory=dict)
    reconstruction: dict = field(default_factory=dict)
    recovery: dict = field(default_factory=dict)  # spa prune --recover: spa recover's report
    # The graph inputs and outputs pruning narrowed (KV-cache pairs: spa/generation.py), and
    # the greedy generation check run on such a decoder (tokens compared, equal).
    signature_changes: list[str] = field(default_factory=list)
    generation: dict = field(default_factory=dict)
    # --target latency: the table's summary, predicted ms and requested speed-up.
    latency_target: dict = field(default_factory=dict)
    # Depth pruning: the residual blocks removed (spa.plan.DroppedBlock's fields).
    dropped_blocks: list[dict] = field(default_factory=list)
    # Pruned groups whose dense width was whole kernel blocks of this CPU's blocked
    # convolutions and whose kept width is not (passes/kernel_widths.py): what makes a conv
    # net slower after pruning.
    off_block_groups: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Compensated:
    """What the rewrite writes besides slicing: OBS weight updates and FLAP bias shifts."""

    weights: WeightUpdates | None = None
    shifts: BiasShifts | None = None


def compensate(analysis: Analysis, the_plan: Plan, statistics: LayerStats | None,
               calib: Calibration | None = None) -> Compensated:
    """OBSPA's weight update and FLAP's bias shifts, as the plan's recipes say; ``statistics``
    (from planning) are used when they came from the recipe's source, else recomputed (on
    ``calib``'s calibration samples)."""
    arrays = calib.train if calib is not None else None
    recipe = the_plan.recipe
    if recipe is None:
        return Compensated()
    shifts = weights = None
    if recipe.bias_compensation is not None:
        stats = statistics
        if stats is None or stats.source is not HessianSource.CALIBRATION:
            stats = LayerStatistics(  # calibration data is read whole: no sample count
                source=HessianSource.CALIBRATION, samples=0, calib=arrays,
                skip_padding=recipe.bias_compensation.skip_padding).run(analysis)
        shifts = BiasCompensation().run(analysis, the_plan, stats)
    comp = recipe.compensation
    if comp is not None:
        stats = statistics
        if stats is None or stats.source is not comp.hessian:
            stats = LayerStatistics(source=comp.hessian, samples=comp.samples, seed=recipe.seed,
                                    calib=arrays, dims=dict(comp.input_dims),
                                    skip_padding=comp.skip_padding).run(analysis)
        weights = Compensation(damping=comp.damping).run(analysis, the_plan, stats)
    return Compensated(weights, shifts)


def emit(analysis: Analysis, the_plan: Plan, output: PathLike,
         checks: CheckOptions = CheckOptions(), *, statistics: LayerStats | None = None,
         calib: Calibration | None = None, memory: int = 2 << 30) -> PruneReport:
    """Compensate, rewrite, reconstruct (on ``calib``, as the recipe says), write to a staging
    directory, validate, then move into place. Held-out fidelity is measured after each stage.
    Mutates ``analysis.model`` (it is consumed)."""
    the_plan.check_against(analysis)  # before any work on the weights
    loaded = analysis.model
    recipe = the_plan.recipe
    refit = recipe.reconstruction if recipe is not None else None
    if refit is not None and calib is None:
        raise OptionError("the plan refits weights on calibration data, which was not given")
    on_disk = streamed(loaded)  # written tensor by tensor, with a data file
    if calib is not None and refit is not None and not one_protobuf(loaded):
        raise OptionError(TOO_BIG_TO_REFIT)
    # external data under 2 GB is held whole for a refit; else onnxruntime reads the files
    dense = to_onnx(loaded) if calib is not None and \
        (refit is not None or (calib.held_out and not on_disk)) else None
    kept = kept_indices(analysis, the_plan)
    declared = cut_shapes(loaded.graph, kept)  # before the rewrite changes the graph
    change = signature_change(analysis, the_plan)
    t0 = time.perf_counter()
    faithful = _Fidelity()
    before = CostModel(loaded.graph).count()
    channels_before = sum(g.size for g in analysis.prunable_groups)
    checks, oracle = oracle_decision(analysis, the_plan, checks)
    checks, widen = bfloat16_checks(loaded, checks)
    half = float16_oracle(loaded, checks)
    if half:
        oracle = "held on float32 twins (float16 rounding is at its tolerance)"
    with Staging(output, input_path=loaded.path, input_files=loaded.data_files) as stage:
        sources = reference_models(analysis, the_plan, checks, stage)
        updates = compensate(analysis, the_plan, statistics, calib)
        rewritten = Rewrite().run(analysis, the_plan, weights=updates.weights,
                                  shifts=updates.shifts)
        join_ties(loaded.graph, loaded.ties)  # each tensor of the file written once
        if loaded.mapped is not None:  # what the export still reads is mapped again then
            loaded.mapped.release()
        if streamed(loaded):  # after the rewrite: the pruned weights' size
            if dense is not None and calib is not None:  # refitted in memory, written streamed
                _, values = _reconstruct(dense, known_dims(infer_shapes(to_onnx(loaded)),
                                                           declared),
                                         calib, kept, refit, memory, faithful, change)
                del dense
                for t in loaded.graph.tensors().values():
                    if isinstance(t, gs.Constant) and t.name in values:
                        t.values = values[t.name]
            write_streamed(loaded, stage.model_path)
            pruned: PathLike | onnx.ModelProto = stage.model_path
            if calib is not None and calib.held_out and "pruned" not in faithful.stages:
                # (a refit measured it in memory)
                if loaded.path is not None:  # onnxruntime reads both files (and their data)
                    faithful.stages["pruned"] = fidelity.measure(loaded.path, pruned,
                                                                 calib.held_out, change)
                else:
                    log.warning("held-out fidelity is not measured: onnxruntime reads a model "
                                "over 2 GB from its file, and this one was given in memory (save "
                                "it with its weights as external data, and prune the file)")
            reread = load_model(stage.model_path)
            emitted = reread.graph, reread.ties
        else:
            pruned = known_dims(infer_shapes(to_onnx(loaded)), declared)
            if dense is not None and calib is not None:
                pruned, _ = _reconstruct(dense, pruned, calib, kept, refit, memory, faithful,
                                         change)
            emitted = import_graph(with_contrib_shapes(pruned), "the rewritten model")
        t1 = time.perf_counter()
        report_extra = {} if sources is None else run_checks(
            sources.original, sources.masked, sources.weight_free, pruned, checks, widen=widen,
            half=half, change=change)
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
    mismatch = config_mismatch(str(loaded.path) if loaded.path else None, change) \
        if checks.config_warning else None
    if mismatch is not None:
        log.warning("%s", mismatch)
    pred = the_plan.prediction
    return PruneReport(
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
        compensated_layers=rewritten.compensated, oracle=oracle,
        allocation=recipe.allocation if recipe is not None else "uniform",
        calibration=calib.summary() if calib is not None else {}, fidelity=faithful.stages,
        reconstruction=faithful.reconstruction, signature_changes=change.describe(),
        dropped_blocks=[asdict(b) for b in the_plan.dropped],
        off_block_groups=off_block_groups(analysis, the_plan), **report_extra)


def off_block_groups(analysis: Analysis, the_plan: Plan) -> int:
    """How many pruned groups left whole kernel blocks (:attr:`PruneReport.off_block_groups`)."""
    steps = KernelWidths(block=kernel_block()).run(analysis)
    return sum(1 for g in the_plan.groups if g.removed and (step := steps.get(g.id, 1)) > 1
               and g.size % step == 0 and len(g.keep) % step)


@dataclass
class _Fidelity:
    """What the emit stage measured on the held-out samples, and the reconstruction's summary."""

    stages: dict[str, dict[str, float]] = field(default_factory=dict)
    reconstruction: dict = field(default_factory=dict)


def _reconstruct(dense: onnx.ModelProto, pruned: onnx.ModelProto, calib: Calibration,
                 kept, refit, memory: int, faithful: _Fidelity, change: SignatureChange
                 ) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Held-out fidelity of the pruned model; with a reconstruction recipe, the refit (kept only
    when held-out fidelity does not get worse) and its fidelity. ``change``: how the pruned
    model's inputs differ (a decoder's caches lose heads). Returns the model to write and the
    refitted values it holds by initializer name (none when the refit was not kept)."""
    if calib.held_out:
        faithful.stages["pruned"] = fidelity.measure(dense, pruned, calib.held_out, change)
    if refit is None:
        return pruned, {}
    t0 = time.perf_counter()
    release()  # what planning dropped: the reconstruction's activations fill the budget
    done = Reconstruction(kept=kept, rows=refit.rows, memory=memory, seed=refit.seed,
                          max_rows=refit.max_rows, row_macs=refit.row_macs,
                          cut_padding=refit.cut_padding).run(
        dense, pruned, calib.train, pruned_feeds=change.pruned_feeds)
    refitted = onnx.ModelProto()
    refitted.CopyFrom(pruned)
    for init in refitted.graph.initializer:
        if init.name in done.values:
            init.CopyFrom(numpy_helper.from_array(done.values[init.name], init.name))
    faithful.reconstruction = done.summary() | {"seconds": time.perf_counter() - t0}
    if not calib.held_out:
        return refitted, done.values
    after = fidelity.measure(dense, refitted, calib.held_out, change)
    faithful.stages["reconstructed"] = after
    if not fidelity.better(after, faithful.stages["pruned"]) and \
            after != faithful.stages["pruned"]:
        log.warning("reconstruction made held-out fidelity worse (%s): the model is written "
                    "without it", fidelity.change(faithful.stages["pruned"], after))
        faithful.reconstruction["kept"] = False
        return pruned, {}
    faithful.reconstruction["kept"] = True
    return refitted, done.values
