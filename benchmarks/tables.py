"""Markdown tables of the benchmark results, and benchmarks/README.md made from them.

Reads ``benchmarks/results/{coverage,compile_speed,result_speed,memory,quality,
quality_pipeline,genai_folder,optimum_exports,
seq2seq_calibration}.json`` and renders one table (with the command
and revision that produced it) per file, so that every figure in the tables is a figure of a
recorded run.

``benchmarks/README.md`` is hand-written prose around generated blocks. Each block sits between
``<!-- generated: NAME -->`` and ``<!-- end generated: NAME -->`` lines; :func:`update` replaces
what is between them by the table rendered from ``results/NAME.json`` and keeps everything else.
``tests/test_benchmarks_readme.py`` fails when the committed file differs from :func:`update`
of itself, i.e. when a result was re-recorded without regenerating the README.

    python -m benchmarks.tables [--quick]   # print the tables
    python -m benchmarks.tables --write     # regenerate the blocks of benchmarks/README.md
    python -m benchmarks.tables --check     # exit 1 when benchmarks/README.md is stale
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

from benchmarks.common import RESULTS

README = Path(__file__).parent / "README.md"
BLOCK = re.compile(r"(<!-- generated: (?P<name>\w+) -->\n)(?P<body>.*?)(<!-- end generated: "
                   r"(?P=name) -->)", re.DOTALL)


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _load_note(d: dict) -> str:
    return f"`{d['command']}`, revision `{d.get('revision', '?')}`, {d['date']}"


def coverage(d: dict) -> str:
    from benchmarks.coverage import summarise

    s = summarise(d["models"])  # the current summary of the recorded rows
    spa, tp = s["spa"], s["tp"]
    by = s["by_source"]
    lines = [
        f"Coverage ({_load_note(d)}): ratio {d['ratio']}, {s['models']} models, "
        f"{s['compared']} compared ({len(s['skipped'])} skipped as too large, "
        f"{len(s['export_failures'])} export failures, {len(s['build_errors'])} build errors).",
        "",
        "| | models | pruned (oracle holds) | frozen entirely | error | over the memory limit "
        "| timeout / crash |",
        "|---|---|---|---|---|---|---|",
        f"| SPA | {s['compared']} | {spa['pruned']} | {spa['frozen']} | {spa['error']} | "
        f"{spa['memory_limit']} | {spa['timeout'] + spa['crash']} |",
        "",
        "| | models | pruned, runs, right output shape | wrong output shape | pruned, forward "
        "fails | error while pruning | over the memory limit | timeout / crash | nothing pruned |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| Torch-Pruning | {s['compared']} | {tp['pruned_runs']} | {tp['wrong_output_shape']} | "
        f"{tp['forward_fails']} | {tp['error']} | {tp['memory_limit']} | "
        f"{tp['timeout'] + tp['crash']} | {tp['nothing_pruned']} |",
        "",
        "By source: " + "; ".join(f"{src}: SPA {v['spa_pruned']}/{v['compared']}, "
                                  f"Torch-Pruning {v['tp_pruned_runs']}/{v['compared']}"
                                  for src, v in by.items()),
    ]
    both = s["both_pruned"]
    if both["models"]:
        lines += ["", f"On the {both['models']} models both prune, the median FLOPs reduction at "
                  f"this ratio is ÷{both['spa_flops_reduction_median']:.2f} for SPA and "
                  f"÷{both['tp_flops_reduction_median']:.2f} for Torch-Pruning; SPA's is more "
                  f"than 10% smaller on {both['spa_below_tp_by_10pct']}."]
    lines += ["", "SPA freeze reasons (number of models):", ""]
    lines += [f"- {n}: {reason}" for reason, n in s["freeze_reasons_by_models"].items()]
    if s["spa_prediction_mismatch"]:
        lines += ["", "Pruned, oracle holds, but the emitted FLOPs differ from the prediction "
                  "(left out of the medians): " + ", ".join(s["spa_prediction_mismatch"]) + "."]
    lines += ["", "SPA frozen entirely:", ""]
    lines += [f"- {name}: {msg[:200]}" for name, msg in s["spa_frozen"].items()] or ["- none"]
    lines += ["", "SPA errors:", ""]
    lines += [f"- {name}: {err}" for name, err in s["spa_errors"].items()] or ["- none"]
    return "\n".join(lines)


def compile_speed(d: dict) -> str:
    lines = [f"Compile speed ({_load_note(d)}; load average "
             f"{d['load_average_before'][0]:.1f} → {d['load_average_after'][0]:.1f}):", "",
             "| model | file | SPA file → pruned file | Torch-Pruning graph + prune | SPA / TP "
             "(wall) | SPA / TP (CPU time) |", "|---|---|---|---|---|---|"]
    for r in d["results"].values():
        b = r["spa_breakdown_median"]
        lines.append(
            f"| {r['model']} | {r['file_bytes'] / 2**20:.0f} MB | {r['spa_seconds_median']:.2f} s"
            f" (load+analysis {b['load_analyze']:.2f}, plan {b['plan']:.2f}, rewrite "
            f"{b['rewrite']:.2f}, save {b['save']:.2f}) | {r['tp_seconds_median']:.2f} s | "
            f"{r['spa_over_tp']:.2f} | {r['spa_over_tp_cpu']:.2f} |")
    return "\n".join(lines)


def _variant_cell(v: dict) -> str:
    t1, t2 = v["threads1"], v["threads2"]
    return (f"÷{v['flops_reduction_x']:.2f} | ×{t1['cpu_ms']['speedup_x']:.2f} "
            f"({t1['cpu_ms']['speedup_over_flops_reduction']:.2f}) | "
            f"×{t1['wall_ms']['speedup_x']:.2f} / ×{t2['wall_ms']['speedup_x']:.2f}")


def result_speed(d: dict) -> str:
    lines = [f"Speed of the result ({_load_note(d)}):", "",
             "| model | ratio | tool | FLOPs | speed-up, 1 thread CPU time (÷ FLOPs cut) | "
             "speed-up, wall clock 1 / 2 threads | size |", "|---|---|---|---|---|---|---|"]
    for key, res in d["results"].items():
        variants = res["main"]["variants"]
        r8 = res.get("round_to_8", {}).get("variants", {})
        dense = variants["dense"]
        lines.append(f"| {key} | dense | | {dense['flops'] / 1e9:.2f} GMACs | "
                     f"{dense['threads1']['cpu_ms']['latency_ms']:.1f} ms | "
                     f"{dense['threads1']['wall_ms']['latency_ms']:.1f} / "
                     f"{dense['threads2']['wall_ms']['latency_ms']:.1f} ms | "
                     f"{dense['bytes'] / 2**20:.0f} MB |")
        for ratio in d["ratios"]:
            for label, tool in ((f"spa_{ratio}", "SPA"), (f"tp_{ratio}", "Torch-Pruning"),
                                (f"spa_{ratio}_round8", "SPA `--round-to 8`")):
                v = variants.get(label) or r8.get(label)
                if v is None:
                    continue
                lines.append(f"| | {ratio} | {tool} | {_variant_cell(v)} | "
                             f"÷{v['size_reduction_x']:.2f} |")
    return "\n".join(lines)


MEMORY_MODES = {"no_validate": "`--no-validate`", "no_check": "`--no-check`",
                "validate": "default (validate, oracle where it applies)",
                "check_masked": "`--check-masked`"}


def memory(d: dict) -> str:
    modes = list(next(iter(d["results"].values()))["modes"])  # the columns, as recorded
    lines = [f"Memory ({_load_note(d)}; importing SPA alone: "
             f"{d['baseline_import_rss_bytes'] / 2**20:.0f} MiB):", "",
             "| model | file | " + " | ".join(MEMORY_MODES.get(m, f"`{m}`") for m in modes)
             + " |", "|---|---|" + "---|" * len(modes)]
    for r in d["results"].values():
        cells = [f"{m['peak_rss_bytes'] / 2**20:.0f} MiB = {m['rss_over_file']:.1f}× "
                 f"({m['wall_seconds']:.0f} s)" for m in r["modes"].values()]
        lines.append(f"| {r['model']} | {r['file_bytes'] / 2**20:.0f} MiB | " + " | ".join(cells)
                     + " |")
    return "\n".join(lines)


def genai_folder(d: dict) -> str:
    """Folder → folder seconds and peak RSS of ``spa prune`` on an int4 onnxruntime-genai
    folder, params and FLOPs from its report, and whether the Generator runs the output."""
    lines = [f"onnxruntime-genai int4 folder, {d['model']}, model files "
             f"{d['model_bytes'] / 2**20:.0f} MiB ({_load_note(d)}; median of {d['runs']}):", "",
             "| variant | command | seconds (plan, validate) | peak RSS (× model) | params | "
             "FLOPs (MACs) | validation | Generator |", "|---|---|---|---|---|---|---|---|"]
    for label, r in d["results"].items():
        if r.get("exit_code"):
            rss, error = r["peak_rss_bytes"] or 0, " ".join(r["error"]).replace("|", "\\|")
            lines.append(f"| {label} | `{r['command']}` | {r['seconds']:.1f} | "
                         f"{rss / 2**20:.0f} MiB ({rss / d['model_bytes']:.2f}×) | | | exit "
                         f"{r['exit_code']}: {error} | |")
            continue
        gen = r["generation_check"]
        check = (f"oracle {r['masked_relative_diff']:.1e}" if r["masked_relative_diff"] is not None
                 else "no oracle") + (f", {gen['tokens']} greedy tokens "
                                      f"{'equal' if gen['equal'] else 'differ'}" if gen else "")
        if r["dropped_blocks"]:
            check += (f"; {r['dropped_blocks']} blocks dropped, the dense original's greedy "
                      f"tokens: {gen['dense_tokens_equal']} of {gen['tokens']}")
        lines.append(
            f"| {label} | `{r['command']}` | {r['seconds_median']:.1f} "
            f"({r['stage_seconds']['plan']:.1f}, {r['stage_seconds']['validate']:.1f}) | "
            f"{r['peak_rss_bytes'] / 2**20:.0f} MiB ({r['rss_over_model']:.2f}×) | "
            f"{r['params_before']:,} → {r['params_after']:,} | {r['flops_before']:,} → "
            f"{r['flops_after']:,} | {check} | {r['generator_tokens']} tokens |")
    return "\n".join(lines)


def optimum_exports(d: dict) -> str:
    """Each 🤗 Optimum export: params of each file before → after and groups pruned, the
    oracle, the folder's step check and config edits, and whether Optimum's runtime
    generates with the pruned folder."""
    lines = [f"🤗 Optimum exports, `spa prune … {' '.join(d['flags'])}` ({_load_note(d)}; "
             f"exported with {', '.join(d['side_venv'][:3])}):", "",
             "| export | pruned as | params by file (groups pruned) | oracle (relative) | "
             "folder checks | generates under Optimum |", "|---|---|---|---|---|---|"]
    for name, m in d["models"].items():
        if "export" in m or m.get("exit"):
            why = m["export"]["error"] if "export" in m else " ".join(m["error"])
            lines.append(f"| {name} | | failed: {why.replace('|', '/')} | | | |")
            continue
        files = "; ".join(f"{n.removesuffix('.onnx')} {f['params_before']:,} → "
                          f"{f['params_after']:,} ({f['groups_pruned']} of {f['groups']})"
                          for n, f in m["files"].items())
        oracle = max((f["masked_relative_diff"] or 0.0) for f in m["files"].values())
        checks = []
        steps = [s["relative_diff"] for s in m.get("step_checks", {}).values()
                 if isinstance(s, dict)]
        if steps:
            checks.append(f"step check {max(steps):.1e}")
        checks += [f"config {k} {a} → {b}" for k, (a, b) in m.get("config_edits", {}).items()]
        gen = m.get("generate_pruned")
        runs = "" if gen is None else "yes" if "tokens" in gen else \
            "no: " + gen["error"].split("\n")[0].replace("|", "/")[:90]
        apart = m.get("generate_separate")
        if gen is not None and "tokens" in gen and apart is not None:
            runs += (" (merged decoder; the separate decoders alone: the same tokens)"
                     if apart.get("tokens") == gen["tokens"] else
                     f" (merged decoder; the separate decoders alone: {apart})")
        checks += [f"merged decoder = its branches ({done['relative_diff']:.0e})"
                   for done in m.get("merged", {}).values() if "relative_diff" in done]
        lines.append(f"| {name} | {'file' if m['kind'] == 'encoder' else 'folder'} | {files} | "
                     f"{oracle:.1e} | {', '.join(checks)} | {runs} |")
    return "\n".join(lines)


def _reversals(row: dict) -> str:
    if "exact_reversals" not in row:
        return "failed"
    under = row.get("under_optimum", {})
    return f"{row['exact_reversals']:.3f}" + (f" ({under['exact']:.3f})" if "exact" in under
                                              else f" ({under.get('error', 'not run')})"
                                              if under else "")


#: seq2seq_calibration's variants, in its tables' column order (results key → column title)
SEQ2SEQ_VARIANTS = {"data-free": "data-free", "data-free, obspa": "data-free `obspa`",
                    "calibrated": "`--calib`",
                    "calibrated, no reconstruction": "`--calib --no-reconstruct`",
                    "calibrated, obspa": "`--calib --criterion obspa`"}


def seq2seq_calibration(d: dict) -> str:
    """Each seq2seq export pruned without data and with it: held-out next-token agreement and
    KL divergence of the decoder (teacher forced on the dense decode), the share of tokens a
    free-running decode keeps, and whether the calibrated folder, and the one compensated
    without data, generate under Optimum."""
    titles = {k: v for k, v in SEQ2SEQ_VARIANTS.items()
              if any(k in m for m in d["models"].values())}
    lines = [f"Seq2seq folders with and without `--calib`, `spa prune … {' '.join(d['flags'])}` "
             f"({_load_note(d)}); held out: next-token agreement / KL divergence teacher forced "
             f"on the dense model's {d['measured_tokens']}-token decode, tokens of a free "
             "decode equal to the dense one:", "",
             "| export | samples (held out) | " + " | ".join(titles.values())
             + " | generates under Optimum (`--calib`, data-free `obspa`) |",
             "|---|---|" + "---|" * len(titles) + "---|"]

    def cell(v: dict) -> str:
        if not v:
            return "not run"
        if v.get("exit"):
            return "failed: " + " ".join(v.get("error", [])).replace("|", "/")
        h = v["held_out"]
        return (f"{h['teacher_forced_agreement']:.3f} / {h['teacher_forced_kl']:.2e} / "
                f"{h['decoded_token_agreement']:.3f}")

    def runs(v: dict) -> str:
        gen = v.get("generate", {})
        return "yes" if "tokens" in gen else \
            "no: " + str(gen.get("error", "not run")).split("\n")[0].replace("|", "/")[:80]

    for name, m in d["models"].items():
        if name == "reverse":
            continue
        if "export" in m:
            lines.append(f"| {name} | export failed |" + " |" * (len(titles) + 1))
            continue
        gen = ", ".join(runs(m[k]) for k in ("calibrated", "data-free, obspa") if k in m)
        lines.append(f"| {name} | {m['calibration_samples']} ({m['held_out_samples']}) | "
                     + " | ".join(cell(m.get(k, {})) for k in titles) + f" | {gen} |")
    rev = d["models"].get("reverse")
    if rev and "dense" in rev:
        kinds = {k: v for k, v in titles.items()
                 if any(r.endswith(f" {k}") for r in rev if r[0].isdigit())}
        lines += ["", "The BART trained to reverse sequences of symbols (`python "
                  "benchmarks/optimum_side.py train`, hidden 64, 2+2 layers; held out: 512 new "
                  f"sequences, of which the dense folder reverses {rev['dense']:.3f}); exact "
                  "reversals, greedy to EOS (in brackets: generated under Optimum's "
                  "`ORTModelForSeq2SeqLM`, with its caches and the merged decoder):", "",
                  "| heads and MLP ratio | decoder params | " + " | ".join(kinds.values())
                  + " |", "|---|---|" + "---|" * len(kinds)]
        for ratio in sorted({k.split()[0] for k in rev if k[0].isdigit()}):
            row = {v: rev.get(f"{ratio} {v}", {}) for v in kinds}
            before, after = row["calibrated"].get("params", {}).get("decoder_model.onnx",
                                                                    (0, 0))
            lines.append(f"| {ratio} | {before:,} → {after:,} | " + " | ".join(
                _reversals(r) if r else "not run" for r in row.values()) + " |")
    return "\n".join(lines)


def seq2seq_recovery(d: dict) -> str:
    """The trained BART pruned from two starts, with and without ``--recover``: exact
    reversals (under Optimum), the recovery's held-out agreement before → after, wall time."""
    rev = d["models"]["reverse"]
    if "dense" not in rev:
        return f"The trained BART could not be made: {rev.get('training')}"
    lines = [f"The trained BART, pruned with `--calib` of {d['calibration_sequences']} sequences "
             f"({_load_note(d)}); exact reversals of {d['held_out_sequences']} held-out "
             f"sequences (the dense folder: {rev['dense']:.3f}), greedy to EOS, in brackets "
             "generated under Optimum's `ORTModelForSeq2SeqLM`; the recovery's held-out "
             "agreement with the dense model's tokens (teacher forced, at the positions up to "
             "the one that chose EOS, on its own held-out share of the calibration "
             "sequences), before → after:", "",
             "| heads and MLP ratio | start | exact reversals | with `--recover "
             f"{d['steps']}` | recovery's held-out agreement | wall (without → with) |",
             "|---|---|---|---|---|---|"]
    for key, row in rev.items():
        if not key[0].isdigit() or ", recover" in key:
            continue
        ratio, start = key.split(" ", 1)
        rec = rev.get(f"{key}, recover {d['steps']}", {})
        fid = rec.get("recovery", {})
        moved = (f"{fid['fidelity_before']['agreement']:.3f} → "
                 f"{fid['fidelity_after']['agreement']:.3f}"
                 + ("" if fid["kept"] == "recovered" else " (start kept)")) if fid else "–"
        lines.append(f"| {ratio} | {start} | {_reversals(row)} | "
                     f"{_reversals(rec) if rec else 'not run'} | {moved} | "
                     f"{row.get('seconds', 0):.0f} s → {rec.get('seconds', 0):.0f} s |")
    return "\n".join(lines)


QUALITY_METHODS = {  # results key → column title
    "torch-pruning-magnitude": "Torch-Pruning magnitude", "l1": "SPA `l1`",
    "flap": "SPA `flap` (calib)", "obspa-synthetic": "SPA `obspa` synthetic (data-free)",
    "obspa-noise": "SPA `obspa` noise", "obspa-identity": "SPA `obspa` identity",
    "obspa-calibration": "SPA `obspa` calibration"}


def _metric(cell: dict) -> float | None:
    return cell.get("accuracy", cell.get("top1_agreement"))


def quality(d: dict) -> str:
    """Accuracy (or top-1 agreement with the dense model) after pruning to each FLOPs cut,
    without fine-tuning. A cut the model cannot reach is shown as the one it reached."""
    lines = [f"Quality without fine-tuning (`{d['command']}`, {d['date']}):", "",
             "| model, metric | FLOPs cut | " + " | ".join(QUALITY_METHODS.values()) + " |",
             "|---|---|" + "---|" * len(QUALITY_METHODS)]
    for model, res in d["results"].items():
        dense = res["dense"]
        metric = "test accuracy" if "accuracy" in dense else "top-1 agreement"
        title = f"{model}, {metric} (dense {_metric(dense):.1%})"
        for cut in d["reductions"]:
            key = str(float(cut))
            reached = [res[m][key].get("flops_reduction") for m in QUALITY_METHODS
                       if key in res.get(m, {}) and "flops_reduction" in res[m][key]]
            cut_text = f"{cut:g}×" + (f" (reached {reached[0]:.2f}×)"
                                      if reached and reached[0] < 0.98 * cut else "")
            cells = [f"{_metric(res[m][key]):.1%}" if key in res.get(m, {}) else "–"
                     for m in QUALITY_METHODS]
            lines.append(f"| {title} | {cut_text} | " + " | ".join(cells) + " |")
            title = ""
    return "\n".join(lines)


PIPELINE_VARIANTS = {  # results key → row title, in table order
    "l1-uniform": "`l1`, uniform, no data", "data-free": "default, no data",
    "data-free-r0.1": "default, no data, `--ratio 0.1`",
    "data-free-synthetic": "`--calib synthetic` (data-free: inversion + reconstruction)",
    "data-free-synthetic-r0.1": "`--calib synthetic`, `--ratio 0.1`",
    "obspa-calib-uniform": "`obspa` calibration, uniform, no reconstruction",
    "post-obspa": "post-training `obspa` (sensitivity, reconstruction)",
    "post-obspa-exact": "the same, exact channel counts (`--round-to 1`, not kernel blocks)",
    "recover-exact": "and from it `spa recover`",
    "post-obspa-latency": "post-training `obspa`, `--target latency --ratio 0.21` instead "
                          "(2 threads; a smaller FLOPs cut)",
    "post-l1": "post-training `l1`", "recover": "post-training `obspa` + `spa recover`",
    "recover-long": "the same, longer: `spa recover --time-budget 1200`, 4096 lines",
    "post-obspa-4096": "post-training `obspa`, 4096 calibration lines",
    "recover-hour": "and from it `spa recover --time-budget 3600`, 16384 lines",
    "recover-2h": "and from it `spa recover --time-budget 7200`, 16384 lines",
    "post-obspa-4096-heads": "post-training `obspa`, 4096 lines, heads 0.3 alone (MLP whole)",
    "post-obspa-4096-mlp": "post-training `obspa`, 4096 lines, MLP 0.3 alone (heads whole)",
    "tp-magnitude": "Torch-Pruning magnitude", "tp-recover": "Torch-Pruning + `spa recover`"}
#: Which variant each target of ``pipeline.CUTS`` applies to.
PIPELINE_TARGETS = {"post-obspa": "post", "recover": "recover", "recover-long": "recover",
                    "post-obspa-exact": "post", "recover-exact": "recover",
                    "post-obspa-4096": "post", "recover-hour": "recover", "recover-2h": "recover",
                    "data-free": "data-free",
                    "data-free-r0.1": "data-free-r0.1", "data-free-synthetic": "data-free",
                    "data-free-synthetic-r0.1": "data-free-r0.1"}


def _pipeline_row(title: str, v: dict, key: str, target: float | None) -> str:
    if "error" in v or key not in v:
        reason = (v.get("error") or "?").strip().splitlines()[-1:] or ["?"]
        return f"| | {title} | failed: {reason[0][:90]} | | | | | |"
    check = _check(v[key], target)
    rss = f"{v['peak_rss_bytes'] / 2**20:.0f} MiB" if v.get("peak_rss_bytes") else "–"
    cuts = [f"÷{v[k]:.2f}" if v.get(k) else "–" for k in ("flops_reduction", "params_reduction")]
    alone = v.get(f"{key}_sk5")  # EfficientNet-Lite0: the five scikit photos alone
    also = "" if alone is None else f" (5 scikit photos: {alone:.4f})"
    if v.get("latency_ms"):  # timed side by side with the dense model
        title += (f"; {v['latency_ms']:.2f} ms, dense {v['dense_latency_ms']:.2f} ms "
                  f"(×{v['dense_latency_ms'] / v['latency_ms']:.2f})")
    return (f"| | {title} | {v[key]:.4f}{also} | {check} | {cuts[0]} | {cuts[1]} | "
            f"{v['seconds']:.0f} s | {rss} |")


def _seed_rows(rows: dict, base: str, key: str, target: float | None) -> list[str]:
    """The ``base`` row under other ``--seed`` values, and the median over all seeds."""
    seeded = {int(label.rsplit("seed", 1)[1]): v for label, v in rows.items()
              if label.startswith(f"{base}-seed")}
    if not seeded or key not in rows.get(base, {}):
        return []
    out = [_pipeline_row(f"the same, `--seed {s}`", seeded[s], key, target) for s in sorted(seeded)]
    values = [rows[base][key], *(v[key] for _, v in sorted(seeded.items()) if key in v)]
    median = statistics.median(values)
    return [*out, f"| | median over seeds 0–{max(seeded)} | {median:.4f} "
            f"(of {', '.join(f'{x:.4f}' for x in values)}) | {_check(median, target)} | | | | |"]


def _check(value: float, target: float | None) -> str:
    """The target cell: ``≥ target`` and whether ``value`` meets it (empty without a target)."""
    return "" if target is None else f"≥ {target:g} {'✓' if value >= target else '✗'}"


def quality_pipeline(d: dict) -> str:
    """Each model's variants on held-out data: metric, target, reductions, wall time, RSS."""
    lines = [f"Pruned models that still do their job ({_load_note(d)}):", "",
             "| model | variant | metric (held-out) | target | FLOPs | params | wall | peak RSS |",
             "|---|---|---|---|---|---|---|---|"]
    for model, res in d["results"].items():
        key, rows = res["metric"], res["variants"]
        dense = f"{rows['dense'][key]:.4f}" if "dense" in rows else "–"
        lines.append(f"| **{model}** ({' '.join(res['cut'])}) | dense | {key} {dense} "
                     "| | | | | |")
        for label, title in PIPELINE_VARIANTS.items():
            if label in rows:
                target = res["targets"].get(PIPELINE_TARGETS.get(label, ""))
                lines.append(_pipeline_row(title, rows[label], key, target))
                lines.extend(_seed_rows(rows, label, key, target))
    cost = d.get("resnet50_cost")
    if cost:
        ok = cost.get("exit_code") == 0
        lines += ["", f"Cost, ResNet-50 (random weights), {cost['calibration_images']} calibration "
                  f"images: `{cost['command'].split(' -m ', 1)[-1]}`: "
                  + (f"{cost['seconds']:.0f} s, peak RSS {cost['peak_rss_bytes'] / 2**30:.2f} GiB "
                     f"(targets ≤ 180 s, ≤ 3 GiB)" if ok else "failed")]
        if ok and "dense_pass_seconds" in cost:
            lines[-1] += (f"; on this machine one dense onnxruntime pass over the same number of "
                          f"inputs takes {cost['dense_pass_seconds']:.1f} s, so the run costs "
                          f"{cost['seconds_in_dense_passes']:.1f} such passes")
        if ok and cost.get("runs"):
            runs = cost["runs"]
            lines[-1] += (f". That run is the median of {len(runs)}, in the order run: "
                          + ", ".join(f"{r['seconds']:.0f} s ({r['seconds_in_dense_passes']:.1f} "
                                      f"passes of {r['dense_pass_seconds']:.1f} s, peak "
                                      f"{r['peak_rss_bytes'] / 2**30:.2f} GiB)" for r in runs))
    return "\n".join(lines)


def latency_target(d: dict) -> str:
    lines = [f"Latency target ({_load_note(d)}; load average "
             f"{d['load_average_before'][0]:.1f} → {d['load_average_after'][0]:.1f}):", "",
             "| model | latency table: build / cached | asked | `--target latency`: predicted → "
             "measured (FLOPs; re-planned: the first plan measured more than 10% off) | "
             "within ±10% | `--target flops` at the same ratio: measured "
             "(FLOPs) |",
             "|---|---|---|---|---|---|"]
    for r in d["results"].values():
        t = r["latency_table_seconds"]
        for s in d["speedups"]:
            lat, flops = r["runs"][f"latency_{s}x"], r["runs"][f"flops_{s}x"]
            within = abs(lat["achieved_speedup_x"] / s - 1) <= 0.1
            lines.append(
                f"| {r['model']} | {t['build']:.1f} s / {t['cached']:.2f} s | ×{s:g} | "
                f"×{lat['predicted_speedup_x']:.2f} → **×{lat['achieved_speedup_x']:.2f}** "
                f"(÷{lat['flops_reduction_x']:.2f}){' re-planned' if lat.get('replanned') else ''}"
                f" | {'yes' if within else '**no**'} | "
                f"×{flops['achieved_speedup_x']:.2f} (÷{flops['flops_reduction_x']:.2f}) |")
    return "\n".join([*lines, "", *_never_slower(d)])


def _never_slower(d: dict) -> list[str]:
    """Every run's measured speed-up over dense; below 1 (slower than dense) in bold."""
    labels = list(dict.fromkeys(k for r in d["results"].values() for k in r["runs"]))
    lines = ["Measured speed-up over dense of every run (**bold**: slower than dense; "
             "`dense again`: the dense model in a second session, the run's noise floor; "
             "`default` (older runs): `--round-to 1`, the default then; `exact`: `--round-to 1`; "
             "`auto`: `--round-to auto`, the default now; "
             "`uniform`: one channel ratio in every group; `torch_pruning`: its L1 magnitude "
             "pruning at the same channel ratio):", "",
             "| model | dense | dense again | " + " | ".join(f"`{k}`" for k in labels) + " |",
             "|---|---|---|" + "---|" * len(labels)]
    for r in d["results"].values():
        cells = []
        for k in labels:
            run = r["runs"].get(k)
            x = run and run["achieved_speedup_x"]
            cells.append("–" if x is None else f"**×{x:.2f}**" if x < 1 else f"×{x:.2f}")
        lines.append(f"| {r['model']} | {r['latency_ms_dense']:.1f} ms | "
                     f"×{r['dense_again_speedup_x']:.2f} | " + " | ".join(cells) + " |")
    return lines


def kernel_widths(d: dict) -> str:
    lines = [f"Kernel-aware widths ({_load_note(d)}; block {d['kernel_block']}, 1 thread, load "
             f"average {d['load_average_before'][0]:.1f} → {d['load_average_after'][0]:.1f}): "
             "measured speed-up over dense (**bold**: slower than dense) and FLOPs reduction, "
             "L1 with one channel ratio per group, exact counts (`--round-to 1`, the default "
             "before) and `--round-to auto` (the default now); `dense again`: the dense model "
             "in a second session, the run's noise floor.", "",
             "| model | dense | dense again | ratio | exact | auto | groups rounded |",
             "|---|---|---|---|---|---|---|"]

    def cell(run: dict) -> str:
        x = run["speedup_x"]
        return (f"**×{x:.2f}**" if x < 1 else f"×{x:.2f}") + f" (÷{run['flops_reduction_x']:.2f})"

    for r in d["results"].values():
        for i, ratio in enumerate(d["ratios"]):
            exact, auto = r["runs"][f"exact_{ratio}"], r["runs"][f"auto_{ratio}"]
            head = (f"| {r['model']} | {r['latency_ms_dense']:.1f} ms | "
                    f"×{r['dense_again_speedup_x']:.2f} " if i == 0 else "| | | ")
            lines.append(f"{head}| {ratio:g} | {cell(exact)} | {cell(auto)} | "
                         f"{auto['groups_rounded']}/{auto['groups']} |")
    return "\n".join(lines)


def minilm_mlp_joint_fit(d: dict) -> str:
    lines = [f"Fitting each all-MiniLM-L6-v2 MLP whole ({_load_note(d)}): both projections "
             f"through the GELU, Adam ({d['steps']} steps, lr {d['lr']:g}) from SPA's refitted "
             f"weights, on rows of the kind SPA fits (the attended tokens of "
             f"{d['calibration_lines']} calibration lines, {d['held_out_lines']} of them held "
             "out to choose the step and to measure); "
             "relative squared error of each MLP's residual sum on the held-out lines, and the "
             "benchmark's cosine on the 1000 evaluation sentences.", "",
             "| MLP | neurons kept | SPA (layer-wise ridge) | joint fit | change |",
             "|---|---|---|---|---|"]
    for r in d["layers"]:
        a, b = r["held_out_error_spa"], r["held_out_error_joint"]
        lines.append(f"| {r['mlp']} | {r['neurons']} | {a:.5f} | {b:.5f} | {b / a - 1:+.1%} |")
    lines.append(f"| cosine | | {d['cosine_spa']:.4f} | {d['cosine_joint']:.4f} | "
                 f"{d['cosine_joint'] - d['cosine_spa']:+.4f} |")
    return "\n".join(lines)


def ratio_budget(d: dict) -> str:
    """``--ratio`` with calibration data, allocated by sensitivity or one ratio per group: the
    reductions of each run and its held-out score."""
    lines = [f"`--ratio` with calibration data ({_load_note(d)}):", "",
             "| model | `--ratio` | allocation | FLOPs | params | channels kept | held-out |",
             "|---|---|---|---|---|---|---|"]
    for model, rows in d["models"].items():
        for label, r in rows.items():
            ratio, allocation = label.rsplit("-", 1)[1], label.split("-")[1]
            if r["exit_code"]:
                lines.append(f"| {model} | {ratio} | {allocation} | failed (exit "
                             f"{r['exit_code']}) | | | |")
                continue
            if "evaluation" in r:
                e = r["evaluation"]
                held = f"top-1 {e['top1_agreement']:.4f}, top-5 {e['top5_agreement']:.4f}"
            else:
                f = r["fidelity"]["reconstructed" if r["reconstruction_kept"] else "pruned"]
                held = f"relative error {f['relative_error']:.4f}, cosine {f['cosine']:.5f}"
            kept, before = r["channels"]
            lines.append(f"| {model} | {ratio} | {allocation} | ×{r['flops']:.3f} | "
                         f"×{r['params']:.3f} | {kept} of {before} | {held} |")
    return "\n".join(lines)


def _refit_rows(rows: list[dict], scores: tuple[str, str], held: str, digits: int
                ) -> list[str]:
    """The rows of a quantised-model table (benchmarks/quality/quantized.py): FLOPs, the two
    ``scores``, the report's held-out ``held`` metric before and after reconstruction, how many
    layers were refitted, whether the refit was kept, and the wall time."""
    lines = []
    for r in rows:
        f, rec = r["fidelity"], r["reconstruction"]
        kept = f"{f['pruned'][held]:.{digits}f}" + (
            f" → {f['reconstructed'][held]:.{digits}f}" if "reconstructed" in f else "")
        refit = f"{rec['refitted']} of {rec['layers']} | {'yes' if rec['kept'] else 'no'}" \
            if rec else "– | "
        lines.append(f"| `{r['variant']}` | ÷{r['flops_before'] / r['flops_after']:.2f} | "
                     f"{r[scores[0]]:.4f} | {r[scores[1]]:.4f} | {kept} | {refit} | "
                     f"{r['seconds']:.0f} |")
    return lines


def _refit_table(intro: str, score_columns: str, rows: list[dict], scores: tuple[str, str],
                 held: str, digits: int) -> str:
    """A quantised-model table: ``intro``, then the header (the two ``score_columns``, then the
    report's held-out ``held`` metric and the refit) and :func:`_refit_rows`."""
    return "\n".join([
        intro, "",
        f"| run | FLOPs | {score_columns} | held-out {held} (report): pruned → reconstructed | "
        "layers refitted | kept | seconds |", "|---|---|---|---|---|---|---|---|",
        *_refit_rows(rows, scores, held, digits)])


def _minilm_refit_table(d: dict, form: str, kind: str, to_float: str) -> str:
    """A quantised all-MiniLM-L6-v2 table (:func:`_refit_table`): ``form`` as the title says it,
    ``kind`` the quantised model's (int4, int8), and its cosine ``to_float``."""
    return _refit_table(
        f"all-MiniLM-L6-v2 {form} ({_load_note(d)}): {d['model']}; the {kind} model's cosine "
        f"to the float model's embeddings {to_float} on the "
        f"{d['evaluation_sentences']} evaluation sentences. Heads 0.3 + MLP 0.3, calibrated on "
        "the benchmark's 1024 lines.",
        f"cosine to the {kind} model | cosine to the float model", d["rows"],
        (f"cosine_{kind}", "cosine_float"), "cosine", 4)


def int4_minilm(d: dict) -> str:
    to_float = ", ".join(f"{form} {c:.4f}" for form, c in d["int4_vs_float_cosine"].items())
    return _minilm_refit_table(d, "in int4", "int4", to_float)


def fp16_copy(d: dict) -> str:
    lines = [f"A folder of all-MiniLM-L6-v2 and its float16 copy ({_load_note(d)}): {d['model']};"
             f" the unpruned copy's cosine to the float32 model's embeddings "
             f"{d['fp16_vs_float_cosine']:.4f} on the {d['evaluation_sentences']} evaluation "
             "sentences. Heads 0.3 + MLP 0.3, calibrated on the benchmark's 1024 lines; cosine "
             "to the dense float32 model's embeddings.", "",
             "| criterion | run | model.onnx | model_fp16.onnx | copy vs plain (relative; input "
             "files) | seconds |", "|---|---|---|---|---|---|"]
    for row in d["rows"]:
        plain, copy, check = _copy_cells(row, "model_fp16.onnx")
        lines.append(f"| {row['criterion']} | {row['run']} | {plain} | {copy} | {check} | "
                     f"{row['seconds']:.0f} |")
    return "\n".join(lines)


def _copy_cells(row: dict, copy: str) -> tuple[str, str, str]:
    """A folder-with-a-copy row's cells: the plain file's cosine, the copy's (or how the run
    failed), and the copy's check against the plain file (or why it was copied as it was)."""
    def cell(name: str) -> str:
        key = f"cosine_{name}"
        return f"{row[key]:.4f}" if key in row else ""
    taken = row.get("taken") or {}
    check = (f"{taken['relative_diff']:.1e}; {taken['relative_diff_before']:.1e}"
             if "relative_diff" in taken else row.get("skipped") or "")
    failed = f"exit {row['exit']}: {row['error']}" if row["exit"] else ""
    return cell("model.onnx"), cell(copy) or failed, check


def q8_copy(d: dict) -> str:
    lat = d["latency_ms"]
    dims = ", ".join(f"{k}={v}" for k, v in d["latency_dims"].items())
    ways = "; ".join(f"{k}: " + ", ".join(f"{a}={v}" for a, v in s.items())
                     for k, s in d["quantisers"].items())
    lines = [f"A folder of all-MiniLM-L6-v2 and its int8 copy ({_load_note(d)}), quantised two "
             f"ways ({ways}). Heads 0.3 + MLP 0.3, calibrated on the benchmark's 1024 lines; "
             "cosine to the dense float32 model's embeddings on the "
             f"{d['evaluation_sentences']} evaluation sentences; latency: median ms, side by "
             f"side in one run (one thread, its CPU time; {dims}; the dense float32 model "
             f"{lat['dense model.onnx']:.1f} ms). `input` is the int8 file as it was written "
             "before: copied unpruned.", "",
             "| quantiser | criterion | run | model.onnx | model_quantized.onnx | copy vs plain "
             "(relative; input files) | int8 ms | plain ms | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in d["rows"]:
        plain, copy, check = _copy_cells(row, "model_quantized.onnx")
        key = f"{row['quantiser']} {'input' if row['run'] == 'input' else row['criterion']}"
        ms = [lat.get(f"{key} {n}") for n in ("model_quantized.onnx", "model.onnx")]
        times = " | ".join("" if t is None else f"{t:.2f}" for t in ms)
        lines.append(f"| {row['quantiser']} | {row['criterion'] or '—'} | {row['run']} | "
                     f"{plain} | {copy} | {check} | {times} | {row['seconds']:.0f} |")
    return "\n".join(lines)


def int8_effnet(d: dict) -> str:
    return _refit_table(
        f"EfficientNet-Lite0 in int8 ({_load_note(d)}): {d['model']}; the int8 model's top-1 "
        f"agreement with the float model {d['int8_vs_float_top1']:.4f} on the "
        f"{d['evaluation_views']} evaluation views. 1.5x FLOPs cut, calibrated on the "
        "benchmark's calibration views.",
        "top-1 agreement with the int8 model | with the float model", d["rows"],
        ("top1_int8", "top1_float"), "agreement", 3)


def int8_chain_minilm(d: dict) -> str:
    return _minilm_refit_table(d, "with int8 chains", "int8",
                               f"{d['int8_vs_float_cosine']:.4f}")


def held_out_sources(d: dict) -> str:
    held, n = d["held_out_photos"], len(d["calibrating_photos"])
    lines = [f"Held-out fidelity judged two ways ({_load_note(d)}): EfficientNet-Lite0 at the "
             f"1.5x FLOPs cut, calibrated on the views of {n} photos; held out either a share "
             f"of those views or (`--held-out-data`) the views of {len(held)} other photos "
             f"({', '.join(held)}). Top-1 agreement with the dense model (KL divergence) on "
             "what was held out, and on the views of the benchmark's "
             f"{len(d['evaluation_photos'])} evaluation photos, which no run sees.", "",
             "| run | judged on | held out: before | held out: after | kept | "
             f"{len(d['evaluation_photos'])} evaluation photos |", "|---|---|---|---|---|---|"]

    def cell(m: dict) -> str:
        return f"{m['agreement']:.3f} ({m['kl']:.3f})"

    def where(r: dict) -> str:
        c = r["calibration"]
        return f"{c['held_out']} views of " + ("other photos" if c.get("held_out_path")
                                               else "the same photos (share)")

    for label, r in d["prune"].items():
        if r.get("exit_code"):
            lines.append(f"| prune, {label} | failed | | | | |")
            continue
        f = r["fidelity"]
        after = f.get("reconstructed", f["pruned"])
        kept = "reconstructed" if r["reconstruction_kept"] else "pruned"
        lines.append(f"| prune (pruned → reconstructed) | {where(r)} | {cell(f['pruned'])} | "
                     f"{cell(after)} | {kept} | {r['evaluation']['top1_agreement']:.3f} |")
    start = d["evaluation_start"]["top1_agreement"]
    for label, r in d["recover"].items():
        if r.get("exit_code"):
            lines.append(f"| recover, {label} | failed | | | | |")
            continue
        lines.append(f"| recover from the share's model ({r['steps']} steps; start "
                     f"{start:.3f}) | {where(r)} | {cell(r['fidelity_before'])} | "
                     f"{cell(r['fidelity_after'])} | {_written(r)} | "
                     f"{r['evaluation']['top1_agreement']:.3f} |")
    return "\n".join(lines)


def decoder_calibration(d: dict) -> str:
    m, dense = d["model"], d["dense"]
    lines = [f"A decoder calibrated on text ({_load_note(d)}): GPT-2, {m['layers']} layers, "
             f"hidden {m['hidden']}, {m['heads']} heads, trained here for {m['train_steps']} "
             f"steps on the calibration fortunes; dense perplexity {dense['perplexity']:.1f} on "
             f"{d['evaluation_sentences']} evaluation sentences ({dense['positions']} "
             f"next-token positions). Calibrated rows: {d['calibration_lines']} calibration "
             "sentences.", "",
             "| heads and MLP | run | FLOPs | next-token agreement with the dense model | "
             "perplexity | held-out fidelity (report): pruned → reconstructed | seconds |",
             "|---|---|---|---|---|---|---|"]
    for label, r in d["variants"].items():
        variant, ratio = label.rsplit("-", 1)
        if r.get("exit_code"):
            lines.append(f"| {ratio} | `{variant}` | failed | | | | |")
            continue
        e, f = r["evaluation"], r["fidelity"]
        held = "" if not f else f"{f['pruned']['agreement']:.3f} → " + (
            f"{f['reconstructed']['agreement']:.3f}" if "reconstructed" in f else "–") + \
            f" ({r['calibration']['held_out']} samples)"
        lines.append(f"| {ratio} | `{variant}` | ÷{r['flops_reduction']:.2f} | "
                     f"{e['agreement']:.3f} | {e['perplexity']:.1f} | {held} | "
                     f"{r['seconds']:.0f} |")
    for label, r in d.get("recover", {}).items():
        ratio = label.rsplit("-", 1)[1]
        lines.append(f"| {ratio} | `recover` | failed | | | | |" if r.get("exit_code") else
                     f"| {ratio} | `recover` from `post-obspa-lines` ({r['steps']} steps, lr "
                     f"{r['lr']:g}; wrote: {_written(r)}) | | "
                     f"{r['evaluation']['agreement']:.3f} | "
                     f"{r['evaluation']['perplexity']:.1f} | "
                     f"{r['fidelity_before']['agreement']:.3f} → "
                     f"{r['fidelity_after']['agreement']:.3f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def _written(recovered: dict) -> str:
    """What ``spa recover`` wrote: the trained model or its start (its report's ``kept``)."""
    return "trained" if recovered["kept"].startswith("recovered") else "start"


def latency_fidelity(d: dict) -> str:
    metric = d["metric"]
    criterion = d.get("criterion", "l1")
    spa = "" if criterion == "l1" else f", SPA with `--criterion {criterion}`"
    lines = [f"Latency against fidelity, {d['model']}{spa} ({_load_note(d)}); dense "
             f"{d['dense_latency_ms']:.2f} ms:", "",
             f"| run | FLOPs | latency (speed-up) | held-out {metric.replace('_', ' ')} | "
             f"Torch-Pruning at the same latency |", "|---|---|---|---|---|"]
    for label, row in d["results"].items():
        if "latency_ms" not in row:
            lines.append(f"| `{label}` | failed | | | |")
            continue
        tp = row.get("torch_pruning_at_same_latency")
        flops = f"÷{row['flops_reduction']:.2f}" if "flops_reduction" in row else ""
        lines.append(f"| `{label}` | {flops} | {row['latency_ms']:.2f} ms "
                     f"(×{row['speedup_x']:.2f}) | {row[metric]:.3f} | "
                     + ("" if "torch_pruning_at_same_latency" not in row else
                        "outside its range" if tp is None else f"{tp:.3f}") + " |")
    return "\n".join(lines)


def structure_models(d: dict) -> str:
    """Models with GroupNorm, weights the graph computes, channel or pixel shuffles: groups,
    cuts, oracle, latency."""
    lines = [f"Models whose channels froze before ({_load_note(d)}): TorchScript exports, "
             f"random weights, `spa prune --ratio {d['ratio']}` (default options, the oracle "
             "on); params and FLOPs by SPA's counter (a computed weight counted once, folded); "
             "latency: median ms of the dense and pruned files side by side, one thread.", "",
             "| model | groups prunable | params | FLOPs (MACs) | oracle (relative) | latency "
             "ms | seconds |", "|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        model = f"{r['model']}, `{r['flags']}`" if r.get("flags") else r["model"]
        if r["exit"]:
            lines.append(f"| {model} | {r['prunable']} of {r['groups']} | exit "
                         f"{r['exit']}: {r['error']} | | | | {r['seconds']:.0f} |")
            continue
        (p0, p1), (f0, f1), (t0, t1) = r["params"], r["flops"], r["latency_ms"]
        lines.append(f"| {model} | {r['prunable']} of {r['groups']} | {p0 / 1e6:.2f}M → "
                     f"{p1 / 1e6:.2f}M | {f0 / 1e6:.0f}M → {f1 / 1e6:.0f}M (÷{f0 / f1:.2f}) | "
                     f"{r['oracle_relative']:.1e} | {t0:.2f} → {t1:.2f} (×{t0 / t1:.2f}) | "
                     f"{r['seconds']:.0f} |")
    lines += [f"| {label} | skipped: {why} | | | | | |" for label, why in d["skipped"].items()]
    return "\n".join(lines)


RENDER = {"coverage": coverage, "compile_speed": compile_speed, "result_speed": result_speed,
          "memory": memory, "quality": quality, "quality_pipeline": quality_pipeline,
          "latency_target": latency_target, "latency_fidelity": latency_fidelity,
          "latency_fidelity_minilm": latency_fidelity,
          "latency_fidelity_obspa": latency_fidelity,
          "kernel_widths": kernel_widths, "genai_folder": genai_folder,
          "optimum_exports": optimum_exports, "seq2seq_calibration": seq2seq_calibration,
          "seq2seq_recovery": seq2seq_recovery,
          "minilm_mlp_joint_fit": minilm_mlp_joint_fit, "held_out_sources": held_out_sources,
          "int4_minilm": int4_minilm, "int8_effnet": int8_effnet, "fp16_copy": fp16_copy,
          "q8_copy": q8_copy,
          "int8_chain_minilm": int8_chain_minilm,
          "decoder_calibration": decoder_calibration, "structure_models": structure_models,
          "ratio_budget": ratio_budget}


def render(name: str) -> str:
    """The table of ``results/<name>.json``, or a line saying it was not run."""
    d = _load(name)
    return RENDER[name.removesuffix("_quick")](d) if d else f"({name}.json: not run)"


def update(text: str) -> str:
    """``text`` with every generated block rendered afresh from the results."""
    def block(m: re.Match) -> str:
        return f"{m.group(1)}\n{render(m.group('name'))}\n\n{m.group(4)}"

    return BLOCK.sub(block, text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="print the --quick results")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true",
                        help="regenerate the tables in benchmarks/README.md")
    action.add_argument("--check", action="store_true",
                        help="exit 1 when benchmarks/README.md differs from what --write makes")
    args = parser.parse_args()
    if args.write or args.check:
        old = README.read_text()
        new = update(old)
        if args.check:
            if new != old:
                print("benchmarks/README.md is stale: run python -m benchmarks.tables --write",
                      file=sys.stderr)
            return int(new != old)
        README.write_text(new)
        return 0
    suffix = "_quick" if args.quick else ""
    for name in RENDER:
        print(render(name + suffix), end="\n\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
