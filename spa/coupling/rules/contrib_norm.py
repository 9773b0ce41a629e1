"""onnxruntime's fused normalisations over the hidden (last) axis.

``SimplifiedLayerNormalization`` (RMSNorm; onnxruntime registers it in the *default* domain,
where onnxruntime-genai's builder writes it): ``Y = X / rms(X) · scale`` over axes
``axis..-1``, with an optional ``inv_std_var`` output. It maps as ONNX's RMSNormalization does
(spa/coupling/rules/norm.py): the leading axes pass through; the normalised axes freeze, unless
hidden-size pruning is on and only the last axis is normalised, where the axis goes with its
scale and the statistics change by design (outside the masked oracle).

``SkipLayerNormalization`` and ``SkipSimplifiedLayerNormalization`` (``com.microsoft``) add
before they normalise over the last axis: ``S = input + skip (+ bias)``; ``output = LN(S) · γ
(+ β)`` (or RMSNorm); optional outputs ``mean`` and ``inv_std_var`` (``[…, 1]``) and
``input_skip_bias_sum`` ``= S``. ``skip`` broadcasts to ``input`` (it may lack leading axes).
The leading axes of input, skip and every output are coupled as in an element-wise add; the
last axis is the residual stream: it freezes, naming the statistics, unless hidden-size
pruning is on, where input, skip, bias, the sum and the output go together with ``γ`` and ``β``.
Facts: the bias is added to input and skip (the bias of a MatMul the norm follows).

``EmbedLayerNormalization`` (``com.microsoft``, BERT's fused embeddings):
``S = word[input_ids] + position[position_ids] (+ segment[segment_ids])``,
``output = LN(S) · γ + β``, with optional outputs ``mask_index`` (per batch) and
``embedding_sum`` (``= S``). ``input_ids``' axes are the output's leading axes; the tables' axis
1 (producers, as for a Gather of an embedding table) is the hidden axis of ``S``, of the output
and of ``γ``/``β``: it freezes, naming the statistics, unless hidden-size pruning is on.

Fail closed: an input or output of unknown rank refuses the node; a normalised axis other
than the last always freezes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from spa.coupling.context import axes_text
from spa.coupling.registry import register
from spa.coupling.rules.elementwise import couple_broadcast
from spa.coupling.rules.norm import normalise, statistics_reason
from spa.coupling.types import Role

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

    from spa.coupling.context import NodeContext

# SkipLayerNormalization's inputs: (γ, β, bias); SkipSimplifiedLayerNormalization has no β.
_PARAMS = {"SkipLayerNormalization": (2, 3, 4), "SkipSimplifiedLayerNormalization": (2, None, 3)}
_SUM_OUTPUT = 3  # input_skip_bias_sum


@register("SimplifiedLayerNormalization")
def simplified_layer_norm(ctx: NodeContext) -> None:
    x, rank = ctx.input(0), ctx.rank(ctx.input(0))
    if x is None or rank is None:
        ctx.refuse(ctx.unknown_rank(x))
        return
    stats = ctx.output(1)
    normalise(ctx, [ctx.input(1)], [stats] if stats is not None else [])


def _bias_input(node: gs.Node, slot: int) -> int | None:
    """The optional bias is added to ``input`` and ``skip`` before the normalisation."""
    return _PARAMS[node.op][2] if slot in (0, 1) else None


@register("SkipLayerNormalization", "SkipSimplifiedLayerNormalization", domain="com.microsoft",
          adds_bias=_bias_input)
def skip_layer_norm(ctx: NodeContext) -> None:
    x, skip, y = ctx.input(0), ctx.input(1), ctx.output(0)
    rank = ctx.rank(x)
    if x is None or skip is None or y is None or rank is None or ctx.rank(y) != rank:
        ctx.refuse(ctx.unknown_rank(x if rank is None else y))
        return
    couple_broadcast(ctx, [x, skip], y, skip_last=1)
    for out in ctx.outputs[1:]:
        for ax in range(rank - 1):
            ctx.identity_axes(y, ax, out, ax)
    sy = ctx.space(y, -1)
    added = [ctx.space(t, -1) for t in (x, skip, ctx.output(_SUM_OUTPUT))]
    if not ctx.hidden:
        ctx.decline(statistics_reason(f"normalises over {axes_text([rank - 1])} of '{x.name}'",
                                      True), sy, *added)
        return
    gamma, beta, bias = (None if i is None else ctx.input(i) for i in _PARAMS[ctx.node.op])
    for space in added:
        ctx.identity(space, sy)
    for param in (gamma, beta, bias):
        sp = ctx.space(param, 0) if ctx.rank(param) == 1 else None
        ctx.identity(sp, sy)
        if param is gamma:
            ctx.role(sp, Role.SCALE)
    ctx.statistics_over(ctx.space(x, -1))


# EmbedLayerNormalization: the tables (word, position, segment), then γ and β.
_TABLES, _GAMMA, _BETA, _EMBEDDING_SUM = (2, 3, 4), 5, 6, 2


@register("EmbedLayerNormalization", domain="com.microsoft")
def embed_layer_norm(ctx: NodeContext) -> None:
    ids, y = ctx.input(0), ctx.output(0)
    if ids is None or y is None or ctx.rank(ids) != 2 or ctx.rank(y) != 3:
        ctx.refuse(ctx.unknown_rank(ids if ctx.rank(ids) is None else y)
                   if None in (ctx.rank(ids), ctx.rank(y)) else
                   f"{ctx.which(ids)} of rank {ctx.rank(ids)}: only [batch, sequence] is mapped")
        return
    sums = [t for t in (y, ctx.output(_EMBEDDING_SUM)) if t is not None]
    for t in sums:
        for ax in (0, 1):
            ctx.identity_axes(ids, ax, t, ax)
    tables = [ctx.space(ctx.input(i), 1) for i in _TABLES]
    for table in tables:
        ctx.role(table, Role.PRODUCER)
    hidden = [ctx.space(t, 2) for t in sums]
    sy = hidden[0]
    for space in (*hidden[1:], *tables):
        ctx.identity(space, sy)
    if not ctx.hidden:  # the coupled tables still make the (frozen) residual-stream group
        ctx.refuse(statistics_reason(f"normalises over axis 2 of '{y.name}'", True))
        return
    for i in (_GAMMA, _BETA):
        sp = ctx.space(ctx.input(i), 0)
        ctx.identity(sp, sy)
        if i == _GAMMA:
            ctx.role(sp, Role.SCALE)
    ctx.statistics_over(sy)
