"""How a latency table (passes/latency.py) is measured, and where it is kept.

Each group's layers are cut out as a subgraph (passes/latency_subgraph.py) of the dense model and
of the model rewritten with the group at each width; groups with disjoint layers are rewritten
together (a greedy colouring), so ResNet-50 needs a dozen rewrites, not a hundred. The pairs run
in turn (interleaved: load on the machine shifts both alike); the difference of the medians is
the saving. The whole model is then timed at each width in every group at once, interleaved with
the dense model: the points of the overlap fit.

*Noise.* With one thread on the CPU provider the calling thread runs the whole model, so its
CPU time (``time.thread_time``) is what is measured: time spent preempted by other processes
on a shared machine is not counted. A pair runs at least ``runs`` times, and as often as fits
``SUBGRAPH_MS`` of its time (up to 20 × ``runs``): the medians of fast subgraphs are otherwise
noise. A pair whose dense spread (interquartile range over median) exceeds ``NOISY`` is timed
again with twice the runs; the table records the median spread and warns above it.

The table is cached on disk (``$SPA_CACHE_DIR/latency`` or ``~/.cache/spa/latency``), keyed by
a hash of the model's bytes, its coupling fingerprint, the provider, threads, input sizes,
widths and block size; a cached run creates no onnxruntime session.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import onnx

from spa import validate as val
from spa.coupling.analysis import GroupKind
from spa.errors import OptionError
from spa.ir import to_onnx
from spa.ir.save import infer_shapes
from spa.metrics import CostModel, interleaved_times
from spa.passes.latency import (
    CPU_PROVIDER,
    FRACTIONS,
    NOISY,
    GroupLatency,
    LatencyTable,
    cache_dir,
    check_provider,
    snap,
)
from spa.passes.latency_subgraph import colours, group_nodes, static, static_shape, subgraph
from spa.plan import GroupPlan, Plan, kept_indices
from spa.progress import progress

if TYPE_CHECKING:
    from spa.coupling.analysis import Analysis, Group
    from spa.ir.load import LoadedModel

log = logging.getLogger(__name__)
SUBGRAPH_MS = 40.0  # at least this much of a subgraph's time per timed pair (or 20 × runs)
WHOLE_MS = 400.0  # and of the whole model per point of the fit
#: Part of the cache key: a table cached by an earlier way of measuring is not read (2: values
#: shape inference leaves unsized are sized by a run, so more groups are timed; 3: each group's
#: narrowest width is timed, and head groups' widths are whole heads, not kernel blocks).
TABLE_VERSION = 3


class LatencyProfile:
    """``LatencyProfile(reanalyse=…, provider=…, threads=1, dims=…, block=16).run(analysis)
    -> LatencyTable``.

    ``reanalyse`` makes a fresh analysis of a loaded copy of the model (the rewrite consumes
    one), with the options the caller's analysis was made with. ``session`` makes the timing
    sessions from serialized models (tests count them); ``use_cache``: read and write the cache.
    """

    def __init__(self, *, reanalyse: Callable[[LoadedModel], Analysis],
                 provider: str = CPU_PROVIDER, threads: int = 1,
                 dims: Mapping[str, int] | None = None, block: int = 1,
                 fractions: tuple[float, ...] = FRACTIONS, runs: int = 15,
                 use_cache: bool = True, session: Callable[[bytes], object] | None = None):
        if threads < 1:
            raise OptionError(f"threads must be at least 1, got {threads}")
        self.reanalyse = reanalyse
        self.provider = check_provider(provider)
        self.threads = threads
        self.dims = dict(dims or {})
        self.block = block
        self.fractions = fractions
        self.runs = runs
        self.use_cache = use_cache
        self.session = session or self._session
        # One CPU thread: the caller's thread runs the model, and its CPU time ignores the
        # time other processes take from it.
        self.clock = time.thread_time if threads == 1 and provider == CPU_PROVIDER \
            else time.perf_counter

    def run(self, analysis: Analysis) -> LatencyTable:
        t0 = time.perf_counter()
        key = self.key(analysis)
        path = cache_dir() / f"{key}.json"
        if self.use_cache and path.is_file():
            try:
                table = LatencyTable.from_json(path.read_text())
            except (ValueError, KeyError, TypeError, IndexError) as exc:
                log.warning("latency table %s is unreadable (%s): timing again", path, exc)
            else:
                log.info("latency table read from %s", path)
                return dataclasses.replace(table, cached=True, seconds=time.perf_counter() - t0)
        table = dataclasses.replace(self._build(analysis, key), seconds=time.perf_counter() - t0)
        log.info("latency table built in %.1f s: %s", table.seconds, table.summary())
        if self.use_cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(table.to_json())
            tmp.replace(path)
        return table

    def key(self, analysis: Analysis) -> str:
        """The cache key: model bytes, coupling fingerprint, runtime, sizes, widths, block and
        :data:`TABLE_VERSION`."""
        h = hashlib.sha256()
        loaded = analysis.model
        if loaded.path is not None:
            for f in (loaded.path, *loaded.data_files):
                with open(f, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 22), b""):
                        h.update(chunk)
        else:
            h.update(to_onnx(loaded).SerializeToString())
        h.update(json.dumps([TABLE_VERSION, analysis.fingerprint, self.provider, self.threads,
                             sorted(self.dims.items()), list(self.fractions), self.block,
                             self.runs]).encode())
        return h.hexdigest()[:32]

    def _session(self, model: bytes):
        return val.session(model, threads=self.threads, spin=False, what="latency model",
                           provider=self.provider)

    def _sized(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """``model`` (input sizes fixed, shapes inferred) with the values that shape inference
        left without a fixed shape sized by one onnxruntime run. Inference stops short on some
        exports: on all-MiniLM-L6-v2's dynamo export no LayerNorm output has a shape, and
        without this no group of it could be timed (``--target latency`` pruned nothing)."""
        graph = model.graph
        infos = {v.name: v for v in (*graph.input, *graph.value_info)}
        declared = {v.name for v in graph.output}  # their shapes are the model's contract
        missing = [o for n in graph.node for o in n.output
                   if o and o not in declared and not static_shape(infos.get(o))
                   and infos.get(o, onnx.ValueInfoProto()).type.tensor_type.elem_type]
        if not missing:
            return model
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        probe.graph.output.extend(infos[o] for o in missing)
        sess = self._session(probe.SerializeToString())
        values = dict(zip(missing, sess.run(missing, val.random_inputs(sess))))
        out = onnx.ModelProto()
        out.CopyFrom(model)
        kept = [v for v in out.graph.value_info if v.name not in values]
        del out.graph.value_info[:]
        out.graph.value_info.extend(kept)
        out.graph.value_info.extend(
            onnx.helper.make_tensor_value_info(name, infos[name].type.tensor_type.elem_type,
                                               list(value.shape))
            for name, value in values.items())
        return out

    def _build(self, analysis: Analysis, key: str) -> LatencyTable:
        dense = static(to_onnx(analysis.model), self.dims)
        dense_bytes = dense.SerializeToString()
        shaped = self._sized(infer_shapes(dense))
        groups = {g.id: g for g in analysis.prunable_groups}
        nodes = {gid: group_nodes(shaped.graph, g) for gid, g in groups.items()}
        untimed = {gid: why for gid, (_, why) in nodes.items() if why}
        from spa.ir.load import load_proto

        # the timed copy has static dims: a group it does not find the same cannot be rewritten
        # there (a with-past decoder's self-attention heads, tied to caches of a fixed length)
        again = {g.id: g.name for g in self.reanalyse(load_proto(onnx.load_from_string(
            dense_bytes))).prunable_groups}
        untimed |= {gid: "not prunable in the copy timed at static input sizes"
                    for gid, g in groups.items() if gid not in untimed
                    and again.get(gid) != g.name}
        timed = [gid for gid in groups if gid not in untimed]
        widths = {gid: _widths(groups[gid].size, self.fractions, self._block(groups[gid]))
                  for gid in timed}
        out: dict[int, list[float]] = {gid: [] for gid in timed}
        spreads: list[float] = []
        batches = colours({gid: nodes[gid][0] for gid in timed})
        steps = max((len(w) for w in widths.values()), default=0)
        for step in progress(range(steps), "latency table", unit="width"):
            for colour in batches:
                kept = {gid: widths[gid][step] for gid in colour if step < len(widths[gid])}
                if not kept:
                    continue
                pruned = self._sized(infer_shapes(self._rewritten(dense_bytes, kept)))
                for gid in kept:
                    saved, spread = self._saving(subgraph(shaped, nodes[gid][0]),
                                                 subgraph(pruned, nodes[gid][0]))
                    spreads.append(spread)
                    out[gid].append(saved)
        cost = CostModel(analysis.model.graph, analysis.model.ties)
        macs = cost.count().flops
        table = {gid: GroupLatency(
            groups[gid].name, groups[gid].size, tuple(widths[gid]), tuple(out[gid]),
            self._macs_per_channel(analysis, cost, macs, gid, widths[gid])) for gid in timed}
        dense_ms, points = self._whole(analysis, dense_bytes, table, cost, macs, steps)
        noise = statistics.median(spreads) if spreads else 0.0
        if noise > NOISY:
            log.warning("latency timings are noisy (median spread %.0f%% of the median): the "
                        "table is unreliable; time on an idle machine", noise * 100)
        for gid, why in untimed.items():
            log.info("group %d (%s) not timed: %s", gid, groups[gid].name, why)
        return LatencyTable(key, self.provider, self.threads, tuple(sorted(self.dims.items())),
                            dense_ms, table, points, untimed, noise)

    def _whole(self, analysis: Analysis, dense: bytes, table: Mapping[int, GroupLatency],
               cost: CostModel, macs: int, steps: int
               ) -> tuple[float, tuple[tuple[float, float, float], ...]]:
        """Dense latency and the points of the fit: the whole model timed with every group at
        the table's ``step``-th width, for each step, interleaved with the dense model."""
        base = self.session(dense)
        feeds = val.random_inputs(base, dims=self.dims)
        dense_times: list[float] = []
        points = []
        for step in range(steps):
            kept = {gid: g.kept[step] for gid, g in table.items() if step < len(g.kept)}
            plan = _plan(analysis, kept)
            saved_macs = macs - cost.count(kept_indices(analysis, plan)).flops
            pruned = self.session(self._rewritten(dense, kept).SerializeToString())
            pruned_feeds = val.random_inputs(pruned, dims=self.dims)
            ta, tb = interleaved_times((base, feeds), (pruned, pruned_feeds),
                                       runs=self._runs(base, feeds, WHOLE_MS), clock=self.clock)
            dense_times += ta
            f, over = LatencyTable("", "", 1, (), 0.0, table).raw(kept)
            points.append((statistics.median(ta) - statistics.median(tb), f,
                           max(over - saved_macs, 0.0)))
        if not points:
            runs = self._runs(base, feeds, WHOLE_MS)
            (dense_times,) = interleaved_times((base, feeds), runs=runs, clock=self.clock)
        return statistics.median(dense_times), tuple(points)

    def _block(self, group: Group) -> int:
        """What ``group``'s timed widths are multiples of: the kernel block, but for a head
        group, whose unit is a whole head (BERT's 12 heads snapped to AVX2's block of 8 were
        timed at 8 heads only, and 4 heads at a block of 4 not at all)."""
        return 1 if group.kind is GroupKind.HEADS else self.block

    def _macs_per_channel(self, analysis: Analysis, cost: CostModel, macs: int, gid: int,
                          widths: list[int]) -> float:
        size = next(g.size for g in analysis.prunable_groups if g.id == gid)
        k = widths[-1] if widths else size
        after = cost.count(kept_indices(analysis, _plan(analysis, {gid: k}))).flops
        return (macs - after) / max(size - k, 1)

    def _rewritten(self, dense: bytes, kept: Mapping[int, int]) -> onnx.ModelProto:
        """The model with the groups of ``kept`` at those widths (their first channels kept:
        which ones does not change the time)."""
        from spa.ir.load import load_proto
        from spa.passes.rewrite import Rewrite

        fresh = self.reanalyse(load_proto(onnx.load_from_string(dense)))
        Rewrite().run(fresh, _plan(fresh, kept))
        return to_onnx(fresh.model)

    def _saving(self, dense: bytes, pruned: bytes) -> tuple[float, float]:
        """Milliseconds the pruned subgraph saves over the dense one (medians of interleaved
        runs), and the dense timing's relative spread (timed again, longer, when noisy)."""
        a, b = self.session(dense), self.session(pruned)
        pairs = ((a, val.random_inputs(a)), (b, val.random_inputs(b)))
        runs = self._runs(*pairs[0], SUBGRAPH_MS)
        ta, tb = interleaved_times(*pairs, runs=runs, clock=self.clock)
        if _spread(ta) > NOISY:
            ta, tb = interleaved_times(*pairs, runs=2 * runs, clock=self.clock)
        return statistics.median(ta) - statistics.median(tb), _spread(ta)


    def _runs(self, sess, feeds, budget_ms: float) -> int:
        """Runs enough for ``budget_ms`` of the session's time (fast subgraphs are timed more
        often: their medians are otherwise noise), between ``runs`` and 20 × ``runs``."""
        sess.run(None, feeds)
        t0 = self.clock()
        sess.run(None, feeds)
        once = max((self.clock() - t0) * 1e3, 1e-3)
        return int(min(max(self.runs, math.ceil(budget_ms / once)), 20 * self.runs))


def _plan(analysis: Analysis, kept: Mapping[int, int]) -> Plan:
    by_id = {g.id: g for g in analysis.prunable_groups}
    return Plan(analysis.fingerprint, tuple(
        GroupPlan(gid, by_id[gid].name, by_id[gid].size, tuple(range(k)))
        for gid, k in sorted(kept.items())))


def _spread(times: list[float]) -> float:
    q1, _, q3 = statistics.quantiles(times, n=4)
    return (q3 - q1) / max(statistics.median(times), 1e-9)


def _widths(size: int, fractions: tuple[float, ...], block: int) -> list[int]:
    """Distinct kept widths below ``size``, descending."""
    return sorted({k for f in fractions if (k := snap(f * size, size, block)) < size},
                  reverse=True)
