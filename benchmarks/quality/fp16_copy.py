"""A transformers.js-style folder: all-MiniLM-L6-v2 and its float16 copy, pruned together.

    python -m benchmarks.quality.fp16_copy

The benchmark's sentence encoder (benchmarks/quality/real.py: the dynamo export, 1024
calibration lines of fortunes, 1000 evaluation sentences of other fortunes files) beside
``model_fp16.onnx``, made from it by onnxruntime's ``convert_float_to_float16`` with float
inputs and outputs (as transformers.js folders hold it). Pruned at heads 0.3 + MLP 0.3 with the
calibration lines, each run ``spa`` in its own process:

* ``folder``: ``spa prune FOLDER/``: the copy follows ``model.onnx`` and takes its written
  values, cast (spa/pipeline/variants.py);
* ``fp16 alone``: ``spa prune model_fp16.onnx``, the float16 file pruned on its own: its own
  calibration and plan (refitted in float16 since edb2075; at d38c9a3 it was not refitted,
  0.8187, and failed with ``--criterion obspa``).

Each with the default criterion and with ``--criterion obspa``. Scored by the mean cosine of
the embeddings with the dense float32 model's on the evaluation sentences (never used to
calibrate).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import write_result
from benchmarks.quality import real

WORK = real.CACHE / "minilm_fp16"
FLAGS = ["--heads-ratio", "0.3", "--mlp-ratio", "0.3", "--ratio", "0.3"]
CRITERIA = {"default": [], "obspa": ["--criterion", "obspa"]}


def folder(dense: Path) -> Path:
    """The folder of ``dense`` as ``model.onnx`` and its float16 copy (cached)."""
    out = WORK / "folder"
    if not (out / "model_fp16.onnx").exists():
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(dense, out / "model.onnx")
        copy = convert_float_to_float16(onnx.load(str(dense)), keep_io_types=True)
        onnx.save(copy, str(out / "model_fp16.onnx"))
    return out


def _run(argv: list[str]) -> tuple[int, float, str]:
    t0 = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    error = done.stderr.strip().splitlines()[-1] if done.returncode else ""
    return done.returncode, round(time.perf_counter() - t0, 1), error


def folder_row(evaluation: tuple[real.Bench, list[str], np.ndarray], src: Path,
               criterion: str, copy: str) -> tuple[dict, Path]:
    """``spa prune src/`` (the MiniLM folder holding ``model.onnx`` and ``copy``) with the
    calibration lines and ``CRITERIA[criterion]``, into ``src``'s sibling
    ``folder_{criterion}``: the row (exit, seconds, both files' cosines, what the report says
    the copy took or why it was copied) and the output folder."""
    bench, texts, float_ref = evaluation
    flags = ["--calib", str(bench.calib), *bench.calib_flags, *FLAGS, *CRITERIA[criterion]]
    out = src.parent / f"folder_{criterion}"
    report = out.with_suffix(".json")
    shutil.rmtree(out, ignore_errors=True)
    code, seconds, error = _run([sys.executable, "-m", "spa", "prune", str(src), "-o",
                                 str(out), *flags, "--report", str(report), "-q"])
    row: dict = {"criterion": criterion, "run": "folder", "exit": code, "seconds": seconds,
                 "error": error}
    if code == 0:
        body = json.loads(report.read_text())
        row |= {f"cosine_{n}": real.mean_cosine(float_ref, real.embed(out / n, texts))
                for n in ("model.onnx", copy)}
        row["taken"] = body["refits_taken"].get(copy)
        row["skipped"] = body["skipped"].get(copy)
    return row, out


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    evaluation = real.minilm_evaluation()
    bench, texts, float_ref = evaluation
    src = folder(bench.dense)
    rows = []
    for criterion, extra in CRITERIA.items():
        flags = ["--calib", str(bench.calib), *bench.calib_flags, *FLAGS, *extra]
        rows.append(folder_row(evaluation, src, criterion, "model_fp16.onnx")[0])
        alone = WORK / f"alone_{criterion}.onnx"
        code, seconds, error = _run([sys.executable, "-m", "spa", "prune",
                                     str(src / "model_fp16.onnx"), "-o", str(alone), *flags,
                                     "-q"])
        row = {"criterion": criterion, "run": "fp16 alone", "exit": code, "seconds": seconds,
               "error": error}
        if code == 0:
            row["cosine_model_fp16.onnx"] = real.mean_cosine(float_ref, real.embed(alone, texts))
        rows.append(row)
        print(rows[-2:], flush=True)
    write_result("fp16_copy", {
        "model": "all-MiniLM-L6-v2 and its float16 copy (onnxruntime's convert_float_to_float16, "
                 "float inputs and outputs)",
        "evaluation_sentences": len(texts),
        "fp16_vs_float_cosine": real.mean_cosine(
            float_ref, real.embed(src / "model_fp16.onnx", texts)),
        "rows": rows})


if __name__ == "__main__":
    main()
