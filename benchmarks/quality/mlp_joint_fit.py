"""How much would fitting a whole MLP through its GELU add to SPA's layer-wise reconstruction?

    python -m benchmarks.quality.mlp_joint_fit PRUNED.onnx [--steps 300] [--lr 1e-4]

A diagnostic for #14, not a pipeline stage. ``PRUNED.onnx``: all-MiniLM-L6-v2 pruned by
``spa prune`` (reconstruction on). SPA refits each layer alone by ridge least squares, so an MLP's
up projection is fitted to the dense pre-activations of the neurons it kept, and its down
projection to the dense output on the GELU of those. Here, layer by layer in order, both
projections of each MLP are fitted *together* through the GELU (Adam on the summed squared
error, from SPA's weights, PyTorch autograd: gradients, so this is an upper estimate of what a
gradient-free nonlinear refit could reach). Rows and targets are of the kind SPA fits: the real
(attended) tokens of the benchmark's calibration lines, the pruned model's inputs to the MLP
(every earlier MLP already refitted) against the dense model's residual sum less the pruned
stream; a seeded fifth of the lines is held out, and each MLP keeps the step with the least
held-out error. The result: each MLP's held-out relative error with SPA's weights and with the
joint fit, and the benchmark's held-out cosine (the 1000 evaluation sentences, never fitted)
of the model as SPA wrote it and with every MLP jointly refitted.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from benchmarks.common import write_result
from benchmarks.quality import real
from spa import validate as val


def _mlps(model: onnx.ModelProto) -> list[dict[str, str]]:
    """Per Gelu: its MLP's input, weights, biases, output sum and residual stream by name."""
    made = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    found = []
    for gelu in (n for n in model.graph.node if n.op_type == "Gelu"):
        add1 = made[gelu.input[0]]
        mm1 = made[next(i for i in add1.input if i in made)]
        mm2 = readers[gelu.output[0]][0]
        add2 = readers[mm2.output[0]][0]
        joined = readers[add2.output[0]][0]
        found.append({"x": mm1.input[0], "w1": mm1.input[1],
                      "b1": next(i for i in add1.input if i not in made),
                      "w2": mm2.input[1], "b2": next(i for i in add2.input if i != mm2.output[0]),
                      "sum": joined.output[0],
                      "stream": next(i for i in joined.input if i != add2.output[0])})
    return found


def _tokens(model: onnx.ModelProto, names: list[str], feeds: list[dict]) -> list[np.ndarray]:
    """The ``names`` tensors at the real tokens of every batch of ``feeds``, stacked."""
    from spa.torch.interpreter import with_outputs

    sess = val.session(with_outputs(model, names))
    out: list[list[np.ndarray]] = [[] for _ in names]
    for f in feeds:
        real_tokens = f["attention_mask"].astype(bool)
        for got, value in zip(out, sess.run(names, f)):
            got.append(value[real_tokens])
    return [np.concatenate(v).astype(np.float32) for v in out]


def _joint_fit(x, t, w, steps: int, lr: float, held: np.ndarray) -> tuple[list, float, float]:
    """Adam on ``‖gelu(x·W1 + b1)·W2 + b2 − t‖²`` from ``w``; the weights with the least
    held-out error, that error and SPA's, both relative to ``‖t‖²`` on the held-out rows."""
    import torch

    xs, ts = torch.from_numpy(x), torch.from_numpy(t)
    params = [torch.from_numpy(v.copy()).requires_grad_() for v in w]
    fit, out = torch.from_numpy(~held), torch.from_numpy(held)

    def loss(rows):
        pred = torch.nn.functional.gelu(xs[rows] @ params[0] + params[1]) @ params[2] + params[3]
        return ((pred - ts[rows]) ** 2).sum() / (ts[rows] ** 2).sum()

    opt = torch.optim.Adam(params, lr=lr)
    with torch.no_grad():
        start = best = float(loss(out))
    kept = [p.detach().clone() for p in params]
    for _ in range(steps):
        opt.zero_grad()
        loss(fit).backward()
        opt.step()
        with torch.no_grad():
            now = float(loss(out))
        if now < best:
            best, kept = now, [p.detach().clone() for p in params]
    return [k.numpy() for k in kept], start, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pruned", type=Path)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-4)
    args = parser.parse_args()
    import torch

    torch.manual_seed(0)
    bench = real.minilm_bench()
    lines = bench.calib.read_text(encoding="utf-8").splitlines()
    feeds = [real.tokenize(lines[i:i + 64]) for i in range(0, len(lines), 64)]
    held_lines = np.random.default_rng(0).permutation(len(lines)) < len(lines) // 5
    dense, pruned = onnx.load(str(bench.dense)), onnx.load(str(args.pruned))
    lengths = np.concatenate([f["attention_mask"].sum(1) for f in feeds])
    held = np.repeat(held_lines, lengths)
    mlps = _mlps(pruned)
    sums = _tokens(dense, [m["sum"] for m in mlps], feeds)
    inits = {i.name: i for i in pruned.graph.initializer}
    layers = []
    for k, m in enumerate(mlps):
        x, stream = _tokens(pruned, [m["x"], m["stream"]], feeds)
        w = [numpy_helper.to_array(inits[m[n]]).astype(np.float32) for n in ("w1", "b1", "w2",
                                                                               "b2")]
        fitted, before, after = _joint_fit(x, sums[k] - stream, w, args.steps, args.lr, held)
        for n, v in zip(("w1", "b1", "w2", "b2"), fitted):
            inits[m[n]].CopyFrom(numpy_helper.from_array(v, m[n]))
        layers.append({"mlp": k, "neurons": int(w[0].shape[1]), "held_out_error_spa": before,
                       "held_out_error_joint": after})
        print(layers[-1], flush=True)
    joint = args.pruned.with_name(args.pruned.stem + "-joint.onnx")
    onnx.save(pruned, str(joint))
    body = {"pruned": str(args.pruned), "steps": args.steps, "lr": args.lr,
            "calibration_lines": len(lines), "held_out_lines": int(held_lines.sum()),
            "layers": layers, "cosine_spa": bench.metric(args.pruned)["cosine"],
            "cosine_joint": bench.metric(joint)["cosine"]}
    print({k: body[k] for k in ("cosine_spa", "cosine_joint")})
    write_result("minilm_mlp_joint_fit", body)


if __name__ == "__main__":
    main()
