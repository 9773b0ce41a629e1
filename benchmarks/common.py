"""Shared pieces of the benchmarks: machine info, timing, side-by-side latency, JSON results."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"


PACKAGES = ("numpy", "onnx", "onnxruntime", "torch", "torchvision", "timm", "torch-pruning")


def machine() -> dict:
    import onnxruntime

    return {"python": platform.python_version(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "onnxruntime": onnxruntime.__version__,
            "processor": platform.processor() or platform.machine(), "cpu": cpu(),
            "packages": _versions(PACKAGES)}


SIMD = ("avx512f", "avx2", "avx", "sse4_2", "asimd")  # widest first


def cpu(path: Path = Path("/proc/cpuinfo")) -> dict[str, str]:
    """The CPU's model name and its widest vector extension (Linux's /proc/cpuinfo; empty
    elsewhere). onnxruntime picks its kernels by the extension, so float results, and what
    depends on them bit for bit (synthetic inputs made by gradient steps), can differ between
    two machines: EfficientNet-Lite0 data-free at --ratio 0.1, seed 0, gave top-1 agreement
    0.8667 on one and 0.775 on another from the same code."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    return {"model": fields.get("model name", ""),
            "simd": next((f for f in SIMD if f in flags), "")}


def _versions(names: tuple[str, ...]) -> dict[str, str]:
    """Installed versions as pip sees them (torch-pruning 1.6.1 reports 1.6.0 in __version__)."""
    from importlib import metadata

    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


#: What ``revision`` does not count as uncommitted code (git pathspecs from the top).
NOT_CODE = (":(top,exclude)benchmarks/results", ":(top,exclude)*.md")


def revision() -> str:
    """The commit the benchmark ran, with ``-dirty`` appended when tracked files other than
    results and Markdown differ from it, or files git does not track are there (the run
    measured uncommitted code; results written by an earlier benchmark of the same session do
    not count); ``unknown`` when git cannot tell; ``SPA_REVISION`` for a run from an exported
    snapshot."""
    import subprocess

    if os.environ.get("SPA_REVISION"):
        return os.environ["SPA_REVISION"]
    here = Path(__file__).parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=here, check=True).stdout.strip()
        changed = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", ":(top)", *NOT_CODE],
                                 cwd=here).returncode
        # a file git does not track yet (a new benchmark script) is uncommitted code too
        untracked = subprocess.run(["git", "ls-files", "--others", "--exclude-standard", "--",
                                    ":(top)", *NOT_CODE], capture_output=True, text=True,
                                   cwd=here, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    if changed not in (0, 1):  # not "same" or "differs": git failed, so nothing is known
        return "unknown"
    return f"{head}-dirty" if changed or untracked else head


def median_seconds(fn: Callable[[], object], runs: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def side_by_side_latency(paths: dict[str, Path], *, threads: int, rounds: int = 7,
                         runs_per_round: int = 10,
                         clock: Callable[[], float] = time.perf_counter,
                         dims: dict[str, int] | None = None) -> dict[str, float]:
    """Median latency (ms) of each model, measured in interleaved rounds so that machine noise
    hits all of them alike.

    ``clock=time.thread_time`` with ``threads=1`` measures the CPU time of the calling thread,
    which runs the whole model when onnxruntime has one intra-op thread: time the thread spends
    preempted by other processes is not counted, so the figure holds on a loaded machine.
    ``dims`` sizes the inputs' symbolic dims (:func:`spa.validate.random_inputs`; else 1)."""
    from spa import validate as val

    # No spinning: an idle session's spinning workers would slow the next one down.
    sessions = {k: val.session(p, threads=threads, spin=False) for k, p in paths.items()}
    feeds = val.random_inputs(next(iter(sessions.values())), dims=dims)
    for s in sessions.values():
        for _ in range(3):
            s.run(None, feeds)
    samples: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            for _ in range(runs_per_round):
                t0 = clock()
                s.run(None, feeds)
                samples[k].append((clock() - t0) * 1e3)
    return {k: float(np.median(v)) for k, v in samples.items()}


def command() -> str:
    """The command line that ran, as ``python -m benchmarks.x …`` when run as a module."""
    script, root = Path(sys.argv[0]).resolve(), Path(__file__).resolve().parent.parent
    if script.suffix == ".py" and script.is_relative_to(root):
        module = ".".join(script.relative_to(root).with_suffix("").parts)
        return " ".join(["python", "-m", module, *sys.argv[1:]])
    return " ".join([Path(sys.executable).name, *sys.argv])


def onnx_counts(path: Path) -> dict:
    """Params and FLOPs (MACs) of an ONNX file by SPA's counter, and its size: one yardstick for
    every tool's output."""
    from spa.ir import load_model
    from spa.metrics import CostModel

    c = CostModel(load_model(path).graph).count()
    return {"params": c.params, "flops": c.flops, "bytes": Path(path).stat().st_size}


def write_result(name: str, body: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    body = {"command": command(), "machine": machine(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "revision": revision(), **body}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(body, indent=1) + "\n")
    return path


def benchmark_prune(dense: Path, variants: dict, runs: int, workdir: Path) -> dict:
    """Time ``spa.prune`` (load → saved file, validation off) for each variant of options,
    median of ``runs``; then measure latency of all results side by side with the dense model."""
    from spa.api import CheckOptions, prune

    no_checks = CheckOptions(validate=False, latency=False)
    results, paths = {}, {"dense": dense}
    for label, options in variants.items():
        out = workdir / f"{label}.onnx"
        reports: list = []

        def run(out=out, options=options, reports=reports):
            reports.append(prune(dense, out, options, no_checks)[0])

        median, all_runs = median_seconds(run, runs)
        rep = reports[-1]
        paths[label] = out
        results[label] = {
            "prune_seconds_median": median, "prune_seconds_all": all_runs,
            "breakdown_last_run": rep.seconds, "params_before": rep.params_before,
            "params_after": rep.params_after, "flops_before": rep.flops_before,
            "flops_after": rep.flops_after, "flops_reduction_x": rep.flops_before / rep.flops_after,
            "bytes_before": rep.bytes_before, "bytes_after": rep.bytes_after}
    for threads in (1, 2):
        lat = side_by_side_latency(paths, threads=threads)
        for label, entry in results.items():
            speedup = lat["dense"] / lat[label]
            entry[f"threads{threads}"] = {
                "latency_ms_dense": lat["dense"], "latency_ms_pruned": lat[label],
                "speedup_x": speedup,
                "speedup_over_flops_reduction": speedup / entry["flops_reduction_x"]}
    return results


def print_results(results: dict) -> None:
    for label, r in results.items():
        print(f"{label}: prune {r['prune_seconds_median']:.2f}s"
              f"  FLOPs ÷{r['flops_reduction_x']:.2f}"
              f"  speed-up 1 thread ×{r['threads1']['speedup_x']:.2f}"
              f"  2 threads ×{r['threads2']['speedup_x']:.2f}")
