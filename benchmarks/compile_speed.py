"""Compile speed and result speed of SPA on torchvision ResNet-50 (random init).

Times ``analyze`` (load + coupling analysis), the whole ``prune --ratio 0.5`` with L1 (load to
saved file, validation excluded) and the save alone, median of N runs; then measures onnxruntime
latency of the dense and pruned models side by side (1 thread and all threads) against the
FLOPs reduction, with and without ``--round-to 8``.

    python -m benchmarks.compile_speed [--runs 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks.common import median_seconds, side_by_side_latency, write_result


def export_resnet50(path: Path) -> Path:
    import torch

    from models.torchvision_compat import import_torchvision

    tv = import_torchvision()
    torch.manual_seed(0)
    model = tv.models.resnet50().eval()
    torch.onnx.export(model, (torch.randn(1, 3, 224, 224),), str(path), dynamo=False,
                      opset_version=17, input_names=["input"], output_names=["output"])
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    from spa.api import CheckOptions, PruneOptions, analyze, prune
    from spa.ir import load_model, save_model, to_onnx

    tmp = Path(tempfile.mkdtemp(prefix="spa-bench-"))
    dense = export_resnet50(tmp / "resnet50.onnx")
    no_checks = CheckOptions(validate=False, latency=False)

    t_analyze, _ = median_seconds(lambda: analyze(dense), args.runs)
    pruned = {}
    timings = {}
    for label, round_to in (("ratio0.5", 1), ("ratio0.5_round8", 8)):
        out = tmp / f"{label}.onnx"
        reports = []

        def run(out=out, round_to=round_to, reports=reports):
            reports.append(prune(dense, out, PruneOptions(ratio=0.5, round_to=round_to),
                                 no_checks)[0])

        t_prune, all_runs = median_seconds(run, args.runs)
        pruned[label] = (out, reports[-1])
        timings[label] = {"prune_seconds_median": t_prune, "prune_seconds_all": all_runs,
                          "breakdown_last_run": reports[-1].seconds}
    loaded = load_model(pruned["ratio0.5"][0])
    model = to_onnx(loaded)
    t_save, _ = median_seconds(lambda: save_model(model, tmp / "resave.onnx"), args.runs)

    paths = {"dense": dense, **{k: v[0] for k, v in pruned.items()}}
    latency = {f"threads{n}": side_by_side_latency(paths, threads=n) for n in (1, 2)}
    results = {}
    for label, (_, rep) in pruned.items():
        flops_x = rep.flops_before / rep.flops_after
        entry = {"params_before": rep.params_before, "params_after": rep.params_after,
                 "flops_before": rep.flops_before, "flops_after": rep.flops_after,
                 "flops_reduction_x": flops_x, "bytes_before": rep.bytes_before,
                 "bytes_after": rep.bytes_after}
        for key, lat in latency.items():
            speedup = lat["dense"] / lat[label]
            entry[key] = {"latency_ms_dense": lat["dense"], "latency_ms_pruned": lat[label],
                          "speedup_x": speedup, "speedup_over_flops_reduction": speedup / flops_x}
        results[label] = entry | timings[label]
    body = {"model": "torchvision resnet50 (random init), TorchScript exporter opset 17",
            "runs": args.runs, "analyze_seconds_median": t_analyze, "save_seconds_median": t_save,
            "results": results,
            "targets": {"prune_seconds": 3.0, "speedup_over_flops_reduction": 0.8}}
    path = write_result("compile_speed_resnet50", body)
    print(f"analyze {t_analyze:.2f}s  save {t_save:.2f}s")
    for label, r in results.items():
        print(f"{label}: prune {r['prune_seconds_median']:.2f}s"
              f"  FLOPs ÷{r['flops_reduction_x']:.2f}"
              f"  speed-up 1 thread ×{r['threads1']['speedup_x']:.2f}"
              f"  2 threads ×{r['threads2']['speedup_x']:.2f}")
    print(f"wrote {path} at {time.strftime('%H:%M:%S')}")


if __name__ == "__main__":
    main()
