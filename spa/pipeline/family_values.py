"""Values one file of a folder changes, taken by the files that pass caches with it.

A folder's files pruned together (spa/pipeline/family.py) must stay one model after the values
they write differ from the input's:

* **Refits and compensation** (reconstruction's refits, OBSPA's compensation, each file from
  its own statistics): the files that pass caches take those of their variant's first-step
  decoder (:func:`refits_taken`, from :func:`value_sources`) before the folder's checks run
  (spa/pipeline/family_checks.py), which then hold for the values written.
* **Recovery** (``--recover``, given ``distil``): the pruned encoder and first-step decoder
  are distilled together, joined into one graph (spa/pipeline/joined.py; :func:`recovered`),
  after the values are taken and before the checks; the files that pass caches take the
  trained values too. A folder with no encoder distils its one calibrated file alone
  (:func:`trained_alone`, :func:`recovered_alone`).

A file that took values says so in its report (:func:`note_taken`): its own numeric oracle
judged the values it had before.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from spa.errors import OptionError
from spa.pipeline import encdec, joined
from spa.pipeline.variants import variant

if TYPE_CHECKING:
    from spa.pipeline import PruneReport
    from spa.pipeline.family import FamilyPlan
    from spa.recipe import Recipe


def recovered(fp: FamilyPlan, tmp: Path, digests: Mapping[str, Mapping[str, str]],
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
            note_taken(reports[n], {},
                       f"{count} of its values were trained with {other}'s by --recover")
    for n, count in done["taken"].items():
        note_taken(reports[n], {"values": count, "how": "recovered", "from": decoder})
    return done


def trained_alone(fp: FamilyPlan, src: Path) -> str:
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


def recovered_alone(fp: FamilyPlan, tmp: Path, digests: Mapping[str, Mapping[str, str]],
                    distil: joined.Distil, reports: Mapping[str, PruneReport],
                    name: str) -> dict:
    """The folder's one trained file (:func:`trained_alone`) distilled on its own in
    ``tmp`` (:func:`spa.pipeline.joined.recovered_alone`); its report and those of the files
    that took the trained values say so."""
    calib = fp.prepared[name].calib
    assert calib is not None, "a file trained alone was calibrated"
    done = joined.recovered_alone(fp.src, tmp, name, calib, digests, distil)
    report = reports[name]
    report.recovery = {k: v for k, v in done.items() if k not in ("trained", "taken")}
    report.fidelity["recovered"] = done["fidelity_after"]
    if done["trained"].get(name):
        note_taken(report, {},
                   f"{done['trained'][name]} of its values were trained by --recover")
    for n, count in done["taken"].items():
        note_taken(reports[n], {"values": count, "how": "recovered", "from": name})
    return done


def note_taken(report: PruneReport, took: Mapping[str, object], what: str = "") -> None:
    """Say in ``report`` that its file took values of another (``took``: see
    :func:`refits_taken`), or ``what`` happened to its values, after its own checks ran: the
    numeric oracle judged the values before."""
    before = (f" (before: max |Δ| {report.masked_max_abs_diff:.3g})"
              if report.masked_max_abs_diff is not None else "")
    report.masked_max_abs_diff = report.masked_relative_diff = None
    what = what or f"it took {took['values']} {took['how']} values of {took['from']}"
    report.oracle = f"does not apply: {what}{before}; checked with it by the folder's checks"


def value_sources(fp: FamilyPlan, passed: Mapping[str, set[str]]
                  ) -> list[tuple[str, str, str]]:
    """``(variant, source, how)`` per precision variant whose source
    (:func:`spa.pipeline.encdec.sources`; ``passed``: each file's tensors passed between
    files, :func:`spa.pipeline.ties.passed`) is written with values other than the input's:
    refitted on calibration data, or compensated (:func:`_changed`)."""
    out = []
    for kind, source in sorted(encdec.sources(list(fp.headers), fp.headers, passed,
                                              variant).items()):
        plan = fp.plans.get(source)
        how = _changed(plan.recipe) if plan is not None and plan.recipe is not None else ""
        if how:
            out.append((kind, source, how))
    return out


def refits_taken(tmp: Path, sources: list[tuple[str, str, str]],
                 digests: Mapping[str, Mapping[str, str]]) -> dict[str, dict]:
    """Write into the files in ``tmp`` that pass caches the values their source changed
    (:func:`value_sources`), so that they stay one model: first the plain files' source's,
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


__all__ = ["note_taken", "recovered", "recovered_alone", "refits_taken", "trained_alone",
           "value_sources"]
