"""A transformers.js-style folder: all-MiniLM-L6-v2 and its ``quantize_dynamic`` int8 copy.

    python -m benchmarks.quality.q8_copy

The benchmark's sentence encoder (benchmarks/quality/real.py: the dynamo export, 1024
calibration lines of fortunes, 1000 evaluation sentences of other fortunes files) beside
``model_quantized.onnx``, made from it by onnxruntime's ``quantize_dynamic`` (uint8 weights,
per channel, reduced range: ``SETTINGS``) — the file transformers.js's WASM backend loads by
default. Pruned at heads 0.3 + MLP 0.3 with the calibration lines, ``spa prune FOLDER/`` in its
own process, with the default criterion and with ``--criterion obspa``. Before the copy was
made again from the pruned plain file (spa/pipeline/requantize.py), it was copied unpruned:
the ``input`` row is that file.

Scored by the mean cosine of the embeddings with the dense float32 model's on the evaluation
sentences (never used to calibrate), and timed side by side in one run (interleaved rounds,
one onnxruntime thread, its thread's CPU time; a batch of 8 random 128-token inputs): the
input copy, each pruned copy and each pruned plain file.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from benchmarks.common import side_by_side_latency, write_result
from benchmarks.quality import real
from benchmarks.quality.fp16_copy import CRITERIA, folder_row

WORK = real.CACHE / "minilm_q8"
SETTINGS = {"per_channel": True, "reduce_range": True, "weight_type": "QUInt8"}
DIMS = {"batch": 8, "sequence": 128}


def folder(dense: Path) -> Path:
    """The folder of ``dense`` as ``model.onnx`` and its ``quantize_dynamic`` copy (cached)."""
    out = WORK / "folder"
    if not (out / "model_quantized.onnx").exists():
        from onnxruntime.quantization import QuantType, quantize_dynamic

        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(dense, out / "model.onnx")
        quantize_dynamic(out / "model.onnx", out / "model_quantized.onnx",
                         per_channel=SETTINGS["per_channel"],
                         reduce_range=SETTINGS["reduce_range"],
                         weight_type=getattr(QuantType, SETTINGS["weight_type"]))
    return out


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    evaluation = real.minilm_evaluation()
    bench, texts, float_ref = evaluation
    src = folder(bench.dense)
    rows = [{"criterion": "", "run": "input", "exit": 0, "seconds": 0.0, "error": "",
             "cosine_model_quantized.onnx": real.mean_cosine(
                 float_ref, real.embed(src / "model_quantized.onnx", texts))}]
    timed = {"input model_quantized.onnx": src / "model_quantized.onnx"}
    for criterion in CRITERIA:
        row, out = folder_row(evaluation, src, criterion, "model_quantized.onnx")
        if row["exit"] == 0:
            timed |= {f"{criterion} {n}": out / n for n in ("model_quantized.onnx", "model.onnx")}
        rows.append(row)
        print(rows[-1], flush=True)
    t0 = time.perf_counter()
    latency = side_by_side_latency(timed, threads=1, clock=time.thread_time, dims=DIMS)
    print(latency, flush=True)
    write_result("q8_copy", {
        "model": "all-MiniLM-L6-v2 and its quantize_dynamic copy "
                 f"({', '.join(f'{k}={v}' for k, v in SETTINGS.items())})",
        "evaluation_sentences": len(texts), "rows": rows,
        "latency_ms": latency, "latency_dims": DIMS,
        "latency_seconds": round(time.perf_counter() - t0, 1)})


if __name__ == "__main__":
    main()
