"""The files of one model, pruned together: ``spa prune folder/ -o out_folder/``.

🤗 Optimum exports a seq2seq model (T5, BART, Marian, …) as several ONNX files:
``encoder_model.onnx``; ``decoder_model.onnx``, the first step, which writes the caches
(``present.N.decoder.key``, ``present.N.encoder.key``, …); ``decoder_with_past_model.onnx``, the
steps after, which reads them back (``past_key_values.N.…``); and ``decoder_model_merged.onnx``,
the two decoders as the branches of one ``If``. Pruned one by one, the with-past decoder loses
cache heads that the first-step decoder keeps (its caches are plain graph outputs there), and
the two no longer run together. A folder of ONNX files (no ``genai_config.json``: that is an
onnxruntime-genai folder, spa/pipeline/genai.py) is pruned as one model:

* **Ties** (spa/pipeline/ties.py). A tensor one file passes to another of the same precision
  variant (``present.X`` → ``past_key_values.X``) may change shape in both; a channel space of
  one file tied to one of another (the same axis of such a tensor, or of a weight both files
  hold) must lose the same entries. Tied groups follow one file's plan, or keep all of their
  channels in every file, and the report says why.
* **Checks** (spa/pipeline/family_checks.py). Each file is validated as ``spa prune``
  validates it; then across files, the weights they share must stay byte-identical, the
  tensors passed between them the same shape, and a file that reads back what another writes
  must continue it; else nothing is written.
* **Merged decoders** (spa/pipeline/family_view.py, spa/pipeline/merged.py) are pruned as
  their two branches' files, with the others, and merged back; the merged file written must
  answer as its pruned branches do. One SPA cannot split is left out.
* Every other file (configs, tokenizer) is copied, and a ``config.json`` that states the
  key/value head count the pruned caches no longer have is written with their count
  (spa/pipeline/family_config.py). Everything is written into a temporary folder beside the
  output and renamed into place last.

* **Calibration data** (spa/pipeline/encdec.py): the encoder reads ``--calib``; the
  first-step decoder is calibrated on samples made from the encoder's by the dense model; the
  other decoders follow its plan (a calibrated file's group leads its component).
* **Values one file changes** (reconstruction's refits, OBSPA's compensation, ``--recover``'s
  training; spa/pipeline/family_values.py): the files that pass caches take those of their
  variant's first-step decoder before the checks run, which then hold for the values written.
  A latency target times and plans each file, the tied groups then follow one plan, and no
  file is planned again when it misses; a folder whose files pass nothing (a decoder's
  ``model.onnx`` beside its ``config.json``) takes the options one file takes, depth pruning
  aside.
* **Float16 copies** (spa/pipeline/variants.py): ``model_fp16.onnx``, the plain file's values
  cast, ties to it weight by weight, is planned as it and takes its written values, cast.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import onnx

from spa.calibration.text import with_tokenizer
from spa.errors import NothingPrunableError, OptionError, PlanMismatchError
from spa.generation import read_config, signature_change
from spa.ir.load import load_model
from spa.ir.save import external_data_files, staged_folder
from spa.passes.allocation import with_keep
from spa.pipeline import (
    Prepared,
    analyse,
    analyse_as_planned,
    applied,
    encdec,
    finish,
    joined,
    latency_missed,
    prepare,
    ties,
)
from spa.pipeline.family_checks import check_written, steps_checked, together
from spa.pipeline.family_config import config_edits, placeholder_caches, symbolic_heads
from spa.pipeline.family_values import (
    note_taken,
    recovered,
    recovered_alone,
    refits_taken,
    trained_alone,
    value_sources,
)
from spa.pipeline.family_view import View, opened, output_checked
from spa.pipeline.merged import merged_back
from spa.pipeline.requantize import requantizable, requantized
from spa.pipeline.variants import CastCopy, cast_copies, lowered_options, lowered_taken, variant
from spa.plan import FolderPlan
from spa.report import write_text_atomic

if TYPE_CHECKING:
    from spa.coupling.analysis import Analysis
    from spa.pipeline import CheckOptions, PruneOptions, PruneReport
    from spa.pipeline.ties import Site
    from spa.plan import Plan

log = logging.getLogger(__name__)
CONFIG = "config.json"  # 🤗 Transformers' model config


@dataclass
class FamilyReport:
    """Each file's report by name, the files left out and why, and the ties between files."""

    reports: dict[str, PruneReport]
    skipped: dict[str, str] = field(default_factory=dict)
    ties: int = 0  # tied space pairs
    followed: int | None = 0  # groups whose channels another file's group decided (None: a
    # saved plan decided every group)
    kept_whole: list[str] = field(default_factory=list)  # components kept whole, and why
    output: str = ""
    # "writer -> reader": the step check (relative difference, steps) or why it did not run
    steps: dict[str, dict | str] = field(default_factory=dict)
    config_edits: dict[str, list] = field(default_factory=dict)  # key: [before, after]
    # merged decoders pruned through their branches: the branches' files, the merged check
    merged: dict[str, dict] = field(default_factory=dict)
    # decoders whose pruned cache inputs declare their head axis symbolic (family_config.py)
    placeholders: dict[str, dict] = field(default_factory=dict)
    plans: dict[str, Plan] = field(default_factory=dict)  # each pruned file's (for the HTML page)
    # decoders calibrated on samples made from the encoder's (spa/pipeline/encdec.py): how
    decoder_samples: dict[str, dict] = field(default_factory=dict)
    # files that took the values a file of theirs refitted or compensated (family_values.py)
    refits_taken: dict[str, dict] = field(default_factory=dict)
    # "encoder -> decoder": held-out fidelity of the two pruned files run together
    together: dict[str, dict] = field(default_factory=dict)
    # --recover: the encoder and decoder distilled together (spa/pipeline/joined.py)
    recovery: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"output": self.output, "files": {k: r.to_dict() for k, r in self.reports.items()},
                "skipped": self.skipped, "tied_spaces": self.ties,
                "groups_following": self.followed, "kept_whole": self.kept_whole,
                "step_checks": self.steps, "config_edits": self.config_edits,
                "merged": self.merged, "placeholder_caches": self.placeholders,
                "decoder_samples": self.decoder_samples, "refits_taken": self.refits_taken,
                "held_out_together": self.together, "recovery": self.recovery}


@dataclass
class FamilyPlan:
    """The files of a folder analysed and planned together, nothing written yet."""

    src: Path
    headers: dict[str, onnx.ModelProto]  # the files pruned or copied (graphs only)
    data: set[str]  # the external data files of every ONNX file in the folder
    skipped: dict[str, str]  # file -> why it is not pruned
    prepared: dict[str, Prepared]
    analyses: dict[str, Analysis]
    plans: dict[str, Plan]  # the ties followed
    sites: list[tuple[Site, Site]]
    followed: int | None  # None: saved plans, checked to lose the same entries of tied spaces
    kept_whole: list[str]
    origins: dict[str, str]  # each file's path in the input folder, a branch's: its merged file
    made: dict[str, dict] = field(default_factory=dict)  # decoders' samples made (encdec.py)
    copies: dict[str, CastCopy] = field(default_factory=dict)  # float16 variants: their file

    def saved(self) -> FolderPlan:
        """The plans as ``spa apply folder/`` reads them back."""
        return FolderPlan(dict(self.plans), tuple(n for n in self.headers if n not in self.plans))


def analyse_together(folder: str | os.PathLike[str], *, ignore: tuple[str, ...] = (),
                     hidden: bool = False) -> dict[str, Analysis]:
    """Each ONNX file of ``folder`` (merged decoders aside) analysed as :func:`plan_together`
    analyses it: the tensors passed between files may change shape (``spa analyze
    folder/``)."""
    from spa.pipeline import CheckOptions

    with opened(folder, CheckOptions()) as view:
        free = ties.passed(view.headers)
        return {n: analyse(load_model(str(view.path / n)), ignore=ignore, hidden=hidden,
                           free=tuple(sorted(free[n]))) for n in view.onnx_files}


def plan_together(folder: str | os.PathLike[str], options: PruneOptions,
                  checks: CheckOptions, *, plan_path: str | os.PathLike[str] | None = None
                  ) -> FamilyPlan:
    """Analyse and plan the ONNX files of ``folder`` together (see the module); the plan reads
    nothing from the folder once made (``spa prune folder/ --dry-run``). ``plan_path``: where
    the plans will be saved (a decoder's made calibration samples are saved beside it)."""
    with opened(folder, checks) as view:
        return _planned(view, options, checks, plan_path)


def _planned(view: View, options: PruneOptions, checks: CheckOptions,
             plan_path: str | os.PathLike[str] | None = None) -> FamilyPlan:
    src, names, headers = view.path, view.onnx_files, view.headers
    if options.drops_blocks:
        raise OptionError("depth pruning of a folder of files is not supported")
    skipped = dict(view.left_out)
    free = ties.passed(headers)
    # the tokenizer beside the files, named by the input folder: the view's is temporary (a
    # saved plan's recipe names it for spa apply)
    options = with_tokenizer(options, options.calib, view.src)
    per_file = dict.fromkeys(names, options)
    made: dict[str, dict] = {}
    if any(free.values()):
        _refuse(options)
        if options.calib_data:
            readers: dict[str, str] = {}
            for a, b in ties.pairs(headers):
                readers.setdefault(a, b)
            calibrated = encdec.plan_options(src, names, headers, free, options,
                                             _samples_dir(view, plan_path), variant, readers)
            per_file, made = calibrated.options, calibrated.made
    loaded_all = {n: load_model(str(src / n)) for n in names}
    copies = cast_copies({n: m.graph for n, m in loaded_all.items()})
    asked = dict(per_file)
    for n in copies:  # planned as the file it is a copy of: its groups follow that file's
        per_file[n] = lowered_options(options)
    prepared: dict[str, Prepared] = {}
    analyses: dict[str, Analysis] = {}
    unchanged: dict[str, NothingPrunableError] = {}
    for n in names:
        loaded = loaded_all.pop(n)
        try:
            prepared[n] = prepare(loaded, per_file[n], _own_checks(checks, n in copies),
                                  free=tuple(sorted(free[n])))
            analyses[n] = prepared[n].analysis
        except NothingPrunableError as exc:  # copied as it is; what it ties to keeps whole
            unchanged[n] = exc
            analyses[n] = analyse(loaded, ignore=options.ignore,
                                  hidden=options.hidden_ratio is not None,
                                  free=tuple(sorted(free[n])))
    if not prepared:
        raise next(iter(unchanged.values()))
    skipped.update({n: f"nothing to prune in it ({str(e).splitlines()[0]}); copied as it is"
                    for n, e in unchanged.items()})
    copies = {n: c for n, c in copies.items() if n in prepared and c.plain in prepared}
    plans = {n: p.planned.plan for n, p in prepared.items()}
    prefer = {n for n in prepared if per_file[n].calib_data}
    sites = ties.tied_sites(analyses, headers)
    parted = ties.parted(analyses, plans, sites, copies, prefer)
    for n, why in parted.items():  # planned again as a file of its own, with the options
        log.warning("%s: pruned apart, not as a float16 copy of %s: %s", n, copies[n].plain,
                    why)
        del copies[n]
        per_file[n] = asked[n]
        prepared[n] = prepare(load_model(str(src / n)), asked[n], checks,
                              free=tuple(sorted(free[n])))
        analyses[n], plans[n] = prepared[n].analysis, prepared[n].planned.plan
    if parted:
        sites = ties.tied_sites(analyses, headers)
    sites += ties.copy_sites(analyses, copies)
    keep, followed, whole = ties.follow(analyses, plans, sites, prefer=prefer, last=copies)
    for text in whole:
        log.warning("%s", text)
    plans = {n: with_keep(analyses[n], plans[n], keep[n]) if keep[n] else plans[n]
             for n in plans}
    return FamilyPlan(src, headers, view.data, skipped, prepared, analyses, plans, sites,
                      followed, whole, view.origins(), made, copies)


def _own_checks(checks: CheckOptions, copy: bool) -> CheckOptions:
    """A float16 copy's own numeric oracle does not run: the copy is written with its plain
    file's values cast (refitted, compensated or trained there), which its own masked
    original does not hold; it is checked against its plain file instead
    (spa/pipeline/variants.py)."""
    return dataclasses.replace(checks, check_masked=False) if copy else checks


def _samples_dir(view: View, plan_path: str | os.PathLike[str] | None) -> Path:
    """Where a decoder's made calibration samples go: beside a saved plan, whose recipe names
    them for ``spa apply`` (``<plan name>.<decoder>.calib.npz``); else the view's folder."""
    if plan_path is None:
        return view.scratch / "made."
    return Path(plan_path).parent / f"{Path(plan_path).name}."


def prune_together(folder: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                   options: PruneOptions, checks: CheckOptions, *,
                   plan_path: str | os.PathLike[str] | None = None,
                   distil: joined.Distil | None = None) -> FamilyReport:
    """Prune the ONNX files of ``folder`` together into ``out_dir`` (see the module); the
    plans, as one :class:`~spa.plan.FolderPlan`, also to ``plan_path``. With ``distil``
    (``--recover``), the pruned encoder and first-step decoder are then distilled together
    (spa/pipeline/joined.py) before the folder's checks."""
    out = output_checked(folder, out_dir)
    with opened(folder, checks) as view:
        fp = _planned(view, options, checks, plan_path)
        if distil is not None and not fp.made:
            trained_alone(fp, view.src)  # refused before anything is written
        if plan_path is not None:
            write_text_atomic(plan_path, fp.saved().to_json() + "\n")

        def write(n: str, path: Path, checks: CheckOptions) -> PruneReport:
            own = fp.prepared[n].planned
            # a plan that follows another file's is not the one its latency table predicted
            done = dataclasses.replace(fp.prepared[n], planned=dataclasses.replace(
                own, plan=fp.plans[n], latency=own.latency if fp.plans[n] == own.plan
                else None), checks=dataclasses.replace(
                fp.prepared[n].checks, config_warning=checks.config_warning))
            report = finish(view.path / n, done, path, retry=False)[0]
            if done.planned.latency is not None and (saved := latency_missed(report)):
                log.warning("%s: latency target missed: %.0f%% of the latency saved, %.0f%% "
                            "asked (a folder's files are not planned again: their plans tie)",
                            n, saved * 100, options.ratio * 100)
            return report

        return _write_together(fp, view, out, checks, write, distil)


def apply_together(folder: str | os.PathLike[str], saved: FolderPlan,
                   out_dir: str | os.PathLike[str], checks: CheckOptions) -> FamilyReport:
    """Apply a folder's saved plans (``spa prune folder/ --plan``) to its files, checked and
    written as :func:`prune_together` writes them: ``spa apply folder/ plan.json -o out/``.
    Each file's plan must match the file, and the plans must lose the same entries of every
    tied channel space, or nothing is done."""
    out = output_checked(folder, out_dir)
    with opened(folder, checks) as view:
        return _applied_together(view, saved, out, checks)


def _applied_together(view: View, saved: FolderPlan, out: Path, checks: CheckOptions
                      ) -> FamilyReport:
    src, names, headers = view.path, view.onnx_files, view.headers
    listed = sorted({*saved.files, *saved.copied})
    if listed != names:
        raise PlanMismatchError(f"the plan is for the files {listed}; {view.src} holds {names} "
                                f"(a merged decoder as its two branches)")
    free = ties.passed(headers)
    any_plan = next(iter(saved.files.values()), None)
    analyses = {}
    for n in names:
        plan = saved.files.get(n, any_plan)  # a copied file is analysed as the others were
        loaded = load_model(str(src / n))
        if plan is None:
            raise PlanMismatchError(f"the plan prunes none of the files in {view.src}")
        analyses[n] = analyse_as_planned(loaded, plan, free=tuple(sorted(free[n])))
        if n in saved.files:
            try:
                saved.files[n].check_against(analyses[n])
            except PlanMismatchError as exc:
                raise PlanMismatchError(f"{n}: {exc}") from exc
    found = cast_copies({n: a.model.graph for n, a in analyses.items()})
    copies = {n: c for n, c in found.items()  # those pruned as copies (see ties.parted)
              if not ties.ties_broken(analyses, saved.files, ties.copy_sites(analyses, {n: c}))}
    sites = ties.tied_sites(analyses, headers) + ties.copy_sites(analyses, copies)
    broken = ties.ties_broken(analyses, saved.files, sites)
    if broken:
        raise PlanMismatchError(f"{broken}: the files would not run together")
    fp = FamilyPlan(src, headers, view.data, view.left_out | {
        n: "nothing to prune in it when planned; copied as it is" for n in saved.copied}, {},
        analyses, dict(saved.files), sites, None, [], view.origins(), copies=copies)

    def write(n: str, path: Path, checks: CheckOptions) -> PruneReport:
        return applied(analyses[n], saved.files[n], path, _own_checks(checks, n in copies))

    return _write_together(fp, view, out, checks, write)


def _write_together(fp: FamilyPlan, view: View, out: Path, checks: CheckOptions,
                    write: Callable[[str, Path, CheckOptions], PruneReport],
                    distil: joined.Distil | None = None) -> FamilyReport:
    """Write the folder ``fp`` plans into ``out``: each planned file by ``write`` (name, path,
    checks), the others copied, merged decoders merged back, the encoder and decoder distilled
    together by ``distil`` when given (or, with no encoder, the one calibrated file alone);
    the files checked together (see the module)."""
    src = fp.src
    alone = trained_alone(fp, src) if distil is not None and not fp.made else None
    config = read_config(src / CONFIG)
    changes = {n: signature_change(fp.analyses[n], p) for n, p in fp.plans.items()} \
        if config is not None else {}
    edits = config_edits(config, changes) if config is not None else {}
    held = placeholder_caches(config, changes) if config is not None else {}
    if edits or held:  # the copy says what the pruned caches hold, or the file takes what
        checks = dataclasses.replace(checks, config_warning=False)  # runtimes make of it
    passed = ties.passed(fp.headers)
    sources = value_sources(fp, passed)
    # the weights as they were: writing a file updates its graph's in place
    digests = {n: encdec.weight_digests(a) for n, a in fp.analyses.items()
               if n in fp.plans and passed[n]} if sources or distil else {}
    with staged_folder(out) as tmp:
        reports = {}
        for n, header in fp.headers.items():
            if n not in fp.plans:  # nothing to prune in it
                for name in (n, *sorted(external_data_files(header))):
                    shutil.copy2(src / name, tmp / name)
                continue
            reports[n] = write(n, tmp / n, checks)
            reports[n].input, reports[n].output = fp.origins[n], str(out / n)
        for n in fp.made:  # made samples not saved beside a plan are gone after the run
            c = reports[n].calibration if n in reports else None
            for key in ("path", "held_out_path"):
                if c and c.get(key) and Path(c[key]).is_relative_to(view.scratch):
                    c[key] = None
        taken = refits_taken(tmp, sources, digests)
        for n, took in taken.items():  # its oracle judged the weights it had before
            note_taken(reports[n], took)
        recovery: dict = {}
        if distil is not None:
            recovery = recovered(fp, tmp, digests, distil, reports) if alone is None \
                else recovered_alone(fp, tmp, digests, distil, reports, alone)
        for n, took in lowered_taken(tmp, fp.copies, src if checks.validate else None,
                                     reports).items():
            note_taken(reports[n], took, f"a float16 copy of {took['from']}, it took "
                                         f"{took['values']} of its written values, cast")
            taken[n] = took
        joint = together(fp, tmp) if checks.validate else {}
        placeholders = {n: symbolic_heads(tmp / n, *held[n], checks) for n in held}
        check_written(tmp, list(fp.headers), fp.sites, fp.copies)
        steps: dict[str, dict | str] = {}
        for a, b in ties.pairs(fp.headers):
            sized = reports.get(a) or reports.get(b)
            if checks.validate and sized is not None:
                steps[f"{a} -> {b}"] = steps_checked(src, tmp, a, b, dict(sized.input_dims),
                                                     checks.rtol)
        merged = {n: merged_back(tmp, n, t, checks, reports) for n, t in view.merged.items()}
        whole = {p: n for n, done in merged.items() for p in done["branches"].values()}
        dims: dict[str, dict[str, int]] = {}
        for piece, report in reports.items():
            if piece in whole:
                report.output = str(out / whole[piece])
            dims.setdefault(whole.get(piece, piece), {}).update(report.input_dims)
        for n, done in merged.items():  # the cache axes the merge declared symbolic
            dims.setdefault(n, {}).update(done["symbolic_dims"])
        # int8 copies, once their plain files are written (a merged decoder's: merged back)
        found = requantizable(view.src, [n for n in fp.headers if n not in fp.plans],
                              set(reports) | set(merged))  # (merged files: in view.src only)
        again = requantized(view.src, tmp, found, dims, checks.validate)
        taken |= {n: took for n, took in again.items() if isinstance(took, dict)}
        skipped = {n: f"{why}; not made again from its pruned plain file: {again[n]}"
                   if isinstance(again.get(n), str) else why
                   for n, why in fp.skipped.items() if n not in taken}
        for f in sorted(src.iterdir()):
            if f.name not in fp.headers and f.name not in fp.skipped and f.name not in fp.data:
                (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)
        if config is not None and edits:
            (tmp / CONFIG).write_text(json.dumps(config | edits, indent=2, sort_keys=True)
                                      + "\n")
    return FamilyReport(reports, skipped, len(fp.sites), fp.followed, fp.kept_whole,
                        str(out), steps,
                        {k: [config[k], v] for k, v in edits.items()} if config else {}, merged,
                        placeholders, dict(fp.plans), dict(fp.made),
                        taken,
                        joint, recovery)


def _refuse(options: PruneOptions) -> None:
    """What files that pass tensors to each other cannot be pruned with, before any work (a
    folder whose files do not, such as a decoder's ``model.onnx`` beside its config, takes
    every option one file takes but depth pruning)."""
    if options.calib is not None and not options.calib_data:
        raise OptionError("--calib synthetic makes each file's inputs alone, and files that "
                          "pass tensors to each other would be calibrated apart: give data "
                          "(the encoder's, or the decoder's when there is no encoder), or "
                          "prune the folder without --calib")


__all__ = ["FamilyPlan", "FamilyReport", "analyse_together", "apply_together", "plan_together",
           "prune_together"]
