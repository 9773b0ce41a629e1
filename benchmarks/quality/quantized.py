"""What the quantised-model benchmarks share (int4_minilm, int8_effnet): ``spa prune`` of a
quantised model with and without reconstruction, each in its own process, scored alike."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.quality.real import Bench

#: The variants: sensitivity allocation alone, and with reconstruction (the default).
VARIANTS = {"no-reconstruct": ["--no-reconstruct"], "reconstruct": []}


def prune_variants(quantized: Path, bench: Bench, flags: list[str], workdir: Path,
                   score: Callable[[Path], dict]) -> list[dict]:
    """One row per :data:`VARIANTS`: ``spa prune quantized`` on ``bench``'s calibration data
    with ``flags``, its wall time, the report's FLOPs, reconstruction and fidelity, and
    ``score`` of the written model."""
    rows = []
    for label, extra in VARIANTS.items():
        out, report = workdir / f"{label}.onnx", workdir / f"{label}.json"
        argv = [sys.executable, "-m", "spa", "prune", str(quantized), "-o", str(out),
                "--calib", str(bench.calib), *bench.calib_flags, *flags, *extra, "--report",
                str(report), "-q"]
        t0 = time.perf_counter()
        subprocess.run(argv, check=True)
        seconds = time.perf_counter() - t0
        body = json.loads(report.read_text())
        scores = score(out)
        rows.append({"variant": label, "argv": argv[2:], "seconds": round(seconds, 1),
                     **scores,
                     "flops_before": body["flops_before"], "flops_after": body["flops_after"],
                     "reconstruction": body["reconstruction"], "fidelity": body["fidelity"]})
        print(label, {k: round(v, 4) for k, v in scores.items()}, flush=True)
    return rows
