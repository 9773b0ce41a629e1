"""Importance criteria, registered by name (``spa prune --criterion NAME``)."""

from __future__ import annotations

from passes.importance import magnitude, obspa, structure  # noqa: F401  (registers them)
from passes.importance.base import (
    CRITERIA,
    Criterion,
    Normalization,
    Reduction,
    Scores,
    get_criterion,
)

__all__ = ["CRITERIA", "Criterion", "Normalization", "Reduction", "Scores", "get_criterion"]
