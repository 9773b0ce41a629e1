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
nearest in latency. Torch-Pruning runs twice per ratio: as it comes (exact counts, which make
this network slower than dense on onnxruntime's blocked kernels), and with its ``round_to``
set to the kernel block (``tp_rounded_*``), so that it has points at SPA's latencies; its
fidelity at a latency is the better of the two series there.

    python -m benchmarks.latency_fidelity [--rounds 7]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import onnx_counts, side_by_side_latency, write_result

SPEEDUPS = (1.5, 2.0)
TP_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5)
#: SPA's runs at each ratio (all with --calib): the latency target, the FLOPs target, and the
#: same channel ratio in every group.
VARIANTS = {"latency": ["--target", "latency"], "flops": ["--target", "flops"],
            "uniform": ["--allocation", "uniform"]}


def _torch_pruning(ratio: float, out: Path, round_to: int | None = None) -> Path:
    import torch

    from benchmarks import tp_peer
    from benchmarks.quality.effnet_lite0 import build_efficientnet_lite0
    from benchmarks.quality.torch_pruning_baseline import export

    model = build_efficientnet_lite0()
    example = torch.zeros(1, 3, 224, 224)
    tp_peer.prune(model, example, ratio, tp_peer.TPRecipe(ignored=[model.classifier],
                                                          round_to=round_to))
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
                *flags, "--ratio", f"{1 - 1 / s:.6f}",
                *calib], workdir) | {"requested_x": s}
            paths[label] = Path(rows[label]["output"])
            print(label, rows[label].get(bench.key), flush=True)
    for r, round_to in [(r, b) for b in (None, kernel_block()) for r in TP_RATIOS]:
        label = f"tp_rounded_{r}" if round_to else f"torch_pruning_{r}"
        paths[label] = _torch_pruning(r, workdir / f"{label}.onnx", round_to)
        flops = onnx_counts(paths[label])["flops"]
        rows[label] = {"ratio": r, "round_to": round_to, "flops_reduction": dense_flops / flops,
                       **bench.metric(paths[label]), "output": str(paths[label])}
        print(label, rows[label][bench.key], flush=True)
    lat = side_by_side_latency(paths, threads=1, rounds=args.rounds, clock=time.thread_time)
    for label, row in rows.items():
        row["latency_ms"] = lat[label]
        row["speedup_x"] = lat["dense"] / lat[label]
    series = [[(row["latency_ms"], row[bench.key]) for label, row in rows.items()
               if label.startswith(prefix)] for prefix in ("torch_pruning_", "tp_rounded_")]
    for s in SPEEDUPS:
        for kind in VARIANTS:
            row = rows[f"spa_{kind}_{s}x"]
            found = [v for tp in series if (v := at_latency(tp, row["latency_ms"])) is not None]
            row["torch_pruning_at_same_latency"] = max(found, default=None)
    body = {"model": "EfficientNet-Lite0 (timm, ImageNet weights), 224 px",
            "metric": bench.key, "threads": 1, "dense_latency_ms": lat["dense"],
            "notes": bench.notes, "results": rows}
    path = write_result("latency_fidelity", body)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
