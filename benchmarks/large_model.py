"""A model over 2 GB (external data) through ``spa prune``: peak memory and wall time.

Builds an MLP of ``--layers`` dense layers ``[H, H]`` (float32; 9 × 8192² ≈ 2.4 GB by default)
with its weights in ``model.onnx.data``, streaming: one weight at a time is generated and
appended, so the builder never holds the model. Then runs ``spa prune --ratio 0.3`` on it as a
subprocess, with validation and with ``--no-validate``, and records each run's peak resident
memory (``wait4``'s ``ru_maxrss``, which counts file pages mapped and touched as well as
private memory), a sampled RSS timeline, the wall time and the ratio peak / model size in
``benchmarks/results/large_model.json``. The big files are deleted afterwards.

    python -m benchmarks.large_model [--hidden 8192] [--layers 9] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from benchmarks.common import write_result

TARGET_RATIO = 1.5  # peak RSS / model size


def build(path: Path, *, hidden: int = 8192, layers: int = 9, seed: int = 0) -> int:
    """Write ``path`` and ``path.data``: ``x → (MatMul W_i, Add b_i, Relu) × layers``.

    Returns the model's size in bytes (model file + data file). Weights are generated a block
    of rows at a time and appended to the data file; the ModelProto only holds references.
    """
    rng = np.random.default_rng(seed)
    data_name = path.name + ".data"
    inits, nodes = [], []
    offset = 0
    scale = np.float32(1.0 / np.sqrt(hidden))
    with open(path.parent / data_name, "wb") as f:
        for i in range(layers):
            for name, shape in ((f"w{i}", (hidden, hidden)), (f"b{i}", (hidden,))):
                length = _append(f, rng, shape, scale)
                inits.append(_external(name, shape, data_name, offset, length))
                offset += length
            x = "x" if i == 0 else f"h{i - 1}"
            nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"fc{i}"),
                      helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"], name=f"bias{i}")]
            last = i == layers - 1
            nodes.append(helper.make_node("Relu" if not last else "Identity", [f"a{i}"],
                                          ["y" if last else f"h{i}"], name=f"act{i}"))
    graph = helper.make_graph(nodes, "large_mlp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, hidden])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, hidden])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    return path.stat().st_size + offset


def _append(f, rng: np.random.Generator, shape: tuple[int, ...], scale: np.float32) -> int:
    rows_per_block = max(1, (64 << 20) // (4 * int(np.prod(shape[1:], dtype=np.int64))))
    written = 0
    for start in range(0, shape[0], rows_per_block):
        rows = min(rows_per_block, shape[0] - start)
        block = rng.standard_normal((rows, *shape[1:]), dtype=np.float32) * scale
        f.write(block.tobytes())
        written += block.nbytes
    return written


def _external(name: str, shape: tuple[int, ...], location: str, offset: int, length: int
              ) -> TensorProto:
    t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape),
                    data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", str(offset)),
                       ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


class _RssSampler(threading.Thread):
    """Polls a process's VmRSS / RssAnon / RssFile (MiB) every ``period`` seconds."""

    def __init__(self, pid: int, period: float = 0.25):
        super().__init__(daemon=True)
        self.pid, self.period, self.samples = pid, period, []
        self._done = threading.Event()
        self._t0 = time.perf_counter()

    def run(self) -> None:
        status = Path(f"/proc/{self.pid}/status")
        while not self._done.is_set():
            try:
                fields = dict(line.split(":", 1) for line in status.read_text().splitlines())
            except (OSError, ValueError):
                break
            mib = {k: int(fields[k].split()[0]) // 1024 for k in ("VmRSS", "RssAnon", "RssFile")
                   if k in fields}
            self.samples.append({"t": round(time.perf_counter() - self._t0, 2), **mib})
            self._done.wait(self.period)

    def stop(self) -> None:
        self._done.set()
        self.join()


def run_prune(model: Path, out: Path, flags: list[str]) -> dict:
    """``spa prune`` as a child process; its own peak RSS from ``wait4`` (not the max over all
    children, which ``RUSAGE_CHILDREN`` would give)."""
    cmd = [sys.executable, "-m", "spa", "prune", str(model), "-o", str(out), "--ratio", "0.3",
           "--json", *flags]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "2"})
    sampler = _RssSampler(proc.pid)
    sampler.start()
    out_text, err_text = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    sampler.stop()
    result = {"command": " ".join(["spa", *cmd[3:]]), "exit_code": proc.returncode,
              "wall_seconds": round(seconds, 2), "peak_rss_bytes": usage.ru_maxrss * 1024,
              "rss_timeline_mib": sampler.samples[::max(1, len(sampler.samples) // 200)]}
    if proc.returncode == 0:
        report = json.loads(out_text)
        result["report"] = {k: report[k] for k in ("params_before", "params_after",
                                                   "bytes_before", "bytes_after", "seconds")}
        data = out.with_name(out.name + ".data")
        result["output_external_data"] = data.exists() and data.stat().st_size > 0
    else:
        result["stderr"] = err_text.decode(errors="replace")[-2000:]
    return result


def check_output(model: Path, out: Path) -> dict:
    """The pruned model's weights stay external, and it runs in onnxruntime."""
    from spa import validate as val

    proto = onnx.load(str(out), load_external_data=False)
    external = sum(t.data_location == TensorProto.EXTERNAL for t in proto.graph.initializer)
    sess = val.session(out)
    y = val.run(sess, val.random_inputs(sess))["y"]
    return {"external_initializers": external, "initializers": len(proto.graph.initializer),
            "output_shape": list(y.shape), "output_finite": bool(np.isfinite(y).all())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=9)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the big files")
    parser.add_argument("--name", default="large_model", help="result file name")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="an earlier result file to keep as 'before' (its runs' figures)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="spa-large-", dir=args.workdir))
    try:
        model = work / "model.onnx"
        t0 = time.perf_counter()
        size = build(model, hidden=args.hidden, layers=args.layers)
        build_s = time.perf_counter() - t0
        print(f"built {model} ({size / 1e9:.2f} GB) in {build_s:.1f} s", flush=True)
        runs = {}
        for label, flags in (("no_validate", ["--no-validate"]), ("validate", [])):
            out = work / f"pruned_{label}.onnx"
            r = run_prune(model, out, flags)
            r["peak_over_model_size"] = round(r["peak_rss_bytes"] / size, 3)
            if r["exit_code"] == 0:
                r["output_check"] = check_output(model, out)
            runs[label] = r
            print(f"{label}: exit {r['exit_code']}, {r['wall_seconds']} s, peak RSS "
                  f"{r['peak_rss_bytes'] / 1e9:.2f} GB = {r['peak_over_model_size']}× the model",
                  flush=True)
            for p in (out, out.with_name(out.name + ".data")):
                p.unlink(missing_ok=True)
        body = {"model": f"MLP, {args.layers} × MatMul [{args.hidden}, {args.hidden}] + bias "
                         "+ Relu, float32, external data", "model_bytes": size,
                "build_seconds": round(build_s, 1), "target_peak_over_model_size": TARGET_RATIO,
                "runs": runs}
        if args.baseline is not None:
            base = json.loads(args.baseline.read_text())
            body["before"] = {"date": base.get("date"), "runs": {
                k: {f: v.get(f) for f in ("exit_code", "wall_seconds", "peak_rss_bytes",
                                          "peak_over_model_size", "stderr")}
                for k, v in base["runs"].items()}}
        print(f"wrote {write_result(args.name, body)}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
