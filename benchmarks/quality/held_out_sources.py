"""Does held-out fidelity say what a pruned model keeps on new data? ``--held-out-data``.

    python -m benchmarks.quality.held_out_sources [--held-photos 4] [--seed 0]

EfficientNet-Lite0 at the quality benchmark's 1.5x FLOPs cut (OBSPA on calibration Hessians,
sensitivity allocation, reconstruction: the ``post-obspa`` row). The benchmark's 28 calibration
photos are split by photo: a seeded few (``--held-photos``) are held out whole and the others
calibrate, each photo with all its views. Two ``spa prune`` runs:

* ``share``: ``--calib`` the calibrating photos' views, the default 10% of them held out;
* ``sources``: the same views calibrate whole, ``--held-out-data`` the held-out photos' views.

For each, the report's held-out fidelity after pruning and after reconstruction, and top-1
agreement with the dense model on the benchmark's 15 evaluation photos, which neither run sees.
Then ``spa recover`` from the ``share`` model (80 steps at lr 1e-5, fixed, so that both judges
see the same kind of run), judged each way: its held-out fidelity before and after, what it
wrote, and that model's agreement on the 15 photos.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from benchmarks.common import write_result
from benchmarks.quality import real
from benchmarks.quality.pipeline import SPA, run_measured

CUT = ["--target", "flops", "--ratio", "0.333333", "--criterion", "obspa",
       "--hessian", "calibration"]
RECOVER = ["--lr", "1e-5", "--steps", "80"]


def split_views(folder: Path, held: set[str], out: Path) -> tuple[Path, Path]:
    """Links to ``folder``'s views (``<photo>_<k>.png``): (calibrating, held-out) folders."""
    if out.exists():
        shutil.rmtree(out)
    sides = out / "calibrate", out / "held_out"
    for side in sides:
        side.mkdir(parents=True)
    for view in sorted(folder.glob("*.png")):
        side = sides[1] if view.name.rsplit("_", 1)[0] in held else sides[0]
        (side / view.name).symlink_to(view.resolve())
    return sides


def _stages(report: Path) -> dict:
    r = json.loads(report.read_text())
    return {"calibration": r["calibration"], "fidelity": r["fidelity"],
            "reconstruction_kept": r["reconstruction"].get("kept")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--held-photos", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    bench = real.effnet_bench()
    photos = sorted(real.CALIB_PHOTOS | real.WIDE_CALIB_PHOTOS)
    held = sorted(np.random.default_rng(args.seed).choice(photos, args.held_photos,
                                                          replace=False).tolist())
    work = real.CACHE / "runs" / "held_out_sources"
    calibrate, held_out = split_views(bench.calib, set(held), work / "views")
    judges = {"share": [], "sources": ["--held-out-data", str(held_out)]}
    body: dict = {"model": "efficientnet_lite0", "cut": CUT, "held_out_photos": held,
                  "calibrating_photos": [p for p in photos if p not in held],
                  "evaluation_photos": sorted(real.EVAL_PHOTOS | real.WIDE_EVAL_PHOTOS),
                  "prune": {}, "recover": {}}
    for label, extra in judges.items():
        out, report = work / f"{label}.onnx", work / f"{label}.report.json"
        entry = run_measured([*SPA, "prune", str(bench.dense), "-o", str(out), "--report",
                              str(report), "-q", "--no-validate", *CUT, "--calib",
                              str(calibrate), *bench.calib_flags, *extra],
                             work / f"{label}.log")
        if entry["exit_code"] == 0:
            entry.update({**_stages(report), "evaluation": bench.metric(out)})
        body["prune"][label] = entry
        print(label, json.dumps({k: entry.get(k) for k in ("fidelity", "evaluation")}),
              flush=True)
    start = work / "share.onnx"
    for label, extra in judges.items():
        out, report = work / f"recover-{label}.onnx", work / f"recover-{label}.report.json"
        entry = run_measured([*SPA, "recover", str(bench.dense), str(start), "-o", str(out),
                              "--calib", str(calibrate), *bench.calib_flags, *extra,
                              *RECOVER, "--report", str(report)],
                             work / f"recover-{label}.log")
        if entry["exit_code"] == 0:
            r = json.loads(report.read_text())
            entry.update({k: r[k] for k in ("fidelity_before", "fidelity_after", "kept",
                                            "steps", "calibration")})
            entry["evaluation"] = bench.metric(out)
        body["recover"][label] = entry
        print("recover", label, json.dumps({k: entry.get(k) for k in (
            "fidelity_before", "fidelity_after", "kept", "evaluation")}), flush=True)
    body["evaluation_start"] = bench.metric(start)
    write_result("held_out_sources", body)


if __name__ == "__main__":
    main()
