"""ONNX's remaining tensor, bitwise, random, loss and sequence-mixing ops in torch, for
``spa.torch.from_onnx``.

The spec's semantics, onnxruntime's where the spec leaves room; where the two differ the spec
wins and the tests say so.

- Index outputs (NonZero, Unique's indices, inverse indices and counts) are int64. A scalar's
  NonZero is ``(0, N)`` (the spec; onnxruntime gives ``(1, N)``). OneHot truncates float indices
  before wrapping negative ones, as onnxruntime does.
- Scans (CumSum, CumProd) shift by the identity for ``exclusive``, never divide it back out.
- Bitwise ops on unsigned 16/32/64-bit tensors, which torch has few kernels for, run on the
  signed type of the same width viewed bit for bit; a right shift of them is made logical by
  clearing the sign bit after its first step. A shift by a negative amount or by the width or
  more gives 0, or -1 for an arithmetic right shift of a negative value (opset 28's rule;
  onnxruntime applies it at every opset).
- Random ops draw from torch's generator (``torch.manual_seed`` makes runs repeatable); the
  ``seed`` attribute is not used: onnxruntime's stream cannot be matched anyway, and a generator
  reseeded on every call would freeze the noise across training steps. Bernoulli gives 1 with
  probability ``p`` (the spec; ONNX's function body, which onnxruntime runs, gives ``1 - p``).
- Losses: ``loss = -weight[c] · log_prob[c]``; an ignored label weighs 0; ``mean`` is
  ``Σ loss / Σ weight`` (NaN when every label is ignored, as in onnxruntime).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from onnx import TensorProto

from spa.torch.arrays import torch_dtype as _dtype
from spa.torch.interpreter import Op, UnsupportedOpsError, given, int_of, op, positive_axis

Tensor = torch.Tensor

# ---- indexing and reshaping -----------------------------------------------------------------
@op("OneHot")
def _one_hot(a: dict, x: list) -> Tensor:
    """``values[1]`` where the (wrapped) index hits, ``values[0]`` elsewhere and for indices
    outside ``[-depth, depth)``; the new axis at ``axis``."""
    depth = int_of(x[1])
    idx = x[0].long()
    idx = torch.where(idx < 0, idx + depth, idx)
    hit = idx.unsqueeze(-1) == torch.arange(depth, device=idx.device)
    values = x[2].reshape(-1)
    out = torch.where(hit, values[1], values[0])
    return out.movedim(-1, positive_axis(a.get("axis", -1), out.dim()))


@op("NonZero")
def _nonzero(a: dict, x: list) -> Tensor:
    """``[rank, n]``: the indices of the ``n`` non-zero entries; ``(0, n)`` for a scalar."""
    t = x[0]
    if t.dim() == 0:
        return torch.zeros((0, int(bool(t != 0))), dtype=torch.int64, device=t.device)
    return torch.nonzero(t != 0).T  # ``!= 0``: torch has no nonzero for uint16/32/64


@op("Compress")
def _compress(a: dict, x: list) -> Tensor:
    """The slices along ``axis`` (of the flattened input without one) whose condition is true;
    a condition longer than the axis is cut to it, as in onnxruntime."""
    t = x[0] if "axis" in a else x[0].reshape(-1)
    axis = positive_axis(a.get("axis", 0), t.dim())
    keep = torch.nonzero(x[1].reshape(-1)[:t.shape[axis]]).reshape(-1)
    return t.index_select(axis, keep)


def _scan(t: Tensor, axis: int, fn: Callable[[Tensor, int], Tensor], identity: float,
          exclusive: bool, reverse: bool) -> Tensor:
    """Cumulative ``fn`` along ``axis``; ``exclusive`` shifts the input by one ``identity``
    (taking the entry back out, by subtraction or division, fails on inf, 0 and large
    magnitudes)."""
    t = t.flip(axis) if reverse else t
    if exclusive and t.shape[axis]:
        first = torch.full_like(t.narrow(axis, 0, 1), identity)
        t = torch.cat([first, t.narrow(axis, 0, t.shape[axis] - 1)], axis)
    out = fn(t, axis)
    return out.flip(axis) if reverse else out


def _cumulative(fn: Callable[[Tensor, int], Tensor], identity: float) -> Op:
    def run(a: dict, x: list) -> Tensor:
        return _scan(x[0], positive_axis(int_of(x[1]), x[0].dim()), fn, identity,
                     bool(a.get("exclusive", 0)), bool(a.get("reverse", 0)))
    return run


op("CumSum")(_cumulative(torch.cumsum, 0))
op("CumProd")(_cumulative(torch.cumprod, 1))


@op("EyeLike")
def _eye_like(a: dict, x: list) -> Tensor:
    rows, cols = x[0].shape
    dtype = _dtype(a["dtype"], "EyeLike dtype") if "dtype" in a else x[0].dtype
    r = torch.arange(rows, device=x[0].device).unsqueeze(1)
    c = torch.arange(cols, device=x[0].device)
    return (c - r == a.get("k", 0)).to(dtype)


@op("ReverseSequence")
def _reverse_sequence(a: dict, x: list) -> Tensor:
    """Each batch entry's first ``sequence_lens[i]`` time steps reversed, the rest kept."""
    rank = x[0].dim()
    batch = positive_axis(a.get("batch_axis", 1), rank)
    time = positive_axis(a.get("time_axis", 0), rank)
    t = x[0].movedim((batch, time), (0, 1))
    lens = x[1].long().reshape(-1, 1)
    step = torch.arange(t.shape[1], device=t.device)
    src = torch.where(step < lens, lens - 1 - step, step)
    src = src.reshape(*src.shape, *[1] * (t.dim() - 2)).expand(t.shape)
    return t.gather(1, src).movedim((0, 1), (batch, time))


@op("Det")
def _det(a: dict, x: list) -> Tensor:
    return torch.linalg.det(x[0])


@op("Unique")
def _unique(a: dict, x: list) -> tuple[Tensor, ...]:
    """Unique values (or slices along ``axis``), ascending or (``sorted=0``) in order of first
    occurrence; the index of each one's first occurrence, each input entry's index among them,
    and their counts."""
    flat = "axis" not in a
    t = x[0].reshape(-1) if flat else x[0]
    dim = 0 if flat else positive_axis(a["axis"], t.dim())
    y, inverse, counts = torch.unique(t, sorted=True, return_inverse=True, return_counts=True,
                                      dim=dim)
    n, size = counts.shape[0], inverse.shape[0]
    positions = torch.arange(size, device=t.device)
    first = torch.full((n,), size, device=t.device).scatter_reduce(0, inverse, positions,
                                                                     "amin")
    if not a.get("sorted", 1):
        order = torch.argsort(first)
        rank = torch.empty_like(order).scatter_(0, order, torch.arange(n, device=t.device))
        y, first, counts = y.index_select(dim, order), first[order], counts[order]
        inverse = rank[inverse]
    return y, first, inverse, counts


@op("TensorScatter")
def _tensor_scatter(a: dict, x: list) -> Tensor:
    """``past_cache`` with ``update`` written along ``axis`` from each batch entry's
    ``write_indices`` (0 without), modulo the cache length in ``circular`` mode."""
    past, update = x[0], x[1]
    axis, mode = positive_axis(a.get("axis", -2), past.dim()), a.get("mode", "linear")
    if axis == 0 or mode not in ("linear", "circular"):
        raise UnsupportedOpsError(f"TensorScatter with axis={a.get('axis', -2)}, mode={mode}")
    start = given(x, 2)
    start = torch.zeros(past.shape[0], dtype=torch.int64, device=past.device) \
        if start is None else start.long()
    pos = start.unsqueeze(1) + torch.arange(update.shape[axis], device=past.device)
    if mode == "circular":
        pos = pos % past.shape[axis]
    shape = [1] * past.dim()
    shape[0], shape[axis] = pos.shape
    return past.scatter(axis, pos.reshape(shape).expand(update.shape), update)


# ---- bits ----------------------------------------------------------------------------------
_SIGNED = {torch.uint16: torch.int16, torch.uint32: torch.int32, torch.uint64: torch.int64}


def _signed(t: Tensor) -> Tensor:
    """``t``, or for unsigned 16/32/64-bit types its bits viewed as the signed type."""
    return t.view(_SIGNED.get(t.dtype, t.dtype))


def _on_bits(fn: Callable[..., Tensor]) -> Callable[[dict, list], Tensor]:
    """``fn`` on the inputs' bit patterns."""
    def run(a: dict, x: list) -> Tensor:
        return fn(*(_signed(t) for t in x)).view(x[0].dtype)
    return run


_BITWISE: dict[str, Callable[..., Tensor]] = {
    "BitwiseAnd": torch.bitwise_and, "BitwiseOr": torch.bitwise_or,
    "BitwiseXor": torch.bitwise_xor, "BitwiseNot": torch.bitwise_not}
for _name, _fn in _BITWISE.items():
    op(_name)(_on_bits(_fn))


@op("BitShift")
def _bit_shift(a: dict, x: list) -> Tensor:
    dtype, left = x[0].dtype, a["direction"] == "LEFT"
    value, amount = torch.broadcast_tensors(_signed(x[0]), _signed(x[1]).long())
    bits = torch.iinfo(dtype).bits
    k = amount.clamp(0, bits - 1).to(value.dtype)
    if left:
        shifted = value << k
    elif dtype in _SIGNED:
        shifted = _logical_right(value, k)
    else:  # uint8's >> is logical in torch, signed types' arithmetic
        shifted = value >> k
    fill = -(value < 0).to(value.dtype) if dtype.is_signed and not left \
        else torch.zeros_like(value)
    return torch.where((amount >= 0) & (amount < bits), shifted, fill).view(dtype)


def _logical_right(v: Tensor, k: Tensor) -> Tensor:
    """``v >> k`` of a signed view of unsigned values: after one arithmetic step with the sign
    bit cleared the value is non-negative, so the rest of the shift brings in zeros."""
    cleared = (v >> 1) & torch.iinfo(v.dtype).max
    return torch.where(k == 0, v, cleared >> (k - 1).clamp(min=0))


@op("BitCast")
def _bit_cast(a: dict, x: list) -> Tensor:
    dtype = _dtype(a["to"], "BitCast to")
    if dtype.itemsize != x[0].dtype.itemsize:
        raise UnsupportedOpsError(f"BitCast from {x[0].dtype} to {dtype} (widths differ)")
    return x[0].view(dtype)


# ---- random ---------------------------------------------------------------------------------
def _float_dtype(dtype: torch.dtype, what: str) -> torch.dtype:
    if not dtype.is_floating_point:
        raise UnsupportedOpsError(f"{what} of non-float type {dtype}")
    return dtype


_DRAWS: dict[str, Callable[[Tensor, dict], Tensor]] = {
    "Normal": lambda t, a: t.normal_(a.get("mean", 0.0), a.get("scale", 1.0)),
    "Uniform": lambda t, a: t.uniform_(a.get("low", 0.0), a.get("high", 1.0)),
}


def _random(kind: str) -> Callable[[dict, list], Tensor]:
    def run(a: dict, x: list) -> Tensor:
        dtype = _float_dtype(_dtype(a.get("dtype", TensorProto.FLOAT), f"Random{kind} dtype"),
                             f"Random{kind}")
        return _DRAWS[kind](torch.empty(list(a["shape"]), dtype=dtype), a)
    return run


def _random_like(kind: str) -> Callable[[dict, list], Tensor]:
    def run(a: dict, x: list) -> Tensor:
        dtype = _dtype(a["dtype"], f"Random{kind}Like dtype") if "dtype" in a else x[0].dtype
        like = torch.empty_like(x[0], dtype=_float_dtype(dtype, f"Random{kind}Like"))
        return _DRAWS[kind](like, a)
    return run


for _kind in _DRAWS:
    op(f"Random{_kind}")(_random(_kind))
    op(f"Random{_kind}Like")(_random_like(_kind))


@op("Bernoulli")
def _bernoulli(a: dict, x: list) -> Tensor:
    dtype = _dtype(a["dtype"], "Bernoulli dtype") if "dtype" in a else x[0].dtype
    return torch.bernoulli(x[0].detach()).to(dtype)


@op("Multinomial")
def _multinomial(a: dict, x: list) -> Tensor:
    """``sample_size`` class draws per row of unnormalised log-probabilities."""
    probs = torch.softmax(x[0].detach().to(torch.promote_types(x[0].dtype, torch.float32)), -1)
    draws = torch.multinomial(probs, int(a.get("sample_size", 1)), replacement=True)
    return draws.to(_dtype(a.get("dtype", TensorProto.INT32), "Multinomial dtype"))


# ---- losses ---------------------------------------------------------------------------------
def _nll(a: dict, log_prob: Tensor, labels: Tensor, weight: Tensor | None) -> Tensor:
    """``-weight[c] · log_prob[n, c, ...]`` per label ``c``, reduced by ``reduction``."""
    reduction = a.get("reduction", "mean")
    if reduction not in ("none", "sum", "mean"):
        raise UnsupportedOpsError(f"loss with reduction={reduction}")
    labels = labels.long()
    ignore = a.get("ignore_index")
    kept = labels != ignore if ignore is not None else torch.ones_like(labels, dtype=torch.bool)
    safe = torch.where(kept, labels, 0)
    w = torch.ones_like(log_prob[:, 0]) if weight is None else weight[safe]
    w = w * kept
    loss = -log_prob.gather(1, safe.unsqueeze(1)).squeeze(1) * w
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.sum() / w.sum()


@op("NegativeLogLikelihoodLoss")
def _nll_loss(a: dict, x: list) -> Tensor:
    return _nll(a, x[0], x[1], given(x, 2))


@op("SoftmaxCrossEntropyLoss")
def _softmax_cross_entropy(a: dict, x: list) -> tuple[Tensor, Tensor]:
    """The loss of the classes' log-softmax (axis 1), and that log-softmax."""
    log_prob = torch.log_softmax(x[0], 1)
    return _nll(a, log_prob, x[1], given(x, 2)), log_prob


# ---- sequence mixers ------------------------------------------------------------------------
@op("CausalConvWithState")
def _causal_conv_with_state(a: dict, x: list) -> tuple[Tensor, Tensor]:
    """Depthwise conv1d of ``past_state`` (zeros without) followed by the input, optionally
    SiLU; the new state is the last ``k - 1`` positions of that sequence."""
    inp, weight, bias, past = x[0], x[1], given(x, 2), given(x, 3)
    k, act = weight.shape[-1], a.get("activation", "none")
    if act not in ("none", "silu", "swish"):
        raise UnsupportedOpsError(f"CausalConvWithState with activation={act}")
    if past is None:
        past = inp.new_zeros(*inp.shape[:2], k - 1)
    seq = torch.cat([past, inp], -1)
    out = F.conv1d(seq, weight, bias, groups=inp.shape[1])
    return (out if act == "none" else F.silu(out)), seq[..., seq.shape[-1] - (k - 1):]


def _heads(t: Tensor, heads: int) -> Tensor:
    """``[B, T, H·D]`` → ``[B, H, T, D]``."""
    return t.reshape(*t.shape[:2], heads, -1).transpose(1, 2)


_RULES = {"linear": (False, False), "gated": (True, False), "delta": (False, True),
          "gated_delta": (True, True)}  # update rule → (decays, corrects by delta)


@op("LinearAttention")
def _linear_attention(a: dict, x: list) -> tuple[Tensor, Tensor]:
    """Step by step: ``S ← exp(g)·S`` (gated), ``v ← β·(v - Sᵀk)`` (delta), ``S ← S + k ⊗ v``,
    ``o = scale · qᵀS``; a key/value head's state serves ``q_heads / kv_heads`` query heads."""
    rule = a.get("update_rule", "gated_delta")
    decay, beta = given(x, 4), given(x, 5)
    if rule not in _RULES or _RULES[rule] != (decay is not None, beta is not None):
        raise UnsupportedOpsError(f"LinearAttention update_rule={rule} with decay "
                                  f"{'given' if decay is not None else 'absent'} and beta "
                                  f"{'given' if beta is not None else 'absent'}")
    hq, hkv = int(a["q_num_heads"]), int(a["kv_num_heads"])
    q, k, v = _heads(x[0], hq), _heads(x[1], hkv), _heads(x[2], hkv)
    b, _, steps, dk = k.shape
    state = given(x, 3)
    state = k.new_zeros(b, hkv, dk, v.shape[-1]) if state is None else state
    g = None if decay is None else _heads(decay, hkv)  # [B, H, T, 1 or d_k]
    rate = None if beta is None else beta.reshape(b, steps, -1, 1).transpose(1, 2)
    scale = a.get("scale") or 1.0 / math.sqrt(dk)
    outs = []
    for t in range(steps):
        if g is not None:
            state = state * g[:, :, t].exp().unsqueeze(-1)
        vt = v[:, :, t]
        if rate is not None:
            vt = rate[:, :, t] * (vt - torch.einsum("bhdm,bhd->bhm", state, k[:, :, t]))
        state = state + k[:, :, t].unsqueeze(-1) * vt.unsqueeze(-2)
        outs.append(torch.einsum("bhd,bhdm->bhm", q[:, :, t],
                                 state.repeat_interleave(hq // hkv, 1)) * scale)
    out = torch.stack(outs, 2).transpose(1, 2)
    return out.reshape(b, steps, -1), state
