"""Compile speed: SPA from file to pruned file against Torch-Pruning on the same nn.Module.

For torchvision ResNet-50, MobileNetV3-Large, ViT-B/16 and a BERT-base-sized encoder (``zoo``):
SPA's ``prune`` at ratio 0.5 with L1 (load, analysis, plan, rewrite, save; validation off)
against Torch-Pruning's pruner at ratio 0.5 with ``MagnitudeImportance(p=1)`` (DependencyGraph
build by tracing, then ``step()``), on a fresh copy of the same module each run (the copy is made
outside the timing). Runs alternate SPA, Torch-Pruning, SPA, … so that machine load hits both
alike; medians of ``--runs``, wall time and CPU time (all threads of the process; robust to the
load of this shared machine). SPA also reads and writes ONNX; Torch-Pruning does neither.

    python -m benchmarks.compile_speed [--runs 3] [--models resnet50 ...] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import write_result
from benchmarks.zoo import MODELS, export, tp_pruned

RATIO = 0.5
QUICK = ["resnet50", "mobilenet_v3_large"]


def _spa_once(dense: Path, out: Path) -> dict:
    from spa.api import CheckOptions, PruneOptions, prune

    c0, t0 = time.process_time(), time.perf_counter()
    report, _ = prune(dense, out, PruneOptions(ratio=RATIO),
                      CheckOptions(validate=False, latency=False))
    return {"total": time.perf_counter() - t0, "cpu": time.process_time() - c0,
            **report.seconds, "flops_reduction_x": report.flops_before / report.flops_after}


def measure(key: str, runs: int, workdir: Path) -> dict:
    """Interleaved runs of both tools on one model; medians and their ratio."""
    entry = MODELS[key]
    model, inputs = entry.build()
    dense = export(entry, model, inputs, workdir / f"{key}.onnx")
    del model
    spa_runs, tp_runs = [], []
    for _ in range(runs):
        spa_runs.append(_spa_once(dense, workdir / f"{key}_spa.onnx"))
        tp_runs.append(tp_pruned(entry, RATIO)[2])
    spa_median = statistics.median(r["total"] for r in spa_runs)
    tp_median = statistics.median(r["total"] for r in tp_runs)
    spa_cpu = statistics.median(r["cpu"] for r in spa_runs)
    tp_cpu = statistics.median(r["cpu"] for r in tp_runs)
    return {"model": entry.label, "file_bytes": dense.stat().st_size,
            "spa_seconds_median": spa_median, "tp_seconds_median": tp_median,
            "spa_over_tp": spa_median / tp_median,
            "spa_cpu_seconds_median": spa_cpu, "tp_cpu_seconds_median": tp_cpu,
            "spa_over_tp_cpu": spa_cpu / tp_cpu,
            "spa_breakdown_median": {k: statistics.median(r[k] for r in spa_runs)
                                     for k in spa_runs[0] if k != "total"},
            "tp_breakdown_median": {k: statistics.median(r[k] for r in tp_runs)
                                    for k in ("dependency_graph", "prune")},
            "spa_runs": spa_runs, "tp_runs": tp_runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--quick", action="store_true", help="the two CNNs only")
    args = parser.parse_args()
    if args.quick:
        args.models = QUICK

    workdir = Path(tempfile.mkdtemp(prefix="spa-compile-"))
    results = {}
    load_before = os.getloadavg()
    for key in args.models:
        results[key] = r = measure(key, args.runs, workdir)
        print(f"{key}: SPA {r['spa_seconds_median']:.2f}s  Torch-Pruning "
              f"{r['tp_seconds_median']:.2f}s  SPA/TP {r['spa_over_tp']:.2f} (CPU time "
              f"{r['spa_over_tp_cpu']:.2f})", flush=True)
    body = {"ratio": RATIO, "criterion": "l1 (SPA) / MagnitudeImportance(p=1) (Torch-Pruning)",
            "runs": args.runs, "load_average_before": load_before,
            "load_average_after": os.getloadavg(), "results": results,
            "goal": "SPA no slower than Torch-Pruning (spa_over_tp <= 1)"}
    path = write_result("compile_speed" + ("_quick" if args.quick else ""), body)
    print(f"wrote {path} at {time.strftime('%H:%M:%S')}")


if __name__ == "__main__":
    main()
