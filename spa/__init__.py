"""SPA — Structurally Prune Anything: a structural pruning compiler for ONNX models.

``spa.prune``, ``spa.analyze``, ``spa.apply`` (and ``spa.dry_run``, ``spa.PruneOptions``,
``spa.CheckOptions``) are :mod:`spa.api`'s, imported on first use so that ``import spa`` (and
``spa --version``) stays light. (``spa.plan`` is the plan module; the planning function is
``spa.api.plan``.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
_API = ("analyze", "apply", "dry_run", "prune", "CheckOptions", "PruneOptions")

if TYPE_CHECKING:
    from spa.api import CheckOptions, PruneOptions, analyze, apply, dry_run, prune


def __getattr__(name: str) -> Any:
    if name in _API:
        from spa import api

        return getattr(api, name)
    raise AttributeError(f"module 'spa' has no attribute {name!r}")


__all__ = ["CheckOptions", "PruneOptions", "__version__", "analyze", "apply", "dry_run", "prune"]
