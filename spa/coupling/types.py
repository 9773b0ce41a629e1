"""Vocabulary of coupling analysis: channel spaces, roles, index-map edges.

A *channel space* is one axis of one tensor, keyed ``(tensor name, axis)``. Virtual spaces (a
grouped convolution's group axis) use a tensor name that no tensor has, ending in ``::``.
An *edge* couples element ``a_idx[k]`` of space ``a`` with element ``b_idx[k]`` of space ``b``;
identity, offset (Concat/Split/Slice), block (Flatten, grouped conv, head split) maps are all
index arrays, so one union-find serves every map.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

SpaceKey = tuple[str, int]


class Role(Enum):
    """What a space is to the group it belongs to."""

    PRODUCER = "producer"  # output axis of a weight: removing the channel removes the computation
    CONSUMER = "consumer"  # input axis of a weight: the channel's contribution to a layer
    SCALE = "scale"  # per-channel scale of a normalisation or activation (BN gamma, PRelu slope)
    PARAM = "param"  # other per-channel constants: biases, running statistics, broadcast operands
    ACTIVATION = "activation"  # a tensor computed at run time
    VIRTUAL = "virtual"  # not a tensor: e.g. the group axis of a grouped convolution

    @property
    def is_weight(self) -> bool:
        return self in (Role.PRODUCER, Role.CONSUMER, Role.SCALE)


class MapKind(Enum):
    IDENTITY = "identity"
    OFFSET = "offset"
    BLOCK = "block"
    DIGIT = "digit"  # one axis of a factorised reshape: c ↔ (c // stride) % length
    PICK = "pick"  # a Gather by constant indices: output j ↔ input indices[j]


@dataclass(frozen=True)
class Edge:
    a: SpaceKey
    b: SpaceKey
    a_idx: np.ndarray
    b_idx: np.ndarray
    kind: MapKind
    node: str
    # Digit edges are candidates: of the edges sharing ``alternatives`` (one per axis of a
    # factorised reshape, outermost first) the analysis keeps at most one.
    alternatives: str | None = None


RewriteHook = Callable[["gs.Node", "KeptLookup"], None]


class KeptLookup:
    """What the rewrite tells a rule's hook: which indices of a space survive."""

    def __init__(self, kept: dict[SpaceKey, np.ndarray], lengths: dict[SpaceKey, int]):
        self._kept = kept
        self._lengths = lengths

    def changed(self, key: SpaceKey) -> bool:
        return key in self._kept

    def kept(self, key: SpaceKey) -> np.ndarray:
        """Sorted surviving indices of ``key`` (all of them when it is not pruned)."""
        if key in self._kept:
            return self._kept[key]
        return np.arange(self._lengths[key])

    def count(self, key: SpaceKey) -> int:
        return int(self.kept(key).size)


@dataclass(frozen=True)
class KVCache:
    """A KV-cache pair: the past cache a node reads and the present cache it writes (the past
    with this step's keys or values appended), both ``[batch, heads, positions, head_size]``;
    ``past`` and ``present`` are their head axes."""

    past: SpaceKey
    present: SpaceKey
    head_size: int


@dataclass
class NodeCoupling:
    """What one op rule says about one node."""

    edges: list[Edge] = field(default_factory=list)
    handled: set[SpaceKey] = field(default_factory=set)
    roles: dict[SpaceKey, Role] = field(default_factory=dict)
    lengths: dict[SpaceKey, int] = field(default_factory=dict)
    rewrite: RewriteHook | None = None
    # Spaces handled only because hidden-size pruning is on: normalisation statistics over them
    # change when channels go, so their groups are HIDDEN and outside the masked oracle.
    statistics: set[SpaceKey] = field(default_factory=set)
    # Axes that index attention heads (declared by attention rules).
    heads: set[SpaceKey] = field(default_factory=set)
    # Output axes of dense-layer weights stored other than as a 2-D matrix (a packed N-bit
    # weight): their groups are neurons, as a 2-D weight's are.
    dense: set[SpaceKey] = field(default_factory=set)
    # Why the node handles nothing else (a known op SPA will not prune through, or a rule that
    # gave up part-way); frozen spaces of the node carry this reason instead of the generic
    # "does not map axis".
    refusal: str | None = None
    # Why particular spaces stay unhandled (an axis the op reduces, indexes, pads, …): a frozen
    # space with a reason here carries it instead of ``refusal``.
    reasons: dict[SpaceKey, str] = field(default_factory=dict)
    # KV-cache pairs the node reads and writes: may lose heads together when the past is a
    # graph input read by this node alone and the present a graph output (the one change of
    # signature SPA makes; spa/coupling/analysis.py).
    caches: list[KVCache] = field(default_factory=list)
    # How the node ties channels together that a reader of a frozen group's reasons would not
    # guess (a grouped Conv removes whole groups: its input and output channels go together);
    # said beside the reasons of a group holding the space, when the group freezes.
    notes: dict[SpaceKey, str] = field(default_factory=dict)
    # Spaces (virtual ones, whose names are no tensor's) the node keeps whole, and why: a
    # channel a Gather picks by a scalar index stays, so its group freezes.
    pinned: dict[SpaceKey, str] = field(default_factory=dict)
