"""Models exported from TensorFlow/Keras (tf2onnx) and JAX/Flax (jax2onnx), committed under
``tests/data/frameworks/`` so that CI prunes them without either framework installed.

All three were trained on scikit-learn's digits by ``models/frameworks/export_*.py``; the test
split (disjoint from training) is ``digits_test.npz``. Each is pruned under the numeric oracle
at ratio 0.3, and its accuracy is measured before and after pruning 10% of the channels.
"""

from __future__ import annotations

import pytest
from frameworks import DATA, digits_accuracy, prune_framework_model

from spa.api import CheckOptions, PruneOptions, prune

SPLIT = DATA / "digits_test.npz"

# name: (groups with a producer, prunable, max FLOPs after/before at 0.3, dense accuracy)
# Dense accuracies are those the frameworks measured before export (Keras 0.9866, JAX MLP
# 0.9715, JAX CNN 0.8559): the ONNX files reproduce them.
MODELS = {
    "keras_digits_cnn": (5, 4, 0.55, 0.9866),
    "jax_mlp": (3, 2, 0.70, 0.9715),
    "jax_cnn": (3, 2, 0.70, 0.8559),
}


@pytest.mark.parametrize("name", MODELS)
def test_prunes_under_the_oracle(tmp_path, name):
    groups, prunable, max_flops, _ = MODELS[name]
    # Exact counts: the default would keep these nets' 16- and 32-channel conv groups in whole
    # kernel blocks of 16 (tests/test_kernel_widths.py).
    cut = prune_framework_model(DATA / f"{name}.onnx", tmp_path, ratio=0.3, round_to=1)
    assert (cut.groups, cut.prunable) == (groups, prunable)
    # The one frozen group is the classifier's output: a graph output keeps its shape.
    assert cut.frozen_reasons and all("graph output" in r for r in cut.frozen_reasons)
    assert cut.flops_ratio < max_flops
    assert cut.pruned.report.masked_relative_diff < 1e-4


# name: (criterion, least accuracy after pruning 10% of each group's channels). Measured:
# Keras CNN 0.988 (l1), JAX MLP 0.972 (l1); the JAX CNN's unfused BatchNorm makes weight
# magnitude a poor guide (l1: 0.286), data-free OBSPA keeps 0.826.
AFTER = {"keras_digits_cnn": ("l1", 0.97), "jax_mlp": ("l1", 0.96), "jax_cnn": ("obspa", 0.80)}


@pytest.mark.parametrize("name", MODELS)
def test_digits_accuracy_before_and_after(tmp_path, name):
    dense = digits_accuracy(DATA / f"{name}.onnx", SPLIT)
    assert dense == pytest.approx(MODELS[name][3], abs=2e-3)
    criterion, least = AFTER[name]
    out = tmp_path / "pruned.onnx"
    # OBSPA writes compensated weights, outside the masked oracle (the test above runs it).
    report, _ = prune(DATA / f"{name}.onnx", out, PruneOptions(ratio=0.1, criterion=criterion,
                                                               round_to=1),
                      CheckOptions(latency=False))
    assert report.flops_after < 0.92 * report.flops_before
    assert digits_accuracy(out, SPLIT) >= least
