"""What ``--ratio`` removes with calibration data: sensitivity against one ratio per group.

    python -m benchmarks.quality.ratio_budget [--ratios 0.2,0.3]

``spa prune --ratio r --calib C`` allocates by sensitivity; without ``--target`` its budget is
the multiply-adds that removing ``r`` of every group's channels would free (the uniform plan),
spent where the measured damage per MAC is least (passes/allocation.py). Each row is one
``spa prune`` run (OBSPA on calibration Hessians, reconstruction on), ``--allocation uniform``
against the default, at each ratio:

* EfficientNet-Lite0 (real ImageNet weights) on the quality benchmark's 28 calibration photos'
  views, scored by top-1/top-5 agreement with the dense model on the 360 views of 15 other
  photos (:func:`benchmarks.quality.real.effnet_bench`);
* torchvision's RegNetY-400MF (random weights, 128 px: no accuracy to measure; squeeze-and-excite
  bottlenecks in every block) on every tenth of those views (67), scored by the held-out
  fidelity of its report on the views of the ten ImageNet validation photos among the 15
  (``--held-out-data``).

FLOPs, params and channels after/before come from each run's report.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import write_result
from benchmarks.quality import real
from benchmarks.quality.pipeline import SPA, run_measured

CRITERION = ["--criterion", "obspa", "--hessian", "calibration"]
ALLOCATIONS = {"uniform": ["--allocation", "uniform"], "sensitivity": []}


def _regnet(work: Path) -> Path:
    """RegNetY-400MF, random weights (seed 0), exported at 128 px."""
    path = work / "regnet_y_400mf.onnx"
    if not path.exists():
        from benchmarks.coverage import export
        from benchmarks.coverage_models import build

        built = build("torchvision", "regnet_y_400mf")
        export(built.module, built.example, path)
    return path


def _views(source: Path, out: Path, every: int) -> Path:
    """Links to every ``every``-th view of ``source``, in name order."""
    out.mkdir(parents=True, exist_ok=True)
    for view in sorted(source.glob("*.png"))[::every]:
        link = out / view.name
        if not link.exists():
            link.symlink_to(view.resolve())
    return out


def _counts(report: Path) -> dict:
    r = json.loads(report.read_text())
    return {"flops": r["flops_after"] / r["flops_before"],
            "params": r["params_after"] / r["params_before"],
            "channels": [r["channels_after"], r["channels_before"]],
            "fidelity": r["fidelity"], "reconstruction_kept": r["reconstruction"].get("kept")}


def run(label: str, dense: Path, args: list[str], work: Path) -> dict:
    out, report = work / f"{label}.onnx", work / f"{label}.report.json"
    entry = run_measured([*SPA, "prune", str(dense), "-o", str(out), "--report", str(report),
                          "-q", "--no-validate", *args], work / f"{label}.log")
    if entry["exit_code"] == 0:
        entry.update(_counts(report))
    entry["output"] = str(out)
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0.2,0.3")
    args = parser.parse_args()
    ratios = args.ratios.split(",")
    work = real.CACHE / "runs" / "ratio_budget"
    work.mkdir(parents=True, exist_ok=True)
    bench = real.effnet_bench()
    body: dict = {"ratios": ratios, "models": {}}

    rows = {}
    for ratio in ratios:
        for name, extra in ALLOCATIONS.items():
            label = f"effnet-{name}-{ratio}"
            entry = run(label, bench.dense, ["--ratio", ratio, *CRITERION, "--calib",
                                             str(bench.calib), *bench.calib_flags, *extra], work)
            if entry["exit_code"] == 0:
                entry["evaluation"] = bench.metric(Path(entry["output"]))
            rows[label] = entry
            print(label, json.dumps({k: entry.get(k) for k in ("flops", "evaluation")}),
                  flush=True)
    body["models"]["efficientnet_lite0"] = rows

    regnet = _regnet(work)
    calib = _views(bench.calib, work / "regnet_calib", 10)  # 67 of the 666 views
    held = real.CACHE / "effnet" / "eval_views_wide_0"
    flags = ["--preprocess", "imagenet", "--image-size", "128", "--held-out-data", str(held)]
    rows = {}
    for ratio in ratios:
        for name, extra in ALLOCATIONS.items():
            label = f"regnet-{name}-{ratio}"
            rows[label] = run(label, regnet, ["--ratio", ratio, *CRITERION, "--calib",
                                              str(calib), *flags, *extra], work)
            print(label, json.dumps({k: rows[label].get(k) for k in ("flops", "fidelity")}),
                  flush=True)
    body["models"]["regnet_y_400mf"] = rows
    body["regnet_held_out_views"] = len(list(held.glob("*.png")))
    body["regnet_calibration_views"] = len(list(calib.glob("*.png")))
    write_result("ratio_budget", body)


if __name__ == "__main__":
    main()
