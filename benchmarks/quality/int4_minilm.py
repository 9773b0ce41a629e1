"""all-MiniLM-L6-v2 in int4 (``MatMulNBits``), pruned with and without reconstruction.

    python -m benchmarks.quality.int4_minilm

The benchmark's sentence encoder (benchmarks/quality/real.py: the dynamo export, 1024
calibration lines of fortunes, 1000 evaluation sentences of other fortunes files) quantised
by onnxruntime's ``MatMulNBitsQuantizer`` (4 bits, blocks of 32, with zero points: every
projection of attention and MLP becomes a MatMulNBits; and, as a second form of the same
weights, each MatMul after a blocked uint4 DequantizeLinear, ``QuantFormat.QDQ``), then pruned
as the quality table's MiniLM rows are (heads 0.3, MLP 0.3, ``--criterion obspa --hessian
calibration``): heads and MLP neurons go in whole quantisation blocks (32: one head, or 32
neurons), and OBSPA's update is written as new codes on each layer's own scales. Each variant
runs ``spa prune`` in its own process:

* ``--no-reconstruct``: sensitivity allocation only;
* the default: reconstruction, each MatMulNBits refitted in float with its bias and rounded to
  codes on scales fitted to the refit, each blocked DequantizeLinear's weight likewise
  (spa/passes/reconstruction.py).

Scored by the mean cosine of the embeddings with the int4 model's (of the same form), and with
the float model's, on the evaluation sentences (never used to calibrate).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.common import write_result
from benchmarks.quality import real
from benchmarks.quality.quantized import prune_variants

WORK = real.CACHE / "minilm_int4"
#: The quantiser's two forms of the same weights, and their names in the table.
FORMS = {"nbits": "MatMulNBits", "qdq": "QDQ (blocked DequantizeLinear)"}
FLAGS = ["--heads-ratio", "0.3", "--mlp-ratio", "0.3", "--ratio", "0.3", "--criterion", "obspa",
         "--hessian", "calibration"]


def int4(dense: Path, form: str = "nbits") -> Path:
    """``dense`` quantised to 4 bits by onnxruntime (cached): ``nbits``, MatMulNBits; ``qdq``,
    the same weights in QDQ form (a blocked uint4 DequantizeLinear before each MatMul)."""
    out = WORK / ("minilm_int4.onnx" if form == "nbits" else f"minilm_int4_{form}.onnx")
    if not out.exists():
        import onnx
        from onnxruntime.quantization import QuantFormat
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            MatMulNBitsQuantizer,
        )

        WORK.mkdir(parents=True, exist_ok=True)
        config = DefaultWeightOnlyQuantConfig(
            block_size=32, is_symmetric=False,
            quant_format=QuantFormat.QDQ if form == "qdq" else QuantFormat.QOperator)
        quantizer = MatMulNBitsQuantizer(onnx.load(str(dense)), block_size=32,
                                         is_symmetric=False, algo_config=config)
        quantizer.process()
        quantizer.model.save_model_to_file(str(out))
    return out


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    bench, texts, float_ref = real.minilm_evaluation()
    rows, to_float = [], {}
    for form in FORMS:
        quantized = int4(bench.dense, form)
        int4_ref = real.embed(quantized, texts)
        to_float[form] = real.mean_cosine(float_ref, int4_ref)

        def score(out: Path, int4_ref=int4_ref) -> dict:
            embedded = real.embed(out, texts)
            return {"cosine_int4": real.mean_cosine(int4_ref, embedded),
                    "cosine_float": real.mean_cosine(float_ref, embedded)}

        workdir = WORK if form == "nbits" else WORK / form
        workdir.mkdir(parents=True, exist_ok=True)
        for row in prune_variants(quantized, bench, FLAGS, workdir, score):
            rows.append({**row, "variant": f"{FORMS[form]}: {row['variant']}", "form": form})
    write_result("int4_minilm", {
        "model": "all-MiniLM-L6-v2, 4 bits, blocks of 32, zero points, by onnxruntime's "
                 "MatMulNBitsQuantizer",
        "evaluation_sentences": len(texts),
        "int4_vs_float_cosine": to_float, "rows": rows})


if __name__ == "__main__":
    main()
