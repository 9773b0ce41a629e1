"""Registry of op rules keyed by ``(domain, op_type)`` with an opset range.

A rule is a function ``rule(ctx: NodeContext) -> None`` that records couplings on ``ctx``.
Rule families register themselves with :func:`register`; :func:`lookup` picks the rule whose
opset range contains the model's opset. No rule ⇒ the node is unknown ⇒ fail closed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from spa.coupling.context import NodeContext

Rule = Callable[["NodeContext"], None]
DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class RuleEntry:
    domain: str
    op_type: str
    min_opset: int
    max_opset: int
    rule: Rule


_RULES: dict[tuple[str, str], list[RuleEntry]] = {}


def register(*op_types: str, domain: str = "", opsets: tuple[int, int] = (1, 10_000)
             ) -> Callable[[Rule], Rule]:
    """Decorator: register ``rule`` for each op type in ``op_types``."""

    def deco(rule: Rule) -> Rule:
        for op in op_types:
            entry = RuleEntry(domain, op, opsets[0], opsets[1], rule)
            _RULES.setdefault((domain, op), []).append(entry)
        return rule

    return deco


def lookup(domain: str, op_type: str, opset: int) -> Rule | None:
    domain = "" if domain in DEFAULT_DOMAINS else domain
    for entry in _RULES.get((domain, op_type), ()):
        if entry.min_opset <= opset <= entry.max_opset:
            return entry.rule
    return None


def _load_rule_families() -> None:
    # Importing the family modules runs their @register decorators.
    from spa.coupling.rules import (  # noqa: F401
        attention,
        conv,
        einsum,
        elementwise,
        gather,
        linear,
        norm,
        pool,
        quant,
        shape,
        slicing,
    )


_load_rule_families_done = False


def ensure_loaded() -> None:
    global _load_rule_families_done
    if not _load_rule_families_done:
        _load_rule_families()
        _load_rule_families_done = True
