"""Tiny transformer pieces for the attention and MLP op-rule tests, built with :class:`Builder`.

Shapes: batch 1, sequence ``S = 5``, hidden ``D = 16``, ``H = 4`` heads of ``HD = 4``. Weights
are seeded, scaled down so that softmax does not saturate, and named ``<layer>.w`` / ``<layer>.b``
so the tests can read them back from the pruned file.
"""

from __future__ import annotations

import numpy as np
from graphs import Builder, group_of, init_shapes, init_value, kept_slices

from spa.coupling import GroupKind

S, D, H, HD = 5, 16, 4, 4
KV = 2  # key/value heads of grouped-query attention
X3 = {"x": [1, S, D]}
SCALE = 0.5  # 1 / sqrt(HD)
# Head h is scaled by RANKING[h] (see damp_heads): L1 ranks them 1 < 2 < 0 < 3.
RANKING = {0: 0.5, 1: 0.01, 2: 0.1, 3: 1.0}


def weight(b: Builder, *shape: int, name: str, scale: float = 0.4) -> str:
    return b.const((b.rng.standard_normal(shape) * scale).astype(np.float32), name)


def linear(b: Builder, x: str, n_in: int, n_out: int, name: str, *, bias: bool = True) -> str:
    """``x @ W [n_in, n_out] (+ b)``, as MatMul + Add."""
    y = b.op("MatMul", x, weight(b, n_in, n_out, name=f"{name}.w"), name=name)
    return b.op("Add", y, weight(b, n_out, name=f"{name}.b"), name=f"{name}.add") if bias else y


def split_heads(b: Builder, x: str, heads: int, name: str, target: list[int] | None = None,
                perm: tuple[int, ...] = (0, 2, 1, 3)) -> str:
    """``[1, S, heads·HD] → [1, S, heads, HD] → [1, heads, S, HD]``; the Reshape is ``name``."""
    r = b.op("Reshape", x, b.const(target or [1, S, heads, HD]), name=name)
    return b.op("Transpose", r, perm=list(perm))


def merge_heads(b: Builder, ctx: str, name: str = "merge", heads: int = H,
                target: list[int] | None = None) -> str:
    """``[1, heads, S, HD] → [1, S, heads, HD] → [1, S, heads·HD]``; the Reshape is ``name``."""
    t = b.op("Transpose", ctx, perm=[0, 2, 1, 3])
    return b.op("Reshape", t, b.const(target or [1, S, heads * HD]), name=name)


def sdpa(b: Builder, q: str, k: str, v: str, *, mask: str | None = None,
         transpose_k: bool = True, prefix: str = "", softmax_axis: int | None = -1) -> str:
    """``softmax(q @ kᵀ · SCALE + mask) @ v``; node and constant names start with ``prefix``
    (the scale constant is ``<prefix>scale``, multiplied in by node ``<prefix>scale_mul``);
    ``softmax_axis=None`` leaves Softmax's axis at its default."""
    kt = b.op("Transpose", k, perm=[0, 1, 3, 2]) if transpose_k else k
    scores = b.op("MatMul", q, kt, name=f"{prefix}scores")
    scores = b.op("Mul", scores, b.const(np.float32(SCALE), f"{prefix}scale"),
                  name=f"{prefix}scale_mul")
    if mask is not None:
        scores = b.op("Add", scores, mask, name=f"{prefix}mask_add")
    axis = {} if softmax_axis is None else {"axis": softmax_axis}
    p = b.op("Softmax", scores, name=f"{prefix}softmax", **axis)
    return b.op("MatMul", p, v, name=f"{prefix}context")


def mha(b: Builder, x: str, *, mask: str | None = None, qkv: tuple[str, str, str] | None = None,
        rope=None) -> str:
    """Self-attention on ``x [1, S, D]`` up to the output projection ``o`` (MatMul + Add).

    ``qkv``: the three ``[1, S, D]`` projections when the caller made them (fused QKV);
    ``rope``: a function applied to the head-split q and k.
    """
    if qkv is None:
        qkv = tuple(linear(b, x, D, D, n) for n in "qkv")
    q, k, v = (split_heads(b, t, H, f"split_{n}") for t, n in zip(qkv, "qkv"))
    if rope is not None:
        q, k = rope(b, q), rope(b, k)
    return linear(b, merge_heads(b, sdpa(b, q, k, v, mask=mask)), D, D, "o")


def residual_norm(b: Builder, x: str, y: str, name: str = "ln") -> str:
    """``LayerNormalization(x + y)`` over the hidden axis (opset 17)."""
    return b.op("LayerNormalization", b.op("Add", x, y), weight(b, D, name=f"{name}.scale"),
                weight(b, D, name=f"{name}.bias"), name=name, axis=-1)


def damp(b: Builder, name: str, axis: int, index: list[int], factor: float) -> None:
    """Scale slices ``index`` of initializer ``name`` along ``axis`` by ``factor``, so that an
    L1 criterion ranks the channels they belong to lower."""
    arr = b.inits[name]
    where = [slice(None)] * arr.ndim
    where[axis] = index
    arr[tuple(where)] *= np.float32(factor)


def damp_heads(b: Builder, factors: dict[int, float], *, cols: tuple[str, ...] = ("q", "k", "v"),
               rows: tuple[str, ...] = ("o",), width: int = HD) -> None:
    """Scale head ``h`` (``width`` columns of each ``<cols>.w`` and ``<cols>.b``, the matching
    rows of each ``<rows>.w``) by ``factors[h]``."""
    for h, f in factors.items():
        idx = head_columns([h], width)
        for n in cols:
            damp(b, f"{n}.w", 1, idx, f)
            if f"{n}.b" in b.inits:
                damp(b, f"{n}.b", 0, idx, f)
        for n in rows:
            damp(b, f"{n}.w", 0, idx, f)


def head_columns(heads: list[int], width: int = HD, offset: int = 0) -> list[int]:
    """The columns of whole heads ``heads`` (``width`` each), shifted by ``offset``."""
    return [offset + h * width + j for h in heads for j in range(width)]


def kept(m, path, name: str, axis: int) -> list[int]:
    """Which slices of initializer ``name`` along ``axis`` survive in the pruned file."""
    return kept_slices(init_value(m, name), init_value(path, name), axis)


def kept_2d(m, path, name: str) -> tuple[list[int], list[int]]:
    """(rows, columns) of 2-D initializer ``name`` that survive in the pruned file, when both
    axes may have been pruned (matched by value: seeded random weights are all distinct)."""
    orig, new = init_value(m, name), init_value(path, name)
    where = {float(v): divmod(i, orig.shape[1]) for i, v in enumerate(orig.reshape(-1))}
    pos = [where[float(v)] for v in new.reshape(-1)]
    rows, cols = sorted({r for r, _ in pos}), sorted({c for _, c in pos})
    np.testing.assert_array_equal(new, orig[np.ix_(rows, cols)])
    return rows, cols


def assert_heads_kept(m, path, heads: list[int], *, cols=("q", "k", "v"), rows=("o",)) -> None:
    """Exactly the whole heads ``heads`` survive in every Q/K/V weight/bias and output proj."""
    for n in cols:
        assert kept(m, path, f"{n}.w", 1) == head_columns(heads), n
        if f"{n}.b" in init_shapes(m):
            assert kept(m, path, f"{n}.b", 0) == head_columns(heads), n
    for n in rows:
        assert kept(m, path, f"{n}.w", 0) == head_columns(heads), n


def heads_group(m, tensor: str = "q.w", size: int = H):
    """The group of ``(tensor, 1)``: asserted prunable, of kind HEADS with ``size`` heads."""
    g = group_of(m, tensor, 1)
    assert g.kind is GroupKind.HEADS and g.size == size and g.prunable, (g.kind, g.size, g.frozen)
    return g
