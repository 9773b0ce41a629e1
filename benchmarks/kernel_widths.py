"""Kernel-aware widths: is a pruned CNN ever slower than dense, with exact and with rounded counts?

Issue #15 parts 3 and 5. Models: EfficientNet-Lite0 with its real ImageNet weights
(benchmarks/quality/effnet_lite0.py's committed ONNX), torchvision MobileNetV3-Large and
ResNet-50 (random init, ``benchmarks.zoo``). At each ratio of :data:`RATIOS`, SPA's default
options (L1, uniform channel ratio) twice: ``--round-to 1`` (exact counts, the default before
this benchmark) and ``--round-to auto`` (the default now: counts rounded to onnxruntime's
NCHWc block where its convolutions need it, passes/kernel_widths.py). The dense model and every
pruned one are timed side by side in interleaved rounds, one onnxruntime thread on the CPU,
CPU time of the calling thread (robust to the load of a shared machine), medians; the dense
model a second time in its own session is the noise floor. Speed-up = dense / pruned: below 1
is slower than dense.

    python -m benchmarks.kernel_widths [--models resnet50 ...] [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from benchmarks.common import onnx_counts, side_by_side_latency, write_result

RATIOS = (0.05, 0.1, 0.3, 0.5)
VARIANTS = {"exact": 1, "auto": "auto"}  # label -> --round-to
MODELS = ("efficientnet_lite0", "mobilenet_v3_large", "resnet50")


def _dense(key: str, workdir: Path) -> tuple[str, Path]:
    """The model's label and dense ONNX file."""
    if key == "efficientnet_lite0":
        from benchmarks.quality.effnet_lite0 import ONNX_PATH

        return "EfficientNet-Lite0 (real ImageNet weights), 224 px", ONNX_PATH
    from benchmarks.zoo import MODELS as ZOO
    from benchmarks.zoo import export

    entry = ZOO[key]
    model, inputs = entry.build()
    return entry.label, export(entry, model, inputs, workdir / f"{key}.onnx")


def _prune(dense: Path, out: Path, ratio: float, round_to: int | str) -> dict:
    from spa.api import CheckOptions, PruneOptions, prune

    report, plan = prune(dense, out, PruneOptions(ratio=ratio, round_to=round_to),
                         CheckOptions(validate=False, latency=False))
    steps = dict(plan.recipe.kernel_steps or ()) if plan.recipe else {}
    return {"ratio": ratio, "round_to": round_to, "block": plan.recipe.round_to
            if plan.recipe else None,
            "groups_rounded": sum(1 for s in steps.values() if s > 1),
            "groups": len(plan.groups),
            "flops_reduction_x": report.flops_before / report.flops_after,
            "channels_kept": report.channels_after / report.channels_before}


def measure(key: str, workdir: Path, rounds: int) -> dict:
    label, dense = _dense(key, workdir)
    paths = {"dense": dense}
    runs: dict[str, dict] = {}
    for ratio in RATIOS:
        for name, round_to in VARIANTS.items():
            tag = f"{name}_{ratio}"
            paths[tag] = workdir / f"{key}_{tag}.onnx"
            runs[tag] = _prune(dense, paths[tag], ratio, round_to)
    paths["dense_again"] = dense
    lat = side_by_side_latency(paths, threads=1, rounds=rounds, clock=time.thread_time)
    for tag, r in runs.items():
        r["latency_ms"] = lat[tag]
        r["speedup_x"] = lat["dense"] / lat[tag]
        r["slower_than_dense"] = lat[tag] > lat["dense"]
    return {"model": label, "dense_flops": onnx_counts(dense)["flops"],
            "latency_ms_dense": lat["dense"],
            "dense_again_speedup_x": lat["dense"] / lat["dense_again"], "runs": runs}


def main() -> None:
    from spa.passes.latency import kernel_block

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="spa-kernel-widths-"))
    load_before = os.getloadavg()
    results = {}
    for key in args.models:
        results[key] = r = measure(key, workdir, args.rounds)
        print(f"{key}: dense {r['latency_ms_dense']:.2f} ms (noise floor "
              f"{r['dense_again_speedup_x']:.3f}x)", flush=True)
        for tag, run in r["runs"].items():
            print(f"  {tag}: {run['speedup_x']:.2f}x (FLOPs /{run['flops_reduction_x']:.2f}, "
                  f"{run['groups_rounded']}/{run['groups']} groups rounded)", flush=True)
        body = {"ratios": RATIOS, "variants": VARIANTS, "threads": 1, "criterion": "l1",
                "kernel_block": kernel_block(), "load_average_before": load_before,
                "load_average_after": os.getloadavg(), "results": results,
                "goal": "no model and no ratio slower than dense with the default options "
                        "(issue #15, part 5)"}
        path = write_result("kernel_widths", body)
        print(f"wrote {path} at {time.strftime('%H:%M:%S')}", flush=True)


if __name__ == "__main__":
    main()
