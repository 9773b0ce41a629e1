"""SPA — Structurally Prune Anything: a structural pruning compiler for ONNX models."""

from __future__ import annotations

__version__ = "0.1.0"
