"""`spa recover` on a model exported at a fixed batch size against the same model with a
symbolic batch: EfficientNet-Lite0's ``post-obspa`` start from the quality pipeline (run
``python -m benchmarks.quality.pipeline --models effnet --variants post-obspa --skip-tp
--skip-recover`` first), both files copied with batch 1 written into their input and output
shapes. The fixed pair trains one sample at a time (``spa.torch.interpreter.in_chunks``); the
held-out measures should equal the symbolic run's, and the wall time says what the chunking
costs. Runs alternate, side by side.

    python -m benchmarks.fixed_batch_recovery [--runs 2] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnx

from benchmarks.common import write_result
from benchmarks.quality.real import CACHE, MODELS

DENSE = MODELS / "efficientnet_lite0.onnx"
PRUNED = CACHE / "runs" / "effnet" / "post-obspa.onnx"
CALIB = ["--calib", str(CACHE / "effnet" / "calib_views_wide_0"), "--preprocess", "imagenet",
         "--image-size", "224", "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5"]


def fixed_copy(src: Path, dst: Path) -> Path:
    """``src`` with batch 1 in its input and output shapes (its inferred shapes dropped)."""
    model = onnx.load(str(src))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    del model.graph.value_info[:]
    onnx.save(model, str(dst))
    return dst


def run(dense: Path, pruned: Path, out: Path, steps: int) -> dict:
    report = out.with_suffix(".json")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "spa", "recover", str(dense), str(pruned), "-o",
                    str(out), *CALIB, "--steps", str(steps), "--lr", "1e-4", "--report",
                    str(report), "-q"], check=True)
    body = json.loads(report.read_text())
    return {"seconds": time.perf_counter() - t0, "steps": body["steps"],
            "fidelity_after": body["fidelity_after"], "kept": body["kept"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="spa-bench-"))
    pairs = {"symbolic": (DENSE, PRUNED),
             "fixed_batch_1": (fixed_copy(DENSE, tmp / "dense1.onnx"),
                               fixed_copy(PRUNED, tmp / "pruned1.onnx"))}
    runs: dict[str, list[dict]] = {k: [] for k in pairs}
    for i in range(args.runs):
        for name, (dense, pruned) in pairs.items():
            runs[name].append(run(dense, pruned, tmp / f"{name}_{i}.onnx", args.steps))
    seconds = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
    body = {"what": "spa recover, EfficientNet-Lite0 post-obspa start, fixed batch 1 against a "
                    "symbolic batch", "steps": args.steps, "runs": runs,
            "median_seconds": seconds,
            "fixed_over_symbolic": seconds["fixed_batch_1"] / seconds["symbolic"]}
    path = write_result("fixed_batch_recovery", body)
    for name, v in runs.items():
        print(name, [round(r["seconds"], 1) for r in v], v[-1]["fidelity_after"], v[-1]["kept"])
    print(f"fixed / symbolic wall time: {body['fixed_over_symbolic']:.2f}; wrote {path}")


if __name__ == "__main__":
    main()
