"""Parameters, FLOPs (multiply–accumulates), file size and onnxruntime latency.

One cost model serves both the prediction and the measurement: :class:`CostModel` reads tensor
shapes from a graph, and :meth:`CostModel.count` evaluates params and MACs with some channel
spaces shortened — all of them as in the plan for a prediction, none for the emitted model. So
"emitted equals predicted" is a real check of the rewrite, not of two formulas agreeing.

FLOPs here are MACs of Conv, ConvTranspose, Gemm, MatMul and Einsum (the usual convention);
symbolic dims count as 1. Parameters are the elements of floating-point constants (bfloat16 and
float8 included) and of quantised weights (the integer tensors DequantizeLinear reads).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from spa.coupling.context import static_shape
from spa.coupling.rules import einsum
from spa.ir.dtypes import is_floating
from spa.progress import progress

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from spa.coupling.types import SpaceKey

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Counts:
    params: int
    flops: int


def _dims(t: gs.Tensor) -> Shape | None:
    s = static_shape(t)
    return None if s is None else tuple(1 if d is None else d for d in s)


class CostModel:
    """Params and MACs of a graph as functions of the lengths of its channel spaces."""

    def __init__(self, graph: gs.Graph):
        self._params: list[tuple[str, Shape]] = []
        for name, t in graph.tensors().items():
            if isinstance(t, gs.Constant) and (is_floating(t.dtype) or _is_quantized_weight(t)):
                self._params.append((name, tuple(int(d) for d in t.shape)))
        # Each MAC term: product of (tensor, axis) lengths times a constant factor.
        self._macs: list[tuple[list[tuple[str, Shape]], Callable[..., int]]] = []
        for node in graph.nodes:
            term = _mac_term(node)
            if term is not None:
                self._macs.append(term)

    def count(self, lengths: Mapping[SpaceKey, int] | None = None) -> Counts:
        lengths = lengths or {}

        def shape(name: str, base: Shape) -> Shape:
            return tuple(lengths.get((name, ax), d) for ax, d in enumerate(base))

        params = sum(prod(shape(n, s)) for n, s in self._params)
        flops = sum(fn(*(shape(n, s) for n, s in tensors)) for tensors, fn in self._macs)
        return Counts(int(params), int(flops))


def _is_quantized_weight(t: gs.Constant) -> bool:
    """An integer tensor a DequantizeLinear reads as its data: a quantised weight."""
    return any(n.op == "DequantizeLinear" and n.inputs and n.inputs[0] is t for n in t.outputs)


def _mac_term(node: gs.Node):
    op = node.op
    ins = [t for t in node.inputs]
    outs = node.outputs
    if op == "Einsum" and outs:
        return _einsum_term(node)
    if op in ("Conv", "ConvTranspose", "Gemm", "MatMul") and outs:
        shapes = [_dims(t) for t in ins[:2]] + [_dims(outs[0])]
        if any(s is None for s in shapes):
            return None
        (x, xs), (w, ws), (y, ys) = [(t.name, s) for t, s in zip([ins[0], ins[1], outs[0]],
                                                                  shapes)]
        if op == "Conv":
            return [(y, ys), (w, ws)], lambda y_, w_: prod(y_) * prod(w_[1:])
        if op == "ConvTranspose":
            return [(x, xs), (w, ws)], lambda x_, w_: prod(x_) * prod(w_[1:])
        if op == "Gemm":
            k_axis = 0 if int(node.attrs.get("transA", 0)) else 1
            return [(y, ys), (x, xs)], lambda y_, x_: prod(y_) * x_[k_axis]
        return [(y, ys), (x, xs)], lambda y_, x_: prod(y_) * (x_[-1] if len(x_) > 1 else 1)
    return None


def _einsum_term(node: gs.Node):
    """One MAC per combination of index values (spa/coupling/rules/einsum.py)."""
    eq = einsum.parse(str(node.attrs.get("equation", "")), len(node.inputs))
    shapes = [_dims(t) for t in node.inputs]
    if isinstance(eq, str) or any(s is None for s in shapes):
        return None
    return ([(t.name, s) for t, s in zip(node.inputs, shapes)],
            lambda *s: einsum.macs(eq, s))


def file_size(path: str | Path) -> int:
    """Bytes of a model file plus its external data file, if any."""
    p = Path(path)
    data = p.with_name(p.name + ".data")
    return p.stat().st_size + (data.stat().st_size if data.exists() else 0)


def latency_ms(session, feeds: dict[str, np.ndarray], *, runs: int = 20, warmup: int = 3
               ) -> float:
    """Median wall time of ``session.run`` over ``runs`` runs, in milliseconds."""
    for _ in range(warmup):
        session.run(None, feeds)
    times = []
    for _ in progress(range(runs), "latency", unit="run"):
        t0 = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
