"""Compare an original and a pruned ONNX model: parameters and onnxruntime latency, as JSON.

Usage: python benchmark.py ORIGINAL.onnx PRUNED.onnx [--runs N]

Both models get the same seeded random inputs (symbolic dims set to 1) and are timed in
interleaved rounds on one thread, so that they share the machine's state fairly.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def params(path: str) -> int:
    """Elements of floating-point initializers and Constant nodes."""
    graph = onnx.load(path).graph
    tensors = list(graph.initializer) + [a.t for n in graph.node if n.op_type == "Constant"
                                         for a in n.attribute if a.name == "value"]
    return int(sum(numpy_helper.to_array(t).size for t in tensors
                   if np.issubdtype(numpy_helper.to_array(t).dtype, np.floating)))


def session(path: str) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def feeds(sess: ort.InferenceSession) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in i.shape]
        out[i.name] = rng.standard_normal(shape).astype(TYPES[i.type])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("original")
    ap.add_argument("pruned")
    ap.add_argument("--runs", type=int, default=50)
    args = ap.parse_args()
    sessions = {"original": session(args.original), "pruned": session(args.pruned)}
    x = feeds(sessions["original"])
    outputs = {k: s.run(None, x) for k, s in sessions.items()}  # also the warm-up
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(args.runs):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, x)
            times[k].append((time.perf_counter() - t0) * 1e3)
    result = {k: {"params": params(getattr(args, k)), "latency_ms": statistics.median(times[k])}
              for k in sessions}
    result["speedup"] = result["original"]["latency_ms"] / result["pruned"]["latency_ms"]
    result["max_abs_output_change"] = max(float(np.max(np.abs(a - b))) for a, b in
                                          zip(outputs["original"], outputs["pruned"]))
    result["runs"] = args.runs
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
