"""Against Torch-Pruning at equal measured latency: EfficientNet-Lite0 and MiniLM, real weights.

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

all-MiniLM-L6-v2 (``--model minilm``, real weights, written to ``latency_fidelity_minilm.json``)
the same way: SPA's runs with the quality pipeline's fortune calibration sentences, and
Torch-Pruning's magnitude pruning of whole heads and MLP neurons, hidden size kept
(:mod:`benchmarks.quality.tp_minilm`), at the ratios :data:`MINILM_TP_RATIOS`; scored by the
cosine of sentence embeddings with the dense model's on the evaluation sentences, and timed on
one sequence of :data:`MINILM_TOKENS` tokens.

``--criterion obspa`` runs SPA with ``--criterion obspa --hessian calibration`` (its best
post-training setting: OBSPA's compensation, and the sensitivity measured on the compensated
model) and writes ``<result>_obspa.json``; ``--variants`` picks SPA's runs.

    python -m benchmarks.latency_fidelity [--model effnet|minilm] [--rounds 7]
        [--criterion l1|obspa] [--variants latency,flops,uniform]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.common import onnx_counts, side_by_side_latency, write_result
from benchmarks.quality.real import Bench, effnet_bench, minilm_bench

SPEEDUPS = (1.5, 2.0)
TP_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5)
MINILM_TP_RATIOS = (0.2, 0.35, 0.5, 0.6, 0.7, 0.8)
MINILM_TOKENS = 128  # timed on one sequence of this many tokens (the calibration's max length)
#: SPA's runs at each ratio (all with --calib): the latency target, the FLOPs target, and the
#: same channel ratio in every group.
VARIANTS = {"latency": ["--target", "latency"], "flops": ["--target", "flops"],
            "uniform": ["--allocation", "uniform"]}
#: SPA's criterion flags, by ``--criterion``.
CRITERIA = {"l1": [], "obspa": ["--criterion", "obspa", "--hessian", "calibration"]}


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


def _effnet_tp(workdir: Path) -> Iterator[tuple[str, Path, dict]]:
    """Torch-Pruning's EfficientNet-Lite0 outputs: exact counts, then rounded to the block."""
    from spa.passes.latency import kernel_block

    for r, round_to in [(r, b) for b in (None, kernel_block()) for r in TP_RATIOS]:
        label = f"tp_rounded_{r}" if round_to else f"torch_pruning_{r}"
        yield label, _torch_pruning(r, workdir / f"{label}.onnx", round_to), {
            "ratio": r, "round_to": round_to}


def _minilm_tp(workdir: Path) -> Iterator[tuple[str, Path, dict]]:
    """Torch-Pruning's MiniLM outputs: a share of the heads and MLP neurons of every layer."""
    from benchmarks.quality.tp_minilm import prune_minilm

    for r in MINILM_TP_RATIOS:
        label = f"torch_pruning_{r}"
        yield label, prune_minilm(r, workdir / f"{label}.onnx"), {"ratio": r}


@dataclass(frozen=True)
class Model:
    """One benchmarked model: its quality bench, what it is called, SPA's extra flags, its
    Torch-Pruning outputs, the dims it is timed at and where the result goes."""

    bench: Callable[[], Bench]
    title: str
    flags: tuple[str, ...]
    torch_pruning: Callable[[Path], Iterator[tuple[str, Path, dict]]]
    dims: dict[str, int]
    result: str


MODELS = {
    "effnet": Model(effnet_bench, "EfficientNet-Lite0 (timm, ImageNet weights), 224 px", (),
                    _effnet_tp, {}, "latency_fidelity"),
    "minilm": Model(minilm_bench, f"all-MiniLM-L6-v2 (sentence embeddings), 1 x "
                    f"{MINILM_TOKENS} tokens",
                    ("--input-dim", "batch=1", "--input-dim", f"sequence={MINILM_TOKENS}"),
                    _minilm_tp, {"batch": 1, "sequence": MINILM_TOKENS},
                    "latency_fidelity_minilm"),
}


def main() -> None:
    from benchmarks.quality.pipeline import spa_prune

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="effnet")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--criterion", choices=sorted(CRITERIA), default="l1")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="SPA's runs, of: " + ", ".join(VARIANTS))
    args = parser.parse_args()
    model = MODELS[args.model]
    variants = {k: VARIANTS[k] for k in args.variants.split(",")}
    workdir = Path(tempfile.mkdtemp(prefix="spa-latency-fidelity-"))
    bench = model.bench()
    common = ["--calib", str(bench.calib), *bench.calib_flags, *model.flags,
              *CRITERIA[args.criterion]]  # every SPA run's flags
    dense_flops = onnx_counts(bench.dense)["flops"]
    rows: dict[str, dict] = {}
    paths = {"dense": bench.dense}
    for s in SPEEDUPS:
        for kind, flags in variants.items():
            label = f"spa_{kind}_{s}x"
            rows[label] = spa_prune(bench, label, [
                *flags, "--ratio", f"{1 - 1 / s:.6f}",
                *common], workdir) | {"requested_x": s}
            if rows[label]["exit_code"] == 0:
                paths[label] = Path(rows[label]["output"])
            print(label, rows[label].get(bench.key), flush=True)
    for label, path, about in model.torch_pruning(workdir):
        paths[label] = path
        flops = onnx_counts(path)["flops"]
        rows[label] = {**about, "flops_reduction": dense_flops / flops, **bench.metric(path),
                       "output": str(path)}
        print(label, rows[label][bench.key], flush=True)
    lat = side_by_side_latency(paths, threads=1, rounds=args.rounds, clock=time.thread_time,
                               dims=model.dims)
    for label, row in rows.items():
        if label in lat:
            row["latency_ms"] = lat[label]
            row["speedup_x"] = lat["dense"] / lat[label]
    series = [[(row["latency_ms"], row[bench.key]) for label, row in rows.items()
               if label.startswith(prefix) and "latency_ms" in row]
              for prefix in ("torch_pruning_", "tp_rounded_")]
    for s in SPEEDUPS:
        for kind in variants:
            row = rows[f"spa_{kind}_{s}x"]
            if "latency_ms" not in row:
                continue
            found = [v for tp in series if tp
                     and (v := at_latency(tp, row["latency_ms"])) is not None]
            row["torch_pruning_at_same_latency"] = max(found, default=None)
    body = {"model": model.title, "metric": bench.key, "threads": 1,
            "dims": model.dims, "dense_latency_ms": lat["dense"], "notes": bench.notes,
            "criterion": args.criterion, "results": rows}
    suffix = "" if args.criterion == "l1" else f"_{args.criterion}"
    path = write_result(model.result + suffix, body)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
