"""Einsum (opset 12): the equation's index letters name the axes, so the coupling is read off it.

``Y = einsum("t_0,t_1,…->o", X_0, X_1, …)`` multiplies the operands' entries that agree on every
index letter and sums over the letters missing from the output ``o``. For each letter:

* **in the output**: every operand axis it labels is coupled identically with the output axis
  (``bhqd,bhkd->bhqk`` couples b and h of Q, K and the scores; q with Q's axis 2). A constant
  operand that is the only one carrying the letter *produces* those output channels
  (``bij,jk->bik``: the weight's k axis, as MatMul's ``W.1``); a constant that shares the letter
  with an activation (a per-head weight ``bhd,hde->bhe``'s h) is a per-channel parameter;
* **contracted, with a constant operand among its carriers**: the carriers' axes are coupled
  identically and each constant's axis *consumes* them (``bij,jk->bik``: ``X.2 ↔ W.0``). Every
  term of the sum is a product over all operands, so zeroing the weight's slice of a channel
  removes exactly its contribution (the masked oracle);
* **contracted between activations only** (``bhqd,bhkd->bhqk``'s d): there is no weight slice
  to zero, so the axes keep their length — heads prune whole, head_dim never, as for MatMul of
  two activations; **summed within one operand** (``bsd->bs``): the axis keeps its length, as
  a reduction's.

Lengths must agree letter by letter (a broadcast 1 is left uncoupled). Implicit output (no
``->``): the letters that appear once, in alphabetical order. Refused, naming the equation:
ellipsis ``...``, a letter repeated within one operand (a diagonal), implicit output with
upper-case letters, terms that do not match the operands' ranks, only constant operands.
The equation carries no sizes, so pruning needs no rewrite.

MACs (:func:`macs`, the entry's MAC term): the product of the lengths of all distinct letters,
one multiply-add per combination of index values (``n - 1`` times that for ``n`` operands).
A constant operand's contracted axis consumes channels, but not as a layer with one input
(there may be several activations): it has no layer-input accessor, so OBS compensation
leaves it alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import TYPE_CHECKING

from spa.coupling.facts import MacTerm, mac_term
from spa.coupling.registry import register
from spa.coupling.types import Role

if TYPE_CHECKING:
    from collections.abc import Sequence

    import onnx_graphsurgeon as gs

    from spa.coupling.context import NodeContext


@dataclass(frozen=True)
class Equation:
    """A parsed equation: one term per operand and the output term, letters only."""

    text: str
    terms: tuple[str, ...]
    out: str

    @property
    def letters(self) -> list[str]:
        """Every letter once, in order of first appearance."""
        return list(dict.fromkeys("".join(self.terms) + self.out))


def parse(equation: str, n_operands: int) -> Equation | str:
    """The equation, or the reason (naming it) why the rule does not map it."""
    eq = equation.replace(" ", "")
    where = f"equation '{equation}'"
    if "..." in eq:
        return f"{where} has an ellipsis (...)"
    lhs, arrow, out = eq.partition("->")
    terms = tuple(lhs.split(","))
    if len(terms) != n_operands:
        return f"{where} has {len(terms)} terms for {n_operands} operands"
    if not all(c.isascii() and c.isalpha() for c in "".join(terms) + out):
        return f"{where} has characters other than index letters"
    repeated = next((t for t in terms if len(set(t)) != len(t)), None)
    if repeated is not None:
        return f"{where} repeats an index within '{repeated}' (a diagonal)"
    joined = "".join(terms)
    if not arrow:
        if any(c.isupper() for c in joined):
            return f"{where} has an implicit output with upper-case indices"
        out = "".join(sorted(c for c in set(joined) if joined.count(c) == 1))
    if len(set(out)) != len(out) or not set(out) <= set(joined):
        return f"{where} has an output index repeated or not in any input"
    return Equation(equation, terms, out)


def macs(eq: Equation, shapes: Sequence[Sequence[int]]) -> int:
    """Multiply-adds of ``eq`` on operands of ``shapes``: one per combination of index values
    (the product of every letter's length), ``n - 1`` of them for ``n`` operands."""
    length: dict[str, int] = {}
    for term, shape in zip(eq.terms, shapes):
        for letter, d in zip(term, shape):
            length[letter] = max(length.get(letter, 1), int(d))  # a broadcast 1 takes the other
    return prod(length.values()) * max(1, len(eq.terms) - 1)


def _macs(node: gs.Node) -> MacTerm | None:
    """One MAC per combination of index values, over the operands' (cut) shapes."""
    equation = node.attrs.get("equation", "")
    eq = parse(str(equation), len(node.inputs))
    if isinstance(eq, str):
        return None
    parsed: Equation = eq
    return mac_term(node.inputs, lambda *s: macs(parsed, s))


@register("Einsum", opsets=(12, 10_000), mac=_macs)
def einsum(ctx: NodeContext) -> None:
    operands, y = ctx.inputs, ctx.output(0)
    eq = _equation(ctx, operands, y)
    if isinstance(eq, str):
        ctx.refuse(eq)
        return
    constant = [ctx.const(t) is not None for t in operands]
    for letter in eq.letters:
        carriers = [(t, term.index(letter), c)
                    for t, term, c in zip(operands, eq.terms, constant) if letter in term]
        if letter in eq.out:
            _couple_kept(ctx, carriers, y, eq.out.index(letter))
        else:
            _couple_contracted(ctx, eq, letter, carriers)


def _equation(ctx: NodeContext, operands: list[gs.Tensor], y: gs.Tensor | None
              ) -> Equation | str:
    """The node's parsed equation, checked against the operands' ranks; else the reason."""
    equation = ctx.attr("equation", "")
    equation = equation.decode() if isinstance(equation, bytes) else str(equation)
    eq = parse(equation, len(operands))
    if isinstance(eq, str):
        return eq
    for t, term in [*zip(operands, eq.terms), (y, eq.out)]:
        rank = ctx.rank(t)
        if rank is None:
            return ctx.unknown_rank(t)
        if rank != len(term):
            return f"term '{term}' of equation '{equation}' does not match the rank " \
                   f"{rank} of {ctx.which(t)}"
    if all(ctx.const(t) is not None for t in operands):
        return "every operand is a constant"
    return eq


def _couple_kept(ctx: NodeContext, carriers: list[tuple[gs.Tensor, int, bool]], y: gs.Tensor,
                 out_axis: int) -> None:
    """A letter of the output: each carrier's axis ↔ the output axis; a constant alone
    carrying it produces the output's channels."""
    for t, ax, _ in carriers:
        ctx.identity_axes(t, ax, y, out_axis)
    if len(carriers) == 1 and carriers[0][2]:
        t, ax, _ = carriers[0]
        ctx.role(ctx.space(t, ax), Role.PRODUCER)


def _couple_contracted(ctx: NodeContext, eq: Equation, letter: str,
                       carriers: list[tuple[gs.Tensor, int, bool]]) -> None:
    """A summed letter: with a constant among its carriers, the carriers' axes go together and
    each constant's axis consumes them; otherwise the axes keep their length, and say why."""
    where = f"index '{letter}' of equation '{eq.text}'"
    spaces = [ctx.space(t, ax) for t, ax, _ in carriers]
    if len(carriers) == 1:
        ctx.decline(f"{where} is summed over within {ctx.which(carriers[0][0])} alone", *spaces)
        return
    if not any(c for _, _, c in carriers):
        ctx.decline(f"{where} is summed over between activations, with no weight to remove a "
                    "channel at (attention: heads prune whole, head_dim never)", *spaces)
        return
    first, first_ax, _ = carriers[0]
    for t, ax, _ in carriers[1:]:
        ctx.identity_axes(first, first_ax, t, ax)
    for t, ax, c in carriers:
        if c:
            ctx.role(ctx.space(t, ax), Role.CONSUMER)

