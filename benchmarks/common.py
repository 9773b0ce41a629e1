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


def machine() -> dict:
    import onnxruntime

    return {"python": platform.python_version(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "onnxruntime": onnxruntime.__version__,
            "processor": platform.processor() or platform.machine()}


def median_seconds(fn: Callable[[], object], runs: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def side_by_side_latency(paths: dict[str, Path], *, threads: int, rounds: int = 7,
                         runs_per_round: int = 10) -> dict[str, float]:
    """Median latency (ms) of each model, measured in interleaved rounds so that machine noise
    hits all of them alike."""
    from spa import validate as val

    sessions = {k: val.session(p, threads=threads) for k, p in paths.items()}
    feeds = val.random_inputs(next(iter(sessions.values())))
    for s in sessions.values():
        for _ in range(3):
            s.run(None, feeds)
    samples: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            for _ in range(runs_per_round):
                t0 = time.perf_counter()
                s.run(None, feeds)
                samples[k].append((time.perf_counter() - t0) * 1e3)
    return {k: float(np.median(v)) for k, v in samples.items()}


def write_result(name: str, body: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    body = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), **body}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(body, indent=1) + "\n")
    return path
