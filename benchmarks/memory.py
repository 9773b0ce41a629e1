"""Memory: peak RSS of ``spa prune`` on the largest models of the speed benchmarks, against size.

ViT-B/16 (torchvision, ~330 MB file) and the BERT-base-sized encoder (~440 MB): each ``spa prune
--ratio 0.5`` runs as its own subprocess and its peak resident set size is read from
``os.wait4`` (``ru_maxrss`` of that child alone). Three modes: ``--no-validate`` (load, analyse,
rewrite, save), ``--no-check`` (also runs original and pruned in onnxruntime), the default
(also builds and runs the masked original: the numeric oracle, on by default where it applies)
and ``--check-masked`` (the same, required). The baseline is the same
interpreter importing SPA and exiting, so the ratio to file size can be read with and without
that fixed cost. (``benchmarks/large_model.py`` covers a model over 2 GB.)

    python -m benchmarks.memory [--models vit_b_16 bert_base] [--quick]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import write_result
from benchmarks.zoo import MODELS, export

# "validate" is the default command line: since issue #12 it runs the numeric oracle whenever it
# applies (here, l1 without compensation: always); "no_check" is the default of before.
MODES = {"no_validate": ["--no-validate"], "no_check": ["--no-check"], "validate": [],
         "check_masked": ["--check-masked"]}


# Forking copies the parent's resident pages, and Linux keeps the pre-exec high-water mark in
# ru_maxrss: a child forked from this process (torch and a model loaded) would report our RSS.
# So a small interpreter (no site, ~10 MB) starts the command and reports its child's usage.
RUNNER = ("import os, subprocess, sys; p = subprocess.Popen(sys.argv[1:], "
          "stdout=subprocess.DEVNULL); _, s, u = os.wait4(p.pid, 0); p.returncode = 0; "
          "print(u.ru_maxrss, os.waitstatus_to_exitcode(s))")


def peak_rss(cmd: list[str]) -> tuple[int, float, int, str]:
    """(peak RSS in bytes, wall seconds, exit code, last stderr line) of one command."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-S", "-c", RUNNER, *cmd], capture_output=True,
                          text=True, check=True)
    wall = time.perf_counter() - t0
    maxrss_kib, code = (int(v) for v in proc.stdout.split())
    lines = proc.stderr.strip().splitlines()
    return maxrss_kib * 1024, wall, code, lines[-1] if lines else ""


def measure(key: str, workdir: Path) -> dict:
    entry = MODELS[key]
    dense = export(entry, *entry.build(), workdir / f"{key}.onnx")
    size = dense.stat().st_size
    result: dict = {"model": entry.label, "file_bytes": size, "modes": {}}
    for mode, flags in MODES.items():
        out = workdir / f"{key}_{mode}.onnx"
        cmd = [sys.executable, "-m", "spa", "prune", str(dense), "-o", str(out), "--ratio", "0.5",
               *flags]
        rss, wall, code, last = peak_rss(cmd)
        result["modes"][mode] = {"command": " ".join(["spa", *cmd[3:]]), "peak_rss_bytes": rss,
                                 "rss_over_file": rss / size, "wall_seconds": wall,
                                 "exit_code": code, **({"stderr": last} if code else {})}
        print(f"{key} {mode}: peak RSS {rss / 2**20:.0f} MiB = {rss / size:.2f}× the "
              f"{size / 2**20:.0f} MiB file ({wall:.1f} s, exit {code})", flush=True)
        out.unlink(missing_ok=True)
    dense.unlink()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["vit_b_16", "bert_base"],
                        choices=list(MODELS))
    parser.add_argument("--quick", action="store_true", help="ViT-B/16 only")
    args = parser.parse_args()
    if args.quick:
        args.models = ["vit_b_16"]

    workdir = Path(tempfile.mkdtemp(prefix="spa-memory-"))
    baseline = peak_rss([sys.executable, "-c", "import spa.api, spa.cli"])[0]
    results = {key: measure(key, workdir) for key in args.models}
    for r in results.values():
        for m in r["modes"].values():
            m["rss_minus_baseline_over_file"] = (m["peak_rss_bytes"] - baseline) / r["file_bytes"]
    body = {"ratio": 0.5, "baseline_import_rss_bytes": baseline, "results": results}
    path = write_result("memory" + ("_quick" if args.quick else ""), body)
    print(f"baseline (import spa) {baseline / 2**20:.0f} MiB; wrote {path} at "
          f"{time.strftime('%H:%M:%S')}")


if __name__ == "__main__":
    main()
