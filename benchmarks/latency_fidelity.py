"""Against Torch-Pruning at equal measured latency: EfficientNet-Lite0 with real weights.

SPA ``--target latency --ratio 1 − 1/s --round-to auto --calib C`` (L1; sensitivity allocation
and reconstruction, the defaults with ``--calib``; the calibration views of
``benchmarks.quality.real.effnet_bench``) for requested speed-ups ``s`` in :data:`SPEEDUPS`
(and, for the plot, ``--target flops`` and ``--allocation uniform`` at the same ratio), and
Torch-Pruning's L1 magnitude pruning of the same ``nn.Module`` (BatchNorm unfolded, classifier
ignored, one uniform ratio) at the channel ratios :data:`TP_RATIOS`. Every output and the dense
model are timed side by side (1 onnxruntime thread, CPU time of the calling thread, interleaved
rounds) and scored on the held-out photo views (top-1 agreement with the dense model). Torch-
Pruning's agreement at SPA's measured latency is interpolated linearly between its two points
nearest in latency.

    python -m benchmarks.latency_fidelity [--rounds 7]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import onnx_counts, side_by_side_latency, write_result

SPEEDUPS = (1.5,)
TP_RATIOS = (0.1, 0.2, 0.3, 0.4)
#: SPA's runs at each ratio (all with --calib): the latency target, the FLOPs target, and the
#: same channel ratio in every group.
VARIANTS = {"latency": ["--target", "latency"], "flops": ["--target", "flops"],
            "uniform": ["--allocation", "uniform"]}


def _torch_pruning(ratio: float, out: Path) -> Path:
    import torch

    from benchmarks import tp_peer
    from benchmarks.quality.effnet_lite0 import build_efficientnet_lite0
    from benchmarks.quality.torch_pruning_baseline import export

    model = build_efficientnet_lite0()
    example = torch.zeros(1, 3, 224, 224)
    tp_peer.prune(model, example, ratio, tp_peer.TPRecipe(ignored=[model.classifier]))
    return export(model.eval(), example, out)


def at_latency(points: list[tuple[float, float]], ms: float) -> float | None:
    """The fidelity of ``(latency ms, fidelity)`` points, linear in latency, at ``ms`` (None
    outside their range)."""
    xs, ys = zip(*sorted(points))
    if not xs[0] <= ms <= xs[-1]:
        return None
    return float(np.interp(ms, xs, ys))


def main() -> None:
    from benchmarks.quality.pipeline import spa_prune
    from benchmarks.quality.real import effnet_bench
    from spa.passes.latency import kernel_block

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="spa-latency-fidelity-"))
    bench = effnet_bench()
    calib = ["--calib", str(bench.calib), *bench.calib_flags]
    dense_flops = onnx_counts(bench.dense)["flops"]
    rows: dict[str, dict] = {}
    paths = {"dense": bench.dense}
    for s in SPEEDUPS:
        for kind, flags in VARIANTS.items():
            label = f"spa_{kind}_{s}x"
            rows[label] = spa_prune(bench, label, [
                *flags, "--ratio", f"{1 - 1 / s:.6f}", "--round-to", str(kernel_block()),
                *calib], workdir) | {"requested_x": s}
            paths[label] = Path(rows[label]["output"])
            print(label, rows[label].get(bench.key), flush=True)
    for r in TP_RATIOS:
        label = f"torch_pruning_{r}"
        paths[label] = _torch_pruning(r, workdir / f"{label}.onnx")
        flops = onnx_counts(paths[label])["flops"]
        rows[label] = {"ratio": r, "flops_reduction": dense_flops / flops,
                       **bench.metric(paths[label]), "output": str(paths[label])}
        print(label, rows[label][bench.key], flush=True)
    lat = side_by_side_latency(paths, threads=1, rounds=args.rounds, clock=time.thread_time)
    for label, row in rows.items():
        row["latency_ms"] = lat[label]
        row["speedup_x"] = lat["dense"] / lat[label]
    tp = [(row["latency_ms"], row[bench.key]) for label, row in rows.items()
          if label.startswith("torch_pruning")]
    for s in SPEEDUPS:
        row = rows[f"spa_latency_{s}x"]
        row["torch_pruning_at_same_latency"] = at_latency(tp, row["latency_ms"])
    body = {"model": "EfficientNet-Lite0 (timm, ImageNet weights), 224 px",
            "metric": bench.key, "threads": 1, "dense_latency_ms": lat["dense"],
            "notes": bench.notes, "results": rows}
    path = write_result("latency_fidelity", body)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
