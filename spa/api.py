"""The Python API: ``spa.analyze``, ``spa.plan``, ``spa.dry_run``, ``spa.prune``, ``spa.apply``.

A thin layer over :mod:`spa.pipeline`, which owns the order of the stages; the CLI and
``spa.torch`` are thin shells over these functions and the option dataclasses
(:class:`PruneOptions`, :class:`CheckOptions`). ``prune`` = load → analyse → plan → compensate →
rewrite → save → validate; ``dry_run`` stops at the plan (which carries the predicted params and
FLOPs) and writes no model; ``apply`` = load → analyse → a saved plan → the same emission.
"""

from __future__ import annotations

import functools
import gc
import os

import onnx

from spa import pipeline
from spa.coupling.analysis import Analysis
from spa.ir.load import LoadedModel
from spa.pipeline import CheckOptions, PruneOptions, PruneReport
from spa.pipeline.family import FamilyReport, apply_together, prune_together
from spa.pipeline.genai import decoder_of, is_genai_folder, prune_folder
from spa.pipeline.joined import Distil
from spa.plan import FolderPlan, Plan

PathLike = str | os.PathLike[str]
ModelLike = PathLike | onnx.ModelProto | LoadedModel

__all__ = ["CheckOptions", "FamilyReport", "FolderPlan", "PruneOptions", "PruneReport", "analyze",
           "apply", "apply_family", "dry_run", "plan", "prune", "prune_family"]


def analyze(model: ModelLike, *, ignore: tuple[str, ...] = (), hidden: bool = False
            ) -> Analysis:
    """Coupling analysis; ``hidden`` also makes the residual stream (hidden size) prunable."""
    return pipeline.analyse(pipeline.load(decoder_of(model)), ignore=tuple(ignore),
                            hidden=hidden)


def plan(analysis: Analysis, options: PruneOptions = PruneOptions()) -> Plan:
    """Score and allocate: the plan for ``analysis`` under ``options``."""
    return pipeline.plan(analysis, options)


def dry_run(model: ModelLike, options: PruneOptions = PruneOptions(), *,
            plan_path: PathLike | None = None) -> Plan:
    """Analyse and plan, and write no model: the plan holds every decision and the predicted
    params/FLOPs (``spa prune --dry-run``). ``plan_path`` saves it for ``spa apply``."""
    return pipeline.dry_run(decoder_of(model), options, plan_path=plan_path)


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
def prune(model: ModelLike, output: PathLike, options: PruneOptions = PruneOptions(),
          checks: CheckOptions = CheckOptions(), *, plan_path: PathLike | None = None
          ) -> tuple[PruneReport, Plan]:
    """Prune ``model`` and write the smaller model to ``output``; returns the report and the
    plan (``plan_path``: also save the plan for ``spa apply``). An onnxruntime-genai folder
    (``genai_config.json`` in it) is pruned into the folder ``output``
    (spa/pipeline/genai.py)."""
    if isinstance(model, (str, os.PathLike)) and is_genai_folder(model):
        return prune_folder(model, output, options, checks, plan_path=plan_path)
    return pipeline.prune(model, output, options, checks, plan_path=plan_path)


@_gc_paused
def apply(model: ModelLike, plan_file: PathLike | Plan, output: PathLike,
          checks: CheckOptions = CheckOptions()) -> PruneReport:
    """Apply a saved plan; the analysis runs with the options the plan was made with."""
    the_plan = plan_file if isinstance(plan_file, Plan) else Plan.load(plan_file)
    return pipeline.apply(model, the_plan, output, checks)


@_gc_paused
def prune_family(folder: PathLike, output: PathLike, options: PruneOptions = PruneOptions(),
                 checks: CheckOptions = CheckOptions(), *, plan_path: PathLike | None = None,
                 distil: Distil | None = None) -> FamilyReport:
    """Prune the ONNX files of one model in ``folder`` together (a 🤗 Optimum seq2seq export:
    the decoders' caches and shared weights lose the same channels) into the folder
    ``output`` (spa/pipeline/family.py); ``plan_path``: also save the files' plans, for
    :func:`apply_family`; ``distil`` (:func:`spa.torch.recover.joint_distiller`): distil the
    pruned encoder and decoder together before the folder is checked and written."""
    return prune_together(folder, output, options, checks, plan_path=plan_path, distil=distil)


@_gc_paused
def apply_family(folder: PathLike, plan_file: PathLike | FolderPlan, output: PathLike,
                 checks: CheckOptions = CheckOptions()) -> FamilyReport:
    """Apply the plans :func:`prune_family` saved to the files of ``folder``, written into the
    folder ``output`` as it writes them."""
    saved = plan_file if isinstance(plan_file, FolderPlan) else FolderPlan.load(plan_file)
    return apply_together(folder, saved, output, checks)
