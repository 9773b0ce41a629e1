"""A transformers.js-style folder: all-MiniLM-L6-v2 and its dynamically quantised int8 copy.

    python -m benchmarks.quality.q8_copy

The benchmark's sentence encoder (benchmarks/quality/real.py: the dynamo export, 1024
calibration lines of fortunes, 1000 evaluation sentences of other fortunes files) beside
``model_quantized.onnx`` — the file transformers.js's WASM backend loads by default — made
from it in two ways (``QUANTISERS``): as transformers.js's scripts/quantize.py makes its q8
file for a model without Conv (onnxruntime's ``ONNXQuantizer``, int8 weights per tensor), and
by ``quantize_dynamic`` with uint8 weights per channel in a reduced range. Each folder pruned
at heads 0.3 + MLP 0.3 with the calibration lines, ``spa prune FOLDER/`` in its own process,
with the default criterion and with ``--criterion obspa``. Before the copy was made again
from the pruned plain file (spa/pipeline/requantize.py), it was copied unpruned: the
``input`` rows are those files.

Scored by the mean cosine of the embeddings with the dense float32 model's on the evaluation
sentences (never used to calibrate), and timed side by side in one run (interleaved rounds,
one onnxruntime thread, its thread's CPU time; a batch of 8 random 128-token inputs): the
dense float model, the input copies, each pruned copy and each pruned plain file.
"""

from __future__ import annotations

import argparse
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from benchmarks.common import side_by_side_latency, write_result
from benchmarks.quality import real
from benchmarks.quality.fp16_copy import CRITERIA, folder_row
from spa.pipeline.requantize import Settings, quantize

WORK = real.CACHE / "minilm_q8"
QUANTISERS = {"transformers.js q8": Settings("QInt8", False, False, "transformers.js"),
              "quantize_dynamic uint8": Settings("QUInt8", True, True)}
DIMS = {"batch": 8, "sequence": 128}


def folder(dense: Path, name: str) -> Path:
    """The folder of ``dense`` as ``model.onnx`` and its copy quantised as ``name`` says
    (cached)."""
    out = WORK / name.replace(" ", "_") / "folder"
    if not (out / "model_quantized.onnx").exists():
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(dense, out / "model.onnx")
        quantize(out / "model.onnx", out / "model_quantized.onnx", QUANTISERS[name])
    return out


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    evaluation = real.minilm_evaluation()
    bench, texts, float_ref = evaluation
    rows = []
    timed = {"dense model.onnx": bench.dense}
    for name in QUANTISERS:
        src = folder(bench.dense, name)
        rows.append({"quantiser": name, "criterion": "", "run": "input", "exit": 0,
                     "seconds": 0.0, "error": "",
                     "cosine_model_quantized.onnx": real.mean_cosine(
                         float_ref, real.embed(src / "model_quantized.onnx", texts))})
        timed[f"{name} input model_quantized.onnx"] = src / "model_quantized.onnx"
        for criterion in CRITERIA:
            row, out = folder_row(evaluation, src, criterion, "model_quantized.onnx")
            if row["exit"] == 0:
                timed |= {f"{name} {criterion} {n}": out / n
                          for n in ("model_quantized.onnx", "model.onnx")}
            rows.append({"quantiser": name} | row)
            print(rows[-1], flush=True)
    t0 = time.perf_counter()
    latency = side_by_side_latency(timed, threads=1, clock=time.thread_time, dims=DIMS)
    print(latency, flush=True)
    write_result("q8_copy", {
        "model": "all-MiniLM-L6-v2 and its dynamically quantised copy",
        "quantisers": {k: asdict(v) for k, v in QUANTISERS.items()},
        "evaluation_sentences": len(texts), "rows": rows,
        "latency_ms": latency, "latency_dims": DIMS,
        "latency_seconds": round(time.perf_counter() - t0, 1)})


if __name__ == "__main__":
    main()
