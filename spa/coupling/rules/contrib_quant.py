"""onnxruntime's ``MatMulNBits`` (``com.microsoft``): a MatMul by a block-quantised N-bit weight.

``Y[…, n] = Σ_k A[…, k] · W[k, n] (+ bias[n])``, the logical ``W [K, N]`` stored row by row of
``Wᵀ``: ``B [N, k_blocks, blob]`` (uint8; ``bits`` bits a value, packed along K, ``block_size``
values a block), ``scales [N, k_blocks]``, ``zero_points`` ``[N, ⌈k_blocks·bits/8⌉]`` (uint8,
packed like ``B``) or ``[N, k_blocks]`` (float), ``bias [N]``; attributes ``K`` and ``N``.
A value dequantises as ``(q − zero_point) · scale`` of its row and block.

* **Output rows go freely**: ``B.0``, ``scales.0``, ``zero_points.0`` and ``bias.0`` ↔ ``Y.-1``
  (``B.0`` the producer); a row is dequantised on its own. The rewrite sets ``N``.
* **Input columns go in whole quantisation blocks**: ``A.-1[k] ↔ B.1[k // block_size]``, so
  the block's columns are one channel of their group; ``scales.1`` (the consumer) and an
  unpacked zero point go with ``B.1``. A packed zero point holds several blocks a byte: the
  rewrite unpacks, keeps the surviving blocks' and packs again; it sets ``K``.
  Why whole blocks and not re-quantisation: the values of a kept block keep their scale and
  zero point, so the pruned layer computes exactly what the masked original does and the file
  stays N-bit. Cutting a block would shift the values after it into other blocks, whose scales
  were fitted to other values: every later block would be re-quantised, an error on weights
  that were not pruned. The price is granularity (a group prunes ``block_size`` channels at a
  time, e.g. 32 of an MLP's 1536 neurons).
* The masked original zeroes a removed block through its scales: ``(q − zp) · 0 = 0`` whatever
  the packed values and zero points hold.

Facts: MACs ``|Y| · K`` (``K`` read off ``A``), as a MatMul's. Layer input: ``A``'s last axis,
``block_size`` columns to an index of the consumer space (the scales' blocks), so that OBS sees
the columns' Hessian and updates the kept blocks' values, written as new codes on their own
scales and zero points (passes/compensation.py). Bias slot: input 5 (FLAP's shift; created, after
empty optional inputs, when the node has none).

Fail closed, with a reason: a dynamic or misshapen ``B``, ``g_idx``, prepacked weights. Input
columns only (rows still prune): ``K`` not a multiple of ``block_size``, 1-D scales or zero
points (an older layout with rows and blocks on one axis), a packed zero point of a bit width
that does not divide 8.
"""

from __future__ import annotations

from math import prod
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from spa.coupling.facts import BiasSlot, LayerInput, MacTerm, mac_term
from spa.coupling.registry import register
from spa.coupling.types import Role
from spa.ir.nbits import pack, unpack

if TYPE_CHECKING:
    from spa.coupling.context import NodeContext, Space
    from spa.coupling.types import KeptLookup

_SCALES, _ZERO_POINTS, _G_IDX, _BIAS = 2, 3, 4, 5


def _layer_input(node: gs.Node, slot: int) -> LayerInput | None:
    """The scales (where the consumer space is) read ``A``'s last axis a block at a time."""
    a, k, size = node.inputs[0], int(node.attrs.get("K", 0)), int(node.attrs.get("block_size", 0))
    rank = len(a.shape) if a.shape is not None else 0
    if slot != _SCALES or rank == 0 or size <= 0 or k % size:
        return None
    return LayerInput(a, rank - 1, size)


def _macs(node: gs.Node) -> MacTerm | None:
    a, b, y = node.inputs[0], node.inputs[1], node.outputs[0]
    return mac_term([y, a], lambda y_, a_: prod(y_) * a_[-1], known=[b])


@register("MatMulNBits", domain="com.microsoft", mac=_macs, layer_input=_layer_input,
          bias=BiasSlot(_BIAS))
def matmul_nbits(ctx: NodeContext) -> None:
    a, b, y = ctx.input(0), ctx.input(1), ctx.output(0)
    scales, zp, bias = ctx.input(_SCALES), ctx.input(_ZERO_POINTS), ctx.input(_BIAS)
    why = _unsupported(ctx)
    if why is not None:
        ctx.refuse(why)
        return
    rows = ctx.space(b, 0)
    ctx.role(rows, Role.PRODUCER)
    ctx.dense_rows(rows)
    ctx.identity(rows, ctx.space(y, -1))
    for ax in range((ctx.rank(a) or 1) - 1):
        ctx.identity_axes(a, ax, y, ax + (ctx.rank(y) or 0) - (ctx.rank(a) or 0))
    for param in (t for t in (scales, zp) if t is not None):
        rank = ctx.rank(param)
        sp = ctx.space(param, 0)
        if not (ctx.identity(sp, rows) or rank == 1 and ctx.block(sp, rows)):
            ctx.decline(f"{ctx.which(param)} of shape {list(ctx.shape(param) or [])} fits no "
                        f"row layout", sp)
    ctx.identity(ctx.space(bias, 0), rows)
    _couple_blocks(ctx)
    ctx.on_rewrite(_hook(rows, ctx.space(b, 1), ctx.attr_int("bits", 4),
                         ctx.attr_int("block_size")))


def _couple_blocks(ctx: NodeContext) -> None:
    """``A.-1`` ↔ ``B.1`` block by block, with the scales' (and an unpacked zero point's) block
    axis; or, where that layout is not there, why the input columns freeze."""
    a, b, scales, zp = ctx.input(0), ctx.input(1), ctx.input(_SCALES), ctx.input(_ZERO_POINTS)
    blocks, columns = ctx.space(b, 1), ctx.space(a, -1)
    block_size, bits = ctx.attr_int("block_size"), ctx.attr_int("bits", 4)
    why = None
    if columns is None or blocks is None or columns.length != blocks.length * block_size:
        why = f"K={ctx.attr_int('K')} is not a whole number of blocks of {block_size}"
    elif ctx.rank(scales) != 2 or (zp is not None and ctx.rank(zp) != 2):
        why = "1-D scales or zero points (rows and blocks on one axis)"
    elif zp is not None and ctx.const(zp) is not None and _packed(zp) and 8 % bits:
        why = f"zero points packed {bits} bits a value"
    if why is not None:
        ctx.decline(f"input columns are pruned in whole quantisation blocks, but {why}", columns)
        return
    ctx.block(columns, blocks)
    scale_blocks = ctx.space(scales, 1)
    ctx.identity(scale_blocks, blocks)
    ctx.role(scale_blocks, Role.CONSUMER)
    if zp is not None and not _packed(zp):
        ctx.identity(ctx.space(zp, 1), blocks)
    elif zp is not None:
        ctx.handle(ctx.space(zp, 1))  # repacked by the rewrite hook


def _unsupported(ctx: NodeContext) -> str | None:
    b, y = ctx.input(1), ctx.output(0)
    shape = ctx.shape(b)
    if not isinstance(b, gs.Constant):  # (its values are not read: dequantising costs)
        return ctx.not_constant(b)
    if shape is None or len(shape) != 3 or shape[0] != ctx.attr_int("N"):
        return f"{ctx.which(b)} of shape {list(shape or [])} is not [N, k_blocks, blob]"
    if ctx.input(_G_IDX) is not None:
        return "a g_idx input (deprecated column reordering) is not mapped"
    if ctx.attr_int("weight_prepacked", 0):
        return "attribute weight_prepacked=1 (a layout of the execution provider) is not mapped"
    if ctx.rank(ctx.input(0)) is None or ctx.rank(y) is None:
        return ctx.unknown_rank(ctx.input(0) if ctx.rank(ctx.input(0)) is None else y)
    return None


def _packed(zp: gs.Tensor) -> bool:
    return isinstance(zp, gs.Constant) and np.asarray(zp.values).dtype == np.uint8


def _hook(rows: Space | None, blocks: Space | None, bits: int, block_size: int):
    def hook(node: gs.Node, kept: KeptLookup) -> None:
        if rows is not None:
            node.attrs["N"] = kept.count(rows.key)
        if blocks is None or not kept.changed(blocks.key):
            return
        keep = kept.kept(blocks.key)
        node.attrs["K"] = int(keep.size) * block_size
        zp = node.inputs[_ZERO_POINTS] if len(node.inputs) > _ZERO_POINTS else None
        if zp is not None and zp.name and _packed(zp):
            zp.values = repack(np.asarray(zp.values), keep, bits)

    return hook


def repack(packed: np.ndarray, keep: np.ndarray, bits: int) -> np.ndarray:
    """Rows of ``bits``-bit values packed low bits first (``[rows, bytes]``), with only the
    values at ``keep`` of each row, packed again."""
    return pack(unpack(packed, bits)[:, keep], bits)
