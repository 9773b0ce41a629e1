"""The op registry: everything SPA knows about an op, keyed by ``(domain, op_type, opset range)``.

An entry (:class:`RuleEntry`) holds the op's coupling rule — ``rule(ctx: NodeContext) -> None``
records couplings on ``ctx`` — and the op's other facts (spa/coupling/facts.py): its MAC term,
the layer-input accessor of its consumer weights, its bias slot, its slimming scale, the bias
it adds. A family
file registers them together, ``@register("Conv", mac=…, layer_input=…, bias=…)`` on the rule,
so that everything about one op lives in one file. The rewrite hooks of rules that need one
(a new ``group`` count, rewritten shape literals) depend on the node's own couplings and stay
attached per node, by the rule, through ``ctx.on_rewrite``.

:class:`OpTable` is the keying itself: values per ``(domain, op_type)``, each for an opset
range, resolved by the model's opset (``""`` and ``"ai.onnx"`` are one domain). The coupling
entries are one table; a front end keeps its own implementations in another keyed the same
way (spa/torch/interpreter.py: the torch function of each op, per opset). No entry ⇒ the op is
unknown ⇒ fail closed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

    from spa.coupling.context import NodeContext
    from spa.coupling.facts import AddsBiasFn, BiasSlot, BlockedFn, LayerInputFn, MacFn

Rule = Callable[["NodeContext"], None]
DEFAULT_DOMAINS = ("", "ai.onnx")
ALL_OPSETS = (1, 10_000)
#: the newest opset, the open end of a range that holds from some opset on
LATEST = ALL_OPSETS[1]
V = TypeVar("V")


def domain_key(domain: str | None) -> str:
    """``""`` for the default domain, however it is spelled."""
    return "" if not domain or domain in DEFAULT_DOMAINS else domain


class OpTable(Generic[V]):
    """Values keyed by ``(domain, op_type)``, each valid for an inclusive opset range."""

    def __init__(self) -> None:
        self._by_op: dict[tuple[str, str], list[tuple[int, int, V]]] = {}

    def add(self, domain: str, op_type: str, opsets: tuple[int, int], value: V) -> None:
        """Register ``value`` for ``op_type`` at ``opsets``; ranges of one op must not overlap."""
        ranges = self._by_op.setdefault((domain_key(domain), op_type), [])
        lo, hi = opsets
        clash = [(a, b) for a, b, _ in ranges if a <= hi and lo <= b]
        assert not clash, f"{domain}::{op_type} opsets {opsets} overlap {clash}"
        ranges.append((lo, hi, value))

    def lookup(self, domain: str | None, op_type: str, opset: int) -> V | None:
        """The value whose range holds ``opset``, or None."""
        for lo, hi, value in self._by_op.get((domain_key(domain), op_type), ()):
            if lo <= opset <= hi:
                return value
        return None

    def of_op(self, domain: str | None, op_type: str) -> list[V]:
        """The op's values for every opset range."""
        return [value for _, _, value in self._by_op.get((domain_key(domain), op_type), ())]

    def ops(self) -> set[tuple[str, str]]:
        """Every ``(domain, op_type)`` with a value."""
        return set(self._by_op)

    def values(self) -> Iterator[V]:
        return (value for ranges in self._by_op.values() for _, _, value in ranges)


@dataclass(frozen=True)
class RuleEntry:
    """Everything SPA knows about one op at an opset range (the facts: spa/coupling/facts.py)."""

    domain: str
    op_type: str
    min_opset: int
    max_opset: int
    rule: Rule
    mac: MacFn | None = None
    layer_input: LayerInputFn | None = None
    bias: BiasSlot | None = None
    slimming_scale: int | None = None
    adds_bias: AddsBiasFn | None = None
    blocked: BlockedFn | None = None


RULES: OpTable[RuleEntry] = OpTable()


def register(*op_types: str, domain: str = "", opsets: tuple[int, int] = ALL_OPSETS,
             mac: MacFn | None = None, layer_input: LayerInputFn | None = None,
             bias: BiasSlot | None = None, slimming_scale: int | None = None,
             adds_bias: AddsBiasFn | None = None,
             blocked: BlockedFn | None = None) -> Callable[[Rule], Rule]:
    """Decorator: register ``rule``, with the given facts, for each op type in ``op_types``."""

    def deco(rule: Rule) -> Rule:
        for op in op_types:
            entry = RuleEntry(domain, op, opsets[0], opsets[1], rule, mac, layer_input, bias,
                              slimming_scale, adds_bias, blocked)
            RULES.add(domain, op, opsets, entry)
        return rule

    return deco


def entry(domain: str | None, op_type: str, opset: int) -> RuleEntry | None:
    """The op's entry at ``opset``, or None (an unknown op)."""
    ensure_loaded()
    return RULES.lookup(domain, op_type, opset)


def entries(domain: str | None, op_type: str) -> list[RuleEntry]:
    """The op's entries for every opset range (for a fact that holds at any opset)."""
    ensure_loaded()
    return RULES.of_op(domain, op_type)


def entry_of(node: gs.Node, opset: int) -> RuleEntry | None:
    """The entry of ``node``'s op at ``opset``."""
    return entry(node.domain, node.op, opset)


def lookup(domain: str, op_type: str, opset: int) -> Rule | None:
    """The op's coupling rule at ``opset``, or None (an unknown op: fail closed)."""
    found = entry(domain, op_type, opset)
    return None if found is None else found.rule


def _load_rule_families() -> None:
    # Importing the family modules runs their @register decorators.
    from spa.coupling import tied  # noqa: F401
    from spa.coupling.rules import (  # noqa: F401
        attention,
        contrib_attention,
        contrib_elementwise,
        contrib_linear,
        contrib_norm,
        contrib_quant,
        contrib_rotary,
        conv,
        einsum,
        elementwise,
        gather,
        linear,
        norm,
        pool,
        quant,
        rnn,
        shape,
        slicing,
    )


_load_rule_families_done = False


def ensure_loaded() -> None:
    global _load_rule_families_done
    if not _load_rule_families_done:
        _load_rule_families()
        _load_rule_families_done = True
