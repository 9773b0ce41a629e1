"""Synthetic calibration data as a stand-in for real data: OBSPA pruning calibrated on each.

For each source of calibration inputs, ``spa prune --criterion obspa --hessian calibration
--calib SOURCE.npz --no-reconstruct --allocation uniform`` and the pruned model's quality:

* ``synthetic``: ``--hessian synthetic`` (natural-image noise generated inside SPA, the
  current data-free default), no ``.npz``;
* ``noise``, ``classes``, ``activations``, ``activations-only`` (no class term):
  :func:`spa.torch.inversion.synthesize` with that method;
* ``real``: real inputs (digits: ``x_train[:256]`` and ``[:64]``; EfficientNet: the 40
  calibration views of benchmarks/quality/run.py).

Models: ``resnet_digits`` at ``--target flops --ratio 0.5`` (metric: test accuracy) and
``efficientnet_lite0`` at ``--ratio 0.1`` (channels) and ``--target flops --ratio 0.333``
(metric: top-1 agreement with the dense model on the 40 evaluation views). Diagnostics of each
synthetic set: the dense model's predictions on it (entropy of the class histogram, in bits,
and how many classes occur) and, per conv output, how far its per-channel mean and std are
from those on real data (median over layers of the channel-mean |log std ratio| and of
the correlation of the channel means).

    python -m benchmarks.quality.inversion [--models resnet_digits,efficientnet_lite0]
        [--methods noise,classes,activations,activations-only]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, command, write_result

MODELS = Path(__file__).parent / "models"
METHODS = ("noise", "classes", "activations", "activations-only")
RATIOS = {"resnet_digits": [("flops", 0.5)],
          "efficientnet_lite0": [("channels", 0.1), ("flops", 0.333)]}
SAMPLES = 64


def _data(name: str) -> tuple[dict[str, np.ndarray], np.ndarray, object]:
    """(real calibration sets, evaluation inputs, metric of a model path)."""
    from benchmarks.quality.evaluate import accuracy, predict_logits, top1_agreement

    if name == "resnet_digits":
        from benchmarks.quality.digits import load_digits_splits

        x_train, _, x_test, y_test = load_digits_splits(seed=0)
        return ({"real-256": x_train[:256], "real-64": x_train[:64]}, x_train[:256],
                lambda p: accuracy(p, x_test, y_test))
    from benchmarks.quality.effnet_lite0 import effnet_eval_set

    views = effnet_eval_set()
    calib = np.arange(len(views)) < len(views) // 2
    ref = predict_logits(MODELS / f"{name}.onnx", views[~calib])
    return ({"real-40": views[calib]}, views[calib],
            lambda p: top1_agreement(ref, predict_logits(p, views[~calib])))


def _synthesise(path: Path, method: str) -> tuple[np.ndarray, dict]:
    import torch

    from spa.torch.inversion import Weights, synthesize

    torch.set_num_threads(1)
    weights = Weights(classes=0.0) if method == "activations-only" else Weights()
    t0 = time.perf_counter()
    s = synthesize(path, SAMPLES, method=method.removesuffix("-only"), weights=weights)
    return s.arrays["input"], {"method": s.method, "detail": s.detail, "weights": asdict(weights),
                               "seconds": round(time.perf_counter() - t0, 1)}


def _prune(path: Path, out: Path, target: str, ratio: float, calib: Path | None
           ) -> tuple[str, float]:
    hessian = ["--hessian", "calibration", "--calib", str(calib)] if calib \
        else ["--hessian", "synthetic"]
    cmd = [sys.executable, "-m", "spa", "prune", str(path), "-o", str(out), "--criterion",
           "obspa", *hessian, "--target", target, "--ratio", str(ratio), "--no-reconstruct",
           "--allocation", "uniform", "-q"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return " ".join(cmd[1:]), time.perf_counter() - t0


def _predictions(path: Path, x: np.ndarray) -> dict:
    from benchmarks.quality.evaluate import predict_logits

    top = predict_logits(path, x).argmax(1)
    p = np.bincount(top) / len(top)
    p = p[p > 0]
    return {"classes_predicted": int(len(p)),
            "histogram_entropy_bits": float(-(p * np.log2(p)).sum())}


def _conv_stats(path: Path, x: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    import onnx
    import onnxruntime as ort

    from spa.torch.interpreter import with_outputs

    model = onnx.load(str(path))
    names = [n.output[0] for n in model.graph.node if n.op_type == "Conv"]
    sess = ort.InferenceSession(with_outputs(model, names).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    outs = [sess.run(names, {"input": x[i:i + 16]}) for i in range(0, len(x), 16)]
    stats = []
    for k in range(len(names)):
        a = np.concatenate([o[k] for o in outs]).astype(np.float64)
        stats.append((a.mean((0, 2, 3)), a.std((0, 2, 3))))
    return stats


def _versus_real(synth: list, real: list) -> dict:
    """How far each conv output's per-channel statistics are from real data's."""
    log_std = [float(np.mean(np.abs(np.log((s[1] + 1e-6) / (r[1] + 1e-6)))))
               for s, r in zip(synth, real)]
    corr = [float(np.corrcoef(s[0], r[0])[0, 1]) for s, r in zip(synth, real)]
    return {"median_abs_log_std_ratio": float(np.median(log_std)),
            "median_channel_mean_correlation": float(np.median(corr)),
            "per_layer_abs_log_std_ratio": [round(v, 3) for v in log_std]}


def run_model(name: str, workdir: Path, methods: tuple[str, ...] = METHODS) -> dict:
    path = MODELS / f"{name}.onnx"
    reals, real_x, metric = _data(name)
    sets: dict[str, Path | None] = {"synthetic": None}
    info: dict[str, dict] = {}
    real_stats = _conv_stats(path, real_x)
    for label, x in reals.items():
        sets[label] = workdir / f"{name}_{label}.npz"
        np.savez(sets[label], input=x)
        info[label] = _predictions(path, x) | _versus_real(_conv_stats(path, x), real_stats)
    for method in methods:
        x, meta = _synthesise(path, method)
        sets[method] = workdir / f"{name}_{method}.npz"
        np.savez(sets[method], input=x)
        info[method] = meta | _predictions(path, x) | _versus_real(_conv_stats(path, x),
                                                                    real_stats)
        print(f"{name} {method}: {info[method]}", flush=True)
    rows: dict[str, dict] = {"dense": {"metric": metric(path)}}
    for target, ratio in RATIOS[name]:
        key = f"{target}-{ratio}"
        for label, calib in sets.items():
            out = workdir / f"{name}_{label}_{key}.onnx"
            cmd, seconds = _prune(path, out, target, ratio, calib)
            rows.setdefault(label, {})[key] = {"metric": metric(out), "seconds": round(seconds, 1),
                                               "command": cmd}
            print(f"{name} {key} {label}: {rows[label][key]['metric']:.4f}", flush=True)
    return {"metric": "test accuracy" if name == "resnet_digits"
            else "top-1 agreement with the dense model", "samples": SAMPLES, "rows": rows,
            "sets": info}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet_digits,efficientnet_lite0")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="synthesize() methods compared (activations-only: no class term)")
    args = parser.parse_args()
    previous = RESULTS / "inversion.json"  # other models' rows are kept
    body = json.loads(previous.read_text()).get("models", {}) if previous.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            rows = run_model(name, Path(tmp), tuple(args.methods.split(",")))
            body[name] = rows | {"command": command()}
            print(write_result("inversion", {"models": body}))


if __name__ == "__main__":
    main()
