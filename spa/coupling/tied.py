"""Tied views in the coupling analysis: a folded view of a constant the graph still holds *is*
that constant, so its axes are coupled with its source's.

spa/ir/tied.py writes a view (HuggingFace's tied ``lm_head``: ``Transpose(wte)`` beside the
embedding's ``Gather(wte, ids)``) as its layout op reading the source again, which holds only if
pruning slices both alike. So the analysis gives each live view a stand-in node, ``source →
view``, with the op and attributes of the layout op that was folded, and the op's own rule
couples it like any node: ``Transpose`` couples view axis ``k`` with source axis ``perm[k]``,
``Reshape`` regroups and lets its target follow, ``Cast`` couples every axis. A live axis the
rule does not map freezes, with the stand-in (``<node>::tied``) in the reason, as for any node.
A view through several layout ops is not mapped (:data:`CHAIN`): a middle shape could not
follow, so its live axes freeze. Copies are not coupled (spa/ir/load.py says why); they are
joined only where their kept values agree.

Stand-ins read and write stand-in tensors (same names, same lazily read values), so wiring them
leaves the graph as it is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx_graphsurgeon as gs

from spa.coupling.registry import register
from spa.ir.params import graph_constants
from spa.ir.tied import Tie, Ties, live

if TYPE_CHECKING:
    from spa.coupling.context import NodeContext

CHAIN = "TiedChain"  # stand-in op of a view through several layout ops (domain "spa")


def tied_nodes(graph: gs.Graph, ties: Ties) -> list[gs.Node]:
    """One stand-in node per live view of ``graph`` (sorted by the view's name)."""
    constants = graph_constants(graph)
    return [_stand_in(tie, constants[tie.source], constants[name])
            for name, tie in sorted(live(ties, graph).items()) if not tie.is_copy]


def _stand_in(tie: Tie, source: gs.Constant, view: gs.Constant) -> gs.Node:
    x, y = _twin(source), _twin(view)
    if len(tie.steps) > 1:
        ops = ", ".join(s.op for s in tie.steps)
        return gs.Node(CHAIN, f"{view.name}::tied", {"ops": ops}, [x], [y], domain="spa")
    step = tie.steps[0]
    args = [gs.Constant(name, value) for name, value in step.args]
    return gs.Node(step.op, f"{step.node}::tied", dict(step.attrs), [x, *args], [y])


def _twin(t: gs.Constant) -> gs.Constant:
    return gs.Constant(t.name, t._values)  # the same values object: nothing is read or copied


@register(CHAIN, domain="spa")
def chain(ctx: NodeContext) -> None:
    view, source = ctx.output(0), ctx.input(0)
    assert view is not None and source is not None  # the chain node built here has both
    ctx.refuse(f"'{view.name}' is a view of the tied constant '{source.name}' "
               f"through several layout ops ({ctx.attr('ops')}): its axes keep their length")
