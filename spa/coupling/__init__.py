"""Coupling analysis: channel spaces, op rules, groups."""

from __future__ import annotations

from spa.coupling.analysis import Analysis, CouplingAnalysis, Group, GroupKind, Member
from spa.coupling.types import Role, SpaceKey

__all__ = ["Analysis", "CouplingAnalysis", "Group", "GroupKind", "Member", "Role", "SpaceKey"]
