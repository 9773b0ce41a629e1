"""Ops that move axes around: Reshape, Flatten, Transpose, Squeeze, Unsqueeze, Shape,
DepthToSpace, SpaceToDepth.

Reshape/Flatten: input and output dims are cut into *factor groups* with equal products
(``[N, C, H, W] → [N, C·H·W]`` is ``{N}→{N}``, ``{C,H,W}→{CHW}``). In a group with one non-1 dim
on each side the axes are coupled identically; when several input dims merge into one output dim,
the outermost input dim ``C`` is block-coupled with the output (feature ``f`` belongs to channel
``f // (H·W)``); when one input dim splits into several output dims (``C → heads × d``), the input
is block-coupled with the outermost output dim; when several regroup into several with the
outer dims one a multiple of the other (``[C, H, W] → [G, C/G·H·W]``, a GroupNorm's view), or
the first dims after the copied ones are so (symbolic dims after them), those outer dims are
block-coupled (channel ``c`` in row ``c // (C/G)``). Each factor of a split or merge is a
candidate, and the analysis keeps one per reshape (spa/coupling/analysis.py ``_choose_digits``:
a channel shuffle's split and merge keep the same one, so its channels prune in interleaved
sets); a factor not kept freezes if anything makes it a channel space. A Reshape
whose target is a constant has its literal entries rewritten; a run-time target (``Shape →
Gather → Concat``) is accepted where the entry of a coupled output dim is ``-1`` or copies the
input dim (or the dim of the tensor whose GroupNorm view it restores: :func:`restored_view`).

Transpose couples output axis ``k`` with input axis ``perm[k]``. Shape reads dims: a dim it
reads (directly or through constant-index Gather/Slice) is unhandled, so a channel space whose
length is read as data freezes; dims it does not read may change freely.
"""

from __future__ import annotations

from math import prod
from typing import TYPE_CHECKING

import onnx_graphsurgeon as gs

from spa.coupling.context import axes_text
from spa.coupling.registry import register
from spa.ir.shapevalue import DimRef, Entry, Lit, shape_entries, shape_op_dims

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from spa.coupling.context import NodeContext
    from spa.coupling.types import KeptLookup


def factor_groups(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Cut two shapes of equal size into runs of axes with equal products (1-dims dropped)."""
    ia = [i for i, d in enumerate(a) if d != 1]
    ib = [j for j, d in enumerate(b) if d != 1]
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(ia) and j < len(ib):
        ga, gb = [ia[i]], [ib[j]]
        pa, pb = a[ia[i]], b[ib[j]]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb and i < len(ia):
                pa *= a[ia[i]]
                ga.append(ia[i])
                i += 1
            elif pb < pa and j < len(ib):
                pb *= b[ib[j]]
                gb.append(ib[j])
                j += 1
            else:
                return []
        groups.append((ga, gb))
    return groups if i == len(ia) and j == len(ib) else []


def _static(dims: Sequence[int | None]) -> tuple[int, ...]:
    """``dims``, which the caller knows to be all static, typed so."""
    out = tuple(d for d in dims if d is not None)
    assert len(out) == len(dims), f"unknown dims in {dims}"
    return out


def _fill_single_unknown(a: tuple[int | None, ...], b: tuple[int | None, ...]
                         ) -> tuple[int | None, ...]:
    """``a`` with its one unknown dim solved from the element count, when ``b`` is static."""
    if a.count(None) != 1 or None in b:
        return a
    known = prod(d for d in a if d is not None)
    total = prod(_static(b))
    if not known or total % known:
        return a
    return tuple(total // known if d is None else d for d in a)


def static_factor_groups(a: tuple[int | None, ...], b: tuple[int | None, ...],
                         symbols: tuple[tuple[str, ...] | None, tuple[str, ...] | None]
                         = (None, None)) -> list[tuple[list[int], list[int]]]:
    """Factor groups of the static prefix and suffix of two shapes with symbolic dims.

    With ``N`` symbolic, ``[N, C, H, W] → [N, C·H·W]`` still regroups its static suffix. Only the
    part before the first and after the last symbolic dim is used: there the element order is
    fixed whatever the symbolic dims are (a static run *between* two symbolic dims may be cut
    differently at run time) — unless ``symbols`` (the names of each shape's symbolic dims, in
    order) show the same symbolic dims on both sides: then every run between them regroups.
    """
    between = _runs_between_symbols(a, b, *symbols)
    if between is not None:
        return between
    a, b = _fill_single_unknown(a, b), _fill_single_unknown(b, a)
    if None not in a and None not in b:
        return factor_groups(_static(a), _static(b))
    if None not in a or None not in b:
        return []
    pa = [i for i, d in enumerate(a) if d is None]
    pb = [j for j, d in enumerate(b) if d is None]
    ka, kb = _common_run(_static(a[:pa[0]]), _static(b[:pb[0]]))
    groups = factor_groups(_static(a[:ka]), _static(b[:kb]))
    sa, sb = _static(a[pa[-1] + 1:]), _static(b[pb[-1] + 1:])
    ka, kb = _common_run(sa[::-1], sb[::-1])
    shift_a, shift_b = len(a) - ka, len(b) - kb
    groups += [([i + shift_a for i in ga], [j + shift_b for j in gb])
               for ga, gb in factor_groups(sa[len(sa) - ka:], sb[len(sb) - kb:])]
    return groups


def _runs_between_symbols(a: tuple[int | None, ...], b: tuple[int | None, ...],
                          sym_a: tuple[str, ...] | None, sym_b: tuple[str, ...] | None
                          ) -> list[tuple[list[int], list[int]]] | None:
    """Factor groups of the static runs between symbolic dims that are the same on both sides.

    ONNX names equal symbolic dims alike, so ``[B, 2, 2, S, 8] → [B, 4, S, 8]`` (grouped-query
    attention repeating key/value heads, with symbolic batch and sequence) is ``[B, R0, S, R1]``
    on both sides: when each run has the same product on both sides the flat order is the same
    whatever ``B`` and ``S`` are, and ``2·2 → 4`` regroups. None when the symbols differ or a
    run's products do not match (the caller then keeps to the static prefix and suffix).
    """
    pa = [i for i, d in enumerate(a) if d is None]
    pb = [j for j, d in enumerate(b) if d is None]
    if not pa or sym_a is None or sym_a != sym_b or len(sym_a) != len(pa) \
            or len(pa) != len(pb):
        return None
    groups: list[tuple[list[int], list[int]]] = []
    for lo_a, hi_a, lo_b, hi_b in zip([-1, *pa], [*pa, len(a)], [-1, *pb], [*pb, len(b)]):
        ra, rb = _static(a[lo_a + 1:hi_a]), _static(b[lo_b + 1:hi_b])
        if prod(ra) != prod(rb):
            return None
        groups += [([i + lo_a + 1 for i in ga], [j + lo_b + 1 for j in gb])
                   for ga, gb in factor_groups(ra, rb)]
    return groups


def symbols(t: gs.Tensor, start: int = 0) -> tuple[str, ...] | None:
    """The names of the symbolic dims of ``t`` (from axis ``start``) in order; None when a dim
    is unknown and unnamed."""
    if t.shape is None:
        return None
    names = [d for d in t.shape[start:] if not (isinstance(d, int) and d >= 0)]
    return tuple(names) if all(isinstance(d, str) and d for d in names) else None


def _common_run(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, int]:
    """The longest leading runs ``a[:i]``, ``b[:j]`` with equal products.

    Such runs regroup on their own whatever the rest of the shapes is: tf2onnx's Tensordot
    flattens ``[N, H, W, C] → [-1, C]`` (symbolic ``N``), and the trailing ``C`` still maps to
    ``C`` though ``H·W`` went into the symbolic dim. (Called on reversed shapes for the
    trailing runs.)
    """
    cut_a = {prod(a[:i]): i for i in range(1, len(a) + 1)}
    best = (0, 0)
    for j in range(1, len(b) + 1):
        i = cut_a.get(prod(b[:j]))
        if i is not None:
            best = (i, j)
    return best


_ONE_FACTOR = "the channels follow one factor, and only one that leads on to a layer mapping it"


def couple_regroup(ctx: NodeContext, x: gs.Tensor, y: gs.Tensor,
                   allowed_out: set[int] | None = None, copied: int = 0,
                   fixed: Callable[[int], str] | None = None) -> list[int]:
    """Couple each factor group of a reshape; return the output axes that may change.

    One dim on each side: identity. Several dims merging into one, or one splitting into
    several: digit candidates between the single dim and each of the several (the analysis keeps
    the outermost one that leads somewhere, so ``C → heads × head_dim`` couples the heads).
    The first ``copied`` output dims are known to equal the input's (the target copies them), so
    they map one to one even between symbolic dims: ``x.view(n, c, -1)`` of ``[N, C, H, W]``.
    An output axis outside ``allowed_out`` keeps its length, for the reason ``fixed(axis)``.
    """
    a, b = ctx.shape(x), ctx.shape(y)
    if a is None or b is None or 0 in a or 0 in b:
        ctx.decline(ctx.unknown_rank(x if a is None else y) if a is None or b is None
                    else "a dim of length 0")
        return []

    def allowed(o: int, group: list[int]) -> bool:
        """May output axis ``o`` change? If not, say why on it and the input axes ``group``."""
        if allowed_out is None or o in allowed_out:
            return True
        if fixed is not None:
            ctx.decline(fixed(o), ctx.space(y, o), *(ctx.space(x, i) for i in group))
        return False

    changing: list[int] = []
    rest = static_factor_groups(a[copied:], b[copied:], (symbols(x, copied), symbols(y, copied)))
    groups = [([i], [i]) for i in range(copied)] \
        + [([i + copied for i in ga], [j + copied for j in gb]) for ga, gb in rest]
    if _leading_blocks(a, b, copied, groups):
        groups.append(([copied], [copied]))
    _decline_unmatched(ctx, (x, a), (y, b), groups)
    for n, (ga, gb) in enumerate(groups):
        spaces = [ctx.space(x, i) for i in ga] + [ctx.space(y, o) for o in gb]
        if (len(ga) > 1 or len(gb) > 1) and None in [*(a[i] for i in ga), *(b[o] for o in gb)]:
            ctx.decline(f"reshapes {axes_text(ga)} of '{x.name}' into {axes_text(gb)} through a "
                        "symbolic dim: which channel lands where is not known", *spaces)
            continue
        if len(ga) == 1 and len(gb) == 1 and a[ga[0]] == b[gb[0]]:
            if allowed(gb[0], ga) and ctx.identity_axes(x, ga[0], y, gb[0]):
                changing.append(gb[0])
        elif len(gb) == 1 and len(ga) > 1:  # merge: feature f ↔ one of the dims it combines
            parts = [ctx.space(x, i) for i in ga]
            if allowed(gb[0], ga) and ctx.digits(ctx.space(y, gb[0]), parts, f"group{n}",
                                                 _static([a[i] for i in ga])):
                changing.append(gb[0])
                ctx.decline(f"merges {axes_text(ga)} of '{x.name}' into axis {gb[0]}: "
                            f"{_ONE_FACTOR}", *spaces)
        elif len(ga) == 1 and len(gb) > 1:  # split: channel c ↔ one of the dims it splits into
            ok = [o for o in gb if allowed(o, ga)]
            parts = [ctx.space(y, o) if o in ok else None for o in gb]
            if ctx.digits(ctx.space(x, ga[0]), parts, f"group{n}", _static([b[o] for o in gb])):
                changing.extend(ok)
                ctx.decline(f"splits axis {ga[0]} of '{x.name}' into {axes_text(gb)}: "
                            f"{_ONE_FACTOR}", *spaces)
        elif _outer_blocks(ctx, (x, a, ga), (y, b, gb), f"group{n}") and allowed(gb[0], ga):
            changing.append(gb[0])
            ctx.decline(f"regroups {axes_text(ga)} of '{x.name}' into {axes_text(gb)}: only "
                        "the outer dims' common blocks map", *spaces)
    return changing


def _leading_blocks(a: tuple[int | None, ...], b: tuple[int | None, ...], lead: int,
                    groups: list[tuple[list[int], list[int]]]) -> bool:
    """Whether the first dims after the ``lead`` copied ones are static, of different
    lengths, one a multiple of the other, and in no factor group (symbolic dims follow):
    ``[N, C, H, W] → [N, G, -1]`` with ``H``, ``W`` symbolic. Both sides hold the same
    elements after the copied dims, so the outer dims still map in blocks
    (:func:`_outer_blocks`) whatever the symbolic dims are."""
    if lead >= len(a) or lead >= len(b) or any(lead in ga or lead in gb for ga, gb in groups):
        return False
    ca, cb = a[lead], b[lead]
    return ca is not None and cb is not None and ca > 1 and cb > 1 and ca != cb \
        and (ca % cb == 0 or cb % ca == 0)


def _outer_blocks(ctx: NodeContext, xa: tuple[gs.Tensor, tuple[int | None, ...], list[int]],
                  yb: tuple[gs.Tensor, tuple[int | None, ...], list[int]], label: str) -> bool:
    """Dims regrouped into others, the outer of one side a multiple of the other's: ``[C, H,
    W] → [G, C/G·H·W]`` (a group normalisation's view, and back). Input channel ``c`` then
    lands in output row ``c // (C/G)`` whatever the inner dims are, since both sides hold the
    same elements (``C·H·W = G·R`` gives ``R = C/G·H·W``): the larger outer dim is
    digit-coupled, in blocks, with the smaller."""
    (x, a, ga), (y, b, gb) = xa, yb
    ca, cb = a[ga[0]], b[gb[0]]
    if ca is None or cb is None or ca == cb:
        return False
    if ca % cb == 0:
        return ctx.digits(ctx.space(x, ga[0]), [ctx.space(y, gb[0]), None], label,
                          (cb, ca // cb))
    if cb % ca == 0:
        return ctx.digits(ctx.space(y, gb[0]), [ctx.space(x, ga[0]), None], label,
                          (ca, cb // ca))
    return False


def _decline_unmatched(ctx: NodeContext, x_a: tuple[gs.Tensor, tuple[int | None, ...]],
                       y_b: tuple[gs.Tensor, tuple[int | None, ...]],
                       groups: list[tuple[list[int], list[int]]]) -> None:
    """Say which static dims the factor groups leave out: no run of dims with the same product
    on the other side (symbolic dims around them, or a reshape that interleaves)."""
    (x, a), (y, b) = x_a, y_b
    in_x = {i for ga, _ in groups for i in ga}
    in_y = {j for _, gb in groups for j in gb}
    left = [ctx.space(x, i) for i, d in enumerate(a) if d not in (None, 1) and i not in in_x] \
        + [ctx.space(y, j) for j, d in enumerate(b) if d not in (None, 1) and j not in in_y]
    if left:
        ctx.decline(f"cannot tell which dims of '{x.name}' {_dims(a)} become which of "
                    f"'{y.name}' {_dims(b)}", *left)


def _dims(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


@register("Reshape")
def reshape(ctx: NodeContext) -> None:
    x, target, y = ctx.input(0), ctx.input(1), ctx.output(0)
    entries = shape_entries(target, reader=(ctx.node, 1))
    out_shape = ctx.shape(y)
    if x is None or y is None or entries is None or out_shape is None \
            or len(entries) != len(out_shape):
        ctx.refuse(ctx.unknown_rank(x) if x is None else
                   unreadable_shape(ctx, target) if entries is None else
                   ctx.unknown_rank(y) if out_shape is None else
                   f"{ctx.which(target)} has {len(entries)} entries but the output rank "
                   f"{len(out_shape)}")
        return
    allow_zero = bool(ctx.attr_int("allowzero", 0))
    viewed = restored_view(ctx.node)
    copies = {x.name} | ({viewed.name} if viewed is not None else set())
    allowed = set()
    for o, e in enumerate(entries):
        if e == -1 or (isinstance(e, Lit) and e > 0 and e.rewritable_for(ctx.node)):
            allowed.add(o)
        elif (e == 0 and not allow_zero) or (isinstance(e, DimRef) and e.tensor in copies
                                             and e.axis == o):
            allowed.add(o)  # copies input dim o (or of the tensor whose view it restores)
    changing = couple_regroup(ctx, x, y, allowed, _copied_prefix(entries, x, y, ctx.shape(x),
                                                                 allow_zero),
                              lambda o: fixed_entry(ctx, target, o, entries[o]))
    literals = [(y.name, o, e) for o in changing if isinstance(e := entries[o], Lit) and e > 0]
    if literals:
        ctx.on_rewrite(rewrite_literals(literals))


def _copied_prefix(entries: list[Entry], x: gs.Tensor, y: gs.Tensor,
                   in_shape: tuple[int | None, ...] | None, allow_zero: bool) -> int:
    """How many leading target entries copy the input's dims at the same positions: a ``Shape``
    read of that very dim, or of a dim shape inference names like it (ONNX gives equal
    symbolic dims the same name), ``0`` (copy), or a literal equal to a static dim."""
    if in_shape is None:
        return 0
    n = 0
    for pos, e in enumerate(entries[:len(in_shape)]):
        if isinstance(e, DimRef):
            same = (e.tensor == x.name and e.axis == pos) or _same_symbol(x, y, pos)
        else:
            same = (e == 0 and not allow_zero) or (e > 0 and e == in_shape[pos])
        if not same:
            break
        n += 1
    return n


def _same_symbol(x: gs.Tensor, y: gs.Tensor, pos: int) -> bool:
    dx = x.shape[pos] if x.shape is not None and pos < len(x.shape) else None
    dy = y.shape[pos] if y.shape is not None and pos < len(y.shape) else None
    return isinstance(dx, str) and bool(dx) and dx == dy


def unreadable_shape(ctx: NodeContext, t: gs.Tensor | None) -> str:
    """The reason for a shape operand that is neither a constant nor a readable expression."""
    return f"{ctx.which(t)} is computed in a way SPA cannot follow (it reads constants and " \
           "Shape/Gather/Slice/Concat/Cast of dims)"


def fixed_entry(ctx: NodeContext, t: gs.Tensor, pos: int, e: object) -> str:
    """Why entry ``pos`` (``e``) of the shape operand ``t`` cannot follow its axis' length."""
    where = f"entry {pos} of {ctx.which(t)}"
    if isinstance(e, DimRef):
        return f"{where} copies axis {e.axis} of '{e.tensor}'"
    if e == 0:
        return f"{where} is 0 with allowzero=1"
    if isinstance(e, Lit) and e.source is not None and e > 0:
        return f"{where} is the constant {int(e)}, also read by other nodes"
    return f"{where} is the constant {e}, which SPA cannot rewrite"


def rewrite_literals(literals: list[tuple[str, int, Lit]]):
    """Hook: set each literal shape entry to the surviving length of its output axis."""

    def hook(node: gs.Node, kept: KeptLookup) -> None:
        for name, axis, lit in literals:
            if kept.changed((name, axis)):
                lit.write(kept.count((name, axis)))

    return hook


@register("Flatten")
def flatten(ctx: NodeContext) -> None:
    couple_regroup(ctx, ctx.input(0), ctx.output(0))


@register("Transpose")
def transpose(ctx: NodeContext) -> None:
    io = ctx.data_io()
    if io is None:
        ctx.refuse(ctx.unknown_rank(ctx.input(0)))
        return
    x, y, rank = io
    perm = ctx.attr_ints("perm") or list(reversed(range(rank)))
    for k, p in enumerate(perm):
        ctx.identity_axes(x, int(p), y, k)


@register("DepthToSpace")
def depth_to_space(ctx: NodeContext) -> None:
    """``[N, C·b², H, W] → [N, C, H·b, W·b]``: output channel ``c`` takes the ``b²`` input
    channels ``c·b² + k`` (mode CRD, PyTorch's ``PixelShuffle``) or ``k·C + c`` (DCR, the
    default, TensorFlow's), one per pixel of its ``b × b`` block."""
    _space_to_channels(ctx, deep_input=True, dcr=ctx.attr("mode", "DCR") != "CRD")


@register("SpaceToDepth")
def space_to_depth(ctx: NodeContext) -> None:
    """``[N, C, H, W] → [N, b²·C, H/b, W/b]``: input channel ``c`` goes to the ``b²`` output
    channels ``k·C + c`` (PyTorch exports ``PixelUnshuffle`` as reshapes instead, which map the
    same way)."""
    _space_to_channels(ctx, deep_input=False, dcr=True)


def _space_to_channels(ctx: NodeContext, *, deep_input: bool, dcr: bool) -> None:
    """Couple the batch axes, and the ``b²``-times deeper channel axis (the input's when
    ``deep_input``) with the shallow one: cyclically (``k·C + c ↔ c``) or in blocks
    (``c·b² + k ↔ c``). The spatial axes change length, so they freeze if anything makes them
    channel spaces."""
    x, y = ctx.input(0), ctx.output(0)
    unknown = [t for t in (x, y) if ctx.rank(t) is None]
    if unknown or ctx.rank(x) != 4 or ctx.rank(y) != 4:
        ctx.refuse(ctx.unknown_rank(unknown[0]) if unknown else "only 4-D inputs are mapped")
        return
    deep, shallow = (x, y) if deep_input else (y, x)
    ctx.identity_axes(deep, 0, shallow, 0)
    fine, coarse = ctx.space(deep, 1), ctx.space(shallow, 1)
    if not (ctx.cyclic(fine, coarse) if dcr else ctx.block(fine, coarse)):
        ctx.decline("the channel counts are unknown or not a multiple of each other", fine,
                    coarse)


def _axes(ctx: NodeContext, input_from: int) -> list[int] | None:
    """The ``axes`` of (Un)Squeeze, from the opset where they are an input; None when they are
    computed at run time."""
    if ctx.opset >= input_from:
        t = ctx.input(1)
        return [] if t is None else ctx.const_ints(t)
    return ctx.attr_ints("axes") or []


@register("Squeeze")
def squeeze(ctx: NodeContext) -> None:
    x, y = ctx.input(0), ctx.output(0)
    shape = ctx.shape(x)
    axes = _axes(ctx, 13)
    if shape is None or axes is None:
        ctx.refuse(ctx.unknown_rank(x) if shape is None else ctx.not_constant(ctx.input(1), "axes"))
        return
    removed = {a % len(shape) for a in axes} if axes else {i for i, d in enumerate(shape) if d == 1}
    _couple_in_order(ctx, x, [ax for ax in range(len(shape)) if ax not in removed], y, None)


@register("Unsqueeze")
def unsqueeze(ctx: NodeContext) -> None:
    x, y = ctx.input(0), ctx.output(0)
    rank_y = ctx.rank(y)
    axes = _axes(ctx, 13)
    if rank_y is None or not axes:
        ctx.refuse(ctx.unknown_rank(y) if rank_y is None else
                   ctx.not_constant(ctx.input(1), "axes") if axes is None else "no axes")
        return
    inserted = {a % rank_y for a in axes}
    _couple_in_order(ctx, x, None, y, [ax for ax in range(rank_y) if ax not in inserted])


def _couple_in_order(ctx: NodeContext, x: gs.Tensor, x_axes: list[int] | None, y: gs.Tensor,
                     y_axes: list[int] | None) -> None:
    """Identity-couple the listed axes of ``x`` and ``y`` pairwise, in order (None: 0, 1, …)."""
    listed = x_axes if x_axes is not None else y_axes
    assert listed is not None, "the axes of one side are listed"
    n = len(listed)
    for a, b in zip(x_axes or range(n), y_axes or range(n)):
        ctx.identity_axes(x, a, y, b)


@register("Shape")
def shape_op(ctx: NodeContext) -> None:
    x, out = ctx.input(0), ctx.output(0)
    rank = ctx.rank(x)
    if x is None or out is None or rank is None:
        ctx.refuse(ctx.unknown_rank(x) if rank is None else "its output is not used")
        return
    if ctx.is_graph_output(out):
        ctx.refuse(f"its value is graph output '{out.name}', which must not change")
        return
    read = _dims_read(ctx, out, shape_op_dims(ctx.node, rank))
    if _only_copied_into_reshapes(ctx, x, out):
        read = {}  # each dim read flows back into the same axis of a reshape of x
    for ax in range(rank):
        if ax not in read:
            ctx.handle(ctx.space(x, ax))
    for reader in dict.fromkeys(read.values()):
        axes = [ax for ax, r in read.items() if r == reader]
        ctx.decline(f"the length of {axes_text(axes)} of '{x.name}' is read as a number by "
                    f"{reader}", *(ctx.space(x, ax) for ax in axes))


_SHAPE_PLUMBING = ("Gather", "Unsqueeze", "Squeeze", "Concat", "Cast", "Identity")


def _only_copied_into_reshapes(ctx: NodeContext, x: gs.Tensor, out: gs.Tensor) -> bool:
    """True when ``Shape(x)`` only feeds Reshape targets of ``x`` itself (through Gather,
    Unsqueeze, Concat, …) and every dim of ``x`` lands at its own position: ``x.view(x.size(0),
    x.size(1), -1)``. Such a target is re-read at run time and stays right when the dim shrinks.
    A group normalisation's view of ``x`` restored to its shape counts as ``x``
    (:func:`restored_view`)."""
    stack, seen = [out], set()
    while stack:
        t = stack.pop()
        if t.name in seen:
            continue
        seen.add(t.name)
        if ctx.is_graph_output(t) or not ctx.consumers(t):
            return False  # the dims' values leave the graph (or go nowhere a reshape reads)
        for c in ctx.consumers(t):
            if c.op == "Reshape" and c.inputs[1] is t \
                    and any(v is x for v in (c.inputs[0], restored_view(c))):
                entries = shape_entries(t)
                if entries is None or any(isinstance(e, DimRef) and e.tensor == x.name
                                          and e.axis != pos for pos, e in enumerate(entries)):
                    return False
            elif c.op in _SHAPE_PLUMBING and (c.op != "Gather" or c.inputs[0] is t):
                stack.extend(c.outputs)
            else:
                return False
    return True


def restored_view(node: gs.Node) -> gs.Tensor | None:
    """``x`` when the Reshape ``node`` restores a group normalisation's view of it to its
    shape: ``Reshape(InstanceNormalization(Reshape(x, [N, G, -1])), Shape(x))``, as PyTorch
    exports ``GroupNorm``. The view and the normalisation keep every element where it was, so
    each axis of the output is that axis of ``x``; the views' rule couples the channels of both
    with the same groups (:func:`_outer_blocks`), so their lengths stay equal when groups go."""
    norm = node.inputs[0].inputs[0] if node.inputs and node.inputs[0].inputs else None
    if norm is None or norm.op != "InstanceNormalization" or not norm.inputs[0].inputs:
        return None
    view = norm.inputs[0].inputs[0]
    x = view.inputs[0] if view.op == "Reshape" and view.inputs else None
    shape = node.inputs[1].inputs[0] if len(node.inputs) > 1 and node.inputs[1].inputs else None
    return x if shape is not None and shape.op == "Shape" and shape.inputs[0] is x else None


def _dims_read(ctx: NodeContext, out: gs.Tensor, dims: Sequence[int], depth: int = 0
               ) -> dict[int, str]:
    """Which input dims the Shape output's consumers actually read (``dims[k]``: the input dim
    at position ``k`` of ``out``), each with what reads it.

    Cast/Identity pass the vector on; a constant-index Gather or Slice picks positions, and
    what *its* consumers read of them is followed too: tf2onnx reads the batch dim of an NHWC
    view as ``Slice(Gather(Shape(nchw), perm), 0:1)``, which reads no channel dim.
    """
    consumers = ctx.consumers(out)
    if not consumers or depth > 8 or ctx.is_graph_output(out):
        # A graph output (or read by no node, or too far to follow): its values must not change.
        return dict.fromkeys(dims, f"graph output '{out.name}'" if ctx.is_graph_output(out)
                             else f"'{out.name}', which SPA does not follow")
    read: dict[int, str] = {}
    for consumer in consumers:
        if consumer.op in ("Cast", "Identity"):  # tf2onnx casts shapes to int32 and back
            picked: list[int] | None = list(range(len(dims)))
        else:
            picked = _positions_picked(ctx, consumer, len(dims))
        if picked is None:
            return dict.fromkeys(dims, f"{consumer.op} node '{consumer.name}'")
        for dim, reader in _dims_read(ctx, consumer.outputs[0], [dims[i] for i in picked],
                                      depth + 1).items():
            read.setdefault(dim, reader)
    return read


def _positions_picked(ctx: NodeContext, node: gs.Node, n: int) -> list[int] | None:
    """Positions of a length-``n`` shape vector that a Gather or Slice (step 1) reads."""
    if node.op == "Gather" and int(node.attrs.get("axis", 0)) == 0 and len(node.inputs) > 1:
        idx = ctx.const_ints(node.inputs[1])
        return None if idx is None else [i % n for i in idx if -n <= i < n]
    if node.op == "Slice" and len(node.inputs) >= 3 and node.inputs[0].name:
        starts, ends = ctx.const_ints(node.inputs[1]), ctx.const_ints(node.inputs[2])
        rest = [ctx.const_ints(t) for t in node.inputs[3:5]]
        if starts is None or ends is None or len(starts) != 1 or any(r is None for r in rest) \
                or (len(rest) > 1 and rest[1] != [1]):
            return None
        return list(range(n))[slice(starts[0], ends[0])]
    return None
