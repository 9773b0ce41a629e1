"""Test-side use of the numeric oracle (DESIGN.md): prune, then assert the three oracles.

1. pruned ≡ masked original (consumers' input slices of removed channels zeroed), relative 1e-4;
2. ratio 0 ⇒ outputs equal to the original's;
3. the emitted model's params and FLOPs equal the plan's prediction.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from spa import validate as val
from spa.api import CheckOptions, PruneOptions, PruneReport, analyze, prune
from spa.plan import Plan

RTOL = 1e-4


@dataclass
class Pruned:
    report: PruneReport
    plan: Plan
    path: Path


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def prune_checked(model: Path | onnx.ModelProto, tmp_path: Path, *, expect_pruned: bool = True,
                  name: str = "pruned.onnx", **options) -> Pruned:
    """Prune under the masked oracle and assert the prediction; return what was made."""
    if isinstance(model, onnx.ModelProto):
        model = save(model, tmp_path / "model.onnx")
    out = tmp_path / name
    report, plan = prune(model, out, PruneOptions(**options),
                         CheckOptions(check_masked=True, rtol=RTOL, latency=False))
    assert report.params_after == report.predicted_params_after
    assert report.flops_after == report.predicted_flops_after
    if all(len(g.keep) == g.size for g in plan.groups):
        assert report.params_after == report.params_before
        assert_same_outputs(model, out)
    elif expect_pruned:
        assert report.channels_after < report.channels_before, "nothing was pruned"
        assert report.params_after < report.params_before
        assert report.masked_relative_diff is not None and report.masked_relative_diff <= RTOL
    return Pruned(report, plan, out)


def run_model(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    sess = val.session(path)
    return val.run(sess, val.random_inputs(sess, seed=seed))


def assert_same_outputs(a: Path, b: Path) -> None:
    out_a, out_b = run_model(a), run_model(b)
    val.check_signature(out_a, out_b)
    for name in out_a:
        np.testing.assert_allclose(out_b[name], out_a[name], rtol=1e-5, atol=1e-6)


def group_sizes(model: Path | onnx.ModelProto) -> list[tuple[int, bool]]:
    """(channels, prunable) of each group that has a producer."""
    return [(g.size, g.prunable) for g in analyze(model).groups if g.producers]
