"""Slow sweep: transformers written by others (HuggingFace from small configs, timm), random
weights, dynamo exporter, heads and MLP at 0.5 under the numeric oracle. A model may freeze
(fail closed, with reasons); it may never produce a wrong graph."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
torch = pytest.importorskip("torch")

from models.export import export_module  # noqa: E402
from models.thirdparty import HF_MODELS, VISION_TRANSFORMERS  # noqa: E402
from spa.errors import NothingPrunableError  # noqa: E402
from tests.oracle import prune_checked  # noqa: E402


def _check(build, tmp_path: Path) -> None:
    module, inputs = build()
    path = export_module(module, inputs, tmp_path / "m.onnx", exporter="dynamo")
    try:
        prune_checked(path, tmp_path, ratio=0.0, heads_ratio=0.5, mlp_ratio=0.5,
                      expect_pruned=False)
    except NothingPrunableError:
        pytest.skip("every group frozen (fail closed); see spa analyze --explain")


@pytest.mark.parametrize("name", sorted(HF_MODELS))
def test_huggingface(tmp_path: Path, name: str) -> None:
    pytest.importorskip("transformers")
    _check(HF_MODELS[name], tmp_path)


@pytest.mark.parametrize("name", sorted(VISION_TRANSFORMERS))
def test_timm_vision_transformers(tmp_path: Path, name: str) -> None:
    pytest.importorskip("timm")
    _check(VISION_TRANSFORMERS[name], tmp_path)
