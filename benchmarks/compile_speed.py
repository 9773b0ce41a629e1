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

from benchmarks.common import benchmark_prune, median_seconds, print_results, write_result


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

    from spa.api import PruneOptions, analyze
    from spa.ir import load_model, save_model, to_onnx

    tmp = Path(tempfile.mkdtemp(prefix="spa-bench-"))
    dense = export_resnet50(tmp / "resnet50.onnx")
    t_analyze, _ = median_seconds(lambda: analyze(dense), args.runs)
    variants = {"ratio0.5": PruneOptions(ratio=0.5),
                "ratio0.5_round8": PruneOptions(ratio=0.5, round_to=8)}
    results = benchmark_prune(dense, variants, args.runs, tmp)
    model = to_onnx(load_model(tmp / "ratio0.5.onnx"))
    t_save, _ = median_seconds(lambda: save_model(model, tmp / "resave.onnx"), args.runs)
    body = {"model": "torchvision resnet50 (random init), TorchScript exporter opset 17",
            "runs": args.runs, "analyze_seconds_median": t_analyze, "save_seconds_median": t_save,
            "results": results,
            "targets": {"prune_seconds": 3.0, "speedup_over_flops_reduction": 0.8}}
    path = write_result("compile_speed_resnet50", body)
    print(f"analyze {t_analyze:.2f}s  save {t_save:.2f}s")
    print_results(results)
    print(f"wrote {path} at {time.strftime('%H:%M:%S')}")


if __name__ == "__main__":
    main()
