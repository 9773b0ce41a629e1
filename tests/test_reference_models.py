"""Every reference model × both exporters × ratios {0, 0.3, 0.6} under the numeric oracle."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")

from models import MODELS  # noqa: E402
from models.export import export  # noqa: E402
from tests.oracle import prune_checked  # noqa: E402

EXPORTERS = ("torchscript", "dynamo")
_cache: dict[tuple[str, str], Path] = {}


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    def get(name: str, exporter: str) -> Path:
        key = (name, exporter)
        if key not in _cache:
            d = tmp_path_factory.mktemp(f"{name}_{exporter}")
            _cache[key] = export(name, d / f"{name}.onnx", exporter=exporter)
        return _cache[key]

    return get


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.6])
@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_reference_model_under_oracle(exported, tmp_path, name, exporter, ratio) -> None:
    # Exact counts (irregular widths, the harder case for the rewrite); the default's kernel
    # rounding is tests/test_kernel_widths.py's.
    pruned = prune_checked(exported(name, exporter), tmp_path, ratio=ratio, round_to=1)
    if ratio:
        # A real reduction, in proportion to the ratio: at least a fifth of it in parameters.
        assert pruned.report.params_after <= (1 - ratio / 5) * pruned.report.params_before


@pytest.mark.parametrize("name", sorted(MODELS))
def test_exporters_agree_on_groups(exported, name) -> None:
    """Both exporters' files give the same prunable channel counts (the analysis sees through
    folded vs separate BatchNorm, Flatten vs Reshape, initializers vs .data files)."""
    from spa.api import analyze

    sizes = [sorted(g.size for g in analyze(exported(name, e)).prunable_groups)
             for e in EXPORTERS]
    assert sizes[0] == sizes[1]
    assert sizes[0], f"{name}: no prunable group"
