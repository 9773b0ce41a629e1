"""ONNX's element-wise ops, activations, casts, reductions, ArgMax/ArgMin, TopK and Einsum in
torch, for ``spa.torch.from_onnx``.

- Binary ops broadcast as torch does; integer ``Div`` truncates towards zero (C's division),
  ``Mod`` takes the sign of the divisor unless ``fmod=1``.
- Softmax, LogSoftmax and Hardmax before opset 13 flatten the input to 2-D at ``axis``
  (default 1) and normalise each row; from 13 on they work along ``axis`` (default -1).
- Reductions read their axes from the second input when it is given (Squeeze, Unsqueeze and
  ReduceSum from opset 13), else from the attribute. ReduceL2 (and ReduceL1,
  ReduceSumSquare, ReduceProd, ReduceLogSumExp, ReduceLogSum) reads them from the attribute
  before opset 18 and from its second input from 18 on. No axes: all of them, or the input
  unchanged with ``noop_with_empty_axes``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from spa.coupling.registry import LATEST
from spa.torch.arrays import torch_dtype
from spa.torch.interpreter import Op, add, ints, op, positive_axis

# ---- arithmetic and activations -------------------------------------------------------------
_BINARY: dict[str, Callable[..., torch.Tensor]] = {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Pow": torch.pow,
    "Max": torch.maximum, "Min": torch.minimum, "Equal": torch.eq, "Less": torch.lt,
    "Greater": torch.gt, "LessOrEqual": torch.le, "GreaterOrEqual": torch.ge, "And":
    torch.logical_and, "Or": torch.logical_or, "Xor": torch.logical_xor,
    "MatMul": torch.matmul,
}
_UNARY: dict[str, Callable[..., torch.Tensor]] = {
    "Relu": F.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Exp": torch.exp,
    "Log": torch.log, "Sqrt": torch.sqrt, "Neg": torch.neg, "Abs": torch.abs, "Erf": torch.erf,
    "Reciprocal": torch.reciprocal, "Floor": torch.floor, "Ceil": torch.ceil, "Sin": torch.sin,
    "Cos": torch.cos, "Not": torch.logical_not, "Softplus": F.softplus, "Mish": F.mish,
    "HardSwish": F.hardswish, "Sign": torch.sign, "Round": torch.round,
    "Identity": lambda x: x, "Softsign": F.softsign, "IsNaN": torch.isnan,
    "Tan": torch.tan, "Atan": torch.atan, "Asin": torch.asin, "Acos": torch.acos,
    "Sinh": torch.sinh, "Cosh": torch.cosh, "Asinh": torch.asinh, "Acosh": torch.acosh,
    "Atanh": torch.atanh,
}
for _name, _fn in _BINARY.items():
    add(_name, (lambda fn: lambda a, x: fn(x[0], x[1]))(_fn))
for _name, _fn in _UNARY.items():
    add(_name, (lambda fn: lambda a, x: fn(x[0]))(_fn))


@op("Div")
def _div(a, x):
    if not x[0].is_floating_point() and not x[1].is_floating_point():
        return torch.div(x[0], x[1], rounding_mode="trunc")
    return x[0] / x[1]


@op("Shrink")
def _shrink(a, x):
    lambd, bias = a.get("lambd", 0.5), a.get("bias", 0.0)
    return torch.where(x[0] < -lambd, x[0] + bias,
                       torch.where(x[0] > lambd, x[0] - bias, torch.zeros_like(x[0])))


@op("Swish")
def _swish(a, x):
    return x[0] * torch.sigmoid(a.get("alpha", 1.0) * x[0])


@op("Where")
def _where(a, x):
    return torch.where(x[0], x[1], x[2])


@op("Sum")
def _sum(a, x):
    out = x[0]
    for t in x[1:]:
        out = out + t
    return out


@op("Mean")
def _mean(a, x):
    return _sum(a, x) / len(x)


@op("Mod")
def _mod(a, x):
    """``fmod=1``: the sign of the dividend (C's fmod); else of the divisor (Python's %)."""
    return torch.fmod(x[0], x[1]) if a.get("fmod", 0) else torch.remainder(x[0], x[1])


@op("IsInf")
def _isinf(a, x):
    pos = x[0] == float("inf") if a.get("detect_positive", 1) else torch.zeros_like(
        x[0], dtype=torch.bool)
    neg = x[0] == float("-inf") if a.get("detect_negative", 1) else torch.zeros_like(
        x[0], dtype=torch.bool)
    return pos | neg


@op("Selu")
def _selu(a, x):
    alpha, gamma = a.get("alpha", 1.67326319217681884765625), a.get("gamma",
                                                                       1.05070102214813232421875)
    return gamma * torch.where(x[0] > 0, x[0], alpha * (torch.exp(x[0]) - 1))


@op("Celu")
def _celu(a, x):
    return F.celu(x[0], a.get("alpha", 1.0))


@op("ThresholdedRelu")
def _thresholded_relu(a, x):
    return torch.where(x[0] > a.get("alpha", 1.0), x[0], torch.zeros_like(x[0]))


@op("LeakyRelu")
def _leaky(a, x):
    return F.leaky_relu(x[0], a.get("alpha", 0.01))


@op("Elu")
def _elu(a, x):
    return F.elu(x[0], a.get("alpha", 1.0))


@op("HardSigmoid")
def _hardsigmoid(a, x):
    return torch.clamp(a.get("alpha", 0.2) * x[0] + a.get("beta", 0.5), 0, 1)


@op("Gelu")
def _gelu(a, x):
    return F.gelu(x[0], approximate=a.get("approximate", "none"))


@op("Clip")
def _clip(a, x):
    lo = x[1] if len(x) > 1 and x[1] is not None else a.get("min")
    hi = x[2] if len(x) > 2 and x[2] is not None else a.get("max")
    return torch.clamp(x[0], lo, hi)


@op("PRelu")
def _prelu(a, x):
    return torch.where(x[0] >= 0, x[0], x[0] * x[1])


def _hardmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """1 at the first maximum along ``dim``, 0 elsewhere."""
    hot = F.one_hot(x.argmax(dim=dim), x.shape[dim]).to(x.dtype)
    return hot.movedim(-1, dim)


def _along_axis(fn: Callable[[torch.Tensor, int], torch.Tensor]) -> Op:
    """Opset 13 on: ``fn`` along ``axis`` (default -1)."""
    return lambda a, x: fn(x[0], a.get("axis", -1))


def _flattened(fn: Callable[[torch.Tensor, int], torch.Tensor]) -> Op:
    """Before opset 13: ``fn`` over each row of the input flattened to 2-D at ``axis``
    (default 1), i.e. jointly over the axes ``axis..-1``."""
    def run(a, x):
        axis = positive_axis(a.get("axis", 1), x[0].dim())
        rows = x[0].reshape(int(np.prod(x[0].shape[:axis])), -1)
        return fn(rows, 1).reshape(x[0].shape)
    return run


_NORMALISE_ROWS: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "Softmax": lambda t, dim: torch.softmax(t, dim), "Hardmax": _hardmax,
    "LogSoftmax": lambda t, dim: torch.log_softmax(t, dim)}
for _name, _rows in _NORMALISE_ROWS.items():
    add(_name, _flattened(_rows), (1, 12))
    add(_name, _along_axis(_rows), (13, LATEST))


# ---- casts ----------------------------------------------------------------------------------
@op("Cast")
def _cast(a, x):
    return x[0].to(torch_dtype(int(a["to"]), "Cast to"))


@op("CastLike")
def _cast_like(a, x):
    return x[0].to(x[1].dtype)


# ---- reductions, ArgMax/ArgMin, TopK, Einsum ------------------------------------------------
def _axes_input(a, x) -> list[int] | None:
    return ints(x[1]) if len(x) > 1 and x[1] is not None else None


def _axes_attribute(a, x) -> list[int] | None:
    return a.get("axes")


def named_axes(a, x) -> list[int] | None:
    """The axes of a Squeeze, Unsqueeze or reduction: from the second input (Squeeze, Unsqueeze
    and ReduceSum from opset 13, the other reductions from 18) when present, else from the
    attribute."""
    axes = _axes_input(a, x)
    return _axes_attribute(a, x) if axes is None else axes


def _reduce(fn, axes_of: Callable[[dict, list], list[int] | None] = named_axes):
    def run(a, x):
        axes = axes_of(a, x)
        keep = bool(a.get("keepdims", 1))
        if not axes:
            if a.get("noop_with_empty_axes", 0):
                return x[0]
            axes = list(range(x[0].dim()))
        return fn(x[0], dim=tuple(axes), keepdim=keep)
    return run


def _log_sum(t: torch.Tensor, dim: tuple[int, ...], keepdim: bool) -> torch.Tensor:
    return torch.log(t.sum(dim=dim, keepdim=keepdim))


def _l2(t: torch.Tensor, dim: tuple[int, ...], keepdim: bool) -> torch.Tensor:
    return torch.linalg.vector_norm(t, 2, dim=dim, keepdim=keepdim)


def _l1(t: torch.Tensor, dim: tuple[int, ...], keepdim: bool) -> torch.Tensor:
    return t.abs().sum(dim=dim, keepdim=keepdim)


def _sum_square(t: torch.Tensor, dim: tuple[int, ...], keepdim: bool) -> torch.Tensor:
    return (t * t).sum(dim=dim, keepdim=keepdim)


def _prod(t: torch.Tensor, dim: tuple[int, ...], keepdim: bool) -> torch.Tensor:
    for d in sorted(dim, reverse=True):
        t = t.prod(dim=d, keepdim=keepdim)
    return t


# ReduceL2 takes its axes from an attribute before opset 18, from its second input from 18 on
# (as do ReduceL1, ReduceSumSquare, ReduceProd and ReduceLogSumExp).
for _name, _fn in (("ReduceL2", _l2), ("ReduceL1", _l1), ("ReduceSumSquare", _sum_square),
                   ("ReduceProd", _prod), ("ReduceLogSumExp", torch.logsumexp),
                   ("ReduceLogSum", _log_sum)):
    add(_name, _reduce(_fn, _axes_attribute), (1, 17))
    add(_name, _reduce(_fn, _axes_input), (18, LATEST))
add("ReduceMean", _reduce(torch.mean))
add("ReduceSum", _reduce(torch.sum))
add("ReduceMax", _reduce(torch.amax))
add("ReduceMin", _reduce(torch.amin))


def _arg(largest: bool) -> Op:
    """ArgMax / ArgMin (indices: not differentiable; exports that pick by score read them)."""
    def run(a, x):
        axis = positive_axis(a.get("axis", 0), x[0].dim())
        t = x[0].flip(axis) if a.get("select_last_index", 0) else x[0]
        idx = t.argmax(axis, keepdim=True) if largest else t.argmin(axis, keepdim=True)
        if a.get("select_last_index", 0):
            idx = x[0].shape[axis] - 1 - idx
        return idx if a.get("keepdims", 1) else idx.squeeze(axis)
    return run


add("ArgMax", _arg(True))
add("ArgMin", _arg(False))


@op("TopK")
def _topk(a, x):
    k = int(x[1].reshape(-1)[0]) if len(x) > 1 else int(a["k"])
    axis = positive_axis(a.get("axis", -1), x[0].dim())
    values, idx = torch.topk(x[0], k, dim=axis, largest=bool(a.get("largest", 1)),
                             sorted=True)
    return values, idx


@op("Einsum")
def _einsum(a, x):
    return torch.einsum(a["equation"], *x)
