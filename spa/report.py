"""Human and JSON views of an analysis (``spa analyze``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from spa.coupling.types import Role
from spa.metrics import CostModel

if TYPE_CHECKING:
    from spa.coupling.analysis import Analysis, Group


def _group_dict(g: Group) -> dict:
    return {
        "id": g.id, "name": g.name, "kind": g.kind.value, "channels": g.size,
        "prunable": g.prunable,
        "producers": [f"{m.space[0]}[{m.space[1]}]" for m in g.producers],
        "consumers": [f"{m.space[0]}[{m.space[1]}]" for m in g.consumers],
        "members": len([m for m in g.members if m.role is not Role.VIRTUAL]),
        "frozen": list(g.frozen),
    }


def analysis_summary(analysis: Analysis) -> dict:
    counts = CostModel(analysis.model.graph).count()
    groups = [g for g in analysis.groups if g.producers]
    return {
        "model": str(analysis.model.path or "<memory>"),
        "fingerprint": analysis.fingerprint,
        "opset": analysis.model.opset,
        "nodes": len(analysis.model.graph.nodes),
        "params": counts.params,
        "flops": counts.flops,
        "groups": [_group_dict(g) for g in groups],
        "prunable_groups": len(analysis.prunable_groups),
        "prunable_channels": sum(g.size for g in analysis.prunable_groups),
        "frozen_groups": len(analysis.frozen_groups),
    }


def analysis_text(analysis: Analysis, *, explain: bool = False) -> str:
    s = analysis_summary(analysis)
    lines = [f"model {s['model']}  opset {s['opset']}  nodes {s['nodes']}  "
             f"params {s['params']:,}  FLOPs (MACs) {s['flops']:,}",
             f"groups: {s['prunable_groups']} prunable ({s['prunable_channels']} channels), "
             f"{s['frozen_groups']} frozen", "",
             f"{'id':>4} {'channels':>8} {'status':<8} {'producers → consumers'}"]
    for g in s["groups"]:
        status = "prunable" if g["prunable"] else ("frozen" if g["frozen"] else "fixed")
        flow = f"{', '.join(g['producers'][:3])} → {', '.join(g['consumers'][:3]) or '-'}"
        lines.append(f"{g['id']:>4} {g['channels']:>8} {status:<8} {flow}")
        if explain and g["frozen"]:
            lines.extend(f"{'':>14}because {r}" for r in g["frozen"])
    if not explain and s["frozen_groups"]:
        lines.append("\n(run with --explain to see why groups are frozen)")
    return "\n".join(lines)
