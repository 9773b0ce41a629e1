"""Parameters, FLOPs (multiply–accumulates), file size and onnxruntime latency.

One cost model serves both the prediction and the measurement: :class:`CostModel` reads tensor
shapes from a graph, and :meth:`CostModel.count` evaluates params and MACs with some channel
spaces shortened — all of them as in the plan for a prediction, none for the emitted model. So
"emitted equals predicted" is a real check of the rewrite, not of two formulas agreeing.

FLOPs here are MACs of the ops whose registry entry has a MAC term (spa/coupling/facts.py:
Conv, ConvTranspose, Gemm, MatMul and Einsum, the usual convention), each stated in its family
file; symbolic dims count as 1.

Parameters are the elements of floating-point constants (bfloat16 and float8 included) and of
quantised weights (spa/ir/params.py; a packed N-bit weight counts the values it holds), those
read in subgraphs (If, Loop) too, **each tensor of the file once**: a constant tied to another
(spa/ir/tied.py) counts nothing when it is written as its derivation — a view always (the
analysis slices it as its source), a copy when its kept values equal its source's. So the
count of an emitted model, re-read, is that of its file, and the prediction that of the file to
be written. A model as read is counted from its file (``LoadedModel.params``): its normal
form may have folded float shape arithmetic away.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from spa.coupling.registry import entry_of
from spa.ir.params import elements, graph_constants, is_parameter
from spa.ir.tied import Tie, Ties, live
from spa.progress import progress

if TYPE_CHECKING:
    from collections.abc import Mapping
    from collections.abc import Set as AbstractSet

    from spa.coupling.facts import MacTerm
    from spa.coupling.types import SpaceKey

    Kept = Mapping[SpaceKey, np.ndarray]

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Counts:
    params: int
    flops: int


class CostModel:
    """Params and MACs of a graph as functions of the kept indices of its channel spaces;
    ``ties`` are those of the graph's model (spa/ir/tied.py)."""

    def __init__(self, graph: gs.Graph, ties: Ties | None = None):
        constants = graph_constants(graph)
        self._params = [(name, tuple(int(d) for d in t.shape)) for name, t in constants.items()
                        if is_parameter(t)]
        self._shapes = dict(self._params)
        self._constants = constants
        self._ties: dict[str, tuple[Tie, gs.Constant]] = {
            name: (tie, constants[tie.source]) for name, tie in live(ties or {}, graph).items()
            if name in self._shapes}
        self._macs = [(node.name, term) for node in graph.nodes
                      if (term := _mac_term(node, graph.opset)) is not None]
        self._readers = {name: {n.name for n in t.outputs} for name, t in constants.items()}

    def count(self, kept: Kept | None = None, gone: AbstractSet[str] = frozenset(),
              unread: AbstractSet[str] = frozenset()) -> Counts:
        """Params and MACs with the spaces in ``kept`` cut to those indices (none: as is) and
        without the nodes named in ``gone`` (dropped residual blocks), nor the constants only
        they read, nor the constants ``unread`` (a dropped fused residual norm's bias)."""
        kept = kept or {}
        params = sum(elements(self._constants[n], _cut(s, n, kept)) for n, s in self._params
                     if not self._joined(n, kept) and n not in unread
                     and not (gone and self._readers[n] and self._readers[n] <= gone))
        flops = sum(term.count(*(_cut(s, n, kept) for n, s in term.tensors))
                    for name, term in self._macs if name not in gone)
        return Counts(int(params), int(flops))

    def _joined(self, name: str, kept: Kept) -> bool:
        """``name`` is tied, and will be written as its derivation (spa/ir/tied.py)."""
        if name not in self._ties:
            return False
        tie, source = self._ties[name]
        if not tie.is_copy:
            return True
        if tie.uniform:
            return _cut(self._shapes[name], name, kept) \
                == _cut(tuple(int(d) for d in source.shape), tie.source, kept)
        values = np.asarray(source.values)  # the copy's values too (a vector)
        return np.array_equal(_kept_values(values, name, kept),
                              _kept_values(values, tie.source, kept))


def node_macs(graph: gs.Graph) -> dict[str, int]:
    """Each node's MACs at the graph's shapes, by node name (nodes with no MAC term: absent)."""
    out = {}
    for node in graph.nodes:
        term = _mac_term(node, graph.opset)
        if term is not None:
            out[node.name] = int(term.count(*(s for _, s in term.tensors)))
    return out


def cut_shapes(graph: gs.Graph, kept: Kept) -> dict[str, tuple[int | None, ...]]:
    """The activations' declared shapes with each pruned axis cut to its kept count (None:
    a dim not known as a number)."""
    out = {}
    for name, t in graph.tensors().items():
        if isinstance(t, gs.Variable) and t.shape is not None:
            out[name] = tuple(len(kept[(name, ax)]) if (name, ax) in kept
                              else (d if isinstance(d, int) and d > 0 else None)
                              for ax, d in enumerate(t.shape))
    return out


def _cut(shape: Shape, name: str, kept: Kept) -> Shape:
    """``shape`` of tensor ``name`` with each axis in ``kept`` cut to its kept indices."""
    return tuple(len(kept[(name, ax)]) if (name, ax) in kept else d
                 for ax, d in enumerate(shape))


def _kept_values(values: np.ndarray, name: str, kept: Kept) -> np.ndarray:
    for ax in range(values.ndim):
        if (name, ax) in kept:
            values = np.take(values, kept[(name, ax)], axis=ax)
    return values


def _mac_term(node: gs.Node, opset: int) -> MacTerm | None:
    """The node's MAC term, from its op's registry entry; None for ops with no MACs counted."""
    entry = entry_of(node, opset)
    return None if entry is None or entry.mac is None else entry.mac(node)


def file_size(path: str | Path) -> int:
    """Bytes of a model file plus its external data file, if any."""
    p = Path(path)
    data = p.with_name(p.name + ".data")
    return p.stat().st_size + (data.stat().st_size if data.exists() else 0)


def latency_ms(session, feeds: dict[str, np.ndarray], *, runs: int = 20, warmup: int = 3,
               clock: Callable[[], float] = time.perf_counter) -> float:
    """Median time of ``session.run`` over ``runs`` runs, in milliseconds: wall time, or
    ``clock`` (``time.thread_time`` for a one-thread CPU session, which runs in the calling
    thread: the time a shared machine's other load takes is not counted)."""
    (times,) = interleaved_times((session, feeds), runs=runs, warmup=warmup, clock=clock,
                                 label="latency")
    return statistics.median(times)


def interleaved_times(*pairs, runs: int, warmup: int = 1,
                      clock: Callable[[], float] = time.perf_counter,
                      label: str | None = None) -> list[list[float]]:
    """Times (ms, by ``clock``) of ``runs`` rounds, each running every ``(session, feeds)``
    once in turn: load on the machine and its drifts (clock, caches) shift all of them alike,
    where timing one model after the other lets them fall on one side only. ``label``: a
    progress bar of that name over the rounds."""
    times: list[list[float]] = [[] for _ in pairs]
    for s, feeds in pairs:
        for _ in range(warmup):
            s.run(None, feeds)
    for _ in (range(runs) if label is None else progress(range(runs), label, unit="round")):
        for i, (s, feeds) in enumerate(pairs):
            t0 = clock()
            s.run(None, feeds)
            times[i].append((clock() - t0) * 1e3)
    return times
