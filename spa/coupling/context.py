"""What an op rule sees of a node, and the small vocabulary it records couplings with.

Rules never touch the graph: they read shapes, attributes and constant inputs through a
:class:`NodeContext` and record edges (index maps between channel spaces), roles and an
optional rewrite hook. Every space a rule couples counts as *handled* by the
node; a live space the node does not handle is frozen by the analysis (fail closed).

A rule that gives up, or leaves an axis alone on purpose, says why: :meth:`NodeContext.refuse`
(handle nothing) or :meth:`NodeContext.decline` (keep what is handled; the reason for given
spaces, or for any the node leaves unhandled). The reason is a fragment that the analysis prints
after ``<Op> node '<name>': ``, so it does not name the node itself; it quotes tensor names
(``'x'``) so that reasons can be counted with the names taken out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from spa.coupling.types import (
    Edge,
    KVCache,
    MapKind,
    NodeCoupling,
    RewriteHook,
    Role,
    SpaceKey,
)
from spa.ir.quant import weight_values
from spa.ir.quant_chain import dequant_chain

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence


@dataclass(frozen=True)
class Space:
    key: SpaceKey
    length: int


def static_shape(t: gs.Tensor) -> tuple[int | None, ...] | None:
    """The tensor's shape with unknown or symbolic dims as None; None when the rank is unknown."""
    if isinstance(t, gs.Constant):
        return tuple(int(d) for d in t.shape)
    if t.shape is None:
        return None
    return tuple(d if isinstance(d, int) and d >= 0 else None for d in t.shape)


def axes_text(axes: Iterable[int]) -> str:
    """``axis 2`` or ``axes [1, 2]``, for reasons."""
    axes = sorted(axes)
    return f"axis {axes[0]}" if len(axes) == 1 else f"axes {axes}"


def _joined(old: str | None, reason: str) -> str:
    return reason if old is None else old if reason in old.split("; ") else f"{old}; {reason}"


class NodeContext:
    """One node, seen by its rule."""

    def __init__(self, node: gs.Node, opset: int, consumers_of: dict[str, list[gs.Node]],
                 *, hidden: bool = False, graph_outputs: frozenset[str] = frozenset()):
        self.node = node
        self.opset = opset
        self.hidden = hidden  # may normalisation statistics change (hidden-size pruning)?
        self.result = NodeCoupling()
        self._consumers_of = consumers_of
        self._graph_outputs = graph_outputs

    # --- reading the node -------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.node.name

    def input(self, i: int) -> gs.Tensor | None:
        ins = self.node.inputs
        return ins[i] if i < len(ins) and ins[i].name else None

    def output(self, i: int) -> gs.Tensor | None:
        outs = self.node.outputs
        return outs[i] if i < len(outs) and outs[i].name else None

    @property
    def inputs(self) -> list[gs.Tensor]:
        return [t for t in self.node.inputs if t.name]

    @property
    def outputs(self) -> list[gs.Tensor]:
        return [t for t in self.node.outputs if t.name]

    def data_io(self) -> tuple[gs.Tensor, gs.Tensor, int] | None:
        """``(input 0, output 0, rank of input 0)``, or None when the rank is unknown."""
        x, y = self.input(0), self.output(0)
        rank = self.rank(x)
        return None if rank is None or y is None else (x, y, rank)

    def attr(self, name: str, default: object = None) -> object:
        return self.node.attrs.get(name, default)

    def attr_int(self, name: str, default: int | None = None) -> int:
        """An integer attribute, ``default`` when absent (no default: a required attribute, whose
        absence makes the model invalid and raises)."""
        return int(self.node.attrs.get(name, default))

    def attr_ints(self, name: str) -> list[int] | None:
        """A list-of-integers attribute; None when absent."""
        values = self.node.attrs.get(name)
        return None if values is None else [int(v) for v in values]

    def shape(self, t: gs.Tensor | None) -> tuple[int | None, ...] | None:
        return None if t is None else static_shape(t)

    def rank(self, t: gs.Tensor | None) -> int | None:
        s = self.shape(t)
        return None if s is None else len(s)

    def const(self, t: gs.Tensor | None) -> np.ndarray | None:
        """The value of a constant input; a quantised weight (``DequantizeLinear`` of
        constants) counts as the float constant it stands for (spa/ir/quant.py)."""
        return weight_values(t)  # external tensors: mapped for this read only

    def const_ints(self, t: gs.Tensor | None) -> list[int] | None:
        v = self.const(t)
        return None if v is None else [int(x) for x in np.asarray(v).reshape(-1)]

    def consumers(self, t: gs.Tensor) -> list[gs.Node]:
        return self._consumers_of.get(t.name, [])

    def is_graph_output(self, t: gs.Tensor) -> bool:
        """Whether ``t`` leaves the graph: its values are the model's, and must not change."""
        return t.name in self._graph_outputs

    # --- recording couplings ----------------------------------------------------------------
    def space(self, t: gs.Tensor | None, axis: int) -> Space | None:
        """The channel space ``(t, axis)``; None when its length is not statically known."""
        s = self.shape(t)
        if t is None or s is None or not -len(s) <= axis < len(s):
            return None
        axis %= len(s)
        length = s[axis]
        if length is None:
            return None
        return Space((t.name, axis), length)

    def virtual(self, label: str, length: int) -> Space:
        key = (f"{self.node.name}::{label}::", 0)
        self.result.roles[key] = Role.VIRTUAL
        return Space(key, length)

    def _edge(self, a: Space, b: Space, a_idx: np.ndarray, b_idx: np.ndarray,
              kind: MapKind, alternatives: str | None = None) -> None:
        r = self.result
        r.edges.append(Edge(a.key, b.key, a_idx, b_idx, kind, self.node.name, alternatives))
        for s in (a, b):
            if alternatives is None:  # a candidate counts as handled only once it is chosen
                r.handled.add(s.key)
            r.lengths[s.key] = s.length

    def identity(self, a: Space | None, b: Space | None) -> bool:
        """Couple element i of ``a`` with element i of ``b`` (equal lengths)."""
        if a is None or b is None or a.length != b.length:
            return False
        idx = np.arange(a.length)
        self._edge(a, b, idx, idx, MapKind.IDENTITY)
        return True

    def kv_cache(self, past: Space | None, present: Space | None, head_size: int) -> None:
        """``past`` (the head axis of the cache the node reads) and ``present`` (of the cache it
        writes, the past with this step's keys or values appended): a KV-cache pair, whose
        graph input and output may lose heads together (spa/coupling/analysis.py)."""
        if past is not None and present is not None and past.length == present.length:
            self.result.caches.append(KVCache(past.key, present.key, head_size))

    def offset(self, part: Space | None, whole: Space | None, start: int) -> bool:
        """Couple ``part[i]`` with ``whole[start + i]`` (Concat input, Split/Slice output)."""
        if part is None or whole is None or start < 0 or start + part.length > whole.length:
            return False
        idx = np.arange(part.length)
        self._edge(part, whole, idx, idx + start, MapKind.OFFSET)
        return True

    def pick(self, picked: Space | None, source: Space | None, indices: Sequence[int]) -> bool:
        """Couple ``picked[j]`` with ``source[indices[j]]`` (a Gather by constant indices, in
        range and non-negative); ``source``'s other elements are left free."""
        if picked is None or source is None or len(indices) != picked.length \
                or any(not 0 <= i < source.length for i in indices):
            return False
        self._edge(picked, source, np.arange(picked.length), np.asarray(indices, dtype=np.int64),
                   MapKind.PICK)
        return True

    def block(self, fine: Space | None, coarse: Space | None) -> bool:
        """Couple ``fine[i]`` with ``coarse[i // k]``, ``k = len(fine) / len(coarse)``."""
        if fine is None or coarse is None or coarse.length == 0 \
                or fine.length % coarse.length:
            return False
        k = fine.length // coarse.length
        idx = np.arange(fine.length)
        self._edge(fine, coarse, idx, idx // k, MapKind.BLOCK)
        return True

    def sections(self, fine: Space | None, coarse: Space | None, sizes: Sequence[int]) -> bool:
        """Couple ``fine``, the concatenation of parts of ``sizes``, with ``coarse``: each part
        is split into ``len(coarse)`` equal blocks, element ``c`` of part ``p`` going with
        ``coarse[(c - start_p) // (sizes[p] / len(coarse))]`` (the columns of a fused QKV
        projection: head ``h``'s Q, K and V columns all go with head ``h``)."""
        if fine is None or coarse is None or coarse.length == 0 or sum(sizes) != fine.length \
                or any(n % coarse.length for n in sizes):
            return False
        coarse_idx = np.concatenate([np.arange(n) // (n // coarse.length) for n in sizes])
        self._edge(fine, coarse, np.arange(fine.length), coarse_idx, MapKind.BLOCK)
        return True

    def digits(self, whole: Space | None, parts: Sequence[Space | None], label: str,
               lengths: Sequence[int]) -> bool:
        """Candidate couplings of ``whole`` with each axis of its factorisation ``parts``.

        ``whole[c]`` ↔ ``parts[k][(c // stride_k) % lengths[k]]`` with ``stride_k`` the product
        of the lengths after ``k`` (outermost first). A part may be None (not a candidate).
        The analysis keeps the outermost candidate that leads somewhere: a head axis, not the
        head_dim axis, nor the ``3`` of a fused QKV projection.
        """
        if whole is None or any(n is None for n in lengths) \
                or int(np.prod(lengths)) != whole.length:
            return False
        idx = np.arange(whole.length)
        alt = f"{self.node.name}::{label}"
        stride = whole.length
        for part, length in zip(parts, lengths):
            stride //= length
            if part is not None and part.length == length:
                self._edge(whole, part, idx, (idx // stride) % length, MapKind.DIGIT, alt)
        return True

    def cyclic(self, repeated: Space | None, base: Space | None) -> bool:
        """Couple ``repeated[i]`` with ``base[i mod len(base)]`` (Tile)."""
        if repeated is None or base is None or repeated.length % base.length:
            return False
        idx = np.arange(repeated.length)
        self._edge(repeated, base, idx, idx % base.length, MapKind.BLOCK)
        return True

    def role(self, space: Space | None, role: Role) -> None:
        if space is not None:
            self.result.roles[space.key] = role
            self.result.lengths[space.key] = space.length

    def handle(self, space: Space | None) -> None:
        """Declare that this node tolerates ``space`` changing without being coupled."""
        if space is not None:
            self.result.handled.add(space.key)
            self.result.lengths[space.key] = space.length

    def heads_axis(self, space: Space | None) -> None:
        """Declare that ``space`` indexes attention heads (for ``--heads-ratio``)."""
        if space is not None:
            self.result.heads.add(space.key)

    def dense_rows(self, space: Space | None) -> None:
        """Declare that ``space`` holds the output rows of a dense layer whose weight is not
        stored as a 2-D matrix (its groups are neurons, for ``--mlp-ratio``)."""
        if space is not None:
            self.result.dense.add(space.key)

    def statistics_over(self, space: Space | None) -> None:
        """``space`` feeds normalisation statistics: handled only with hidden-size pruning on."""
        if self.hidden and space is not None:
            self.handle(space)
            self.result.statistics.add(space.key)

    def refuse(self, reason: str) -> None:
        """Handle none of this node's spaces, and say why: they all freeze with ``reason``.
        Edges recorded before still couple (a weight's output channels still form a group)."""
        self.result.handled.clear()
        self.result.reasons.clear()
        self.decline(reason)

    def pin(self, space: Space, reason: str) -> None:
        """Keep every element of ``space`` (a virtual space: a tensor's axis is frozen by
        declining it), with ``reason``: whatever is coupled to it freezes."""
        self.result.pinned[space.key] = reason

    def note(self, space: Space, text: str) -> None:
        """Say how this node ties ``space``'s channels to others, for the reasons of a frozen
        group that holds it (it freezes nothing)."""
        self.result.notes[space.key] = text

    def decline(self, reason: str, *spaces: Space | None) -> None:
        """Say why spaces this node leaves unhandled freeze, keeping those it handled. With
        ``spaces``: why those do (an axis the op reduces, indexes, pads; unknown ones are
        skipped); without: why any other does (a rule that gives up part-way). Reasons
        accumulate, each once, in the order given."""
        r = self.result
        if not spaces:
            r.refusal = _joined(r.refusal, reason)
        for s in spaces:
            if s is not None:
                r.reasons[s.key] = _joined(r.reasons.get(s.key), reason)

    # --- wording of reasons -----------------------------------------------------------------
    def which(self, t: gs.Tensor | None) -> str:
        """``input 1 'w'`` / ``output 0 'y'``: where ``t`` sits on this node, for reasons."""
        if t is None:
            return "a missing tensor"
        for kind, tensors in (("input", self.node.inputs), ("output", self.node.outputs)):
            for i, u in enumerate(tensors):
                if u is t:
                    return f"{kind} {i} '{t.name}'"
        return f"'{t.name}'"

    def unknown_rank(self, t: gs.Tensor | None) -> str:
        return f"unknown rank of {self.which(t)}"

    def not_constant(self, t: gs.Tensor | None, what: str = "weight") -> str:
        """The reason for a parameter that is a graph input or computed at run time; for one
        dequantised from integers by plain ops, why that chain has no slicable form."""
        why = self.unsliceable_chain(t)
        if why is not None:
            return why
        return f"dynamic {what}: {self.which(t)} is not a constant"

    def unsliceable_chain(self, t: gs.Tensor | None) -> str | None:
        """Why ``t``, dequantised from an integer constant by plain ops (Cast, Sub, Mul,
        Transpose), could not be read as a quantised weight (spa/ir/quant_chain.py); None when
        ``t`` is no such tensor."""
        chain = dequant_chain(t)
        if not isinstance(chain, str):
            return None
        return f"{self.which(t)} is dequantised from integers by plain ops, but {chain}"

    def on_rewrite(self, hook: RewriteHook) -> None:
        self.result.rewrite = hook

    def same_axes(self, pairs: Sequence[tuple[gs.Tensor | None, gs.Tensor | None]],
                  skip: Sequence[int] = ()) -> None:
        """Identity-couple axis k of each pair's tensors for every k not in ``skip``."""
        for a, b in pairs:
            ra, rb = self.rank(a), self.rank(b)
            if ra is None or ra != rb:
                if ra is not None or rb is not None:
                    self.decline(self.unknown_rank(a if ra is None else b) if None in (ra, rb)
                                 else f"{self.which(a)} has rank {ra} but {self.which(b)} {rb}")
                continue
            for ax in range(ra):
                if ax not in skip:
                    self.identity_axes(a, ax, b, ax)

    def identity_axes(self, a: gs.Tensor | None, ax_a: int, b: gs.Tensor | None, ax_b: int
                      ) -> bool:
        """:meth:`identity` of axis ``ax_a`` of ``a`` and ``ax_b`` of ``b``; when they cannot
        be coupled and one of them is a space that could be live, say why."""
        sa, sb = self.space(a, ax_a), self.space(b, ax_b)
        if self.identity(sa, sb):
            return True
        self.decline(self.lengths_differ(a, b, ax_a, ax_b), sa, sb)
        return False

    def lengths_differ(self, a: gs.Tensor, b: gs.Tensor, ax_a: int, ax_b: int) -> str:
        """Why axis ``ax_a`` of ``a`` and axis ``ax_b`` of ``b`` could not be coupled."""
        sa, sb = self.shape(a), self.shape(b)
        for t, shape, ax in ((a, sa, ax_a), (b, sb, ax_b)):
            if shape is None:
                return self.unknown_rank(t)
            if not -len(shape) <= ax < len(shape):
                return f"{self.which(t)} has no axis {ax}"
        assert sa is not None and sb is not None  # returned above otherwise
        la, lb = sa[ax_a], sb[ax_b]
        if la is None or lb is None:
            return f"unknown length of axis {ax_a if la is None else ax_b} of " \
                   f"{self.which(a if la is None else b)}"
        return f"axis {ax_a} of {self.which(a)} has length {la} but axis {ax_b} of " \
               f"{self.which(b)} {lb}"
