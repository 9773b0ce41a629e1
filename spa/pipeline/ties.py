"""What ties the files of a folder pruned together, and how their tied groups follow one plan.

A folder of ONNX files is pruned as one model (spa/pipeline/family.py):

* **Tensors between files.** A graph output of one file that another file of the same
  precision variant (:func:`variant`) reads as an input (``present.X`` → ``past_key_values.X``
  or ``past.X``) may change shape in both
  (:class:`~spa.coupling.analysis.CouplingAnalysis` ``free``): :func:`passed`, :func:`pairs`.
* **Ties** (:func:`tied_sites`). A channel space of one file is tied to one of another file
  when it is the same axis of such a tensor, or of a weight both files hold (the same bytes,
  shape and type; a weight that is not unique in its file ties nothing). Tied spaces must lose
  the same entries. The groups they touch form components; in each, the group with the most
  members decides (the first-step decoder holds the cross-attention's key and value weights,
  which the with-past decoder only reads as caches), by its own file's plan, and every other
  group follows it entry by entry (:func:`follow`). A component that cannot follow (a member
  frozen or unscored in its file, spaces of different lengths, entries that do not line up, a
  weight one file prunes and another keeps) keeps all of its channels in every file, and the
  report says why.
* **Float16 copies** (spa/pipeline/variants.py) tie to their plain file weight by weight
  (:func:`copy_sites`) and follow it, unless that would keep channels whole in the plain file
  too (:func:`parted`). Saved plans are checked to lose the same entries of every tied space
  (:func:`ties_broken`).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import TYPE_CHECKING

import networkx as nx
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from spa.pipeline import encdec
from spa.pipeline.variants import CastCopy, variant
from spa.plan import removed_indices

if TYPE_CHECKING:
    from spa.coupling.analysis import Analysis, Group
    from spa.coupling.types import SpaceKey
    from spa.plan import Plan

Site = tuple[str, "SpaceKey"]  # a channel space of one file: (file name, space)
GroupRef = tuple[str, int]  # a group of one file: (file name, group id)


def _signatures(headers: Mapping[str, onnx.ModelProto]
                ) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Each file's graph input names, and its output names."""
    return ({n: {i.name for i in h.graph.input} for n, h in headers.items()},
            {n: {o.name for o in h.graph.output} for n, h in headers.items()})


def passed(headers: Mapping[str, onnx.ModelProto]) -> dict[str, set[str]]:
    """Per file, its graph inputs and outputs that another file writes or reads back."""
    free: dict[str, set[str]] = {n: set() for n in headers}
    for a, b, out, inp in _passings(*_signatures(headers)):
        free[a].add(out)
        free[b].add(inp)
    return free


def pairs(headers: Mapping[str, onnx.ModelProto]) -> list[tuple[str, str]]:
    """(writer, reader) of the files one of which reads back what the other writes, sorted."""
    return sorted({(a, b) for a, b, _, _ in _passings(*_signatures(headers))})


def _passings(inputs: Mapping[str, set[str]], outputs: Mapping[str, set[str]]
              ) -> Iterable[tuple[str, str, str, str]]:
    """(writer file, reader file, output name, input name) of every tensor passed on, between
    files of one variant (:func:`variant`)."""
    for a, outs in outputs.items():
        for out in sorted(outs):
            head, dot, rest = out.partition(".")
            for prefix in encdec.PASSED.get(head, ()) if dot else ():
                for b, ins in inputs.items():
                    if b != a and f"{prefix}.{rest}" in ins and variant(a) == variant(b):
                        yield a, b, out, f"{prefix}.{rest}"


def tied_sites(analyses: Mapping[str, Analysis], headers: Mapping[str, onnx.ModelProto]
               ) -> list[tuple[Site, Site]]:
    """Pairs of channel spaces of two files that must lose the same entries: an axis of a
    tensor passed between them, or of a weight both hold (the same bytes; a float16 copy's
    weights: :func:`copy_sites`)."""
    live = _live(analyses)
    pairs: list[tuple[Site, Site]] = []
    inputs, outputs = _signatures(headers)
    ranks = {n: {v.name: len(v.type.tensor_type.shape.dim)
                 for v in (*h.graph.input, *h.graph.output)} for n, h in headers.items()}
    for a, b, out, inp in _passings(inputs, outputs):
        for axis in range(ranks[a][out]):
            if (out, axis) in live[a] or (inp, axis) in live[b]:
                pairs.append(((a, (out, axis)), (b, (inp, axis))))
    owners: dict[str, list[tuple[str, str]]] = {}
    for n, analysis in analyses.items():
        for digest, name in _weights(analysis.model.graph, {k[0] for k in live[n]}).items():
            owners.setdefault(digest, []).append((n, name))
    for held in owners.values():
        first, *others = held
        pairs += [p for other in others for p in _axes_tied(live, first, other)]
    return pairs


def copy_sites(analyses: Mapping[str, Analysis], copies: Mapping[str, CastCopy]
               ) -> list[tuple[Site, Site]]:
    """The channel spaces a float16 copy's weights tie to its plain file's (the same name:
    :func:`spa.pipeline.variants.cast_copies`)."""
    live = _live(analyses)
    return [p for n, copy in copies.items() if copy.plain in analyses for name in copy.names
            for p in _axes_tied(live, (copy.plain, name), (n, name))]


def _live(analyses: Mapping[str, Analysis]) -> dict[str, set[SpaceKey]]:
    """Each file's channel spaces."""
    return {n: {m.space for g in a.groups for m in g.members} for n, a in analyses.items()}


def _axes_tied(live: Mapping[str, set[SpaceKey]], first: tuple[str, str],
               other: tuple[str, str]) -> list[tuple[Site, Site]]:
    """The pairs of a weight held by two files (file, name): each axis a channel space in
    either."""
    axes = {k[1] for n, name in (first, other) for k in live[n] if k[0] == name}
    return [((first[0], (first[1], ax)), (other[0], (other[1], ax))) for ax in sorted(axes)]


def _weights(graph: gs.Graph, names: set[str]) -> dict[str, str]:
    """The weights among ``names`` (rank 2 and up) by a digest of their type, shape and bytes,
    those alone in their file with it."""
    seen: dict[str, list[str]] = {}
    tensors = graph.tensors()
    for name in sorted(names):
        t = tensors.get(name)
        if isinstance(t, gs.Constant) and len(t.shape) >= 2:
            seen.setdefault(encdec.digest(t.values), []).append(name)
    return {d: ns[0] for d, ns in seen.items() if len(ns) == 1}


def follow(analyses: Mapping[str, Analysis], plans: Mapping[str, Plan],
           pairs: list[tuple[Site, Site]], prefer: Collection[str] = (),
           last: Collection[str] = ()
           ) -> tuple[dict[str, dict[int, np.ndarray]], int, list[str]]:
    """Each file's groups whose channels a tied group decides (their kept channels), how many
    follow, and the components kept whole, with why; a group of a ``prefer`` file (one
    planned on calibration data) decides before the others."""
    on: dict[Site, list[GroupRef]] = {}
    groups: dict[GroupRef, Group] = {}
    for n, a in analyses.items():
        for g in a.groups:
            groups[(n, g.id)] = g
            for m in g.members:
                on.setdefault((n, m.space), []).append((n, g.id))
    links = nx.Graph()
    for s, t in pairs:
        refs = on.get(s, []) + on.get(t, [])
        links.add_nodes_from(refs)
        links.add_edges_from(zip(refs, refs[1:]))
    planned = {(n, gp.id): np.asarray(gp.keep) for n, p in plans.items() for gp in p.groups}
    keep: dict[str, dict[int, np.ndarray]] = {n: {} for n in analyses}
    whole: list[str] = []
    followed = 0
    for comp in sorted(map(sorted, nx.connected_components(links))):
        files = {n for n, _ in comp}
        if len(files) < 2 or not any(r in planned for r in comp):
            continue  # within one file, or nothing in it could lose channels anyway
        why = _unfollowable(comp, groups, planned, pairs, on)
        decided = None if why else _propagate(comp, groups, planned, pairs, on, prefer, last)
        if decided is None or (why := _mismatch(comp, groups, decided, pairs, analyses)):
            names = ", ".join(f"{groups[r].name} in {r[0]}" for r in comp)
            whole.append(f"{names}: kept whole, {why or 'the entries do not line up'}")
            decided = {r: np.arange(groups[r].size) for r in comp}
        for r, k in decided.items():
            if r in planned and not np.array_equal(k, planned[r]):
                followed += 1
            if r in planned:
                keep[r[0]][r[1]] = k
    return keep, followed, whole


def _unfollowable(comp: list[GroupRef], groups: Mapping[GroupRef, Group],
                  planned: Mapping[GroupRef, np.ndarray], pairs: list[tuple[Site, Site]],
                  on: Mapping[Site, list[GroupRef]]) -> str | None:
    """Why a component cannot lose channels at all, or None."""
    for r in comp:
        if r not in planned:
            g = groups[r]
            reasons = sorted(g.frozen) or ["not pruned in that file"]
            more = f"; and {len(reasons) - 1} more" if len(reasons) > 1 else ""
            return f"{g.name} cannot lose channels in {r[0]} ({reasons[0]}{more})"
    for s, t in pairs:
        if s in on and t in on and any(r in comp for r in on[s]):
            continue
        if any(x in on and any(r in comp for r in on[x]) for x in (s, t)):
            one, other = (s, t) if s in on else (t, s)
            return (f"'{one[1][0]}' axis {one[1][1]} is a channel space in {one[0]} but not "
                    f"'{other[1][0]}' in {other[0]}")
    return None


def _leader(comp: list[GroupRef], groups: Mapping[GroupRef, Group],
            prefer: Collection[str] = (), last: Collection[str] = ()) -> GroupRef:
    """The group whose file's plan decides: one of a ``prefer`` file first, then one not of a
    ``last`` file (a float16 copy), then the one with the most members (most weights)."""
    return max(comp, key=lambda r: (r[0] in prefer, r[0] not in last,
                                    len(groups[r].members)))  # the first of equals


def _propagate(comp: list[GroupRef], groups: Mapping[GroupRef, Group],
               planned: Mapping[GroupRef, np.ndarray], pairs: list[tuple[Site, Site]],
               on: Mapping[Site, list[GroupRef]], prefer: Collection[str] = (),
               last: Collection[str] = ()) -> dict[GroupRef, np.ndarray] | None:
    """From the leader's plan, each group's kept channels so that tied spaces lose the same
    entries; None when a group would have to lose part of a channel."""
    tied: dict[Site, list[Site]] = {}
    for s, t in pairs:
        tied.setdefault(s, []).append(t)
        tied.setdefault(t, []).append(s)
    lead = _leader(comp, groups, prefer, last)
    decided = {lead: planned[lead]}
    todo = [lead]
    while todo:
        r = todo.pop()
        gone = np.ones(groups[r].size, bool)
        gone[decided[r]] = False
        for m in groups[r].members:
            removed = set(m.indices[gone[m.channels]].tolist())
            for t in tied.get((r[0], m.space), ()):
                for h in on.get(t, ()):
                    for mh in (x for x in groups[h].members if x.space == t[1]):
                        out = np.isin(mh.indices, list(removed))
                        drop = set(mh.channels[out].tolist())
                        if drop & set(mh.channels[~out].tolist()):
                            return None  # a channel partly removed
                        k = np.setdiff1d(np.arange(groups[h].size), sorted(drop))
                        if h in decided:
                            if not np.array_equal(decided[h], k):
                                return None
                        elif k.size == 0:
                            return None
                        else:
                            decided[h] = k
                            todo.append(h)
    missing = [r for r in comp if r not in decided]
    return None if missing else decided


def _mismatch(comp: list[GroupRef], groups: Mapping[GroupRef, Group],
              decided: Mapping[GroupRef, np.ndarray], pairs: list[tuple[Site, Site]],
              analyses: Mapping[str, Analysis]) -> str | None:
    """Why the decided channels leave two tied spaces with different entries, or None."""
    kept: dict[Site, np.ndarray] = {}
    for r in comp:
        g = groups[r]
        gone = np.ones(g.size, bool)
        gone[decided[r]] = False
        for m in g.members:
            site = (r[0], m.space)
            length = analyses[r[0]].lengths[m.space]
            mask = kept.setdefault(site, np.ones(length, bool))
            mask[m.indices[gone[m.channels]]] = False
    for s, t in pairs:
        if s in kept and t in kept and (kept[s].shape != kept[t].shape
                                        or not np.array_equal(kept[s], kept[t])):
            return (f"'{s[1][0]}' in {s[0]} and '{t[1][0]}' in {t[0]} (axis {s[1][1]}) would "
                    f"lose different entries")
    return None


def ties_broken(analyses: Mapping[str, Analysis], plans: Mapping[str, Plan],
                pairs: list[tuple[Site, Site]]) -> str | None:
    """Which two tied spaces the plans leave with different entries, or None."""
    removed = {n: removed_indices(analyses[n], p) for n, p in plans.items()}
    none = np.zeros(0, np.int64)
    for (a, s), (b, t) in pairs:
        ra, rb = (removed.get(n, {}).get(k, none) for n, k in ((a, s), (b, t)))
        if not np.array_equal(ra, rb):
            return (f"'{s[0]}' in {a} and '{t[0]}' in {b} (axis {s[1]}) would lose different "
                    f"entries")
    return None


def parted(analyses: Mapping[str, Analysis], plans: Mapping[str, Plan],
           sites: list[tuple[Site, Site]], copies: Mapping[str, CastCopy],
           prefer: Collection[str]) -> dict[str, str]:
    """The float16 copies that cannot follow their plain file (a group the copy cannot prune,
    such as a cache only the plain files pass on): tied to it, they would keep channels
    whole in the plain file too. Each with why; ``sites``: the ties without the copies'."""
    if not copies:
        return {}
    apart = follow(analyses, plans, sites, prefer=prefer)[0]
    out = {}
    for n, copy in copies.items():
        keep, _, whole = follow(analyses, plans, sites + copy_sites(analyses, {n: copy}),
                                prefer=prefer, last={n})
        if any(f not in copies and f in plans
               and _kept(keep[f], plans[f]) != _kept(apart[f], plans[f]) for f in analyses):
            out[n] = next((w for w in whole if f" in {n}" in w), "its ties keep channels")
    return out


def _kept(keep: Mapping[int, np.ndarray], plan: Plan) -> dict[int, tuple[int, ...]]:
    """A file's groups' kept channels: as ties decided them (``keep``), else as planned."""
    return {g.id: tuple(np.asarray(keep.get(g.id, g.keep)).tolist()) for g in plan.groups}


__all__ = ["GroupRef", "Site", "copy_sites", "follow", "pairs", "parted", "passed", "tied_sites",
           "ties_broken"]
