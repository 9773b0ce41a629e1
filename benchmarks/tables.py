"""Markdown tables of the SPA-versus-Torch-Pruning results, for the README.

Reads ``benchmarks/results/{coverage,compile_speed,result_speed,memory}.json`` and prints the
tables, so that every figure in the README is a figure of a recorded run.

    python -m benchmarks.tables [--quick]
"""

from __future__ import annotations

import argparse
import json

from benchmarks.common import RESULTS


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


def memory(d: dict) -> str:
    lines = [f"Memory ({_load_note(d)}; importing SPA alone: "
             f"{d['baseline_import_rss_bytes'] / 2**20:.0f} MiB):", "",
             "| model | file | `--no-validate` | default (validate) | `--check-masked` |",
             "|---|---|---|---|---|"]
    for r in d["results"].values():
        cells = [f"{m['peak_rss_bytes'] / 2**20:.0f} MiB = {m['rss_over_file']:.1f}× "
                 f"({m['wall_seconds']:.0f} s)" for m in r["modes"].values()]
        lines.append(f"| {r['model']} | {r['file_bytes'] / 2**20:.0f} MiB | " + " | ".join(cells)
                     + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the --quick results")
    args = parser.parse_args()
    suffix = "_quick" if args.quick else ""
    for name, render in (("coverage", coverage), ("compile_speed", compile_speed),
                         ("result_speed", result_speed), ("memory", memory)):
        d = _load(name + suffix)
        print(render(d) if d else f"({name}{suffix}.json: not run)", end="\n\n")


if __name__ == "__main__":
    main()
