"""Run every SPA-versus-Torch-Pruning benchmark, one subprocess each, and say which failed.

Coverage (``coverage``), compile speed (``compile_speed``), speed of the result
(``result_speed``), memory (``memory``) and accuracy without fine-tuning (``quality``, the
curves of the OBSPA issue); each writes ``benchmarks/results/<name>.json`` (and its plots).
``--quick`` runs the smaller version of each (16 coverage models, the two CNNs, one ratio, the
digits ResNet at 2×) and writes ``<name>_quick.json`` instead, leaving the full results alone.
A full run then regenerates the tables of ``benchmarks/README.md`` from the new results
(``python -m benchmarks.tables --write``), so that the two are committed together.

    python -m benchmarks.run_all [--quick]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

BENCHMARKS = ["coverage", "compile_speed", "result_speed", "memory", "quality"]
MODULES = {"quality": "benchmarks.quality.run"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the smaller sweep of each")
    parser.add_argument("--only", nargs="*", choices=BENCHMARKS, default=BENCHMARKS)
    args = parser.parse_args()

    failed = []
    for name in args.only:
        module = MODULES.get(name, f"benchmarks.{name}")
        cmd = [sys.executable, "-m", module, *(["--quick"] if args.quick else [])]
        print(f"== {' '.join(cmd[1:])} ({time.strftime('%H:%M:%S')})", flush=True)
        if subprocess.run(cmd).returncode:
            failed.append(name)
    if not args.quick:
        from benchmarks import tables

        tables.README.write_text(tables.update(tables.README.read_text()))
        print(f"== wrote {tables.README}")
    print(f"== done at {time.strftime('%H:%M:%S')}; "
          + (f"failed: {', '.join(failed)}" if failed else "all succeeded"))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
