"""Shared by the tests of models exported from other frameworks (TensorFlow/Keras via tf2onnx,
JAX/Flax via jax2onnx): prune under the numeric oracle and check the cut, and the accuracy of
digits classifiers on the held-out split (see ``models/frameworks/digits.py``)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from oracle import Pruned, prune_checked, run_model

from spa import validate as val
from spa.api import analyze

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "frameworks"
sys.path.insert(0, str(ROOT / "models" / "frameworks"))
import digits  # noqa: E402


@dataclass(frozen=True)
class Cut:
    pruned: Pruned
    groups: int  # groups with a producer
    prunable: int
    frozen_reasons: list[str]

    @property
    def flops_ratio(self) -> float:
        r = self.pruned.report
        return r.flops_after / r.flops_before


def prune_framework_model(path: Path, tmp_path: Path, ratio: float = 0.3, **options) -> Cut:
    """Analyse, prune at ``ratio`` under the masked oracle, and check that the pruning changed
    the outputs (so a model whose output is a constant cannot pass the oracle trivially) and
    shrank the file."""
    groups = [g for g in analyze(path).groups if g.producers]
    pruned = prune_checked(path, tmp_path, name=f"{path.stem}_pruned.onnx", ratio=ratio,
                           **options)
    assert pruned.report.bytes_after < pruned.report.bytes_before
    before, after = run_model(path), run_model(pruned.path)
    change = val.closeness(before, after)
    assert change.relative > 1e-3, "pruning did not change the outputs: degenerate model?"
    return Cut(pruned, len(groups), sum(g.prunable for g in groups),
               [r for g in groups for r in g.frozen])


def digits_accuracy(model: Path, split: Path) -> float:
    """Top-1 accuracy on the digits test split; a rank-2 input gets flattened images."""
    x, y = digits.load_test_split(split)
    sess = val.session(model)
    inp = sess.get_inputs()[0]
    if len(inp.shape) == 2:
        x = x.reshape(len(x), -1)
    elif inp.shape[1] == 1:  # exported with tf2onnx --inputs-as-nchw
        x = digits.to_nchw(x)
    logits = sess.run(None, {inp.name: x})[0]
    return float(np.mean(logits.argmax(-1) == y))
