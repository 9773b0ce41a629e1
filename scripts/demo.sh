#!/usr/bin/env bash
# The main job on the bundled default: export a reference ResNet (bottleneck blocks) from its
# PyTorch definition, prune half of its channels with L1, check the numeric oracle, print the
# before/after table. Outputs go to build/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh torch
mkdir -p build
.venv/bin/python -m models.export resnet_bottleneck -o build/resnet.onnx
.venv/bin/spa prune build/resnet.onnx -o build/resnet_pruned.onnx --ratio 0.5 \
    --check-masked --plan build/plan.json --report build/report.json
