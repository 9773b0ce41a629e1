"""Residual blocks: where depth pruning may cut.

A **residual block** is an ``Add(x, f)`` whose branch ``f`` is a single-entry, single-exit
subgraph of the stream ``x``:

* the branch is every node that lies on a path from ``x`` to ``f`` (descendants of ``x`` that
  are ancestors of ``f``); it may also read *side* tensors that do not depend on ``x``
  (constants, an attention mask made once for all layers);
* no tensor made inside the branch is read outside it (but ``f`` by the ``Add``), and none is a
  graph output, but for a KV cache: an attention branch of a decoder may write ``present``
  caches whose ``past`` inputs only the branch reads (pairs found by the coupling analysis);
  dropping the block removes both from the signature;
* ``Add``'s output has ``x``'s shape (no broadcast of the stream by the branch).

Dropping the block rewrites ``Add(x, f)`` into ``x``; the branch is then dead. Its numeric
oracle is the original with the branch's *tail* weights zeroed, so that ``f == 0`` exactly: the
tail is the branch's last weighted producer (``Conv``, ``ConvTranspose``, ``Gemm``, ``MatMul``
with a constant weight; or a ``BatchNormalization``, whose scale and shift zeroed give 0),
followed only by constant ``Add`` (a bias, zeroed too) and constant ``Mul`` (a layer scale: 0
stays 0). A branch ending otherwise, or whose tail constants other nodes also read, is not a
candidate, and the result says why.

**Fused residual adds.** onnxruntime's ``SkipLayerNormalization`` and
``SkipSimplifiedLayerNormalization`` (inputs ``input, skip, gamma[, beta][, bias]``; outputs the
normalised sum, mean, inverse std, and ``input_skip_bias_sum``) add the stream inside the norm:
the branch feeds ``input`` with the stream in ``skip``, or the other way round. A block there
starts at the stream and, when the stream is itself the sum output (3) of such a norm, at that
norm's normalised output (0) too, a function of the sum alone: that is where a pre-norm layer's
branch reads. Dropping it rewrites the fused norm into the plain norm of the stream (same
epsilon, gamma, beta) whose sum output is the stream itself. A ``bias`` of the fused norm is
added to the branch only, so it goes with it: the masked original zeroes it with the branch's
last layer. The fused norm's mean and inverse-std outputs must be unread, and its sum output
must not be a graph output. A ``MatMulNBits`` last layer is zeroed by its scales (and bias):
its dequantised weight ``(q − zero point) · scale`` is then exactly 0.

The search is structural: no node or tensor names are matched.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

if TYPE_CHECKING:
    from spa.coupling.analysis import Analysis

log = logging.getLogger(__name__)
# op → the input slots zeroed to make its output 0 (MatMulNBits: scales and bias)
_WEIGHTED = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "MatMul": (1,),
             "MatMulNBits": (2, 5)}
# fused residual norm → the plain norm it becomes without the branch, and its bias slot
FUSED_RESIDUAL = {"SkipLayerNormalization": ("LayerNormalization", 4),
                  "SkipSimplifiedLayerNormalization": ("SimplifiedLayerNormalization", 3)}
SUM = 3  # a fused residual norm's input_skip_bias_sum output
SKIP_EPSILON = 1e-12  # their epsilon when the attribute is absent (onnxruntime's schema)


@dataclass(frozen=True)
class Block:
    """A residual block: the ``Add`` node, its stream input ``x``, its branch output ``f``, the
    branch's nodes (in graph order) and the constants zeroed to make ``f`` exactly 0."""

    add: str
    stream: str
    branch: str
    nodes: tuple[str, ...]
    zero: tuple[str, ...]
    caches: tuple[tuple[str, str], ...] = ()  # KV-cache pairs (past input, present output)


@dataclass(frozen=True)
class Blocks:
    """The candidate blocks in graph order, and why other residual adds are not candidates
    (node name → reason)."""

    candidates: tuple[Block, ...]
    refused: dict[str, str]

    def by_add(self) -> dict[str, Block]:
        return {b.add: b for b in self.candidates}


class FindBlocks:
    """``FindBlocks().run(analysis)``: the residual blocks of the analysed graph."""

    def run(self, analysis: Analysis) -> Blocks:
        return find_blocks(analysis.model.graph, kv_pairs(analysis))


def kv_pairs(analysis: Analysis) -> dict[str, str]:
    """The analysis's KV-cache pairs: present output name → past input name."""
    return {c.present[0]: c.past[0] for c in analysis.kv_cache}


def find_blocks(graph: gs.Graph, caches: Mapping[str, str] | None = None) -> Blocks:
    """The residual blocks of ``graph``; ``caches`` (present output → past input: the KV-cache
    pairs of spa/coupling/analysis.py) may go with a dropped attention branch."""
    caches = caches or {}
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    outputs = {t.name for t in graph.outputs}
    found: list[Block] = []
    refused: dict[str, str] = {}
    for node in graph.nodes:
        if not is_residual(node):
            continue
        for x, f in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
            branch = _branch(x, f)
            if not branch:
                continue
            block = _block(node, x, f, branch, outputs, order, caches, graph)
            if isinstance(block, Block) and node.op in FUSED_RESIDUAL:
                block = _fused(node, block, outputs)
            if isinstance(block, str):
                refused[node.name] = block
            else:
                found.append(block)
            break
    return Blocks(tuple(found), refused)


def is_residual(node: gs.Node) -> bool:
    """An ``Add`` of two computed tensors, or a fused residual norm with computed input and
    skip: where a residual block may end."""
    if node.op == "Add":
        return len(node.inputs) == 2 and not any(isinstance(t, gs.Constant) for t in node.inputs)
    return node.op in FUSED_RESIDUAL and len(node.inputs) >= 3 and not any(
        isinstance(t, gs.Constant) for t in node.inputs[:2])


def _fused(node: gs.Node, block: Block, outputs: set[str]) -> Block | str:
    """``block`` ending in fused residual norm ``node``, with the norm's bias zeroed too, or
    why the norm cannot become the plain norm of the stream."""
    if any(i < len(node.outputs) and (node.outputs[i].outputs or node.outputs[i].name in outputs)
           for i in (1, 2)):
        return (f"{node.op} node '{node.name}' has its mean or inverse-std output read: the "
                "plain norm it would become does not write it")
    if len(node.outputs) > SUM and node.outputs[SUM].name in outputs:
        return (f"the sum output of {node.op} node '{node.name}' is a graph output: dropping "
                "the block would rename it")
    slot = FUSED_RESIDUAL[node.op][1]
    bias = node.inputs[slot] if slot < len(node.inputs) and node.inputs[slot].name else None
    if bias is None:
        return block
    if not isinstance(bias, gs.Constant) or len(bias.outputs) > 1:
        return (f"the bias '{bias.name}' of {node.op} node '{node.name}' is computed or shared: "
                "it cannot go with the branch")
    return replace(block, zero=(*block.zero, bias.name) if np.any(np.asarray(bias.values))
                   else block.zero)


def _entries(x: gs.Tensor) -> list[gs.Tensor]:
    """Where a branch of stream ``x`` may start: ``x``, and when ``x`` is a fused residual
    norm's sum output, that norm's normalised output (a function of ``x`` alone)."""
    p = x.inputs[0] if x.inputs else None
    if p is not None and p.op in FUSED_RESIDUAL and len(p.outputs) > SUM \
            and p.outputs[SUM] is x:
        return [x, p.outputs[0]]
    return [x]


def _branch(x: gs.Tensor, f: gs.Tensor) -> list[gs.Node]:
    """The nodes on paths from ``x`` (or the norm of it a fused residual norm writes) to ``f``
    (empty when ``f`` does not depend on ``x``)."""
    starts = {id(t) for t in _entries(x)}
    below: dict[int, gs.Node] = {}
    stack = [n for t in _entries(x) for n in t.outputs]
    while stack:
        n = stack.pop()
        if id(n) in below:
            continue
        below[id(n)] = n
        stack.extend(c for t in n.outputs for c in t.outputs)
    if not f.inputs or id(f.inputs[0]) not in below:
        return []
    branch: dict[int, gs.Node] = {}
    stack = [f.inputs[0]]
    while stack:
        n = stack.pop()
        if id(n) in branch or id(n) not in below:
            continue
        branch[id(n)] = n
        stack.extend(t.inputs[0] for t in n.inputs if id(t) not in starts and t.inputs)
    return list(branch.values())


def _block(add: gs.Node, x: gs.Tensor, f: gs.Tensor, branch: list[gs.Node], outputs: set[str],
           order: dict[int, int], caches: Mapping[str, str], graph: gs.Graph) -> Block | str:
    """The block, or why this residual add is not a candidate."""
    inside = {id(n) for n in branch}
    pairs = []
    for n in branch:
        for t in n.outputs:
            if t.name in outputs:
                why = _cache_pair(n, t, caches, graph, inside)
                if isinstance(why, str):
                    return why
                pairs.append(why)
                continue
            leak = next((c for c in t.outputs if id(c) not in inside and c is not add), None)
            if leak is not None:
                return (f"tensor '{t.name}' of the branch is also read by node '{leak.name}' "
                        "outside it")
    out = add.outputs[0]
    if x.shape is not None and out.shape is not None and list(x.shape) != list(out.shape):
        return f"the branch broadcasts the stream '{x.name}' from {x.shape} to {out.shape}"
    zero = _tail(f, inside)
    if isinstance(zero, str):
        return zero
    nodes = tuple(n.name for n in sorted(branch, key=lambda n: order[id(n)]))
    return Block(add.name, x.name, f.name, nodes, zero, tuple(sorted(pairs)))


def _cache_pair(n: gs.Node, t: gs.Tensor, caches: Mapping[str, str], graph: gs.Graph,
                inside: set[int]) -> tuple[str, str] | str:
    """(past, present) when graph output ``t`` of branch node ``n`` is a KV cache whose past
    input only the branch reads (both go with the block), else why the block cannot go."""
    past = caches.get(t.name)
    if past is None:
        return (f"node '{n.name}' of the branch writes graph output '{t.name}', which is not "
                "a KV cache: dropping the block would remove it")
    readers: list[gs.Node] = next((i.outputs for i in graph.inputs if i.name == past), [])
    other = next((r for r in readers if id(r) not in inside), None)
    if other is not None:
        return (f"KV cache '{past}' of node '{n.name}' is also read by node '{other.name}' "
                "outside the branch")
    if any(o.name == past for o in graph.outputs):
        return f"KV cache '{past}' is also a graph output"
    return past, t.name


def _tail(f: gs.Tensor, inside: set[int]) -> tuple[str, ...] | str:
    """The constants whose zeroing makes ``f`` exactly 0, or why there are none."""
    zero: list[gs.Constant] = []
    tail: set[int] = set()
    t = f
    while True:
        n = t.inputs[0]
        tail.add(id(n))
        consts = [i for i in n.inputs if isinstance(i, gs.Constant)]
        live = [i for i in n.inputs if not isinstance(i, gs.Constant)]
        if n.op in ("Add", "Mul") and len(consts) == 1 and len(live) == 1 and live[0].inputs \
                and id(live[0].inputs[0]) in inside:
            if n.op == "Add":
                zero.append(consts[0])
            t = live[0]
            continue
        if n.op == "BatchNormalization" and all(isinstance(i, gs.Constant) for i in n.inputs[1:3]):
            zero.extend(n.inputs[1:3])
            break
        slots = _WEIGHTED.get(n.op)
        if slots is not None and len(n.inputs) > 1 and isinstance(n.inputs[1], gs.Constant) \
                and all(isinstance(n.inputs[s], gs.Constant) for s in slots if s < len(n.inputs)
                        and n.inputs[s].name):
            zero.extend(n.inputs[s] for s in slots if s < len(n.inputs) and n.inputs[s].name)
            break
        return (f"the branch ends in {n.op} node '{n.name}', whose output no weight of its "
                "own zeroes")
    names = []
    for c in zero:
        if not np.any(np.asarray(c.values)):
            continue  # already zero: nothing to write, shared or not
        other = next((r for r in c.outputs if id(r) not in tail), None)
        if other is not None:
            return (f"weight '{c.name}' of the branch's last layer is also read by node "
                    f"'{other.name}'")
        names.append(c.name)
    return tuple(dict.fromkeys(names))


def dead_nodes(graph: gs.Graph, stream: Mapping[str, str],
               removed: Collection[str] = ()) -> set[str]:
    """The nodes no graph output (but the ``removed`` ones) depends on once each ``Add`` in
    ``stream`` is rewritten into its stream input (what the rewrite's cleanup removes), by
    name."""
    live: set[int] = set()
    seen: set[int] = set()
    stack = [t for t in graph.outputs if t.inputs and t.name not in removed]
    while stack:
        t = stack.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        n = t.inputs[0]
        ins = [i for i in n.inputs if i.name == stream[n.name]] if n.name in stream \
            else n.inputs
        # a dropped fused residual norm's sum output is its stream: the norm need not run
        if n.name not in stream or n.op not in FUSED_RESIDUAL or t is n.outputs[0]:
            live.add(id(n))
        stack.extend(i for i in ins if i.inputs)
        for g in _subgraphs(n):
            stack.extend(i for i in _outer_reads(g) if i.inputs)
    return {n.name for n in graph.nodes if id(n) not in live}


def _subgraphs(node: gs.Node) -> list[gs.Graph]:
    return [v for v in node.attrs.values() if isinstance(v, gs.Graph)]


def _outer_reads(g: gs.Graph) -> list[gs.Tensor]:
    """Tensors a subgraph reads from the enclosing scope (produced outside it)."""
    inner = {id(n) for n in g.nodes}
    return [t for n in g.nodes for t in n.inputs
            if t.inputs and id(t.inputs[0]) not in inner]
