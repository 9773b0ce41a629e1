"""The worked example ``examples/prune_finetune.py`` (slow: it fine-tunes for an epoch)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "prune_finetune.py"


@pytest.mark.slow
def test_prune_without_data_then_finetune_recovers(tmp_path):
    spec = importlib.util.spec_from_file_location("prune_finetune", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    figures = example.main(["--epochs", "1", "--out", str(tmp_path / "p.onnx")])
    assert figures["flops_cut"] >= 1.9
    assert figures["params"][1] < 0.6 * figures["params"][0]
    assert figures["finetuned_accuracy"] > figures["pruned_accuracy_no_data"]
    assert figures["finetuned_accuracy"] >= 0.95
    assert abs(figures["onnx_accuracy"] - figures["finetuned_accuracy"]) < 0.01
