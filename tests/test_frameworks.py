"""Models exported by other frameworks' own tools, pruned under the numeric oracle (slow).

Each model is exported in ``.venv-frameworks`` (``bash scripts/setup_frameworks.sh``) by
``models/frameworks/export_keras.py`` (tf2onnx, default settings: NHWC input, opset 15; some
cases with ``--inputs-as-nchw`` or opset 11/12) or ``export_jax.py`` (jax2onnx, opset 23), and
in ``.venv-paddle`` (``setup_frameworks.sh --paddle``) by ``export_paddle.py`` (paddle2onnx,
opset 11/12), then pruned at ratio 0.3 with SPA in this venv. A case whose framework venv is
missing is skipped.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from frameworks import ROOT, digits_accuracy, prune_framework_model

VENVS = {"keras": ".venv-frameworks", "jax": ".venv-frameworks", "paddle": ".venv-paddle"}
EXPORTERS = ROOT / "models" / "frameworks"

pytestmark = pytest.mark.slow

# id: (exporter, arguments, least share of prunable groups, most FLOPs after/before at 0.3)
# Measured (2-core CPU): every frozen group is the classifier output (graph output or Softmax).
CASES = {
    "keras_mobilenetv2": ("keras", ["mobilenetv2"], 25 / 26, 0.53),
    "keras_mobilenetv2_nchw_opset12": ("keras", ["mobilenetv2", "--nchw", "--opset", "12"],
                                       25 / 26, 0.53),
    "keras_resnet50": ("keras", ["resnet50"], 37 / 38, 0.51),
    "keras_efficientnetb0": ("keras", ["efficientnetb0"], 40 / 41, 0.53),
    "keras_efficientnetb0_nchw_opset11": ("keras", ["efficientnetb0", "--nchw", "--opset", "11"],
                                          40 / 41, 0.53),
    "keras_idioms": ("keras", ["idioms"], 6 / 7, 0.57),
    "keras_idioms_opset11": ("keras", ["idioms", "--opset", "11"], 6 / 7, 0.57),
    "keras_pixel_shuffle": ("keras", ["pixel_shuffle"], 4 / 5, 0.6),
    "keras_digits_cnn": ("keras", ["digits_cnn"], 4 / 5, 0.55),
    "keras_digits_cnn_nchw": ("keras", ["digits_cnn", "--nchw"], 4 / 5, 0.55),
    "jax_mlp": ("jax", ["mlp"], 2 / 3, 0.67),
    "jax_cnn": ("jax", ["cnn"], 2 / 3, 0.67),
    "paddle_lcnet_opset11": ("paddle", [], 6 / 7, 0.57),
    "paddle_lcnet_opset12": ("paddle", ["--opset", "12"], 6 / 7, 0.57),
}


def export(case: str, out_dir: Path) -> Path:
    tool, args, *_ = CASES[case]
    python = ROOT / VENVS[tool] / "bin" / "python"
    if not python.exists():
        pytest.skip(f"{VENVS[tool]} is missing: run bash scripts/setup_frameworks.sh"
                    f"{' --paddle' if tool == 'paddle' else ''}")
    out = out_dir / f"{case}.onnx"
    subprocess.run([str(python), str(EXPORTERS / f"export_{tool}.py"), *args, "-o", str(out)],
                   check=True, capture_output=True, timeout=900)
    return out


@pytest.mark.parametrize("case", CASES)
def test_exported_model_prunes_under_the_oracle(tmp_path, case):
    _, _, least_prunable, most_flops = CASES[case]
    # Exact channel counts: the FLOPs bound is about the structure, not this CPU's kernel
    # blocks (--round-to auto, the default since these bounds were measured).
    cut = prune_framework_model(export(case, tmp_path), tmp_path, ratio=0.3, round_to=1)
    assert cut.prunable / cut.groups >= least_prunable - 1e-9
    assert cut.flops_ratio <= most_flops
    assert cut.pruned.report.masked_relative_diff < 1e-4
    assert all("graph output" in r or "Softmax" in r for r in cut.frozen_reasons)


@pytest.mark.parametrize("case", ["keras_digits_cnn", "jax_mlp"])
def test_trained_digits_model_keeps_its_accuracy(tmp_path, case):
    path = export(case, tmp_path)
    split = path.with_name(f"{path.stem}_test.npz")
    dense = digits_accuracy(path, split)
    assert dense >= 0.95
    cut = prune_framework_model(path, tmp_path, ratio=0.1)
    assert digits_accuracy(cut.pruned.path, split) >= dense - 0.02
