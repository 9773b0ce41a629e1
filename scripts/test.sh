#!/usr/bin/env bash
# Set up and run the test suite (slow sweeps excluded; run them with: scripts/test.sh -m slow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "torch,test"
.venv/bin/ruff check spa passes models tests benchmarks examples
.venv/bin/lint-imports  # one direction of imports (pyproject.toml [tool.importlinter])
.venv/bin/mypy  # the type checker on spa/ (pyproject.toml [tool.mypy])
.venv/bin/python -m pytest -n 2 -q "$@"
