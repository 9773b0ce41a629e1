"""Latency tables: what each prunable group's width costs in milliseconds, measured.

For every prunable group ``g`` and a few kept widths ``k`` (``fractions`` of its channels, rounded
up to the kernel block), the table holds ``f_g(k)``: how much faster the group's layers run at
width ``k`` than dense, timed in onnxruntime with the user's provider, thread count and input
sizes — the group's layers cut out as a subgraph (passes/latency_subgraph.py) of the dense model
and of the model rewritten with the group at width ``k``, run in turn (interleaved: load on the
machine shifts both alike); ``f_g`` is piecewise linear between the widths, 0 at full width.

*Two groups that share a layer.* A conv between groups ``a`` and ``b`` runs in about
``ρ_a·ρ_b`` of its time (ρ: kept share), so its saving ``1 − ρ_a·ρ_b = (1 − ρ_a) + (1 − ρ_b) −
(1 − ρ_a)(1 − ρ_b)``: the per-group sum over-counts by the last term. Its MAC-weighted total is
the MACs the per-group sum over-counts, ``I(plan) = Σ_g c_g·(n_g − k_g) − ΔMACs(plan)`` (``c_g``:
MACs one channel of ``g`` carries alone; ``ΔMACs``: the cost model on the whole plan). So

    latency(plan) = dense − (α·Σ_g f_g(k_g) − β·I(plan))

with ``α = 1`` and ``β ≥ 0`` fitted (least squares) to the whole model measured at the table's
widths in every group at once: the subgraphs give each group's share, the whole model the
overlap. (ResNet-50, 1 thread: speed-up predicted within 1–6% on uniform and non-uniform plans.)
The prediction's error on a plan is measured by the caller against the pruned model.

*Noise.* With one thread on the CPU provider the calling thread runs the whole model, so its
CPU time (``time.thread_time``) is what is measured: time spent preempted by other processes
on a shared machine is not counted. A timed pair whose dense spread (interquartile range over
median) exceeds ``NOISY`` is timed again with twice the runs; the table records the median
spread and warns above it.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from spa import validate as val
from spa.errors import OptionError
from spa.ir import to_onnx
from spa.ir.save import infer_shapes
from spa.metrics import CostModel
from spa.passes.latency_subgraph import colours, group_nodes, static, subgraph
from spa.plan import GroupPlan, Plan, kept_indices
from spa.progress import progress

if TYPE_CHECKING:
    from spa.coupling.analysis import Analysis
    from spa.ir.load import LoadedModel

log = logging.getLogger(__name__)

FRACTIONS = (0.75, 0.5, 0.25)  # kept widths timed per group, as shares of its channels
NOISY = 0.15  # a timing spread above this share of the median is noise
#: The block (in channels) of onnxruntime's NCHWc convolution kernels, by CPU feature flag.
KERNEL_BLOCKS = (("avx512f", 16), ("avx2", 8), ("avx", 8))
CPU_PROVIDER = "CPUExecutionProvider"


def kernel_block(cpuinfo: str | None = None) -> int:
    """The channel block onnxruntime's blocked (NCHWc) kernels use on this CPU: 16 with
    AVX-512, 8 with AVX2, else 1. ``cpuinfo``: the text of /proc/cpuinfo (read when None;
    where there is none the answer is 1)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return 1
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return next((block for flag, block in KERNEL_BLOCKS if flag in flags), 1)


def check_provider(provider: str) -> str:
    """``provider`` when onnxruntime has it here; else an :class:`OptionError` naming those
    it has."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if provider not in available:
        raise OptionError(f"execution provider {provider!r} is not available in this "
                          f"onnxruntime; available: {', '.join(available)}")
    return provider


def snap(width: float, size: int, block: int) -> int:
    """``width`` channels rounded up to a multiple of ``block`` (when the group has that many),
    at least 1 and at most ``size``."""
    k = max(1, math.ceil(width))
    if block > 1 and size >= block:
        k = math.ceil(k / block) * block
    return min(size, k)


@dataclass(frozen=True)
class GroupLatency:
    """Milliseconds saved by one group at kept widths ``kept`` (descending), and the MACs one
    of its channels carries when the group is pruned alone."""

    name: str
    size: int
    kept: tuple[int, ...]
    saved_ms: tuple[float, ...]
    macs_per_channel: float = 0.0

    def saved(self, kept: int) -> float:
        """``f_g(kept)``: linear between measured widths, 0 at full width, and no more than
        at the narrowest measured width below it (nothing measured there: no saving claimed,
        so the allocator does not go there for time)."""
        xs = np.array((*self.kept[::-1], self.size), dtype=np.float64)
        ys = np.array((*self.saved_ms[::-1], 0.0))
        return float(np.interp(kept, xs, ys))


@dataclass(frozen=True)
class LatencyTable:
    """Dense latency, per-group savings (by group id) and the whole-model fit ``(α, β)`` of
    one model on one runtime."""

    key: str
    provider: str
    threads: int
    dims: tuple[tuple[str, int], ...]
    dense_ms: float
    groups: Mapping[int, GroupLatency]
    #: Whole-model measurements at the table's widths: (ms saved, Σ f_g, over-counted MACs).
    points: tuple[tuple[float, float, float], ...] = ()
    untimed: Mapping[int, str] = field(default_factory=dict)  # group id → why not timed
    noise: float = 0.0  # median relative spread of the timings
    seconds: float = 0.0  # to build, or to read when cached
    cached: bool = False

    @property
    def fit(self) -> tuple[float, float]:
        """``(α, β)`` fitted to the whole-model points (``(1, 0)`` without any)."""
        return fit_points(list(self.points)) if self.points else (1.0, 0.0)

    def raw(self, kept: Mapping[int, int]) -> tuple[float, float]:
        """``Σ_g f_g(k_g)`` and ``Σ_g c_g·(n_g − k_g)`` of the widths ``kept``."""
        rows = [(self.groups[gid], k) for gid, k in kept.items() if gid in self.groups]
        return (sum(g.saved(k) for g, k in rows),
                sum(g.macs_per_channel * (g.size - k) for g, k in rows))

    def saved(self, kept: Mapping[int, int], macs_saved: float) -> float:
        """Milliseconds saved by the widths ``kept`` (group id → kept channels) of a plan that
        saves ``macs_saved`` MACs in all."""
        f, macs = self.raw(kept)
        alpha, beta = self.fit
        return alpha * f - beta * max(macs - macs_saved, 0.0)

    def predict(self, kept: Mapping[int, int], macs_saved: float) -> float:
        """Predicted latency of a plan, in milliseconds."""
        return self.dense_ms - self.saved(kept, macs_saved)

    def to_json(self) -> str:
        body = dataclasses.asdict(self)
        body["groups"] = {str(k): dataclasses.asdict(v) for k, v in self.groups.items()}
        body["untimed"] = {str(k): v for k, v in self.untimed.items()}
        del body["cached"], body["seconds"]
        return json.dumps(body, indent=1)

    @classmethod
    def from_json(cls, text: str) -> LatencyTable:
        body = json.loads(text)
        groups = {int(k): GroupLatency(v["name"], v["size"], tuple(v["kept"]),
                                       tuple(v["saved_ms"]), v["macs_per_channel"])
                  for k, v in body["groups"].items()}
        return cls(body["key"], body["provider"], body["threads"],
                   tuple((str(n), int(s)) for n, s in body["dims"]), body["dense_ms"], groups,
                   tuple((float(a), float(b), float(c)) for a, b, c in body["points"]),
                   {int(k): v for k, v in body["untimed"].items()}, body["noise"])

    def summary(self) -> dict:
        return {"dense_ms": self.dense_ms, "groups_timed": len(self.groups),
                "groups_untimed": len(self.untimed), "fit": list(self.fit),
                "noise": self.noise, "seconds": self.seconds, "cached": self.cached}


def cache_dir() -> Path:
    root = os.environ.get("SPA_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "spa") / "latency"


def fit_points(points: list[tuple[float, float, float]]) -> tuple[float, float]:
    """``(1, β)`` with ``β ≥ 0`` minimising ``Σ (y − f + β·I)²`` over ``(y, f, I)`` points:
    the subgraphs' savings are trusted as measured, the whole model fits the overlap (on
    ResNet-50 a free ``α`` came out 1.1 and predicted no better)."""
    y, f, inter = (np.array(c, dtype=np.float64) for c in zip(*points))
    denom = float(inter @ inter)
    return 1.0, max(float((f - y) @ inter) / denom, 0.0) if denom > 0 else 0.0


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
        """The cache key: model bytes, coupling fingerprint, runtime, sizes, widths, block."""
        h = hashlib.sha256()
        loaded = analysis.model
        if loaded.path is not None:
            for f in (loaded.path, *loaded.data_files):
                with open(f, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 22), b""):
                        h.update(chunk)
        else:
            h.update(to_onnx(loaded).SerializeToString())
        h.update(json.dumps([analysis.fingerprint, self.provider, self.threads,
                             sorted(self.dims.items()), list(self.fractions), self.block,
                             self.runs]).encode())
        return h.hexdigest()[:32]

    def _session(self, model: bytes):
        return val.session(model, threads=self.threads, spin=False, what="latency model",
                           provider=self.provider)

    def _build(self, analysis: Analysis, key: str) -> LatencyTable:
        dense = static(to_onnx(analysis.model), self.dims)
        dense_bytes = dense.SerializeToString()
        shaped = infer_shapes(dense)
        groups = {g.id: g for g in analysis.prunable_groups}
        nodes = {gid: group_nodes(shaped.graph, g) for gid, g in groups.items()}
        untimed = {gid: why for gid, (_, why) in nodes.items() if why}
        timed = [gid for gid in groups if gid not in untimed]
        widths = {gid: _widths(groups[gid].size, self.fractions, self.block) for gid in timed}
        out: dict[int, list[float]] = {gid: [] for gid in timed}
        spreads: list[float] = []
        batches = colours({gid: nodes[gid][0] for gid in timed})
        steps = max((len(w) for w in widths.values()), default=0)
        for step in progress(range(steps), "latency table", unit="width"):
            for colour in batches:
                kept = {gid: widths[gid][step] for gid in colour if step < len(widths[gid])}
                if not kept:
                    continue
                pruned = infer_shapes(self._rewritten(dense_bytes, kept))
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
            ta, tb = _interleaved((base, feeds), (pruned, val.random_inputs(pruned,
                                                                             dims=self.dims)),
                                  runs=max(self.runs, 10), clock=self.clock)
            dense_times += ta
            f, over = LatencyTable("", "", 1, (), 0.0, table).raw(kept)
            points.append((statistics.median(ta) - statistics.median(tb), f,
                           max(over - saved_macs, 0.0)))
        if not points:
            (dense_times,) = _interleaved((base, feeds), runs=max(self.runs, 10),
                                          clock=self.clock)
        return statistics.median(dense_times), tuple(points)

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
        runs = self.runs
        ta, tb = _interleaved(*pairs, runs=runs, clock=self.clock)
        if _spread(ta) > NOISY:
            ta, tb = _interleaved(*pairs, runs=2 * runs, clock=self.clock)
        return statistics.median(ta) - statistics.median(tb), _spread(ta)


def _plan(analysis: Analysis, kept: Mapping[int, int]) -> Plan:
    by_id = {g.id: g for g in analysis.prunable_groups}
    return Plan(analysis.fingerprint, tuple(
        GroupPlan(gid, by_id[gid].name, by_id[gid].size, tuple(range(k)))
        for gid, k in sorted(kept.items())))


def _interleaved(*pairs, runs: int, clock: Callable[[], float] = time.perf_counter
                 ) -> list[list[float]]:
    """Times (ms, by ``clock``) of ``runs`` rounds, each running every (session, feeds) once
    in turn."""
    times: list[list[float]] = [[] for _ in pairs]
    for s, feeds in pairs:  # warm-up
        s.run(None, feeds)
    for _ in range(runs):
        for i, (s, feeds) in enumerate(pairs):
            t0 = clock()
            s.run(None, feeds)
            times[i].append((clock() - t0) * 1e3)
    return times


def _spread(times: list[float]) -> float:
    q1, _, q3 = statistics.quantiles(times, n=4)
    return (q3 - q1) / max(statistics.median(times), 1e-9)


def _widths(size: int, fractions: tuple[float, ...], block: int) -> list[int]:
    """Distinct kept widths below ``size``, descending."""
    return sorted({k for f in fractions if (k := snap(f * size, size, block)) < size},
                  reverse=True)
