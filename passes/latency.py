"""Latency tables: what each prunable group's width costs in milliseconds, measured.

For every prunable group ``g`` and a few kept widths ``k`` (``fractions`` of its channels, rounded
up to the kernel block; of its heads, for a head group), the table holds ``f_g(k)``: how much
faster the group's layers run at width ``k`` than dense, timed in onnxruntime with the user's
provider, thread count and input sizes — the group's layers cut out as a subgraph
(passes/latency_subgraph.py) of the dense model and of the model rewritten with the group at
width ``k``, run in turn (interleaved: load on the machine shifts both alike); ``f_g`` is
piecewise linear between the widths, 0 at full width.

*Two groups that share a layer.* A conv between groups ``a`` and ``b`` runs in about
``ρ_a·ρ_b`` of its time (ρ: kept share), so its saving ``1 − ρ_a·ρ_b = (1 − ρ_a) + (1 − ρ_b) −
(1 − ρ_a)(1 − ρ_b)``: the per-group sum over-counts by the last term. Its MAC-weighted total is
the MACs the per-group sum over-counts, ``I(plan) = Σ_g c_g·(n_g − k_g) − ΔMACs(plan)`` (``c_g``:
MACs one channel of ``g`` carries alone; ``ΔMACs``: the cost model on the whole plan). So

    latency(plan) = dense − (α·Σ_g f_g(k_g) − β·I(plan))

with ``α, β ≥ 0`` fitted (least squares) to the whole model measured at the table's widths in
every group at once: the subgraphs give each group's share, the whole model the scale and the
overlap. (1 thread, benchmarks/latency_target.py: plans for 1.5× and 2× on ResNet-50,
MobileNetV3-Large, EfficientNet-Lite0, YOLOv8n and BERT-base measured −7.8% to +4.2% off the
speed-up asked for.)
The prediction's error on a plan is measured by the caller against the pruned model.

The table is measured by :class:`spa.passes.latency_profile.LatencyProfile` and cached on disk.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from spa.errors import OptionError

#: Kept widths timed per group, as shares of its channels; 0 is its narrowest width (one block,
#: one head). Without it nothing below a quarter was measured, so the allocator claimed no time
#: there: on EfficientNet-Lite0 it could not take an expansion layer down to one block as the
#: FLOPs target does, and cut fragile layers instead (1.5x asked: top-1 agreement 0.053 -> 0.342).
FRACTIONS = (0.75, 0.5, 0.25, 0.0)
NOISY = 0.15  # a timing spread above this share of the median is noise
#: The block (in channels) of onnxruntime's NCHWc convolution kernels, by CPU feature flag.
KERNEL_BLOCKS = (("avx512f", 16), ("avx2", 8), ("avx", 8))
CPU_PROVIDER = "CPUExecutionProvider"
BLOCK_ENV = "SPA_KERNEL_BLOCK"


def kernel_block(cpuinfo: str | None = None) -> int:
    """The channel block onnxruntime's blocked (NCHWc) kernels use on this CPU: 16 with
    AVX-512, 8 with AVX2, else 1. ``cpuinfo``: the text of /proc/cpuinfo (read when None;
    where there is none the answer is 1). ``$SPA_KERNEL_BLOCK`` overrides what this CPU says
    (a plan for another machine's CPU; the test suite pins it, so that its counts do not
    depend on the machine)."""
    if cpuinfo is None and os.environ.get(BLOCK_ENV):
        return int(os.environ[BLOCK_ENV])
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

    def as_fast_wider(self, kept: int) -> int:
        """The widest width ≥ ``kept`` (a measured one, or full width) that saves at least
        what ``kept`` saves: a narrower width the table measured no faster is not worth its
        lost channels."""
        here = self.saved(kept)
        wider = [k for k in (self.size, *self.kept) if k > kept and self.saved(k) >= here]
        return max(wider, default=kept)


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
    scale: float = 1.0  # the savings' correction by a measured plan (:meth:`corrected`)

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
        return self.scale * (alpha * f - beta * max(macs - macs_saved, 0.0))

    def as_fast_wider(self, gid: int, kept: int) -> int:
        """Group ``gid``'s :meth:`GroupLatency.as_fast_wider` (``kept`` when not timed)."""
        row = self.groups.get(gid)
        return kept if row is None else row.as_fast_wider(kept)

    def predict(self, kept: Mapping[int, int], macs_saved: float) -> float:
        """Predicted latency of a plan, in milliseconds."""
        return self.dense_ms - self.saved(kept, macs_saved)

    def to_json(self) -> str:
        body = dataclasses.asdict(self)
        body["groups"] = {str(k): dataclasses.asdict(v) for k, v in self.groups.items()}
        body["untimed"] = {str(k): v for k, v in self.untimed.items()}
        del body["cached"], body["seconds"], body["scale"]
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

    def corrected(self, predicted_ms: float, measured_share: float) -> LatencyTable:
        """The table with its savings scaled so that a plan it predicted at ``predicted_ms``
        saves what it measured: ``measured_share`` of the dense latency."""
        predicted_saving = self.dense_ms - predicted_ms
        if predicted_saving <= 0:
            return self
        return dataclasses.replace(
            self, scale=self.scale * max(measured_share, 0.0) * self.dense_ms / predicted_saving)

    def summary(self) -> dict:
        return {"dense_ms": self.dense_ms, "groups_timed": len(self.groups),
                "groups_untimed": len(self.untimed), "fit": list(self.fit),
                "noise": self.noise, "seconds": self.seconds, "cached": self.cached,
                "scale": self.scale}


def cache_dir() -> Path:
    root = os.environ.get("SPA_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "spa") / "latency"


def fit_points(points: list[tuple[float, float, float]]) -> tuple[float, float]:
    """``(α, β)`` minimising ``Σ (y − α·f + β·I)²`` over ``(y, f, I)`` points, with ``β ≥ 0``
    (when the free fit gives ``β < 0``: ``β = 0`` and ``α`` alone). ``α`` is the scale of the
    whole model over its subgraphs: ResNet-50 1.1, MobileNetV3-Large 1.2 (nodes onnxruntime
    adds in the whole model only, NCHWc reorders around squeeze-excitation, scale with width)."""
    y, f, inter = (np.array(c, dtype=np.float64) for c in zip(*points))
    scale = max(float(np.abs(inter).max()), 1.0)
    (alpha, beta), *_ = np.linalg.lstsq(np.stack([f, -inter / scale], 1), y, rcond=None)
    if beta < 0 or alpha <= 0:
        alpha, beta = float(f @ y) / max(float(f @ f), 1e-12), 0.0
    return max(float(alpha), 0.0), float(beta) / scale
