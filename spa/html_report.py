"""``--report-html``: one self-contained HTML page about a pruning run, for people.

The page must open anywhere a pipeline stores artifacts (CI job pages, air-gapped machines, an
e-mail attachment), so it holds everything itself: inline CSS, inline SVG charts, no script, no
font, no link to anything. It shows

* the before/after table (params, FLOPs, file size, latency, channels) with the ratios;
* latency before/after as a two-bar chart;
* channels kept against the original width, one horizontal bar per prunable group on one
  linear scale (rows, not columns, so ResNet-50's ~100 groups stay readable; the chart scrolls);
* the frozen groups and why they are frozen;
* the criterion and options the plan was made with, and the validation result (with the
  sizes the symbolic input dims took).

Built from the plan alone (``spa prune --dry-run``: predicted figures, nothing measured) or from
the plan and the measured :class:`~spa.api.PruneReport`. Every text is escaped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from html import escape
from typing import TYPE_CHECKING

from spa.report import (
    fidelity_lines,
    folder_lines,
    folder_notes,
    input_dims_text,
    oracle_line,
    write_text_atomic,
)

if TYPE_CHECKING:
    import os

    from spa.api import PruneReport
    from spa.pipeline.family import FamilyReport
    from spa.plan import Plan

ROW = 18  # px per group in the channel chart
LABEL_W, BAR_W, VALUE_W = 300, 560, 150
MAX_LABEL = 44  # characters of a group name shown; the full name is in the tooltip
MAX_REASONS = 4  # reasons shown per frozen group before "… more"
KEPT, REMOVED, BEFORE = "#2b6cb0", "#e2e8f0", "#a0aec0"

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;color:#1a202c;margin:24px;
max-width:1150px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid
#e2e8f0;padding-bottom:4px}.sub{color:#4a5568;margin:0 0 12px}
table{border-collapse:collapse}td,th{padding:4px 10px;border-bottom:1px solid #edf2f7;
text-align:right;vertical-align:top}th{background:#f7fafc}td.l,th.l{text-align:left}
.scroll{max-height:640px;overflow:auto;border:1px solid #e2e8f0;padding:4px}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;background:#ebf8ff;
color:#2c5282;font-size:12px}.warn{background:#fffaf0;color:#9c4221}
.legend span{display:inline-block;width:12px;height:12px;margin:0 4px 0 12px;
vertical-align:middle}code{font-size:12px}svg text{font:12px system-ui,sans-serif}
"""


def write_html_report(path: str | os.PathLike[str], plan: Plan,
                      report: PruneReport | None = None, *, model: str = "") -> None:
    """Render the page and write it atomically to ``path``."""
    write_text_atomic(path, render_html(plan, report, model=model))


def render_html(plan: Plan, report: PruneReport | None = None, *, model: str = "") -> str:
    model = report.input if report is not None else model
    title = "SPA pruning report" if report is not None else "SPA pruning plan (dry run)"
    what = (f"{escape(model)} → {escape(report.output)}" if report is not None
            else f"{escape(model)}: nothing written, figures are predicted by the plan")
    body = [f"<h1>{title}</h1>", f'<p class="sub">{what}</p>',
            f'<p class="sub">criterion <span class="badge">'
            f'{escape(plan.recipe.criterion if plan.recipe else "?")}</span> · '
            f'{sum(1 for g in plan.groups if g.removed)} of {len(plan.groups)} prunable groups '
            f'pruned · {len(plan.frozen)} frozen · plan {escape(plan.fingerprint)}</p>',
            *_sections(plan, report)]
    return _page(f"{title}: {model}", body)


def _page(title: str, body: list[str]) -> str:
    from spa import __version__

    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{escape(title)}</title><style>{_CSS}</style></head>\n<body>\n"
            + "\n".join(body)
            + f"\n<p class=\"sub\">made by spa {escape(__version__)}</p>\n</body></html>\n")


def _sections(plan: Plan, report: PruneReport | None, h: str = "h2") -> list[str]:
    """The page's sections about one model, under ``h`` headings."""
    return [f"<{h}>Before and after</{h}>", _summary_table(plan, report),
            f"<{h}>Latency</{h}>", _latency_chart(report),
            f"<{h}>Channels kept per group</{h}>", _channel_chart(plan),
            f"<{h}>Frozen groups ({len(plan.frozen)})</{h}>", _frozen_table(plan),
            f"<{h}>Criterion and options</{h}>", _options_table(plan.options()),
            f"<{h}>Validation</{h}>", _validation(report)]


def write_folder_html(path: str | os.PathLike[str], plans: Mapping[str, Plan],
                      family: FamilyReport | None = None, *, folder: str = "") -> None:
    """The page of a folder of ONNX files pruned together (spa/pipeline/family.py), or planned
    (``family`` None: a dry run): what ties the files, then each file's sections."""
    write_text_atomic(path, render_folder_html(plans, family, folder=folder))


def render_folder_html(plans: Mapping[str, Plan], family: FamilyReport | None = None, *,
                       folder: str = "") -> str:
    title = ("SPA pruning report: a folder" if family is not None
             else "SPA pruning plan (dry run): a folder")
    what = (f"{escape(folder)} → {escape(family.output)}" if family is not None
            else f"{escape(folder)}: nothing written, figures are predicted by the plans")
    body = [f"<h1>{title}</h1>", f'<p class="sub">{what}</p>', "<h2>The files together</h2>",
            "<ul>" + "".join(f"<li>{escape(x)}</li>" for x in _folder_lines(plans, family))
            + "</ul>"]
    for k, (name, plan) in enumerate(plans.items()):
        report = family.reports.get(name) if family is not None else None
        sections = "\n".join(_sections(plan, report, "h3"))
        body += [f'<h2 id="file-{k}">{escape(name)}</h2>',
                 f'<p class="sub">criterion <span class="badge">'
                 f'{escape(plan.recipe.criterion if plan.recipe else "?")}</span> · '
                 f'{sum(1 for g in plan.groups if g.removed)} of {len(plan.groups)} prunable '
                 f'groups pruned · {len(plan.frozen)} frozen · plan {escape(plan.fingerprint)}'
                 "</p>",
                 re.sub(r'id="([\w-]+)"', rf'id="\1-{k}"', sections)]
    return _page(f"{title}: {folder}", body)


def _folder_lines(plans: Mapping[str, Plan], family: FamilyReport | None) -> list[str]:
    lines = [f"files pruned: {', '.join(plans) or 'none'}"]
    return lines if family is None else lines + folder_notes(family) + folder_lines(family)


def _rows(plan: Plan, report: PruneReport | None) -> list[tuple[str, float | None,
                                                               float | None, str]]:
    channels = (sum(g.size for g in plan.groups), sum(len(g.keep) for g in plan.groups))
    if report is not None:
        return [("params", report.params_before, report.params_after, ",d"),
                ("FLOPs (MACs)", report.flops_before, report.flops_after, ",d"),
                ("file size (bytes)", report.bytes_before, report.bytes_after, ",d"),
                ("latency (ms)", report.latency_ms_before, report.latency_ms_after, ".3f"),
                ("channels (prunable groups)", *channels, ",d")]
    p = plan.prediction
    params, flops = ((p.params_before, p.params_after), (p.flops_before, p.flops_after)) \
        if p is not None else ((None, None), (None, None))
    return [("params (predicted)", *params, ",d"), ("FLOPs (MACs, predicted)", *flops, ",d"),
            ("file size (bytes)", None, None, ",d"), ("latency (ms)", None, None, ".3f"),
            ("channels (prunable groups)", *channels, ",d")]


def _summary_table(plan: Plan, report: PruneReport | None) -> str:
    out = ['<table id="before-after"><tr><th class="l">metric</th><th>before</th><th>after</th>'
           '<th>after / before</th><th class="l"></th></tr>']
    for label, a, b, fmt in _rows(plan, report):
        if a is None or b is None:
            cells = '<td>–</td><td>–</td><td>–</td><td class="l">not measured</td>'
        else:
            frac = b / a if a else 0.0
            bar = (f'<svg width="160" height="12"><rect width="160" height="12" fill="{REMOVED}"/>'
                   f'<rect width="{160 * min(frac, 1.0):.1f}" height="12" fill="{KEPT}"/></svg>')
            cells = (f"<td>{format(a, fmt)}</td><td>{format(b, fmt)}</td><td>{frac:.3f}×</td>"
                     f'<td class="l">{bar}</td>')
        out.append(f'<tr><td class="l">{escape(label)}</td>{cells}</tr>')
    return "".join(out) + "</table>"


def _latency_chart(report: PruneReport | None) -> str:
    if report is None or report.latency_ms_before is None or report.latency_ms_after is None:
        why = "dry run" if report is None else "validation was off (--no-validate)"
        return f'<p class="sub" id="latency-chart">Not measured: {why}.</p>'
    a, b = report.latency_ms_before, report.latency_ms_after
    top = max(a, b, 1e-9)
    bars = []
    for i, (label, value, color) in enumerate((("before", a, BEFORE), ("after", b, KEPT))):
        y = 4 + i * 26
        bars.append(f'<text x="0" y="{y + 14}">{label}</text>'
                    f'<rect x="60" y="{y}" width="{max(1.0, 400 * value / top):.1f}" '
                    f'height="20" fill="{color}"><title>{value:.3f} ms</title></rect>'
                    f'<text x="{66 + 400 * value / top:.1f}" y="{y + 14}">{value:.3f} ms</text>')
    speed = f"{a / b:.2f}× faster" if b < a else f"{b / a:.2f}× slower"
    note = "" if b < a else (' <span class="badge warn">slower: keep the default --round-to '
                             'auto (channel counts in whole blocks suit onnxruntime\'s '
                             'kernels), or try --target latency</span>')
    return (f'<svg id="latency-chart" width="560" height="58" role="img" '
            f'aria-label="latency before and after">{"".join(bars)}</svg>'
            f'<p class="sub">median onnxruntime CPU latency: {speed}{note}</p>')


def _channel_chart(plan: Plan) -> str:
    if not plan.groups:
        return '<p class="sub" id="channels-chart">No prunable group.</p>'
    top = max(g.size for g in plan.groups)
    height = ROW * len(plan.groups) + 4
    width = LABEL_W + BAR_W + VALUE_W
    rows = []
    for i, g in enumerate(plan.groups):
        y = 2 + i * ROW
        name = g.name if len(g.name) <= MAX_LABEL else "…" + g.name[-(MAX_LABEL - 1):]
        full, kept = BAR_W * g.size / top, BAR_W * len(g.keep) / top
        tip = escape(f"group {g.id} {g.name}: kept {len(g.keep)} of {g.size}")
        rows.append(
            f'<g class="bar"><title>{tip}</title>'
            f'<text x="{LABEL_W - 6}" y="{y + 12}" text-anchor="end">{escape(name)}</text>'
            f'<rect x="{LABEL_W}" y="{y + 2}" width="{max(full, 1.0):.1f}" height="{ROW - 5}" '
            f'fill="{REMOVED}"/><rect class="kept" x="{LABEL_W}" y="{y + 2}" '
            f'width="{max(kept, 1.0):.1f}" height="{ROW - 5}" fill="{KEPT}"/>'
            f'<text x="{LABEL_W + full + 6:.1f}" y="{y + 12}">{len(g.keep)} / {g.size} '
            f'({100 * len(g.keep) / g.size:.0f}%)</text></g>')
    legend = (f'<p class="legend">one row per prunable group, in graph order, on one scale '
              f'(widest: {top} channels):<span style="background:{KEPT}"></span>kept'
              f'<span style="background:{REMOVED}"></span>removed</p>')
    return (legend + f'<div class="scroll"><svg id="channels-chart" width="{width}" '
            f'height="{height}" role="img" aria-label="channels kept per group">'
            + "".join(rows) + "</svg></div>")


def _frozen_table(plan: Plan) -> str:
    if not plan.frozen:
        return '<p class="sub" id="frozen">None: every group with a producer is prunable.</p>'
    out = ['<table id="frozen"><tr><th>id</th><th class="l">group</th><th>channels</th>'
           '<th class="l">why it is frozen</th></tr>']
    for f in plan.frozen:
        shown = "<br>".join(escape(r) for r in f.reasons[:MAX_REASONS])
        more = f.reasons[MAX_REASONS:]
        if more:
            shown += (f"<details><summary>{len(more)} more</summary>"
                      + "<br>".join(escape(r) for r in more) + "</details>")
        out.append(f'<tr><td>{f.id}</td><td class="l"><code>{escape(f.name)}</code></td>'
                   f'<td>{f.size}</td><td class="l">{shown}</td></tr>')
    return "".join(out) + "</table>"


def _options_table(meta: dict) -> str:
    rows = "".join(f'<tr><td class="l">{escape(str(k))}</td><td class="l"><code>'
                   f"{escape(json.dumps(v, sort_keys=True))}</code></td></tr>"
                   for k, v in sorted(meta.items()))
    return f'<table id="options">{rows}</table>'


def _validation(report: PruneReport | None) -> str:
    if report is None:
        return '<p class="sub">Not run: dry run.</p>'
    lines = [oracle_line(report)]
    if report.latency_ms_before is not None or report.masked_relative_diff is not None:
        lines.append("onnxruntime ran both models; output names, dtypes and shapes are unchanged")
    if report.input_dims:
        lines.append(f"symbolic input dims of the inputs SPA made: {input_dims_text(report)}")
    if report.compensated_layers:
        lines.append(f"compensated layers (weights updated): {report.compensated_layers}")
    lines.extend(fidelity_lines(report))
    lines.append(f"params and FLOPs measured on the written model; the plan predicted "
                 f"{report.predicted_params_after:,d} params, {report.predicted_flops_after:,d} "
                 "FLOPs")
    return "<ul>" + "".join(f"<li>{escape(x)}</li>" for x in lines) + "</ul>"
