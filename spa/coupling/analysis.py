"""Coupling analysis: from a normalised graph to groups of channels that must go together.

1. Every node's op rule records edges between channel spaces (index maps), roles and the spaces
   it handles. A node without a rule handles nothing. A folded view of a tied constant has a
   stand-in node, coupled by its layout op's rule (spa/coupling/tied.py).
2. The spaces and edges form a networkx graph. A connected component is *live* when it holds a
   producer (an output axis of a weight): only live spaces are channel spaces.
3. Fail closed: a live space touched by a node that does not handle it, a graph input or output,
   or a node the user ignores is *frozen*, with the reason. One exemption: a KV-cache pair
   declared by a rule (an attention op's, or a Concat appending to a past cache) — the past
   cache a graph input that node alone reads (others may read its other dims: a Shape), the
   present cache a graph output, each in no other pair — may lose heads; both sides then lose
   the same heads, since the rule couples both to the KV heads (:func:`kv_cache_pairs`).
4. Element level: each live space contributes one element per index; the edges' index maps are
   unioned (numpy union-find). A component of elements is a *channel* (an atom): the indices,
   across all spaces, that must be removed together (a conv output channel with its BN entries
   and the next layers' input columns; a whole group of a grouped conv; the 49 flattened features
   of one channel).
5. Channels touching the same set of spaces form a *group* (DenseNet's concatenated segments
   thus give one group per source layer). A group touching a frozen space is frozen.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

import networkx as nx
import numpy as np
import onnx_graphsurgeon as gs

from spa.coupling.context import NodeContext
from spa.coupling.registry import ensure_loaded, lookup
from spa.coupling.tied import tied_nodes
from spa.coupling.types import Edge, KVCache, NodeCoupling, RewriteHook, Role, SpaceKey
from spa.coupling.unionfind import components
from spa.ir.quant import is_weight
from spa.progress import progress

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence
    from collections.abc import Set as AbstractSet

    from spa.ir.load import LoadedModel

log = logging.getLogger(__name__)
_ROLE_PRIORITY = [Role.PRODUCER, Role.CONSUMER, Role.SCALE, Role.PARAM, Role.VIRTUAL,
                  Role.ACTIVATION]


class GroupKind(Enum):
    """What a group's channels are, for per-kind ratios (``--heads-ratio``, ``--mlp-ratio``)."""

    CHANNELS = "channels"  # convolution channels and anything not dense
    NEURONS = "neurons"  # one output row of dense (Gemm/MatMul) weights per channel
    HEADS = "heads"  # several dense rows per channel: attention heads
    HIDDEN = "hidden"  # the residual stream: normalisation statistics run over it


@dataclass(frozen=True)
class Member:
    """The part of one channel space that belongs to a group."""

    space: SpaceKey
    role: Role
    indices: np.ndarray  # indices into the space, ascending
    channels: np.ndarray  # the group channel each index belongs to


@dataclass(frozen=True)
class Group:
    id: int
    size: int  # number of channels (prunable units)
    members: tuple[Member, ...]
    frozen: tuple[str, ...] = ()
    kind: GroupKind = GroupKind.CHANNELS
    # of a frozen group: how its channels are tied to the frozen ones (rules' notes, such as a
    # grouped Conv removing whole groups)
    via: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        m = self.producers[0] if self.producers else self.members[0]
        return f"{m.space[0]}[{m.space[1]}]"

    @property
    def producers(self) -> list[Member]:
        return [m for m in self.members if m.role is Role.PRODUCER]

    @property
    def consumers(self) -> list[Member]:
        return [m for m in self.members if m.role is Role.CONSUMER]

    @property
    def prunable(self) -> bool:
        return not self.frozen and bool(self.producers) and self.size > 1

    def signature(self) -> list[str]:
        return sorted(f"{m.space[0]}[{m.space[1]}]" for m in self.members
                      if m.role is not Role.VIRTUAL)


@dataclass(frozen=True)
class Analysis:
    model: LoadedModel
    groups: tuple[Group, ...]
    lengths: dict[SpaceKey, int]
    roles: dict[SpaceKey, Role]
    frozen_spaces: dict[SpaceKey, tuple[str, ...]]
    hooks: dict[str, RewriteHook]
    fingerprint: str
    space_graph: nx.Graph = field(repr=False)
    # KV-cache pairs (past graph input, present graph output) that may lose heads.
    kv_cache: tuple[KVCache, ...] = ()
    # Graph inputs and outputs another file of the same model writes or reads (a seq2seq
    # decoder's caches: spa/pipeline/family.py), which may lose channels as that file's do.
    free: tuple[str, ...] = ()

    @property
    def prunable_groups(self) -> list[Group]:
        return [g for g in self.groups if g.prunable]

    @property
    def frozen_groups(self) -> list[Group]:
        return [g for g in self.groups if g.frozen and g.producers]


class CouplingAnalysis:
    """The analysis pass: ``CouplingAnalysis(ignore=[...]).run(model) -> Analysis``."""

    def __init__(self, *, ignore: Sequence[str] = (), hidden: bool = False,
                 frozen_tensors: Mapping[str, str] | None = None, free: Sequence[str] = ()):
        self.ignore = tuple(ignore)
        self.hidden = hidden
        # Tensors a caller cannot follow (the PyTorch front end: a constant with no parameter
        # behind it), each with the reason; every live axis of them freezes.
        self.frozen_tensors = dict(frozen_tensors or {})
        # Graph inputs and outputs whose shape may change (every axis): a caller that prunes
        # the file reading or writing them alike (spa/pipeline/family.py) asks for it.
        self.free = tuple(free)

    def run(self, model: LoadedModel) -> Analysis:
        ensure_loaded()
        graph = model.graph
        nodes = [*graph.nodes, *tied_nodes(graph, model.ties)]
        couplings, unknown = self._apply_rules(graph, nodes, model.opset)
        caches, refused = kv_cache_pairs(graph, couplings)
        exempt = {k for c in caches for k in (c.past, c.present)}
        signature = {t.name: t for t in (*graph.inputs, *graph.outputs)}
        exempt.update((name, axis) for name in self.free if name in signature
                      for axis in range(len(signature[name].shape or ())))
        roles, lengths = self._roles_and_lengths(graph, couplings)
        space_graph = nx.Graph()
        candidates = []
        for c in couplings.values():
            for e in c.edges:
                if e.alternatives is None:
                    space_graph.add_edge(e.a, e.b, node=e.node, kind=e.kind.value)
                else:
                    candidates.append(e)
        # A candidate whose axis would freeze anyway (a contraction, an unbind, a graph output)
        # is no choice: its reshape's own candidates count as handled for this look-ahead.
        on_candidates: dict[str, set[SpaceKey]] = {}
        for e in candidates:
            on_candidates.setdefault(e.node, set()).update((e.a, e.b))
        every = set(space_graph.nodes) | {k for ks in on_candidates.values() for k in ks}
        blocked = set(self._frozen(graph, nodes, couplings, unknown, every, exempt,
                                   on_candidates, refused, pins=False))
        chosen = _choose_digits(space_graph, candidates, roles, blocked)
        for e in chosen:
            space_graph.add_edge(e.a, e.b, node=e.node, kind=e.kind.value)
            couplings[e.node].handled.update((e.a, e.b))
        chosen_ids = {id(e) for e in chosen}
        edges = [e for c in couplings.values() for e in c.edges
                 if e.alternatives is None or id(e) in chosen_ids]
        live = self._live_spaces(space_graph, roles)
        frozen = self._frozen(graph, nodes, couplings, unknown, live, exempt, notes=refused)
        tensors = graph.tensors()
        dense = {k for k in live if is_weight(tensors.get(k[0]))
                 and len(tensors[k[0]].shape or ()) == 2}
        dense.update(*(c.dense for c in couplings.values()))
        statistics = set().union(*(c.statistics for c in couplings.values()))
        # Head axes: declared by attention rules, or the factor a reshape split a channel axis
        # into (C → heads × head_dim keeps the heads factor).
        heads = set().union(*(c.heads for c in couplings.values()))
        heads.update(e.b for e in chosen if lengths[e.b] < lengths[e.a])
        notes = {k: v for c in couplings.values() for k, v in c.notes.items()}
        groups = _build_groups(edges, live, lengths, roles, frozen, dense, statistics, heads,
                               notes)
        hooks = {name: c.rewrite for name, c in couplings.items() if c.rewrite is not None}
        return Analysis(model=model, groups=tuple(groups), lengths=lengths, roles=roles,
                        frozen_spaces={k: tuple(sorted(v)) for k, v in frozen.items()},
                        hooks=hooks, fingerprint=fingerprint(graph), space_graph=space_graph,
                        kv_cache=caches,
                        free=tuple(name for name in self.free if name in signature))

    def _apply_rules(self, graph: gs.Graph, nodes: list[gs.Node], opset: int
                     ) -> tuple[dict[str, NodeCoupling], set[str]]:
        """Run the rule of every node of ``nodes`` (the graph's, then stand-ins); also return
        the names of nodes that have no rule."""
        consumers_of: dict[str, list[gs.Node]] = {}
        for node in graph.nodes:
            for t in node.inputs:
                consumers_of.setdefault(t.name, []).append(node)
        graph_outputs = frozenset(t.name for t in graph.outputs)
        out: dict[str, NodeCoupling] = {}
        unknown: set[str] = set()
        taken = {node.name for node in nodes}
        for i, node in enumerate(progress(nodes, "analysis", unit="node")):
            if not node.name:
                node.name = _unused_name(f"{node.op}_{i}", taken)
            ctx = NodeContext(node, opset, consumers_of, hidden=self.hidden,
                              graph_outputs=graph_outputs)
            rule = lookup(node.domain or "", node.op, opset)
            if rule is None:
                unknown.add(node.name)
            elif not has_subgraph(node):
                rule(ctx)
            out[node.name] = ctx.result
        return out, unknown

    @staticmethod
    def _roles_and_lengths(graph: gs.Graph, couplings: dict[str, NodeCoupling]
                           ) -> tuple[dict[SpaceKey, Role], dict[SpaceKey, int]]:
        tensors = graph.tensors()
        roles: dict[SpaceKey, Role] = {}
        lengths: dict[SpaceKey, int] = {}
        for c in couplings.values():
            lengths.update(c.lengths)
            for key, role in c.roles.items():
                old = roles.get(key)
                if old is None or _ROLE_PRIORITY.index(role) < _ROLE_PRIORITY.index(old):
                    roles[key] = role
        for key in lengths:
            if key not in roles:
                t = tensors.get(key[0])
                roles[key] = Role.PARAM if isinstance(t, gs.Constant) else Role.ACTIVATION
        return roles, lengths

    @staticmethod
    def _live_spaces(space_graph: nx.Graph, roles: dict[SpaceKey, Role]) -> set[SpaceKey]:
        live: set[SpaceKey] = set()
        for comp in nx.connected_components(space_graph):
            if any(roles.get(k) is Role.PRODUCER for k in comp):
                live.update(comp)
        return live

    def _frozen(self, graph: gs.Graph, nodes: list[gs.Node],
                couplings: dict[str, NodeCoupling], unknown: set[str], live: set[SpaceKey],
                exempt: AbstractSet[SpaceKey] = frozenset(),
                also_handled: dict[str, set[SpaceKey]] | None = None,
                notes: Mapping[SpaceKey, str] | None = None, pins: bool = True
                ) -> dict[SpaceKey, set[str]]:
        """Why each of ``live`` must keep its length: a graph input/output (but for the KV-cache
        spaces in ``exempt``; ``notes`` says why a refused cache's may not change), an ignored
        node, a node with subgraphs or no rule, or a node whose rule does not handle it
        (counting ``also_handled[node]`` as handled too), or a space a rule pins (``pins``: not
        in the digits look-ahead, which judges whole spaces, while a pin keeps only the elements
        coupled to it)."""
        also_handled = also_handled or {}
        notes = notes or {}
        live_axes: dict[str, list[SpaceKey]] = {}
        for key in live:
            live_axes.setdefault(key[0], []).append(key)
        frozen: dict[SpaceKey, set[str]] = {}

        def freeze(names: Iterable[str], reason_of, handled: AbstractSet[SpaceKey] = frozenset()):
            for name in names:
                for key in live_axes.get(name, ()):
                    if key not in handled:
                        frozen.setdefault(key, set()).add(reason_of(key))

        def signature(side: str):
            return lambda k: f"graph {side} '{k[0]}' (axis {k[1]}) keeps its shape" + (
                f": {notes[k]}" if k in notes else "")

        freeze([t.name for t in graph.inputs], signature("input"), exempt)
        freeze([t.name for t in graph.outputs], signature("output"), exempt)
        for name, why in self.frozen_tensors.items():
            freeze([name], lambda k, w=why: w)
        for c in couplings.values() if pins else ():
            for key, why in c.pinned.items():
                if key in live:
                    frozen.setdefault(key, set()).add(why)
        for node in nodes:
            names = [t.name for t in (*node.inputs, *node.outputs) if t.name]
            names += sorted(_subgraph_outer_names(node))
            if any(fnmatch.fnmatchcase(node.name, pat) for pat in self.ignore):
                freeze(names, lambda k, n=node: f"{n.op} node '{n.name}' is ignored (--ignore)")
                continue
            if has_subgraph(node):
                why = f"{node.op} node '{node.name}' has subgraphs; channels entering them freeze"
                freeze(names, lambda k, w=why: w)
            elif node.name in unknown:
                dom = f"{node.domain}::" if node.domain else ""
                freeze(names, lambda k, n=node, d=dom:
                       f"no rule for op {d}{n.op} (node '{n.name}'): fail closed")
            else:
                c = couplings[node.name]
                freeze(names, lambda k, n=node, c=c: _unhandled_reason(n, c, k),
                       c.handled | also_handled.get(node.name, set()))
        return frozen


def kv_cache_pairs(graph: gs.Graph, couplings: Mapping[str, NodeCoupling]
                   ) -> tuple[tuple[KVCache, ...], dict[SpaceKey, str]]:
    """The KV-cache pairs whose signature may change: declared by a node's rule, the past a
    graph input that node alone reads (but for nodes that tolerate its head axis changing and
    couple it to nothing: a ``Shape`` reading the past length), the present a graph output
    that node writes, and neither tensor in another pair. Anything else keeps its shape (fail
    closed); the second result says why, for both sides of each declared pair refused."""
    inputs = {t.name for t in graph.inputs}
    outputs = {t.name for t in graph.outputs}
    readers: dict[str, set[str]] = {}
    for node in graph.nodes:
        for t in node.inputs:
            readers.setdefault(t.name, set()).add(node.name)
    declared = [(name, cache) for name, c in couplings.items() for cache in c.caches]
    uses: dict[str, int] = {}
    for _, cache in declared:
        for tensor in (cache.past[0], cache.present[0]):
            uses[tensor] = uses.get(tensor, 0) + 1

    def refusal(name: str, c: KVCache) -> str | None:
        past, present = c.past[0], c.present[0]
        if past not in inputs or present not in outputs:
            return f"'{past}' is no graph input" if past not in inputs else \
                f"'{present}' is no graph output"
        others = sorted(r for r in readers.get(past, set()) - {name}
                        if not _indifferent(couplings.get(r), c.past))
        if others:
            return f"the past '{past}' is also read by node '{others[0]}'"
        if uses[past] != 1 or uses[present] != 1:
            return f"'{past if uses[past] != 1 else present}' is in several caches"
        return None

    verdicts = [(c, refusal(name, c)) for name, c in declared]
    refused = {key: f"node '{name}' pairs '{c.past[0]}' and '{c.present[0]}' as a KV cache, "
                    f"but {why}"
               for (name, _), (c, why) in zip(declared, verdicts) if why is not None
               for key in (c.past, c.present)}
    return tuple(sorted((c for c, why in verdicts if why is None), key=lambda c: c.past)), \
        refused


def _indifferent(coupling: NodeCoupling | None, key: SpaceKey) -> bool:
    """Whether a node's rule lets axis ``key`` change and couples it to nothing."""
    return coupling is not None and key in coupling.handled \
        and not any(key in (e.a, e.b) for e in coupling.edges)


def _unused_name(stem: str, taken: set[str]) -> str:
    """``stem``, or ``stem_2``, ``stem_3``, … if another node has that name (an unnamed node
    must not take a name in use: couplings, plans and onnxruntime key nodes by name)."""
    name, k = stem, 1
    while name in taken:
        k += 1
        name = f"{stem}_{k}"
    taken.add(name)
    return name


def _unhandled_reason(node: gs.Node, coupling: NodeCoupling, key: SpaceKey) -> str:
    """Why ``node`` leaves ``key`` unhandled: the rule's reason for that space, else for the
    node, else that it does not map it."""
    why = coupling.reasons.get(key) or coupling.refusal
    if why:
        return f"{node.op} node '{node.name}': {why}"
    return f"{node.op} node '{node.name}' does not map axis {key[1]} of '{key[0]}'"


def has_subgraph(node: gs.Node) -> bool:
    return any(isinstance(v, gs.Graph) or (isinstance(v, list) and v
                                            and isinstance(v[0], gs.Graph))
               for v in node.attrs.values())


def _subgraph_outer_names(node: gs.Node) -> set[str]:
    names: set[str] = set()
    for v in node.attrs.values():
        subs = v if isinstance(v, list) else [v]
        for sub in subs:
            if isinstance(sub, gs.Graph):
                for inner in sub.nodes:
                    names.update(t.name for t in inner.inputs if t.name)
                    names.update(_subgraph_outer_names(inner))
    return names


def _choose_digits(graph: nx.Graph, candidates: list[Edge], roles: dict[SpaceKey, Role],
                   blocked: set[SpaceKey]) -> list[Edge]:
    """Of each factorised reshape's digit candidates, the outermost whose axis leads somewhere.

    An axis leads somewhere when its component (over the definite edges) holds a weight axis
    (producer or consumer) or is reached by at least two reshapes (as one of their factors or as
    their whole axis): the head axis of ``[B, S, H, d]`` joins the Q/K/V splits and the merge
    before the output projection, while the ``3`` of a fused QKV reshape ends at the Gather
    that unbinds it. An axis that would freeze anyway (the head_dim contracted in ``Q·Kᵀ``, an
    unbound axis, a graph output) is passed over, and a reshape that factorises such an axis
    reaches nothing: a pixel unshuffle's split of H and W into halves does not make those
    halves lead on, so its merge keeps the channels. Of the rest, the axis reached by the most
    reshapes wins (heads over V's head_dim even when heads are the inner factor, as in einops
    ``(d h)``); ties go to the outermost, unless another reshape chose a tied one
    (:func:`_agree`). When every candidate would freeze, the outermost is kept, so that the
    group freezes with the reason of what blocks it.
    """
    comp_of: dict[SpaceKey, int] = {}
    anchored: set[int] = set()
    dead: set[object] = {k for k in blocked if k not in graph}
    for i, component in enumerate(nx.connected_components(graph)):
        for k in component:
            comp_of[k] = i
            if roles.get(k) in (Role.PRODUCER, Role.CONSUMER):
                anchored.add(i)
            if k in blocked:
                dead.add(i)

    def comp(key: SpaceKey) -> int | SpaceKey:
        return comp_of.get(key, key)

    touching: dict[object, set[str]] = {}
    by_alt: dict[str, list[Edge]] = {}
    for e in candidates:
        assert e.alternatives is not None, "a digit candidate names its alternatives"
        by_alt.setdefault(e.alternatives, []).append(e)
        if comp(e.a) in dead:  # a factor of an axis that freezes anyway leads nowhere
            continue
        touching.setdefault(comp(e.a), set()).add(e.alternatives)
        touching.setdefault(comp(e.b), set()).add(e.alternatives)
    choice: dict[str, Edge] = {}
    tied: dict[str, list[Edge]] = {}
    for alt, edges in by_alt.items():
        eligible = [(len(touching.get(comp(e.b), ())), -i, e) for i, e in enumerate(edges)
                    if comp(e.b) in anchored or len(touching.get(comp(e.b), ())) >= 2]
        alive = [c for c in eligible if comp(c[2].b) not in dead]
        if alive:
            # The axis most reshapes agree on (the heads, met by the Q/K/V splits and the merge;
            # V's head_dim meets only its split and the merge); ties go to the outermost.
            best = max(alive, key=lambda c: c[:2])
            choice[alt] = best[2]
            tied[alt] = [c[2] for c in alive if c[0] == best[0]]
        elif eligible:
            # Everything freezes anyway: keep the outermost, whose blocker names the reason.
            choice[alt] = eligible[0][2]
    _agree(choice, tied, comp)
    return list(choice.values())


def _agree(choice: dict[str, Edge], tied: Mapping[str, list[Edge]],
           comp: Callable[[SpaceKey], object]) -> None:
    """Make tied choices meet: a reshape whose axis no other reshape chose, with a tied
    candidate that another did choose, takes that one instead (in graph order).

    A channel shuffle (``[C] → [g, C/g]``, Transpose, ``[C/g, g] → [C]``) reaches both its
    factors from both reshapes, so each keeps its outermost: the split the group index, the
    merge the channel within a group, and neither leads on. Taking the merge's choice at the
    split couples channel ``c`` of the input with the ``g`` outputs ``(c mod C/g)·g + j``.
    """
    chosen_by = Counter(comp(e.b) for e in choice.values())
    for alt, edges in tied.items():
        own = comp(choice[alt].b)
        if chosen_by[own] > 1:
            continue
        met = [e for e in edges if chosen_by[comp(e.b)] > (comp(e.b) == own)]
        if met:
            chosen_by[own] -= 1
            chosen_by[comp(met[0].b)] += 1
            choice[alt] = met[0]


def _kind(members: list[Member], dense: set[SpaceKey], statistics: set[SpaceKey],
          heads: set[SpaceKey]) -> GroupKind:
    if any(m.space in statistics for m in members):
        return GroupKind.HIDDEN
    producers = [m for m in members if m.role is Role.PRODUCER]
    if not producers or not all(m.space in dense for m in producers):
        return GroupKind.CHANNELS
    # Several rows per channel alone do not make heads: a fused gate_up neuron owns one row in
    # each half. Heads pass through a head axis.
    return GroupKind.HEADS if any(m.space in heads for m in members) else GroupKind.NEURONS


def _build_groups(edges: list[Edge], live: set[SpaceKey], lengths: dict[SpaceKey, int],
                  roles: dict[SpaceKey, Role], frozen: dict[SpaceKey, set[str]],
                  dense: set[SpaceKey], statistics: set[SpaceKey], heads: set[SpaceKey],
                  notes: Mapping[SpaceKey, str]) -> list[Group]:
    # Deterministic space order: producers first, then by the order rules recorded them.
    order: dict[SpaceKey, int] = {}
    for e in edges:
        for k in (e.a, e.b):
            if k in live and k not in order:
                order[k] = len(order)
    spaces = sorted(order, key=lambda k: (_ROLE_PRIORITY.index(roles[k]), order[k]))
    space_id = {k: i for i, k in enumerate(spaces)}
    offsets = np.zeros(len(spaces) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([lengths[k] for k in spaces])
    a_parts, b_parts = [], []
    for e in edges:
        if e.a in space_id:
            a_parts.append(offsets[space_id[e.a]] + e.a_idx)
            b_parts.append(offsets[space_id[e.b]] + e.b_idx)
    n = int(offsets[-1])
    if n == 0:
        return []
    labels = components(n, np.concatenate(a_parts), np.concatenate(b_parts))
    elem_space = np.repeat(np.arange(len(spaces)), np.diff(offsets))
    elem_pos = np.arange(n) - offsets[elem_space]

    # Signature of each channel (atom): the sorted set of spaces it touches. The distinct
    # (atom, space) pairs, sorted, as one int64 key each (sorting 1-D keys is far faster than
    # a row-wise np.unique, or numpy 2's hashed 1-D one, in the same order).
    codes = np.sort(labels * len(spaces) + elem_space)
    codes = codes[np.concatenate(([True], codes[1:] != codes[:-1]))]
    pairs = np.stack([codes // len(spaces), codes % len(spaces)], axis=1)
    atom_ids, starts = np.unique(pairs[:, 0], return_index=True)
    bounds = list(starts[1:]) + [len(pairs)]
    sig_of_atom: dict[int, tuple[int, ...]] = {}
    for atom, lo, hi in zip(atom_ids.tolist(), starts.tolist(), bounds):
        sig_of_atom[atom] = tuple(pairs[lo:hi, 1].tolist())
    sig_ids: dict[tuple[int, ...], int] = {}
    for atom in atom_ids.tolist():  # atom ids ascend with element ids: deterministic order
        sig_ids.setdefault(sig_of_atom[atom], len(sig_ids))
    group_of_atom = np.full(n, -1, dtype=np.int64)
    group_of_atom[atom_ids] = [sig_ids[sig_of_atom[a]] for a in atom_ids.tolist()]

    groups: list[Group] = []
    group_of_elem = group_of_atom[labels]
    sort = np.lexsort((elem_pos, elem_space, group_of_elem))
    g_sorted, s_sorted = group_of_elem[sort], elem_space[sort]
    cut = np.flatnonzero((np.diff(g_sorted) != 0) | (np.diff(s_sorted) != 0)) + 1
    chunks = np.split(sort, cut)
    by_group: dict[int, list[np.ndarray]] = {}
    for chunk in chunks:
        by_group.setdefault(int(group_of_elem[chunk[0]]), []).append(chunk)
    for gid in sig_ids.values():
        chunks_g = by_group[gid]  # ordered by space id: producers first
        canonical = chunks_g[0]
        atoms_in_order = labels[canonical]
        _, first = np.unique(atoms_in_order, return_index=True)
        ordered_atoms = atoms_in_order[np.sort(first)]
        local = {int(a): i for i, a in enumerate(ordered_atoms.tolist())}
        lut_keys = np.array(sorted(local), dtype=np.int64)
        lut_vals = np.array([local[k] for k in lut_keys.tolist()], dtype=np.int64)
        members = []
        reasons: set[str] = set()
        for chunk in chunks_g:
            key = spaces[int(elem_space[chunk[0]])]
            channel = lut_vals[np.searchsorted(lut_keys, labels[chunk])]
            members.append(Member(key, roles[key], elem_pos[chunk], channel))
            reasons.update(frozen.get(key, ()))
        # how a frozen group came to hold what freezes it
        via = sorted({notes[m.space] for m in members if m.space in notes}) if reasons else []
        groups.append(Group(id=len(groups), size=len(local), members=tuple(members),
                            frozen=tuple(sorted(reasons)), via=tuple(via),
                            kind=_kind(members, dense, statistics, heads)))
    return groups


def fingerprint(graph: gs.Graph) -> str:
    """A hash of the graph's structure and weight shapes (plans are matched against it)."""
    h = hashlib.sha256()
    for node in graph.nodes:
        h.update(f"{node.op}|{node.name}|{[t.name for t in node.inputs]}|"
                 f"{[t.name for t in node.outputs]}\n".encode())
    for name, t in sorted(graph.tensors().items()):
        if isinstance(t, gs.Constant):
            h.update(f"{name}:{tuple(t.shape)}\n".encode())
    return h.hexdigest()[:16]
