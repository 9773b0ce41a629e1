"""all-MiniLM-L6-v2 with int8 weights dequantised by plain ops, pruned with and without
reconstruction.

    python -m benchmarks.quality.int8_chain_minilm

The benchmark's sentence encoder (benchmarks/quality/real.py: the dynamo export, 1024
calibration lines of fortunes, 1000 evaluation sentences of other fortunes files) with every
MatMul weight stored as int8 and dequantised by ``Cast → Mul`` (one scale per output column,
symmetric), the form shipped int8 encoders use when they keep weights integer without
``DequantizeLinear`` (spa/ir/quant_chain.py). Pruned as the quality table's MiniLM rows are
(heads 0.3, MLP 0.3, ``--criterion obspa --hessian calibration``); OBSPA's update and
reconstruction's refit are written as new int8 codes on each weight's own scales. Each variant
runs ``spa prune`` in its own process (benchmarks/quality/quantized.py). Scored by the mean
cosine of the embeddings with the int8 model's, and with the float model's, on the evaluation
sentences (never used to calibrate).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import helper, numpy_helper, version_converter

from benchmarks.common import write_result
from benchmarks.quality import real
from benchmarks.quality.int4_minilm import FLAGS
from benchmarks.quality.quantized import prune_variants

WORK = real.CACHE / "minilm_int8_chain"


def int8_chains(model: onnx.ModelProto, dtype=np.int8) -> onnx.ModelProto:
    """``model`` with each 2-D float MatMul weight ``w [K, N]`` stored as int8 (or ``dtype``)
    and dequantised by ``Cast → Mul(scale [1, N])``, one scale per output column (symmetric).
    A 4-bit ``dtype`` needs opset 21: the model is converted first. (Also the tests' int8 BERT,
    tests/test_dequant_bert.py.)"""
    top = int(ml_dtypes.iinfo(dtype).max)
    if top < 127:
        model = version_converter.convert_version(model, 21)
    inits = {t.name: t for t in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        w = inits.get(node.input[1]) if node.op_type == "MatMul" else None
        if w is not None and len(w.dims) == 2 and w.data_type == onnx.TensorProto.FLOAT:
            values = numpy_helper.to_array(w)
            scale = np.maximum(np.abs(values).max(axis=0, keepdims=True), 1e-8) / top
            q = np.clip(np.round(values / scale), -top, top).astype(dtype)
            w.CopyFrom(numpy_helper.from_array(q, w.name))
            model.graph.initializer.append(numpy_helper.from_array(
                scale.astype(np.float32), f"{w.name}.scale"))
            nodes += [helper.make_node("Cast", [w.name], [f"{w.name}.f"], to=1,
                                       name=f"{w.name}.cast"),
                      helper.make_node("Mul", [f"{w.name}.f", f"{w.name}.scale"],
                                       [f"{w.name}.dq"], name=f"{w.name}.mul")]
            node.input[1] = f"{w.name}.dq"
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def chained(dense: Path) -> Path:
    """``dense`` in int8 chains (:func:`int8_chains`), cached."""
    out = WORK / "minilm_int8_chain.onnx"
    if not out.exists():
        WORK.mkdir(parents=True, exist_ok=True)
        onnx.save(int8_chains(onnx.load(str(dense))), str(out))
    return out


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    bench, texts, float_ref = real.minilm_evaluation()
    quantized = chained(bench.dense)
    int8_ref = real.embed(quantized, texts)

    def score(out: Path) -> dict:
        embedded = real.embed(out, texts)
        return {"cosine_int8": real.mean_cosine(int8_ref, embedded),
                "cosine_float": real.mean_cosine(float_ref, embedded)}

    rows = prune_variants(quantized, bench, FLAGS, WORK, score)
    write_result("int8_chain_minilm", {
        "model": "all-MiniLM-L6-v2, int8 MatMul weights per output column, dequantised by "
                 "Cast and Mul",
        "evaluation_sentences": len(texts),
        "int8_vs_float_cosine": real.mean_cosine(float_ref, int8_ref), "rows": rows})


if __name__ == "__main__":
    main()
