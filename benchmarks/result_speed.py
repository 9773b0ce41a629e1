"""Speed of the result: onnxruntime latency of SPA- and Torch-Pruning-pruned models, against FLOPs.

For each model of ``zoo`` (ResNet-50, MobileNetV3-Large, ViT-B/16, BERT-base-sized encoder) and
each ratio (0.25, 0.5, 0.75): SPA prunes the dense ONNX file (L1, validation off);
Torch-Pruning prunes a fresh copy of the same ``nn.Module`` (``MagnitudeImportance(p=1)``), which
is exported like the dense one (TorchScript, opset 17). The dense model and all pruned ones are
timed in one interleaved run (``side_by_side_latency``: rounds over all sessions, median of
every call; 1 and 2 threads, idle workers not spinning), so that the load of this shared machine
hits them alike; the load average is recorded. Each is timed by the wall clock and by CPU time:
with 1 thread the CPU time of the calling thread is the latency on an idle core, which other
jobs on the machine do not inflate; the goal is judged on it. FLOPs and params of every file are
counted by the same counter (``spa.metrics.CostModel``).

Goal: latency speed-up ≥ 0.8 × FLOPs reduction. Where SPA's result falls below it, the same
ratio with ``--round-to 8`` is measured as well, side by side with the unrounded one, and
onnxruntime's profiler says where the time of each of those files goes, by op type.

    python -m benchmarks.result_speed [--ratios 0.25 0.5 0.75] [--models ...] [--rounds 20]
        [--quick]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS, onnx_counts, side_by_side_latency, write_result
from benchmarks.zoo import MODELS, export, tp_pruned

GOAL = 0.8
THREADS = (1, 2)


def spa_variant(dense: Path, out: Path, ratio: float, round_to: int = 1) -> Path:
    from spa.api import CheckOptions, PruneOptions, prune

    prune(dense, out, PruneOptions(ratio=ratio, round_to=round_to),
          CheckOptions(validate=False, latency=False))
    return out


def make_variants(key: str, ratios: list[float], workdir: Path) -> dict[str, Path]:
    """The dense file, SPA's and Torch-Pruning's results at each ratio."""
    entry = MODELS[key]
    paths = {"dense": export(entry, *entry.build(), workdir / f"{key}.onnx")}
    for r in ratios:
        paths[f"spa_{r}"] = spa_variant(paths["dense"], workdir / f"{key}_spa_{r}.onnx", r)
        model, inputs, _ = tp_pruned(entry, r)
        paths[f"tp_{r}"] = export(entry, model, inputs, workdir / f"{key}_tp_{r}.onnx")
    return paths


CPU_CLOCKS = {1: time.thread_time, 2: time.process_time}


def timed(paths: dict[str, Path], rounds: int) -> dict:
    """Latency of every variant at both thread counts, by two clocks, with the load average.

    ``wall_ms``: the wall-clock median, what a user sees, but on this shared machine it also
    counts the time other processes hold the cores. ``cpu_ms``: with 1 thread, the CPU time of
    the calling thread (which runs the whole model), i.e. the latency on an idle core; with 2
    threads, the CPU time of the whole process (the work, not the latency)."""
    out = {}
    for threads in THREADS:
        load = os.getloadavg()
        wall = side_by_side_latency(paths, threads=threads, rounds=rounds, runs_per_round=2)
        cpu = side_by_side_latency(paths, threads=threads, rounds=rounds, runs_per_round=2,
                                   clock=CPU_CLOCKS[threads])
        out[threads] = {"wall_ms": wall, "cpu_ms": cpu,
                        "cpu_clock": CPU_CLOCKS[threads].__name__,
                        "load_average_before": load, "load_average_after": os.getloadavg()}
    return out


def rows(paths: dict[str, Path], timing: dict) -> dict:
    """Per variant: counts, FLOPs reduction, and per thread count and clock the latency, the
    speed-up and the speed-up ÷ FLOPs reduction."""
    dense = onnx_counts(paths["dense"])
    result = {}
    for label, path in paths.items():
        c = onnx_counts(path)
        entry = {**c, "flops_reduction_x": dense["flops"] / c["flops"],
                 "size_reduction_x": dense["bytes"] / c["bytes"]}
        for threads, t in timing.items():
            entry[f"threads{threads}"] = per_clock = {}
            for clock in ("wall_ms", "cpu_ms"):
                speedup = t[clock]["dense"] / t[clock][label]
                per_clock[clock] = {"latency_ms": t[clock][label], "speedup_x": speedup,
                                    "speedup_over_flops_reduction":
                                        speedup / entry["flops_reduction_x"]}
        result[label] = entry
    return result


def below_goal(result: dict) -> list[str]:
    """SPA variants whose 1-thread CPU-time speed-up is under GOAL × their FLOPs reduction (the
    load-independent latency; wall-clock figures on this machine move with other jobs)."""
    return [label for label, e in result.items() if label.startswith("spa_")
            and "round8" not in label
            and e["threads1"]["cpu_ms"]["speedup_over_flops_reduction"] < GOAL]


def op_profile(path: Path, runs: int = 20) -> dict[str, float]:
    """Where one 1-thread run spends its time: onnxruntime's profiler, ms per run by op type,
    largest first (to explain a speed-up that does not follow the FLOPs)."""
    import collections
    import json

    import onnxruntime as ort

    from spa import validate as val

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    opts.enable_profiling = True
    opts.profile_file_prefix = str(path.with_suffix(""))
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feeds = val.random_inputs(sess)
    for _ in range(runs):
        sess.run(None, feeds)
    trace = Path(sess.end_profiling())
    by_op: collections.Counter = collections.Counter()
    for event in json.loads(trace.read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            by_op[event["args"]["op_name"]] += event["dur"] / 1e3 / runs
    trace.unlink()
    return {op: round(ms, 4) for op, ms in by_op.most_common()}


def measure(key: str, ratios: list[float], rounds: int, workdir: Path) -> dict:
    paths = make_variants(key, ratios, workdir)
    timing = timed(paths, rounds)
    result = {"main": {"variants": rows(paths, timing), "timing": timing}}
    slow = below_goal(result["main"]["variants"])
    if slow:  # the same ratios with --round-to 8, timed side by side with the unrounded ones
        retry = {"dense": paths["dense"]}
        for label in slow:
            r = float(label.split("_")[1])
            retry[label] = paths[label]
            retry[f"{label}_round8"] = spa_variant(paths["dense"],
                                                   workdir / f"{key}_{label}_round8.onnx", r, 8)
        timing8 = timed(retry, rounds)
        result["round_to_8"] = {"variants": rows(retry, timing8), "timing": timing8}
        result["op_profile_ms_1_thread"] = {label: op_profile(p) for label, p in retry.items()}
    for p in workdir.glob(f"{key}*.onnx"):
        p.unlink()
    return {"model": MODELS[key].label, "below_goal": slow, **result}


PANELS = ((1, "cpu_ms", "1 thread, CPU time"), (1, "wall_ms", "1 thread, wall clock"),
          (2, "wall_ms", "2 threads, wall clock"))


def plot(results: dict, path: Path) -> None:
    """Speed-up against FLOPs reduction, SPA and Torch-Pruning, per model and measurement."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(PANELS), len(results), figsize=(4 * len(results), 10),
                             squeeze=False)
    for col, (key, res) in enumerate(results.items()):
        variants = dict(res["main"]["variants"])
        r8 = {k: v for k, v in res.get("round_to_8", {}).get("variants", {}).items()
              if k.endswith("round8")}
        hi = max(v["flops_reduction_x"] for v in [*variants.values(), *r8.values()])
        for row, (threads, clock, title) in enumerate(PANELS):
            ax = axes[row][col]

            def point(v, threads=threads, clock=clock):
                return v["flops_reduction_x"], v[f"threads{threads}"][clock]["speedup_x"]

            for prefix, style, name in (("spa_", "o-", "SPA"), ("tp_", "s-", "Torch-Pruning")):
                pts = sorted(point(v) for k, v in variants.items() if k.startswith(prefix))
                ax.plot(*zip(*pts), style, label=name)
            if r8:
                ax.plot(*zip(*(point(v) for v in r8.values())), "D", label="SPA --round-to 8")
            ax.plot([1, hi], [1, hi], "k:", lw=0.8, label="speed-up = FLOPs cut")
            ax.plot([1, hi], [GOAL, GOAL * hi], "r--", lw=0.6, label=f"{GOAL} × FLOPs cut")
            ax.set(title=f"{key}: {title}", xlabel="FLOPs reduction (×)",
                   ylabel="latency speed-up (×)")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="*", default=[0.25, 0.5, 0.75])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds of 2 calls")
    parser.add_argument("--quick", action="store_true", help="the two CNNs at ratio 0.5")
    args = parser.parse_args()
    if args.quick:
        args.models, args.ratios, args.rounds = ["resnet50", "mobilenet_v3_large"], [0.5], 10
    name = "result_speed" + ("_quick" if args.quick else "")

    workdir = Path(tempfile.mkdtemp(prefix="spa-result-speed-"))
    results = {}
    for key in args.models:
        results[key] = res = measure(key, args.ratios, args.rounds, workdir)
        for label, v in res["main"]["variants"].items():
            print(f"{key} {label:10} FLOPs ÷{v['flops_reduction_x']:.2f}  speed-up "
                  + "  ".join(f"{t}t {c[:-3]} ×{v[f'threads{t}'][c]['speedup_x']:.2f}"
                              for t in THREADS for c in ("cpu_ms", "wall_ms")), flush=True)
        if res["below_goal"]:
            print(f"{key}: below goal {res['below_goal']}; --round-to 8 measured", flush=True)
    plot(results, RESULTS / f"{name}.png")
    body = {"ratios": args.ratios, "rounds": args.rounds, "runs_per_round": 2,
            "goal": f"speed-up >= {GOAL} x FLOPs reduction", "results": results}
    path = write_result(name, body)
    print(f"wrote {path} at {time.strftime('%H:%M:%S')}")


if __name__ == "__main__":
    main()
