"""EfficientNet-Lite0 in int8 (QDQ), pruned with and without reconstruction.

    python -m benchmarks.quality.int8_effnet

The quality table's EfficientNet-Lite0 (ImageNet weights) quantised by onnxruntime's
``quantize_static`` in QDQ form (int8 weights per channel, uint8 activations), calibrated on 64
views of the benchmark's calibration photos; then pruned as the table's ``post-obspa`` row is
(a 1.5x FLOPs cut, ``--criterion obspa --hessian calibration``, the calibration views). The
weights are pruned in their int8 tensors with their scales, and OBSPA's update is written as new
codes on each weight's own scales. Each variant runs ``spa prune`` in its own process:

* ``--no-reconstruct``: sensitivity allocation only;
* the default: reconstruction, each Conv's int8 weight and int32 bias refitted through its
  DequantizeLinear and rounded to new codes on its own scales (spa/passes/reconstruction.py).

Scored by top-1 agreement with the int8 model, and with the float model, on the views of the 15
evaluation photos (never used to quantise, calibrate or refit).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from benchmarks.common import write_result
from benchmarks.quality import real
from benchmarks.quality.evaluate import predict_logits, top1_agreement
from benchmarks.quality.quantized import prune_variants

WORK = real.CACHE / "effnet_int8"
FLAGS = ["--target", "flops", "--ratio", "0.333333", "--criterion", "obspa", "--hessian",
         "calibration"]
QUANTIZATION_VIEWS = 64


def int8(dense: Path, calib: Path) -> Path:
    """``dense`` quantised by ``quantize_static`` (QDQ) on views of ``calib`` (cached)."""
    out = WORK / "efficientnet_lite0_int8.onnx"
    if out.exists():
        return out
    import onnx
    import onnxruntime.quantization as ort_q

    WORK.mkdir(parents=True, exist_ok=True)
    name = onnx.load(str(dense), load_external_data=False).graph.input[0].name
    views = sorted(calib.glob("*.png"))
    pick = np.sort(np.random.default_rng(0).permutation(len(views))[:QUANTIZATION_VIEWS])
    batches = [{name: real.imagenet_view(views[i], real.EFFNET_MEAN, real.EFFNET_STD)[None]}
               for i in pick]

    class Reader(ort_q.CalibrationDataReader):
        def get_next(self):
            return batches.pop() if batches else None

    logging.getLogger().setLevel(logging.ERROR)  # quantize_static warns about pre-processing
    ort_q.quantize_static(str(dense), str(out), Reader(), quant_format=ort_q.QuantFormat.QDQ,
                          per_channel=True, weight_type=ort_q.QuantType.QInt8,
                          activation_type=ort_q.QuantType.QUInt8)
    return out


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    bench = real.effnet_bench()
    quantized = int8(bench.dense, bench.calib)
    views = sorted((real.CACHE / "effnet" / "eval_views_0").glob("*.png")) + sorted(
        (real.CACHE / "effnet" / "eval_views_wide_0").glob("*.png"))
    x = np.stack([real.imagenet_view(p, real.EFFNET_MEAN, real.EFFNET_STD) for p in views])
    float_ref = predict_logits(bench.dense, x, batch_size=32)
    int8_ref = predict_logits(quantized, x, batch_size=32)

    def score(out: Path) -> dict:
        logits = predict_logits(out, x, batch_size=32)
        return {"top1_int8": top1_agreement(int8_ref, logits),
                "top1_float": top1_agreement(float_ref, logits)}

    rows = prune_variants(quantized, bench, FLAGS, WORK, score)
    write_result("int8_effnet", {
        "model": "EfficientNet-Lite0, quantize_static QDQ: int8 weights per channel, uint8 "
                 f"activations, {QUANTIZATION_VIEWS} calibration views",
        "evaluation_views": len(x),
        "int8_vs_float_top1": top1_agreement(float_ref, int8_ref), "rows": rows})


if __name__ == "__main__":
    main()
