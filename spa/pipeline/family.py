"""The files of one model, pruned together: ``spa prune folder/ -o out_folder/``.

🤗 Optimum exports a seq2seq model (T5, BART, Marian, …) as several ONNX files:
``encoder_model.onnx``; ``decoder_model.onnx``, the first step, which writes the caches
(``present.N.decoder.key``, ``present.N.encoder.key``, …); ``decoder_with_past_model.onnx``, the
steps after, which reads them back (``past_key_values.N.…``); and ``decoder_model_merged.onnx``,
the two decoders as the branches of one ``If``. Pruned one by one, the with-past decoder loses
cache heads that the first-step decoder keeps (its caches are plain graph outputs there), and
the two no longer run together. A folder of ONNX files (no ``genai_config.json``: that is an
onnxruntime-genai folder, spa/pipeline/genai.py) is pruned as one model:

* **Tensors between files.** A graph output of one file that another file of the same
  precision variant (:func:`variant`) reads as an input (``present.X`` → ``past_key_values.X``
  or ``past.X``) may change shape in both
  (:class:`~spa.coupling.analysis.CouplingAnalysis` ``free``).
* **Ties.** A channel space of one file is tied to one of another file when it is the same axis
  of such a tensor, or of a weight both files hold (the same bytes, shape and type; a weight
  that is not unique in its file ties nothing). Tied spaces must lose the same entries. The
  groups they touch form components; in each, the group with the most members decides (the
  first-step decoder holds the cross-attention's key and value weights, which the with-past
  decoder only reads as caches), by its own file's plan, and every other group follows it entry
  by entry. A component that cannot follow (a member frozen or unscored in its file, spaces of
  different lengths, entries that do not line up, a weight one file prunes and another keeps)
  keeps all of its channels in every file, and the report says why.
* **Checks.** Each file is validated as ``spa prune`` validates it (the numeric oracle against
  its masked original, the greedy check for a decoder). Then across files: every weight two
  files share must be byte-identical after pruning, and each tensor passed between files must
  have the same shape on both sides; and a file that reads back what another writes must
  continue it (:func:`_steps_checked`: a decoder with past, fed the first-step decoder's caches
  and then its own, gives the logits the first-step decoder gives over the whole prefix, as the
  original files do); else nothing is written.
* **Merged decoders.** A ``*_merged.onnx`` file, or any whose graph is a single ``If`` (the
  two decoders as its branches; transformers.js folders hold ``*_merged_quantized.onnx``
  variants too), is split into one file per branch (spa/pipeline/merged.py), pruned with the others
  as ``<stem>.then_branch.onnx`` and ``<stem>.else_branch.onnx`` (the names the reports and
  plans use), and merged back; the merged file written must answer as its pruned branches
  do. One SPA cannot split (not a single ``If`` over two plain branches, weights in external
  data, or branches that do not answer as the file does) is left out, and a runtime such as
  Optimum's loads the separate decoders instead.
* Every other file (configs, tokenizer) is copied, and a ``config.json`` that states the
  key/value head count the pruned caches no longer have (``num_key_value_heads``: Optimum's
  ``ORTModelForCausalLM`` sizes the first step's caches from it) is written with their count.
  Everything is written into a temporary folder beside the output and renamed into place last.

* **Calibration data** (spa/pipeline/encdec.py): the encoder reads ``--calib``; the
  first-step decoder is calibrated on samples made from the encoder's by the dense model; the
  other decoders follow its plan (a calibrated file's group leads its component).
* **Values one file changes** (reconstruction's refits, OBSPA's compensation, each file from
  its own statistics): the files that pass caches take those of their variant's first-step
  decoder (:func:`_refits_taken`) before the checks above run, which then hold for the values
  written. A latency target times and plans each file, the tied groups then follow one plan,
  and no file is planned again when it misses; a folder whose files pass nothing (a
  decoder's ``model.onnx`` beside its ``config.json``) takes the options one file takes,
  depth pruning aside.
* **Float16 copies** (spa/pipeline/variants.py): ``model_fp16.onnx``, the plain file's values
  cast, ties to it weight by weight, is planned as it and takes its written values, cast.
* **Recovery** (``--recover``, given ``distil``): the pruned encoder and first-step decoder
  are distilled together, joined into one graph (spa/pipeline/joined.py), after the values
  are taken and before the checks; the files that pass caches take the trained values too.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import networkx as nx
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx import numpy_helper

from spa import validate as val
from spa.calibration.text import with_tokenizer
from spa.errors import (
    NothingPrunableError,
    OptionError,
    OutputPathError,
    PlanMismatchError,
    ValidationError,
)
from spa.generation import (
    config_edit,
    decoder_feeds,
    placeholder_count,
    read_config,
    signature_change,
)
from spa.ir.contrib import fixed_dims
from spa.ir.load import load_model
from spa.ir.save import check_output_folder, external_data_files, staged_folder
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
)
from spa.pipeline.merged import BRANCHES, agreement, is_merged, merge, piece_name, split
from spa.pipeline.requantize import requantizable, requantized
from spa.pipeline.variants import (
    LIMITS,
    CastCopy,
    cast_copies,
    lowered,
    lowered_options,
    lowered_taken,
    variant,
)
from spa.plan import FolderPlan, removed_indices
from spa.report import write_text_atomic

if TYPE_CHECKING:
    from spa.coupling.analysis import Analysis, Group
    from spa.coupling.types import SpaceKey
    from spa.generation import SignatureChange
    from spa.pipeline import CheckOptions, PruneOptions, PruneReport
    from spa.plan import Plan
    from spa.recipe import Recipe

log = logging.getLogger(__name__)
MERGED = "_merged.onnx"
CONFIG = "config.json"  # 🤗 Transformers' model config

Site = tuple[str, "SpaceKey"]  # a channel space of one file: (file name, space)
GroupRef = tuple[str, int]  # a group of one file: (file name, group id)


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
    # decoders whose pruned cache inputs declare their head axis symbolic (see _symbolic_heads)
    placeholders: dict[str, dict] = field(default_factory=dict)
    plans: dict[str, Plan] = field(default_factory=dict)  # each pruned file's (for the HTML page)
    # decoders calibrated on samples made from the encoder's (spa/pipeline/encdec.py): how
    decoder_samples: dict[str, dict] = field(default_factory=dict)
    # files that took the values a file of theirs refitted or compensated (_refits_taken)
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

    with _opened(folder, CheckOptions()) as view:
        free = _passed(view.headers)
        return {n: analyse(load_model(str(view.path / n)), ignore=ignore, hidden=hidden,
                           free=tuple(sorted(free[n]))) for n in view.onnx_files}


def plan_together(folder: str | os.PathLike[str], options: PruneOptions,
                  checks: CheckOptions, *, plan_path: str | os.PathLike[str] | None = None
                  ) -> FamilyPlan:
    """Analyse and plan the ONNX files of ``folder`` together (see the module); the plan reads
    nothing from the folder once made (``spa prune folder/ --dry-run``). ``plan_path``: where
    the plans will be saved (a decoder's made calibration samples are saved beside it)."""
    with _opened(folder, checks) as view:
        return _planned(view, options, checks, plan_path)


def _planned(view: _View, options: PruneOptions, checks: CheckOptions,
             plan_path: str | os.PathLike[str] | None = None) -> FamilyPlan:
    src, names, headers = view.path, view.onnx_files, view.headers
    if options.drops_blocks:
        raise OptionError("depth pruning of a folder of files is not supported")
    skipped = dict(view.left_out)
    free = _passed(headers)
    # the tokenizer beside the files, named by the input folder: the view's is temporary (a
    # saved plan's recipe names it for spa apply)
    options = with_tokenizer(options, options.calib, view.src)
    per_file = dict.fromkeys(names, options)
    made: dict[str, dict] = {}
    if any(free.values()):
        _refuse(options)
        if options.calib_data:
            readers: dict[str, str] = {}
            for a, b in _pairs(headers):
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
    sites = _tied_sites(analyses, headers)
    parted = _parted(analyses, plans, sites, copies, prefer)
    for n, why in parted.items():  # planned again as a file of its own, with the options
        log.warning("%s: pruned apart, not as a float16 copy of %s: %s", n, copies[n].plain,
                    why)
        del copies[n]
        per_file[n] = asked[n]
        prepared[n] = prepare(load_model(str(src / n)), asked[n], checks,
                              free=tuple(sorted(free[n])))
        analyses[n], plans[n] = prepared[n].analysis, prepared[n].planned.plan
    if parted:
        sites = _tied_sites(analyses, headers)
    sites += _copy_sites(analyses, copies)
    keep, followed, whole = _follow(analyses, plans, sites, prefer=prefer, last=copies)
    for text in whole:
        log.warning("%s", text)
    plans = {n: with_keep(analyses[n], plans[n], keep[n]) if keep[n] else plans[n]
             for n in plans}
    return FamilyPlan(src, headers, view.data, skipped, prepared, analyses, plans, sites,
                      followed, whole, view.origins(), made, copies)


def _parted(analyses: Mapping[str, Analysis], plans: Mapping[str, Plan],
            sites: list[tuple[Site, Site]], copies: Mapping[str, CastCopy],
            prefer: Collection[str]) -> dict[str, str]:
    """The float16 copies that cannot follow their plain file (a group the copy cannot prune,
    such as a cache only the plain files pass on): tied to it, they would keep channels
    whole in the plain file too. Each with why; ``sites``: the ties without the copies'."""
    if not copies:
        return {}
    apart = _follow(analyses, plans, sites, prefer=prefer)[0]
    out = {}
    for n, copy in copies.items():
        keep, _, whole = _follow(analyses, plans, sites + _copy_sites(analyses, {n: copy}),
                                 prefer=prefer, last={n})
        if any(f not in copies and f in plans
               and _kept(keep[f], plans[f]) != _kept(apart[f], plans[f]) for f in analyses):
            out[n] = next((w for w in whole if f" in {n}" in w), "its ties keep channels")
    return out


def _kept(keep: Mapping[int, np.ndarray], plan: Plan) -> dict[int, tuple[int, ...]]:
    """A file's groups' kept channels: as ties decided them (``keep``), else as planned."""
    return {g.id: tuple(np.asarray(keep.get(g.id, g.keep)).tolist()) for g in plan.groups}


def _own_checks(checks: CheckOptions, copy: bool) -> CheckOptions:
    """A float16 copy's own numeric oracle does not run: the copy is written with its plain
    file's values cast (refitted, compensated or trained there), which its own masked
    original does not hold; it is checked against its plain file instead
    (spa/pipeline/variants.py)."""
    return dataclasses.replace(checks, check_masked=False) if copy else checks


def _samples_dir(view: _View, plan_path: str | os.PathLike[str] | None) -> Path:
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
    out = _output_checked(folder, out_dir)
    with _opened(folder, checks) as view:
        fp = _planned(view, options, checks, plan_path)
        if distil is not None and not fp.made:
            _trained_alone(fp, view.src)  # refused before anything is written
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
    out = _output_checked(folder, out_dir)
    with _opened(folder, checks) as view:
        return _applied_together(view, saved, out, checks)


def _applied_together(view: _View, saved: FolderPlan, out: Path, checks: CheckOptions
                      ) -> FamilyReport:
    src, names, headers = view.path, view.onnx_files, view.headers
    listed = sorted({*saved.files, *saved.copied})
    if listed != names:
        raise PlanMismatchError(f"the plan is for the files {listed}; {view.src} holds {names} "
                                f"(a merged decoder as its two branches)")
    free = _passed(headers)
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
    copies = {n: c for n, c in found.items()  # those pruned as copies (see _parted)
              if not _ties_broken(analyses, saved.files, _copy_sites(analyses, {n: c}))}
    sites = _tied_sites(analyses, headers) + _copy_sites(analyses, copies)
    broken = _ties_broken(analyses, saved.files, sites)
    if broken:
        raise PlanMismatchError(f"{broken}: the files would not run together")
    fp = FamilyPlan(src, headers, view.data, view.left_out | {
        n: "nothing to prune in it when planned; copied as it is" for n in saved.copied}, {},
        analyses, dict(saved.files), sites, None, [], view.origins(), copies=copies)

    def write(n: str, path: Path, checks: CheckOptions) -> PruneReport:
        return applied(analyses[n], saved.files[n], path, _own_checks(checks, n in copies))

    return _write_together(fp, view, out, checks, write)


def _output_checked(folder: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    src, out = Path(folder), Path(out_dir)
    _onnx_files(src)  # a folder with nothing to prune says so before the output is judged
    check_output_folder(out)
    if out.resolve().is_relative_to(src.resolve()):
        raise OutputPathError(f"{out}: the pruned folder cannot be in the input folder {src}")
    return out


@dataclass
class _View:
    """What a folder is planned and pruned from: ``path`` links every entry of the input
    folder ``src`` but its merged decoders; a merged decoder SPA splits is there as its two
    branches' files (spa/pipeline/merged.py), to be merged back once pruned."""

    src: Path
    path: Path
    onnx_files: list[str]  # the files pruned or copied, by name in ``path``
    headers: dict[str, onnx.ModelProto]  # their graphs, read once (external data not read)
    merged: dict[str, onnx.ModelProto]  # merged decoders split, by name: the original
    left_out: dict[str, str]  # merged decoders not split, and why
    data: set[str]  # the external data files of every ONNX file of ``src``
    scratch: Path  # a temporary folder beside, for what is made on the way

    def origins(self) -> dict[str, str]:
        """Each file's path in ``src``; a branch's, its merged file's and the branch."""
        branches = {piece_name(m, b): f"{self.src / m} ({b})" for m in self.merged
                    for b in BRANCHES}
        return {n: branches.get(n, str(self.src / n)) for n in self.onnx_files}


@contextmanager
def _opened(folder: str | os.PathLike[str], checks: CheckOptions) -> Iterator[_View]:
    """The :class:`_View` of ``folder``, in a temporary folder removed on exit."""
    src = Path(folder)
    onnx_files = _onnx_files(src)
    headers = {n: onnx.load(str(src / n), load_external_data=False) for n in onnx_files}
    data = {d for h in headers.values() for d in external_data_files(h)}
    with tempfile.TemporaryDirectory(prefix="spa-folder-") as tmp, \
            tempfile.TemporaryDirectory(prefix="spa-scratch-") as scratch:
        path = Path(tmp)
        merged: dict[str, onnx.ModelProto] = {}
        left_out: dict[str, str] = {}
        # by name, or by its graph: transformers.js folders hold *_merged_quantized.onnx too
        for n in (n for n in onnx_files if n.endswith(MERGED) or is_merged(headers[n])):
            done = _split_into(headers[n], n, path, checks)
            if not isinstance(done, str):
                merged[n] = done
            elif n.endswith(MERGED):
                left_out[n] = (f"a merged decoder SPA cannot split: {done}; left out of the "
                               "pruned folder (runtimes such as Optimum's load the separate "
                               "decoders instead)")
        for f in sorted(src.iterdir()):
            if f.name not in merged and f.name not in left_out:
                os.symlink(f.resolve(), path / f.name)
        names = sorted(f.name for f in path.iterdir() if f.suffix == ".onnx" and f.is_file())
        if not names:
            raise OptionError(f"{src}: every ONNX file in it is a merged decoder SPA cannot "
                              f"split ({'; '.join(f'{k}: {v}' for k, v in left_out.items())})")
        # each graph once: the input's as read above, a branch's from its file
        headers = {n: headers[n] if n in headers else
                   onnx.load(str(path / n), load_external_data=False) for n in names}
        yield _View(src, path, names, headers, merged, left_out, data, Path(scratch))


def _split_into(model: onnx.ModelProto, name: str, path: Path, checks: CheckOptions
                ) -> onnx.ModelProto | str:
    """Save the branches of the merged decoder ``model`` into ``path``, and return it; or why
    it is not split (its branches, split apart, must answer as it does)."""
    pieces = split(model)
    if isinstance(pieces, str):
        return pieces
    cond = model.graph.node[0].input[0]
    worst = agreement(model, pieces, cond, dict(checks.input_dims))
    if not worst <= checks.rtol:
        return f"its branches, split apart, do not answer as it does (relative {worst:.1e})"
    for branch, piece in pieces.items():
        onnx.save(piece, str(path / piece_name(name, branch)))
    return model


def _merged_back(tmp: Path, name: str, template: onnx.ModelProto, checks: CheckOptions,
                 reports: Mapping[str, PruneReport]) -> dict:
    """Merge the pruned branches of ``name`` in ``tmp`` back into it (their files removed);
    it must answer as they do."""
    files = {b: tmp / piece_name(name, b) for b in BRANCHES}
    onnx.save(merge(template, {b: onnx.load(str(f)) for b, f in files.items()}),
              str(tmp / name))
    done: dict = {"branches": {b: f.name for b, f in files.items()}}
    if checks.validate:
        dims = dict(checks.input_dims)
        for f in files.values():
            if f.name in reports:
                dims |= reports[f.name].input_dims
        worst = agreement(str(tmp / name), {b: str(f) for b, f in files.items()},
                          template.graph.node[0].input[0], dims)
        if not worst <= checks.rtol:
            raise ValidationError(f"{name}: merged back, its branches answer {worst:.1e} "
                                  f"(relative) apart from their pruned files")
        done["relative_diff"] = worst
    for f in files.values():
        f.unlink()
    return done


def _write_together(fp: FamilyPlan, view: _View, out: Path, checks: CheckOptions,
                    write: Callable[[str, Path, CheckOptions], PruneReport],
                    distil: joined.Distil | None = None) -> FamilyReport:
    """Write the folder ``fp`` plans into ``out``: each planned file by ``write`` (name, path,
    checks), the others copied, merged decoders merged back, the encoder and decoder distilled
    together by ``distil`` when given (or, with no encoder, the one calibrated file alone);
    the files checked together (see the module)."""
    src = fp.src
    alone = _trained_alone(fp, src) if distil is not None and not fp.made else None
    config = read_config(src / CONFIG)
    changes = {n: signature_change(fp.analyses[n], p) for n, p in fp.plans.items()} \
        if config is not None else {}
    edits = _config_edits(config, changes) if config is not None else {}
    held = _placeholder_caches(config, changes) if config is not None else {}
    if edits or held:  # the copy says what the pruned caches hold, or the file takes what
        checks = dataclasses.replace(checks, config_warning=False)  # runtimes make of it
    passed = _passed(fp.headers)
    sources = _value_sources(fp, passed)
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
        taken = _refits_taken(tmp, sources, digests)
        for n, took in taken.items():  # its oracle judged the weights it had before
            _took(reports[n], took)
        recovery: dict = {}
        if distil is not None:
            recovery = _recovered(fp, tmp, digests, distil, reports) if alone is None \
                else _recovered_alone(fp, tmp, digests, distil, reports, alone)
        for n, took in lowered_taken(tmp, fp.copies, src if checks.validate else None,
                                     reports).items():
            _took(reports[n], took, f"a float16 copy of {took['from']}, it took "
                                    f"{took['values']} of its written values, cast")
            taken[n] = took
        found = requantizable(src, [n for n in fp.headers if n not in fp.plans],
                              set(reports))
        again = requantized(src, tmp, found, {n: reports[n].input_dims for n in reports},
                            checks.validate)
        taken |= {n: took for n, took in again.items() if isinstance(took, dict)}
        skipped = {n: f"{why}; not made again from its pruned plain file: {again[n]}"
                   if isinstance(again.get(n), str) else why
                   for n, why in fp.skipped.items() if n not in taken}
        joint = _together(fp, tmp) if checks.validate else {}
        placeholders = {n: _symbolic_heads(tmp / n, *held[n], checks) for n in held}
        _check_written(tmp, list(fp.headers), fp.sites, fp.copies)
        steps: dict[str, dict | str] = {}
        for a, b in _pairs(fp.headers):
            sized = reports.get(a) or reports.get(b)
            if checks.validate and sized is not None:
                steps[f"{a} -> {b}"] = _steps_checked(src, tmp, a, b, dict(sized.input_dims),
                                                      checks.rtol)
        merged = {n: _merged_back(tmp, n, t, checks, reports) for n, t in view.merged.items()}
        for n, done in merged.items():
            for piece in done["branches"].values():
                if piece in reports:
                    reports[piece].output = str(out / n)
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


def _together(fp: FamilyPlan, written: Path) -> dict[str, dict[str, float]]:
    """Per decoder calibrated on samples made from an encoder's, the held-out fidelity of the
    two pruned files run together (:func:`spa.pipeline.encdec.together`)."""
    out = {}
    for d, how in fp.made.items():
        e = how["from"]
        held = [fp.prepared[n].calib if n in fp.prepared else None for n in (e, d)]
        if held[0] is not None and held[1] is not None:
            feeds = encdec.feeds_for(fp.headers, d, [e])
            assert feeds is not None, "a decoder whose samples were made reads an encoder"
            out[f"{e} -> {d}"] = encdec.together(fp.src, written, feeds, d, held[0].held_out,
                                                 held[1].held_out, encdec.eos_ids(fp.src))
    return out


def _recovered(fp: FamilyPlan, tmp: Path, digests: Mapping[str, Mapping[str, str]],
               distil: joined.Distil, reports: Mapping[str, PruneReport]) -> dict:
    """The first decoder calibrated on an encoder's samples and that encoder, distilled
    together in ``tmp`` (:func:`spa.pipeline.joined.recovered`); the files that took the
    trained values say so in their reports."""
    decoder, how = next(iter(fp.made.items()))
    encoder = how["from"]
    feeds = encdec.feeds_for(fp.headers, decoder, [encoder])
    assert feeds is not None, "a decoder whose samples were made reads an encoder"
    cals = [fp.prepared[n].calib if n in fp.prepared else None for n in (encoder, decoder)]
    if cals[0] is None or cals[1] is None:
        raise OptionError(f"--recover trains {encoder} with {decoder}, and "
                          f"{encoder if cals[0] is None else decoder} has nothing to prune "
                          "or no calibration samples")
    done = joined.recovered(fp.src, tmp, encoder, decoder, feeds, (cals[0], cals[1]), digests,
                            distil)
    for n, count in done["trained"].items():
        if count:
            other = decoder if n == encoder else encoder
            _took(reports[n], {}, f"{count} of its values were trained with {other}'s by "
                                  "--recover")
    for n, count in done["taken"].items():
        _took(reports[n], {"values": count, "how": "recovered", "from": decoder})
    return done


def _trained_alone(fp: FamilyPlan, src: Path) -> str:
    """The file ``--recover`` distils in a folder with no encoder: its one calibrated plain
    file, whose float16 copies take the trained values cast, whose int8 copies are quantised
    from it again, and whose with-past twins take them by role. An error when there are
    several (which to train?) or none."""
    plain = [n for n in fp.plans if n not in fp.copies]
    calibrated = [n for n in plain if n in fp.prepared and fp.prepared[n].calib is not None]
    if not calibrated:
        raise OptionError(f"--recover distils on calibration data, and no file of {src} was "
                          "calibrated: give --calib PATH")
    if len(calibrated) > 1:
        raise OptionError(f"--recover distils one pruned file, and {len(calibrated)} were "
                          f"pruned ({', '.join(calibrated)}): prune the folder, then recover "
                          "each file with spa recover")
    return calibrated[0]


def _recovered_alone(fp: FamilyPlan, tmp: Path, digests: Mapping[str, Mapping[str, str]],
                     distil: joined.Distil, reports: Mapping[str, PruneReport],
                     name: str) -> dict:
    """The folder's one trained file (:func:`_trained_alone`) distilled on its own in
    ``tmp`` (:func:`spa.pipeline.joined.recovered_alone`); its report and those of the files
    that took the trained values say so."""
    calib = fp.prepared[name].calib
    assert calib is not None, "a file trained alone was calibrated"
    done = joined.recovered_alone(fp.src, tmp, name, calib, digests, distil)
    report = reports[name]
    report.recovery = {k: v for k, v in done.items() if k not in ("trained", "taken")}
    report.fidelity["recovered"] = done["fidelity_after"]
    if done["trained"].get(name):
        _took(report, {}, f"{done['trained'][name]} of its values were trained by --recover")
    for n, count in done["taken"].items():
        _took(reports[n], {"values": count, "how": "recovered", "from": name})
    return done


def _took(report: PruneReport, took: Mapping[str, object], what: str = "") -> None:
    """Say in ``report`` that its file took values of another (``took``: see
    :func:`_refits_taken`), or ``what`` happened to its values, after its own checks ran: the
    numeric oracle judged the values before."""
    before = (f" (before: max |Δ| {report.masked_max_abs_diff:.3g})"
              if report.masked_max_abs_diff is not None else "")
    report.masked_max_abs_diff = report.masked_relative_diff = None
    what = what or f"it took {took['values']} {took['how']} values of {took['from']}"
    report.oracle = f"does not apply: {what}{before}; checked with it by the folder's checks"


def _value_sources(fp: FamilyPlan, passed: Mapping[str, set[str]]
                   ) -> list[tuple[str, str, str]]:
    """``(variant, source, how)`` per precision variant whose source
    (:func:`spa.pipeline.encdec.sources`; ``passed``: each file's tensors passed between
    files, :func:`_passed`) is written with values other than the input's: refitted on
    calibration data, or compensated (:func:`_changed`)."""
    out = []
    for kind, source in sorted(encdec.sources(list(fp.headers), fp.headers, passed,
                                              variant).items()):
        plan = fp.plans.get(source)
        how = _changed(plan.recipe) if plan is not None and plan.recipe is not None else ""
        if how:
            out.append((kind, source, how))
    return out


def _refits_taken(tmp: Path, sources: list[tuple[str, str, str]],
                  digests: Mapping[str, Mapping[str, str]]) -> dict[str, dict]:
    """Write into the files in ``tmp`` that pass caches the values their source changed
    (:func:`_value_sources`), so that they stay one model: first the plain files' source's,
    which every other such file takes (a precision variant's copies of the same bytes too),
    then each variant's own source's, which that variant's files take (its int8 or float16
    weights match nothing of the plain files). ``digests``: the weights of the files that
    pass caches before they were written (:func:`spa.pipeline.encdec.weight_digests`).
    Returns, per file that took values, how many (``values``), from which sources
    (``from``) and how they were changed there (``how``)."""
    taken: dict[str, dict] = {}
    for kind, source, how in sources:
        files = {n: d for n, d in digests.items() if not kind or variant(n) == kind}
        for n, count in encdec.take_refits(tmp, source, files).items():
            had = taken.setdefault(n, {"from": source, "values": 0, "how": how})
            if had["from"] != source:
                had["from"] += f", {source}"
                had["how"] = _joined(had["how"], how)
            had["values"] += count
    return taken


def _changed(recipe: Recipe) -> str:
    """How a plan's written weights differ from the input's: "compensated" (OBSPA's update,
    FLAP's bias shifts), "refitted" (reconstruction), both, or "" (neither)."""
    return " and ".join(word for word, step in (
        ("compensated", recipe.compensation or recipe.bias_compensation),
        ("refitted", recipe.reconstruction)) if step is not None)


def _joined(a: str, b: str) -> str:
    return " and ".join(dict.fromkeys([*a.split(" and "), *b.split(" and ")]))


def _ties_broken(analyses: Mapping[str, Analysis], plans: Mapping[str, Plan],
                 pairs: list[tuple[Site, Site]]) -> str | None:
    """Which two tied spaces the plans leave with different entries, or None."""
    removed = {n: removed_indices(analyses[n], p) for n, p in plans.items()}
    none = np.zeros(0, np.int64)
    for (a, s), (b, t) in pairs:
        ra, rb = (removed.get(n, {}).get(k, none) for n, k in ((a, s), (b, t)))
        if not np.array_equal(ra, rb):
            return (f"'{s[0]}' in {a} and '{t[0]}' in {b} (axis {s[1]}) would lose different "
                    f"entries")
    return None


def _onnx_files(src: Path) -> list[str]:
    """The ONNX files of ``src`` by name; an error when there are none."""
    onnx_files = sorted(f.name for f in src.iterdir() if f.suffix == ".onnx" and f.is_file())
    if not onnx_files:
        raise OptionError(f"{src}: is a directory with no ONNX file in it")
    return onnx_files


def _config_edits(config: dict, changes: Mapping[str, SignatureChange]) -> dict[str, int]:
    """What to set in the folder's ``config.json`` for the pruned caches (🤗 Optimum's
    ``ORTModelForCausalLM`` sizes the first step's from its key/value head count); nothing when
    the files would need different values."""
    edits: dict[str, set[int]] = {}
    for change in changes.values():
        for k, v in config_edit(config, change).items():
            edits.setdefault(k, set()).add(v)
    return {k: vs.pop() for k, vs in edits.items() if len(vs) == 1}


Cache = tuple[int, int]  # a pruned cache input's head axis, and the heads it keeps


def _placeholder_caches(config: dict, changes: Mapping[str, SignatureChange]
                        ) -> dict[str, tuple[int, dict[str, Cache]]]:
    """Per file whose pruned caches the folder's config cannot describe
    (:func:`spa.generation.placeholder_count`): the head count of the placeholder caches a
    runtime feeds its first step, and its pruned cache inputs."""
    out = {}
    for n, change in changes.items():
        count = placeholder_count(config, change)
        if count is not None:
            out[n] = (count, {name: (axis, len(kept)) for name, (axis, kept, _)
                              in change.inputs.items() if name in change.caches})
    return out


def _symbolic_heads(path: Path, count: int, caches: Mapping[str, Cache],
                    checks: CheckOptions) -> dict:
    """Declare the head axis of the pruned cache inputs of the decoder at ``path`` symbolic, so
    that the first step takes the placeholder caches a runtime sizes from the config (``count``
    heads, length 0: 🤗 Optimum's ``ORTModelForCausalLM`` for GPT-2, Phi-3 and the others it
    sizes by ``num_attention_heads``). Checked: one token decoded on such placeholders gives
    the logits it gives on empty caches of the kept head counts."""
    model = onnx.load(str(path), load_external_data=False)
    for v in model.graph.input:
        if v.name in caches:
            axis = caches[v.name][0]
            v.type.tensor_type.shape.dim[axis].dim_param = f"{v.name}.axis{axis}"
    onnx.save(model, str(path))
    done: dict = {"placeholder_heads": count, "inputs": len(caches)}
    if not checks.validate:
        return done
    sess = val.session(str(path), what=path.name)
    feeds = decoder_feeds(val.random_inputs(sess, dims={}))  # one token, batch 1
    declared = {i.name: i.shape for i in sess.get_inputs()}

    def empty(name: str, heads: int) -> np.ndarray:
        axis = caches[name][0]
        shape = [heads if a == axis else 0 if isinstance(d, str) and a > 0 else s
                 for a, (d, s) in enumerate(zip(declared[name], feeds[name].shape))]
        return np.zeros(shape, feeds[name].dtype)

    try:
        own = val.run(sess, feeds | {k: empty(k, c[1]) for k, c in caches.items()})["logits"]
    except (ValidationError, KeyError) as exc:
        done["check"] = f"not run: {str(exc).splitlines()[0]}"
        return done
    given = val.run(sess, feeds | {k: empty(k, count) for k in caches})["logits"]
    diff = float(np.abs(given - own).max() / max(float(np.abs(own).max()), 1e-30))
    if not diff <= checks.rtol:
        raise ValidationError(f"{path.name}: fed placeholder caches of {count} heads, the first "
                              f"step answers {diff:.1e} (relative) apart from empty caches of "
                              "the heads it keeps")
    done["check"] = diff
    return done


def _refuse(options: PruneOptions) -> None:
    """What files that pass tensors to each other cannot be pruned with, before any work (a
    folder whose files do not, such as a decoder's ``model.onnx`` beside its config, takes
    every option one file takes but depth pruning)."""
    if options.calib is not None and not options.calib_data:
        raise OptionError("--calib synthetic makes each file's inputs alone, and files that "
                          "pass tensors to each other would be calibrated apart: give data "
                          "(the encoder's, or the decoder's when there is no encoder), or "
                          "prune the folder without --calib")


def _signatures(headers: Mapping[str, onnx.ModelProto]
                ) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Each file's graph input names, and its output names."""
    return ({n: {i.name for i in h.graph.input} for n, h in headers.items()},
            {n: {o.name for o in h.graph.output} for n, h in headers.items()})


def _passed(headers: Mapping[str, onnx.ModelProto]) -> dict[str, set[str]]:
    """Per file, its graph inputs and outputs that another file writes or reads back."""
    free: dict[str, set[str]] = {n: set() for n in headers}
    for a, b, out, inp in _passings(*_signatures(headers)):
        free[a].add(out)
        free[b].add(inp)
    return free


def _pairs(headers: Mapping[str, onnx.ModelProto]) -> list[tuple[str, str]]:
    """(writer, reader) of the files one of which reads back what the other writes, sorted."""
    return sorted({(a, b) for a, b, _, _ in _passings(*_signatures(headers))})


def _passings(inputs: Mapping[str, set[str]], outputs: Mapping[str, set[str]]
              ) -> Iterable[tuple[str, str, str, str]]:
    """(writer file, reader file, output name, input name) of every tensor passed on, between
    files of one variant (:func:`variant`)."""
    for a, outs in outputs.items():
        for out in sorted(outs):
            head, dot, rest = out.partition(".")
            for prefix in encdec.PASSED.get(head, ()) if dot else ():
                for b, ins in inputs.items():
                    if b != a and f"{prefix}.{rest}" in ins and variant(a) == variant(b):
                        yield a, b, out, f"{prefix}.{rest}"


def _tied_sites(analyses: Mapping[str, Analysis], headers: Mapping[str, onnx.ModelProto]
                ) -> list[tuple[Site, Site]]:
    """Pairs of channel spaces of two files that must lose the same entries: an axis of a
    tensor passed between them, or of a weight both hold (the same bytes; a float16 copy's
    weights: :func:`_copy_sites`)."""
    live = _live(analyses)
    pairs: list[tuple[Site, Site]] = []
    inputs, outputs = _signatures(headers)
    ranks = {n: {v.name: len(v.type.tensor_type.shape.dim)
                 for v in (*h.graph.input, *h.graph.output)} for n, h in headers.items()}
    for a, b, out, inp in _passings(inputs, outputs):
        for axis in range(ranks[a][out]):
            if (out, axis) in live[a] or (inp, axis) in live[b]:
                pairs.append(((a, (out, axis)), (b, (inp, axis))))
    owners: dict[str, list[tuple[str, str]]] = {}
    for n, analysis in analyses.items():
        for digest, name in _weights(analysis.model.graph, {k[0] for k in live[n]}).items():
            owners.setdefault(digest, []).append((n, name))
    for held in owners.values():
        first, *others = held
        pairs += [p for other in others for p in _axes_tied(live, first, other)]
    return pairs


def _copy_sites(analyses: Mapping[str, Analysis], copies: Mapping[str, CastCopy]
                ) -> list[tuple[Site, Site]]:
    """The channel spaces a float16 copy's weights tie to its plain file's (the same name:
    :func:`spa.pipeline.variants.cast_copies`)."""
    live = _live(analyses)
    return [p for n, copy in copies.items() if copy.plain in analyses for name in copy.names
            for p in _axes_tied(live, (copy.plain, name), (n, name))]


def _live(analyses: Mapping[str, Analysis]) -> dict[str, set[SpaceKey]]:
    """Each file's channel spaces."""
    return {n: {m.space for g in a.groups for m in g.members} for n, a in analyses.items()}


def _axes_tied(live: Mapping[str, set[SpaceKey]], first: tuple[str, str],
               other: tuple[str, str]) -> list[tuple[Site, Site]]:
    """The pairs of a weight held by two files (file, name): each axis a channel space in
    either."""
    axes = {k[1] for n, name in (first, other) for k in live[n] if k[0] == name}
    return [((first[0], (first[1], ax)), (other[0], (other[1], ax))) for ax in sorted(axes)]


def _weights(graph: gs.Graph, names: set[str]) -> dict[str, str]:
    """The weights among ``names`` (rank 2 and up) by a digest of their type, shape and bytes,
    those alone in their file with it."""
    seen: dict[str, list[str]] = {}
    tensors = graph.tensors()
    for name in sorted(names):
        t = tensors.get(name)
        if isinstance(t, gs.Constant) and len(t.shape) >= 2:
            seen.setdefault(encdec.digest(t.values), []).append(name)
    return {d: ns[0] for d, ns in seen.items() if len(ns) == 1}


def _follow(analyses: Mapping[str, Analysis], plans: Mapping[str, Plan],
            pairs: list[tuple[Site, Site]], prefer: Collection[str] = (),
            last: Collection[str] = ()
            ) -> tuple[dict[str, dict[int, np.ndarray]], int, list[str]]:
    """Each file's groups whose channels a tied group decides (their kept channels), how many
    follow, and the components kept whole, with why; a group of a ``prefer`` file (one
    planned on calibration data) decides before the others."""
    on: dict[Site, list[GroupRef]] = {}
    groups: dict[GroupRef, Group] = {}
    for n, a in analyses.items():
        for g in a.groups:
            groups[(n, g.id)] = g
            for m in g.members:
                on.setdefault((n, m.space), []).append((n, g.id))
    links = nx.Graph()
    for s, t in pairs:
        refs = on.get(s, []) + on.get(t, [])
        links.add_nodes_from(refs)
        links.add_edges_from(zip(refs, refs[1:]))
    planned = {(n, gp.id): np.asarray(gp.keep) for n, p in plans.items() for gp in p.groups}
    keep: dict[str, dict[int, np.ndarray]] = {n: {} for n in analyses}
    whole: list[str] = []
    followed = 0
    for comp in sorted(map(sorted, nx.connected_components(links))):
        files = {n for n, _ in comp}
        if len(files) < 2 or not any(r in planned for r in comp):
            continue  # within one file, or nothing in it could lose channels anyway
        why = _unfollowable(comp, groups, planned, pairs, on)
        decided = None if why else _propagate(comp, groups, planned, pairs, on, prefer, last)
        if decided is None or (why := _mismatch(comp, groups, decided, pairs, analyses)):
            names = ", ".join(f"{groups[r].name} in {r[0]}" for r in comp)
            whole.append(f"{names}: kept whole, {why or 'the entries do not line up'}")
            decided = {r: np.arange(groups[r].size) for r in comp}
        for r, k in decided.items():
            if r in planned and not np.array_equal(k, planned[r]):
                followed += 1
            if r in planned:
                keep[r[0]][r[1]] = k
    return keep, followed, whole


def _unfollowable(comp: list[GroupRef], groups: Mapping[GroupRef, Group],
                  planned: Mapping[GroupRef, np.ndarray], pairs: list[tuple[Site, Site]],
                  on: Mapping[Site, list[GroupRef]]) -> str | None:
    """Why a component cannot lose channels at all, or None."""
    for r in comp:
        if r not in planned:
            g = groups[r]
            reasons = sorted(g.frozen) or ["not pruned in that file"]
            more = f"; and {len(reasons) - 1} more" if len(reasons) > 1 else ""
            return f"{g.name} cannot lose channels in {r[0]} ({reasons[0]}{more})"
    for s, t in pairs:
        if s in on and t in on and any(r in comp for r in on[s]):
            continue
        if any(x in on and any(r in comp for r in on[x]) for x in (s, t)):
            one, other = (s, t) if s in on else (t, s)
            return (f"'{one[1][0]}' axis {one[1][1]} is a channel space in {one[0]} but not "
                    f"'{other[1][0]}' in {other[0]}")
    return None


def _leader(comp: list[GroupRef], groups: Mapping[GroupRef, Group],
            prefer: Collection[str] = (), last: Collection[str] = ()) -> GroupRef:
    """The group whose file's plan decides: one of a ``prefer`` file first, then one not of a
    ``last`` file (a float16 copy), then the one with the most members (most weights)."""
    return max(comp, key=lambda r: (r[0] in prefer, r[0] not in last,
                                    len(groups[r].members)))  # the first of equals


def _propagate(comp: list[GroupRef], groups: Mapping[GroupRef, Group],
               planned: Mapping[GroupRef, np.ndarray], pairs: list[tuple[Site, Site]],
               on: Mapping[Site, list[GroupRef]], prefer: Collection[str] = (),
               last: Collection[str] = ()) -> dict[GroupRef, np.ndarray] | None:
    """From the leader's plan, each group's kept channels so that tied spaces lose the same
    entries; None when a group would have to lose part of a channel."""
    tied: dict[Site, list[Site]] = {}
    for s, t in pairs:
        tied.setdefault(s, []).append(t)
        tied.setdefault(t, []).append(s)
    lead = _leader(comp, groups, prefer, last)
    decided = {lead: planned[lead]}
    todo = [lead]
    while todo:
        r = todo.pop()
        gone = np.ones(groups[r].size, bool)
        gone[decided[r]] = False
        for m in groups[r].members:
            removed = set(m.indices[gone[m.channels]].tolist())
            for t in tied.get((r[0], m.space), ()):
                for h in on.get(t, ()):
                    for mh in (x for x in groups[h].members if x.space == t[1]):
                        out = np.isin(mh.indices, list(removed))
                        drop = set(mh.channels[out].tolist())
                        if drop & set(mh.channels[~out].tolist()):
                            return None  # a channel partly removed
                        k = np.setdiff1d(np.arange(groups[h].size), sorted(drop))
                        if h in decided:
                            if not np.array_equal(decided[h], k):
                                return None
                        elif k.size == 0:
                            return None
                        else:
                            decided[h] = k
                            todo.append(h)
    missing = [r for r in comp if r not in decided]
    return None if missing else decided


def _mismatch(comp: list[GroupRef], groups: Mapping[GroupRef, Group],
              decided: Mapping[GroupRef, np.ndarray], pairs: list[tuple[Site, Site]],
              analyses: Mapping[str, Analysis]) -> str | None:
    """Why the decided channels leave two tied spaces with different entries, or None."""
    kept: dict[Site, np.ndarray] = {}
    for r in comp:
        g = groups[r]
        gone = np.ones(g.size, bool)
        gone[decided[r]] = False
        for m in g.members:
            site = (r[0], m.space)
            length = analyses[r[0]].lengths[m.space]
            mask = kept.setdefault(site, np.ones(length, bool))
            mask[m.indices[gone[m.channels]]] = False
    for s, t in pairs:
        if s in kept and t in kept and (kept[s].shape != kept[t].shape
                                        or not np.array_equal(kept[s], kept[t])):
            return (f"'{s[1][0]}' in {s[0]} and '{t[1][0]}' in {t[0]} (axis {s[1][1]}) would "
                    f"lose different entries")
    return None


STEPS = 3  # tokens the step check decodes with the reader


def _steps_checked(src: Path, out: Path, writer: str, reader: str, dims: dict[str, int],
                   rtol: float) -> dict | str:
    """Whether the pruned ``reader`` continues what the pruned ``writer`` wrote, as a decoder
    with past continues the first-step decoder: on the writer's caches for a prefix, and then
    its own, ``STEPS`` tokens one at a time, its logits must match the writer's over the whole
    prefix at the last token (relative ``rtol``), as they do for the original files (else the
    check does not run: the files are not such a pair). The result, or why it did not run."""
    first, later = (val.session(str(out / n), what=n) for n in (writer, reader))
    why = _not_a_pair(first, later)
    if why:
        return f"not run: {why}"
    originals = (val.session(str(src / writer), what=writer),
                 val.session(str(src / reader), what=reader))
    try:
        before = _step_difference(*originals, dims)
    except ValidationError as exc:  # such as a merged decoder that is no file of the pair
        return f"not run: the original files do not run step by step ({exc})"
    if not before <= rtol:
        return f"not run: the original files differ by {before:.1e} step by step"
    after = _step_difference(first, later, dims)
    if not after <= rtol:
        raise ValidationError(
            f"the pruned {reader} does not continue what the pruned {writer} writes: its logits "
            f"differ from a run over the whole prefix by {after:.1e} (relative; the original "
            f"files: {before:.1e}, allowed {rtol:.0e})")
    return {"steps": STEPS, "relative_diff": after, "relative_diff_original": before}


def _not_a_pair(first: ort.InferenceSession, later: ort.InferenceSession) -> str | None:
    """None when ``later`` reads what ``first`` writes and the token inputs both take, else
    why the step check cannot feed them."""
    fed = {i.name for i in first.get_inputs()}
    own = [i.name for i in later.get_inputs() if i.name not in fed and not any(
        i.name.startswith(p + ".") for ps in encdec.PASSED.values() for p in ps)]
    if own:
        return f"inputs {own} are neither the first file's nor caches it writes"
    if "input_ids" not in fed or "logits" not in {o.name for o in first.get_outputs()} \
            or "logits" not in {o.name for o in later.get_outputs()}:
        return "no 'input_ids' input and 'logits' output"
    ids = next(i for i in first.get_inputs() if i.name == "input_ids")
    if len(ids.shape) != 2 or isinstance(ids.shape[1], int):
        return "'input_ids' has no symbolic sequence axis"
    by_length = [i.name for i in first.get_inputs()
                 if i.name != "input_ids" and ids.shape[1] in i.shape]
    if by_length:
        return f"inputs {by_length} are sized by the token sequence too"
    return None


def _step_difference(first: ort.InferenceSession, later: ort.InferenceSession,
                     dims: dict[str, int]) -> float:
    """The worst relative difference, over ``STEPS`` steps, between ``later``'s last logits
    on the caches written so far and ``first``'s over the whole prefix."""
    feeds = {k: np.ones_like(v) if "mask" in k else v
             for k, v in val.random_inputs(first, dims=dims).items()}
    prefix = feeds["input_ids"].shape[1]
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 2, (feeds["input_ids"].shape[0], prefix + STEPS)).astype(
        feeds["input_ids"].dtype)

    def whole(t: int) -> dict[str, np.ndarray]:
        return val.run(first, {**feeds, "input_ids": ids[:, :t]})

    wanted = {i.name for i in later.get_inputs()}
    past = encdec.read_back(whole(prefix))
    worst = 0.0
    for t in range(prefix, prefix + STEPS):
        step = val.run(later, {**{k: v for k, v in feeds.items() if k in wanted},
                               **{k: v for k, v in past.items() if k in wanted},
                               "input_ids": ids[:, t:t + 1]})
        ref = whole(t + 1)["logits"][:, -1]
        worst = max(worst, float(np.abs(step["logits"][:, -1] - ref).max()
                                 / max(float(np.abs(ref).max()), 1e-30)))
        past.update(encdec.read_back(step))
    return worst


def _check_written(folder: Path, names: list[str], pairs: list[tuple[Site, Site]],
                   copies: Mapping[str, CastCopy] | None = None) -> None:
    """The pruned files agree: shared weights byte-identical (a float16 copy's: its plain
    file's cast), passed tensors the same shape."""
    limits = {n: c.limits for n, c in (copies or {}).items()}
    written = {n: onnx.load(str(folder / n)) for n in names}
    values = {n: {i.name: i for i in m.graph.initializer} for n, m in written.items()}
    dims = {n: {v.name: fixed_dims(v) for v in (*m.graph.input, *m.graph.output)}
            for n, m in written.items()}
    for (a, (x, ax)), (b, (y, _)) in pairs:
        if x in dims[a] and y in dims[b]:
            if dims[a][x][ax] != dims[b][y][ax]:
                raise ValidationError(
                    f"'{x}' in {a} and '{y}' in {b} have {dims[a][x][ax]} and {dims[b][y][ax]} "
                    f"entries on axis {ax} after pruning: the files would not run together")
        elif x in values[a] and y in values[b]:
            va, vb = (numpy_helper.to_array(values[n][w]) for n, w in ((a, x), (b, y)))
            if va.dtype != vb.dtype and va.shape == vb.shape:  # a float16 copy's weight
                va = lowered(va, vb.dtype, limits.get(b, LIMITS[0]))
            if va.shape != vb.shape or not val.same_bits(va, vb):
                raise ValidationError(
                    f"weight '{x}' of {a} and '{y}' of {b} were the same before pruning and "
                    f"differ after: the files would not be one model (a value refitted or "
                    f"compensated in one file that the others did not take)")


__all__ = ["FamilyPlan", "FamilyReport", "analyse_together", "apply_together", "plan_together",
           "prune_together"]
