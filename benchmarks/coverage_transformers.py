"""Which third-party transformers SPA prunes, and why the rest freezes.

For each HuggingFace (small config, random weights) and timm vision transformer: export with the
dynamo exporter, analyse, count prunable/frozen groups per kind, collect the freeze reasons, and
prune heads and MLP at 0.5 under the numeric oracle.
Results: ``results/coverage_transformers.json``.

    python -m benchmarks.coverage_transformers
"""

from __future__ import annotations

import collections
import re
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import write_result


def _reason_kind(reason: str) -> str:
    """A reason without node and tensor names, so that reasons can be counted."""
    return re.sub(r"'[^']*'", "'…'", reason)


def survey(name: str, export: Callable[[Path], Path], workdir: Path, *,
           dims: tuple[tuple[str, int], ...] = (), more: Callable[[Any], dict] | None = None,
           ) -> dict:
    """Export (``export(path)`` writes the model there), analyse, and prune heads and MLP at 0.5
    under the numeric oracle (``dims``: its symbolic input dims); ``more(report)`` adds fields.
    A failure is recorded, not raised."""
    from spa.api import CheckOptions, PruneOptions, analyze, prune

    entry: dict = {"model": name}
    try:
        path = export(workdir / f"{name}.onnx")
        analysis = analyze(path)
        kinds = collections.Counter((g.kind.value, g.prunable) for g in analysis.groups
                                    if g.producers)
        entry["groups"] = {f"{k}{'' if ok else '_frozen'}": n for (k, ok), n in kinds.items()}
        reasons = collections.Counter(_reason_kind(r) for g in analysis.frozen_groups
                                      for r in g.frozen)
        entry["freeze_reasons"] = dict(reasons.most_common(6))
        report, _ = prune(path, workdir / f"{name}_pruned.onnx",
                          PruneOptions(ratio=0.0, heads_ratio=0.5, mlp_ratio=0.5),
                          CheckOptions(check_masked=True, latency=False, input_dims=dims))
        entry.update(pruned=True, params_ratio=report.params_after / report.params_before,
                     flops_ratio=report.flops_after / report.flops_before,
                     oracle_relative_diff=report.masked_relative_diff,
                     **(more(report) if more else {}))
    except Exception as exc:  # record, do not stop the survey
        entry.update(pruned=False, error=f"{type(exc).__name__}: {exc}"[:400],
                     where=traceback.format_exc().splitlines()[-3:])
    return entry


def _dynamo(build) -> Callable[[Path], Path]:
    def export(path: Path) -> Path:
        from models.export import export_module

        module, inputs = build()
        return export_module(module, inputs, path, exporter="dynamo")

    return export


def main() -> None:
    from models.thirdparty import HF_MODELS, VISION_TRANSFORMERS

    workdir = Path(tempfile.mkdtemp(prefix="spa-cov-"))
    rows = []
    for name, build in {**HF_MODELS, **VISION_TRANSFORMERS}.items():
        row = survey(name, _dynamo(build), workdir)
        rows.append(row)
        print(f"{name:24} pruned={row.get('pruned')} groups={row.get('groups')} "
              f"params×{row.get('params_ratio', 0):.2f} {row.get('error', '')[:120]}")
    path = write_result("coverage_transformers", {"models": rows})
    print(f"wrote {path} at {time.strftime('%H:%M:%S')}")


if __name__ == "__main__":
    main()
