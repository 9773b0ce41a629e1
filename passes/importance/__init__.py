"""Importance criteria, registered by name (``spa prune --criterion NAME``)."""

from __future__ import annotations

from spa.passes.importance import (  # noqa: F401  (importing registers the criteria)
    calibrated,
    gradient,
    magnitude,
    obspa,
    structure,
)
from spa.passes.importance.base import (
    CRITERIA,
    Criterion,
    Normalization,
    Reduction,
    Scores,
    get_criterion,
)

__all__ = ["CRITERIA", "Criterion", "Normalization", "Reduction", "Scores", "get_criterion"]
