"""all-MiniLM-L6-v2 in int4 (``MatMulNBits``), pruned with and without reconstruction.

    python -m benchmarks.quality.int4_minilm

The benchmark's sentence encoder (benchmarks/quality/real.py: the dynamo export, 1024
calibration lines of fortunes, 1000 evaluation sentences of other fortunes files) quantised
by onnxruntime's ``MatMulNBitsQuantizer`` (4 bits, blocks of 32, with zero points: every
projection of attention and MLP becomes a MatMulNBits), then pruned as the quality table's
MiniLM rows are (heads 0.3, MLP 0.3, ``--criterion obspa --hessian calibration``): heads and
MLP neurons go in whole quantisation blocks (32: one head, or 32 neurons), and OBSPA's update
is written as new codes on each layer's own scales. Each variant runs ``spa prune`` in its own
process:

* ``--no-reconstruct``: sensitivity allocation only;
* the default: reconstruction, each MatMulNBits refitted in float and rounded to new codes on
  its own scales (spa/passes/reconstruction.py).

Scored by the mean cosine of the embeddings with the int4 model's, and with the float model's,
on the evaluation sentences (never used to calibrate).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.common import write_result
from benchmarks.quality import real
from benchmarks.quality.quantized import prune_variants

WORK = real.CACHE / "minilm_int4"
FLAGS = ["--heads-ratio", "0.3", "--mlp-ratio", "0.3", "--ratio", "0.3", "--criterion", "obspa",
         "--hessian", "calibration"]


def int4(dense: Path) -> Path:
    """``dense`` quantised to 4 bits by onnxruntime (cached)."""
    out = WORK / "minilm_int4.onnx"
    if not out.exists():
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        WORK.mkdir(parents=True, exist_ok=True)
        quantizer = MatMulNBitsQuantizer(onnx.load(str(dense)), block_size=32,
                                         is_symmetric=False)
        quantizer.process()
        quantizer.model.save_model_to_file(str(out))
    return out


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    bench = real.minilm_bench()
    quantized = int4(bench.dense)
    texts = (real.CACHE / "minilm" / "eval_1000.txt").read_text(encoding="utf-8").splitlines()
    float_ref, int4_ref = real.embed(bench.dense, texts), real.embed(quantized, texts)

    def score(out: Path) -> dict:
        embedded = real.embed(out, texts)
        return {"cosine_int4": real.mean_cosine(int4_ref, embedded),
                "cosine_float": real.mean_cosine(float_ref, embedded)}

    rows = prune_variants(quantized, bench, FLAGS, WORK, score)
    write_result("int4_minilm", {
        "model": "all-MiniLM-L6-v2, MatMulNBits 4 bits, blocks of 32, zero points",
        "evaluation_sentences": len(texts),
        "int4_vs_float_cosine": real.mean_cosine(float_ref, int4_ref), "rows": rows})


if __name__ == "__main__":
    main()
