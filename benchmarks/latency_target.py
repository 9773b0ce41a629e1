"""Latency target: ask for 1.5× and 2× faster, measure what comes out.

For torchvision ResNet-50 and MobileNetV3-Large (``zoo``) and timm's EfficientNet-Lite0 (random
init, 224 px; the model on which ``--ratio 0.05`` alone runs 2.5× slower): SPA's
``--target latency`` with ``--ratio 1 − 1/s`` for requested speed-ups ``s`` of 1.5 and 2
(L1 importance, ``--round-to auto``, one onnxruntime thread on the CPU), and, for comparison,
``--target flops`` at the same ratio. The latency table is built once in a fresh cache (its
build time is recorded), then read back (the cached time is recorded). Every pruned model and
the dense one are timed side by side in interleaved rounds, 1 thread, CPU time of the calling
thread (robust to the load of a shared machine); achieved speed-up = dense / pruned.

    python -m benchmarks.latency_target [--models resnet50 ...] [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from benchmarks.common import side_by_side_latency, write_result
from benchmarks.tp_peer import default_recipe
from benchmarks.zoo import MODELS, Entry, export

SPEEDUPS = (1.5, 2.0)


def _efficientnet_lite0():
    import torch

    from models.torchvision_compat import import_torchvision

    import_torchvision()  # timm imports torchvision; its registrations are stubbed first
    import timm

    torch.manual_seed(0)
    model = timm.create_model("efficientnet_lite0", pretrained=False).eval()
    return model, (torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)),)


ENTRIES = {"resnet50": MODELS["resnet50"], "mobilenet_v3_large": MODELS["mobilenet_v3_large"],
           "efficientnet_lite0": Entry("timm EfficientNet-Lite0, 224 px", _efficientnet_lite0,
                                       lambda m: default_recipe(m, 1000))}


def _table_seconds(dense: Path) -> dict:
    """Seconds to build the latency table in an empty cache, then to read it back."""
    from spa.passes.latency import kernel_block
    from spa.passes.latency_profile import LatencyProfile
    from spa.pipeline.stages import analyse, load

    analysis = analyse(load(dense))
    seconds = {}
    for label in ("build", "cached"):
        table = LatencyProfile(reanalyse=analyse, block=kernel_block()).run(analysis)
        assert table.cached == (label == "cached")
        seconds[label] = table.seconds
    seconds["groups_timed"] = len(table.groups)
    seconds["noise"] = table.noise
    seconds["dense_ms"] = table.dense_ms
    return seconds


def _prune(dense: Path, out: Path, target: str, ratio: float) -> dict:
    from spa.api import CheckOptions, PruneOptions, prune
    from spa.choices import Target
    from spa.passes.latency import kernel_block

    options = PruneOptions(target=Target(target), ratio=ratio, round_to=kernel_block())
    t0 = time.perf_counter()
    report, plan = prune(dense, out, options, CheckOptions(validate=False, latency=False))
    return {"prune_seconds": time.perf_counter() - t0,
            "flops_reduction_x": report.flops_before / report.flops_after,
            "kept_widths": {g.name: len(g.keep) for g in plan.groups},
            **({"predicted_speedup_x": report.latency_target["dense_ms"]
                / report.latency_target["predicted_ms"]} if report.latency_target else {})}


def measure(key: str, workdir: Path, rounds: int) -> dict:
    entry = ENTRIES[key]
    model, inputs = entry.build()
    dense = export(entry, model, inputs, workdir / f"{key}.onnx")
    del model
    result: dict = {"model": entry.label, "latency_table_seconds": _table_seconds(dense)}
    paths = {"dense": dense}
    runs = {}
    for s in SPEEDUPS:
        for target in ("latency", "flops"):
            label = f"{target}_{s}x"
            paths[label] = workdir / f"{key}_{label}.onnx"
            runs[label] = _prune(dense, paths[label], target, 1 - 1 / s) | {"requested_x": s}
    lat = side_by_side_latency(paths, threads=1, rounds=rounds, clock=time.thread_time)
    for label, r in runs.items():
        r["latency_ms_dense"], r["latency_ms_pruned"] = lat["dense"], lat[label]
        r["achieved_speedup_x"] = lat["dense"] / lat[label]
        r["achieved_over_requested"] = r["achieved_speedup_x"] / r["requested_x"]
    result["runs"] = runs
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(ENTRIES), choices=list(ENTRIES))
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="spa-latency-"))
    os.environ["SPA_CACHE_DIR"] = str(workdir / "cache")  # a fresh table: its build is timed
    load_before = os.getloadavg()
    results = {}
    for key in args.models:
        results[key] = r = measure(key, workdir, args.rounds)
        t = r["latency_table_seconds"]
        print(f"{key}: table {t['build']:.1f}s (cached {t['cached']:.2f}s)", flush=True)
        for label, run in r["runs"].items():
            print(f"  {label}: achieved {run['achieved_speedup_x']:.2f}x "
                  f"(FLOPs ÷{run['flops_reduction_x']:.2f})", flush=True)
    body = {"speedups": SPEEDUPS, "threads": 1, "criterion": "l1", "round_to": "auto",
            "load_average_before": load_before, "load_average_after": os.getloadavg(),
            "results": results,
            "goal": "achieved speed-up within ±10% of the requested one (issue #15)"}
    path = write_result("latency_target", body)
    print(f"wrote {path} at {time.strftime('%H:%M:%S')}")


if __name__ == "__main__":
    main()
