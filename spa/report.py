"""Human and JSON views of SPA's results, for people and for pipelines.

* ``spa analyze``: :func:`analysis_summary` (JSON) and :func:`analysis_text`;
* ``spa prune`` / ``spa apply``: :func:`report_table`, :func:`report_notes` (advice, printed on
  stderr so that ``--json`` leaves exactly one JSON document on stdout) and :func:`write_report`;
* ``spa prune --dry-run``: :func:`plan_summary` (JSON) and :func:`plan_text`.

Every file is written with :func:`write_text_atomic`: a failed run never leaves half a report.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from spa import fidelity
from spa.coupling.types import Role
from spa.errors import OutputPathError
from spa.inputs import InputDims
from spa.metrics import CostModel

if TYPE_CHECKING:
    from spa.api import PruneReport
    from spa.coupling.analysis import Analysis, Group
    from spa.pipeline.family import FamilyReport
    from spa.plan import Plan


def _group_dict(g: Group) -> dict:
    return {
        "id": g.id, "name": g.name, "kind": g.kind.value, "channels": g.size,
        "prunable": g.prunable,
        "producers": [f"{m.space[0]}[{m.space[1]}]" for m in g.producers],
        "consumers": [f"{m.space[0]}[{m.space[1]}]" for m in g.consumers],
        "members": len([m for m in g.members if m.role is not Role.VIRTUAL]),
        "frozen": list(g.frozen),
        **({"via": list(g.via)} if g.via else {}),
    }


def analysis_summary(analysis: Analysis) -> dict:
    groups = [g for g in analysis.groups if g.producers]
    return {
        "model": str(analysis.model.path or "<memory>"),
        "fingerprint": analysis.fingerprint,
        "opset": analysis.model.opset,
        "nodes": len(analysis.model.graph.nodes),
        "params": analysis.model.params,  # as its file holds them
        "flops": CostModel(analysis.model.graph).count().flops,
        "groups": [_group_dict(g) for g in groups],
        "prunable_groups": len(analysis.prunable_groups),
        "prunable_channels": sum(g.size for g in analysis.prunable_groups),
        "frozen_groups": len(analysis.frozen_groups),
    }


def analysis_text(analysis: Analysis, *, explain: bool = False) -> str:
    s = analysis_summary(analysis)
    lines = [f"model {s['model']}  opset {s['opset']}  nodes {s['nodes']}  "
             f"params {s['params']:,}  FLOPs (MACs) {s['flops']:,}",
             f"groups: {s['prunable_groups']} prunable ({s['prunable_channels']} channels), "
             f"{s['frozen_groups']} frozen", "",
             f"{'id':>4} {'channels':>8} {'status':<8} {'producers → consumers'}"]
    for g in s["groups"]:
        status = "prunable" if g["prunable"] else ("frozen" if g["frozen"] else "fixed")
        flow = f"{', '.join(g['producers'][:3])} → {', '.join(g['consumers'][:3]) or '-'}"
        lines.append(f"{g['id']:>4} {g['channels']:>8} {status:<8} {flow}")
        if explain and g["frozen"]:
            lines.extend(f"{'':>14}because {r}" for r in g["frozen"])
            lines.extend(f"{'':>14}tied by {r}" for r in g.get("via", ()))
    if not explain and s["frozen_groups"]:
        lines.append("\n(run with --explain to see why groups are frozen)")
    return "\n".join(lines)


# --- spa prune / spa apply: the before/after report ---------------------------------------


def report_table(r: PruneReport) -> str:
    """The before/after table printed by ``spa prune`` and ``spa apply``."""

    def row(label: str, a: float | None, b: float | None, fmt: str) -> str:
        if a is None or b is None:
            return f"{label:<16}{'-':>14}{'-':>14}{'-':>9}"
        ratio = f"{b / a:8.3f}x" if a else "       -"
        return f"{label:<16}{format(a, fmt):>14}{format(b, fmt):>14}{ratio}"

    lines = [f"{'':<16}{'before':>14}{'after':>14}{'after/before':>13}",
             row("params", r.params_before, r.params_after, ",d"),
             row("FLOPs (MACs)", r.flops_before, r.flops_after, ",d"),
             row("file bytes", r.bytes_before, r.bytes_after, ",d"),
             row("latency ms", r.latency_ms_before, r.latency_ms_after, ".3f"),
             row("channels", r.channels_before, r.channels_after, ",d")]
    lines.append(f"groups pruned: {r.groups_pruned} of {r.groups}; frozen groups: {len(r.frozen)}")
    if r.input_dims:
        lines.append(f"symbolic input dims: {input_dims_text(r)}")
    lines.extend(dropped_lines(r.dropped_blocks))
    lines.append(oracle_line(r))
    lines.extend(signature_lines(r))
    lines.extend(fidelity_lines(r))
    lines.extend(latency_lines(r))
    return "\n".join(lines)


def dropped_lines(dropped: list[dict]) -> list[str]:
    """Depth pruning: the residual blocks removed and the score each was chosen by."""
    if not dropped:
        return []
    return [f"residual blocks dropped: {len(dropped)}"] + [
        f"  {b['add']}: {b['stream']} + {b['branch']} score {b['score']:.4g}"
        for b in dropped]


def signature_lines(r: PruneReport) -> list[str]:
    """The graph inputs and outputs pruning narrowed (KV caches), and the greedy check."""
    lines = [f"signature changed: {c}" for c in r.signature_changes]
    g = r.generation
    if g.get("equal"):
        lines.append(f"greedy generation: {g['tokens']} tokens equal to the masked original's")
    elif g.get("not_run"):
        lines.append(f"greedy generation: not run ({g['not_run']})")
    if g.get("dense_logits_relative_diff"):
        rel = g["dense_logits_relative_diff"]
        lines.append(f"depth: per-token logits max |Δ| {max(g['logits_max_abs_diff']):.2g} from "
                     f"the masked original's; the dense original's greedy tokens: "
                     f"{g['dense_tokens_equal']} of {len(rel)} equal; its logits on the same "
                     f"tokens differ by {float(np.median(rel)):.3g} (median relative, max "
                     f"{max(rel):.3g})")
    return lines


def latency_lines(r: PruneReport) -> list[str]:
    """A latency target: the speed-up asked for, predicted by the table and measured."""
    t = r.latency_target
    if not t:
        return []
    line = (f"latency target: {t['requested_speedup']:.2f}x faster asked; table predicts "
            f"{t['dense_ms'] / t['predicted_ms']:.2f}x ({t['dense_ms']:.3f} → "
            f"{t['predicted_ms']:.3f} ms")
    line += ", table read from cache)" if t["cached"] else f", table timed in {t['seconds']:.1f} s)"
    achieved = measured_speedup(r)
    if achieved is None:
        return [line, "measured speed-up: not measured (validation off)"]
    error = (t["dense_ms"] / t["predicted_ms"]) / achieved - 1.0
    lines = [line, f"measured speed-up: {achieved:.2f}x (prediction error {error:+.1%})"]
    first, second = t.get("first_try"), t.get("second_try")
    if first and second:
        lines[1:1] = [f"first plan measured {_speedup(first)}; planned again with the table's "
                      f"savings scaled by {second['scale']:.2f}: {_speedup(second)}"
                      + ("" if t["scale"] != 1.0 else ", further off: the first plan is kept")]
    return lines


def _speedup(measured: dict) -> str:
    before, after = measured["latency_ms_before"], measured["latency_ms_after"]
    return f"{before / after:.2f}x" if before and after else "not measured"


def measured_speedup(r: PruneReport) -> float | None:
    if not (r.latency_ms_before and r.latency_ms_after):
        return None
    return r.latency_ms_before / r.latency_ms_after


def fidelity_lines(r: PruneReport) -> list[str]:
    """The calibration data, the allocation, and held-out fidelity after each stage."""
    lines = []
    if r.calibration:
        c = r.calibration
        source = f" (from {c['held_out_path']})" if c.get("held_out_path") else ""
        lines.append(f"calibration: {c['samples']} samples ({c['kind']}), {c['held_out']} held "
                     f"out{source}; allocation: {r.allocation}")
    for stage, measures in r.fidelity.items():
        lines.append(f"held-out fidelity after {stage}: {fidelity.describe(measures)}")
    if r.reconstruction.get("kept") is False:
        lines.append("reconstruction made held-out fidelity worse: written without it")
    return lines


def oracle_line(r: PruneReport) -> str:
    """One line on the numeric oracle: its figures when it ran, else why it did not."""
    if r.masked_relative_diff is not None:
        how = "" if r.oracle in (None, "held") else f", {r.oracle.removeprefix('held ')}"
        return (f"numeric oracle (pruned == masked original): max |Δ| "
                f"{r.masked_max_abs_diff:.3g} (relative {r.masked_relative_diff:.2g}{how})")
    return f"numeric oracle (pruned == masked original): {r.oracle or 'not run'}"


def input_dims_text(r: PruneReport) -> str:
    """``h=32 (name), w=32 (name)``: the sizes SPA's inputs gave the symbolic dims, and why."""
    return InputDims(r.input_dims, r.input_dims_from).describe()


def report_notes(r: PruneReport) -> list[str]:
    """Advice about a result, for stderr (``--quiet`` drops it; ``--json`` keeps stdout clean)."""
    notes = []
    achieved = measured_speedup(r)
    if achieved is not None and achieved < 1.0:
        if r.latency_target:
            hint = ""
        elif r.off_block_groups:
            hint = (f"; {r.off_block_groups} pruned group(s) left whole kernel blocks, which "
                    "defeats onnxruntime's blocked convolution kernels: use --round-to auto "
                    "(the default), or try --target latency")
        else:
            hint = ("; no convolution left its kernel blocks, so this is timing noise or "
                    "kernels the runtime prefers at the dense widths: time the model at its "
                    "real input sizes (--input-dim), or try --target latency, which measures "
                    "the widths")
        notes.append(f"warning: the pruned model measures slower than the dense one "
                     f"({r.latency_ms_before:.3f} → {r.latency_ms_after:.3f} ms){hint}")
    target = r.latency_target
    asked = target.get("requested_speedup")
    predicted = (target["dense_ms"] / target["predicted_ms"]
                 if target.get("dense_ms") and target.get("predicted_ms") else None)
    if asked and predicted is not None and predicted < 0.9 * asked:
        # the allocator meets any reachable target: a shorter prediction means none was
        notes.append(f"note: {asked:.2f}x asked is out of reach within --min-channels: the "
                     f"best plan is predicted at {predicted:.2f}x"
                     + ("" if achieved is None else f" and measures {achieved:.2f}x"))
    elif asked and achieved is not None and achieved < 0.9 * asked:
        notes.append(f"note: {achieved:.2f}x measured, {asked:.2f}x asked: the latency table "
                     "over-predicted the saving (timing noise, or layers the table does not "
                     "time); ask for more")
    return notes


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory and a rename,
    so a reader (or a failed run) never sees half a file."""
    target = Path(path)
    if target.is_dir():
        raise OutputPathError(f"{target}: output path is a directory")
    if not target.parent.is_dir():
        raise OutputPathError(f"{target}: directory {target.parent} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".spa-", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise OutputPathError(f"{target}: cannot write ({exc.strerror})") from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(report: PruneReport, path: str | os.PathLike[str]) -> None:
    write_text_atomic(path, json.dumps(report.to_dict(), indent=1) + "\n")


# --- spa prune --dry-run: the plan before anything is written -----------------------------


def plan_summary(plan: Plan, model: str) -> dict:
    """What a plan would do: per group kept/removed, frozen groups, predicted costs."""
    pred = plan.prediction
    return {
        "dry_run": True,
        "model": model,
        "fingerprint": plan.fingerprint,
        "options": plan.options(),
        "params_before": pred.params_before if pred else None,
        "params_after": pred.params_after if pred else None,
        "flops_before": pred.flops_before if pred else None,
        "flops_after": pred.flops_after if pred else None,
        "channels_before": sum(g.size for g in plan.groups),
        "channels_after": sum(len(g.keep) for g in plan.groups),
        "groups_pruned": sum(1 for g in plan.groups if g.removed),
        "groups": [{"id": g.id, "name": g.name, "channels": g.size, "kept": len(g.keep),
                    "removed": g.removed} for g in plan.groups],
        "frozen": [{"group": f.id, "name": f.name, "channels": f.size,
                    "reasons": list(f.reasons)} for f in plan.frozen],
        "dropped_blocks": [asdict(b) for b in plan.dropped],
    }


def ties_line(tied: int, followed: int | None) -> str:
    """How the files of a folder are tied (``followed`` None: saved plans decided)."""
    return f"{tied} channel spaces tied between files; " + (
        "the plans lose the same entries of each" if followed is None
        else f"{followed} groups follow another file's")


def folder_notes(family: FamilyReport) -> list[str]:
    """What a folder's report says beside its files' tables: files left out or copied, tied
    groups kept whole, config edits, placeholder caches, decoders' made calibration samples,
    refitted values taken."""
    notes = [f"{name}: {why}" for name, why in family.skipped.items()] + family.kept_whole
    notes += [f"config.json: {key} {before} -> {after}, the key/value heads the pruned caches "
              "keep (runtimes size the first step's caches from it)"
              for key, (before, after) in family.config_edits.items()]
    for name, held in family.placeholders.items():
        check = held.get("check")
        notes.append(
            f"{name}: {held['inputs']} pruned cache inputs declare their head axis symbolic, so "
            f"that the first step takes the empty caches of {held['placeholder_heads']} heads "
            "that runtimes make from config.json (no edit of it can say the heads kept)" + (
                f"; checked: it answers as on empty caches of the heads kept (relative "
                f"{check:.1e})" if isinstance(check, float) else f"; {check}" if check else ""))
    notes += [f"{name}: calibrated on samples made from {how['from']}'s: its "
              f"'{how['encoder_output']}' and {how['tokens']} tokens the dense model decodes "
              f"greedily from decoder_start_token_id {how['decoder_start_token_id']}"
              for name, how in family.decoder_samples.items()]
    notes += [_taken_note(name, took) for name, took in family.refits_taken.items()]
    notes += [f"held-out fidelity of {pair}, the pruned files together (the encoder's outputs "
              f"into the decoder, on the dense model's decode up to its EOS): "
              f"{fidelity.describe(m)}"
              for pair, m in family.together.items()]
    return notes + _recovery_notes(family.recovery)


def _taken_note(name: str, took: dict) -> str:
    """What a file took of another's written values (FamilyReport.refits_taken)."""
    check = (f"; answers as it within relative {took['relative_diff']:.1e} (the input files: "
             f"{took['relative_diff_before']:.1e})" if "relative_diff" in took else "")
    if took.get("how") == "quantised again":
        s = took["settings"]
        return (f"{name}: {took['from']} dynamically quantised (as {s['tool']} quantised it: "
                f"weight_type {s['weight_type']}, per_channel={s['per_channel']}, "
                f"reduce_range={s['reduce_range']}), made again from the pruned "
                f"{took['from']}{check}")
    if took.get("how") != "float16-cast":
        return (f"{name}: took {took['values']} {took['how']} values of {took['from']} (they "
                "share those weights)")
    return (f"{name}: a float16 copy of {took['from']}: planned as it, and took {took['values']} "
            f"of its written values, cast{check}")


def _recovery_notes(rec: dict) -> list[str]:
    """``--recover`` on a folder: the encoder and decoder distilled together (or its one
    calibrated file alone), and the files that took the trained values."""
    if not rec:
        return []
    before, after, name = rec["fidelity_before"], rec["fidelity_after"], rec["measure"]
    source = rec.get("file") or rec["decoder"]
    what = (f"{rec['file']} distilled" if "file" in rec
            else f"{rec['encoder']} and {rec['decoder']} distilled together")
    head = (f"recovery: {what} ({rec['steps']} steps at lr {rec['lr']:g}, {rec['seconds']:.0f} s, "
            f"{rec['values']} values trained): held-out {name} {before[name]:.4f} -> "
            f"{after[name]:.4f}" + (f" (of {int(before['samples'])} samples)"
                                    if "samples" in before else "") + "; " + (
                "written" if rec["kept"] == "recovered"
                else f"the pruned values written ({rec['kept']})"))
    return [head] + [f"{name}: took {count} values of {source} trained by the recovery "
                     "(they share those weights)" for name, count in rec["taken"].items()]


def folder_lines(family: FamilyReport) -> list[str]:
    """What a folder's files do together: ties, merged decoders, step checks."""
    lines = [ties_line(family.ties, family.followed)]
    lines += [f"{name}: its branches pruned as {' and '.join(done['branches'].values())}, "
              "merged back" + (f" (each answers as its file: relative "
                               f"{done['relative_diff']:.1e})" if "relative_diff" in done
                               else "") for name, done in family.merged.items()]
    lines += [f"step check {pair}: " + (step if isinstance(step, str) else
              f"{step['steps']} tokens decoded on the caches match a run over the whole prefix "
              f"(relative {step['relative_diff']:.1e}; originals "
              f"{step['relative_diff_original']:.1e})") for pair, step in family.steps.items()]
    return lines


def plan_text(s: dict) -> str:
    """The dry-run summary as a table."""

    def row(label: str, a: int | None, b: int | None) -> str:
        if a is None or b is None:
            return f"{label:<24}{'-':>14}{'-':>14}"
        return f"{label:<24}{a:>14,d}{b:>14,d}{(b / a if a else 0):8.3f}x"

    criterion = s["options"].get("criterion")
    lines = [f"dry run of {s['model']} with criterion {criterion}: no model written",
             f"{'':<24}{'before':>14}{'after':>14}{'after/before':>13}",
             row("params (predicted)", s["params_before"], s["params_after"]),
             row("FLOPs (MACs, predicted)", s["flops_before"], s["flops_after"]),
             row("channels", s["channels_before"], s["channels_after"]), "",
             f"{'id':>4} {'channels':>8} {'kept':>6} {'removed':>7}  group"]
    lines += [f"{g['id']:>4} {g['channels']:>8} {g['kept']:>6} {g['removed']:>7}  {g['name']}"
              for g in s["groups"]]
    lines.append(f"groups pruned: {s['groups_pruned']} of {len(s['groups'])}; "
                 f"frozen groups: {len(s['frozen'])}")
    lines += [f"{f['group']:>4} {f['channels']:>8} frozen   {f['name']}: {'; '.join(f['reasons'])}"
              for f in s["frozen"]]
    lines += dropped_lines(s.get("dropped_blocks", []))
    return "\n".join(lines)
