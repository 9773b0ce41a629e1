#!/usr/bin/env bash
# Create .venv-frameworks: the exporters of other frameworks (TensorFlow/Keras + tf2onnx,
# JAX/Flax + jax2onnx, scikit-learn for the digits data), kept apart from the project's .venv
# because they pin numpy/protobuf/onnx versions of their own. SPA itself never runs here: the
# exporters in models/frameworks/ write ONNX files, and SPA (in .venv) prunes them.
#
# Versions resolved together on Python 3.11 (pip's resolver, checked with --dry-run).
# With --paddle, also create .venv-paddle (PaddlePaddle + paddle2onnx): paddle2onnx pins
# onnx 1.17, older than what jax2onnx needs, so it gets a venv of its own.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SPA_FRAMEWORKS_VENV:-.venv-frameworks}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q \
    "tensorflow-cpu==2.21.0" "tf2onnx==1.17.0" \
    "jax==0.10.2" "jaxlib==0.10.2" "flax==0.12.8" "jax2onnx==0.17.1" \
    "scikit-learn" "onnx" "onnxruntime"
"$VENV/bin/python" - <<'PY'
import importlib
for mod in ("tensorflow", "tf2onnx", "jax", "flax", "jax2onnx", "sklearn", "onnx"):
    m = importlib.import_module(mod)
    print(f"{mod:12s} {getattr(m, '__version__', '?')}")
PY

if [ "${1:-}" = "--paddle" ]; then
    if [ ! -x .venv-paddle/bin/python ]; then
        "$PY" -m venv .venv-paddle
    fi
    .venv-paddle/bin/pip install -q --upgrade pip
    # sympy and onnxruntime: paddle2onnx's optimiser (polygraphy) installs them otherwise.
    .venv-paddle/bin/pip install -q "paddlepaddle==3.3.1" "paddle2onnx==2.1.0" sympy onnxruntime
    .venv-paddle/bin/python -c "import paddle, paddle2onnx; print('paddle', paddle.__version__, \
'paddle2onnx', paddle2onnx.__version__)"
fi
