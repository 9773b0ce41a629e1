"""ONNX's shape, layout and indexing ops in torch, for ``spa.torch.from_onnx``: Reshape,
Transpose, Squeeze and Unsqueeze, Concat and Split, Slice, the Gathers and Scatters, Shape and
Size, Expand and Tile, the constants and Range, DepthToSpace and SpaceToDepth, Pad and Trilu.

- Shapes, axes, starts and ends come as int64 tensors and are read as Python ints; negative
  axes and indices count from the end. Reshape's 0 keeps the input's dimension unless
  ``allowzero``; Split without sizes cuts ``num_outputs`` parts of ``ceil(n / num_outputs)``,
  the last one shorter.
- Slice clamps as the spec does, backwards slices to ``[-1, n - 1]`` (torch has no negative
  steps: the positions are picked by index).
- Scatter (opsets 9 and 10) is ScatterElements by its old name; the reductions ``add``,
  ``mul``, ``max`` and ``min`` of ScatterElements and ScatterND run, others are refused, as is
  Pad with explicit ``axes``.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from spa.torch.interpreter import UnsupportedOpsError, ints, op, positive_axis
from spa.torch.math_ops import named_axes


@op("Flatten")
def _flatten(a, x):
    axis = positive_axis(a.get("axis", 1), x[0].dim())
    return x[0].reshape(int(np.prod(x[0].shape[:axis])), -1)


@op("Reshape")
def _reshape(a, x):
    shape = ints(x[1])
    if not a.get("allowzero", 0):
        shape = [x[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x[0].reshape(shape)


@op("Transpose")
def _transpose(a, x):
    return x[0].permute(a.get("perm", list(range(x[0].dim()))[::-1]))


@op("Squeeze")
def _squeeze(a, x):
    axes = named_axes(a, x)
    if axes is None:
        return x[0].squeeze()
    return x[0].squeeze(tuple(positive_axis(i, x[0].dim()) for i in axes))


@op("Unsqueeze")
def _unsqueeze(a, x):
    out = x[0]
    rank = out.dim() + len(named_axes(a, x))
    for ax in sorted(positive_axis(i, rank) for i in named_axes(a, x)):
        out = out.unsqueeze(ax)
    return out


@op("Concat")
def _concat(a, x):
    return torch.cat([t for t in x if t is not None], dim=a["axis"])


@op("Split")
def _split(a, x):
    axis = positive_axis(a.get("axis", 0), x[0].dim())
    sizes = ints(x[1]) if len(x) > 1 and x[1] is not None else a.get("split")
    if sizes is None:
        n = a["num_outputs"]
        sizes = [math.ceil(x[0].shape[axis] / n)] * n
        sizes[-1] = x[0].shape[axis] - sum(sizes[:-1])
    return tuple(torch.split(x[0], sizes, dim=axis))


@op("Slice")
def _slice(a, x):
    starts, ends = ints(x[1]), ints(x[2])
    axes = ints(x[3]) if len(x) > 3 and x[3] is not None else list(range(len(starts)))
    steps = ints(x[4]) if len(x) > 4 and x[4] is not None else [1] * len(starts)
    out = x[0]
    for ax, s, e, st in zip(axes, starts, ends, steps):
        dim = positive_axis(ax, out.dim())
        n = out.shape[dim]
        s, e = s + n if s < 0 else s, e + n if e < 0 else e
        if st > 0:
            s, e = max(min(s, n), 0), max(min(e, n), 0)
        else:  # ONNX clamps backwards slices to [-1, n-1]; torch has no negative steps
            s, e = max(min(s, n - 1), -1), max(min(e, n - 1), -1)
        picked = torch.arange(s, e, st, device=out.device)
        out = torch.index_select(out, dim, picked)
    return out


@op("Gather")
def _gather(a, x):
    axis = positive_axis(a.get("axis", 0), x[0].dim())
    idx = x[1].long()
    idx = torch.where(idx < 0, idx + x[0].shape[axis], idx)
    out = torch.index_select(x[0], axis, idx.reshape(-1))
    return out.reshape((*x[0].shape[:axis], *idx.shape, *x[0].shape[axis + 1:]))  # () too


@op("GatherElements")
def _gather_elements(a, x):
    axis = positive_axis(a.get("axis", 0), x[0].dim())
    idx = x[1].long()
    return torch.gather(x[0], axis, torch.where(idx < 0, idx + x[0].shape[axis], idx))


@op("GatherND")
def _gather_nd(a, x):
    """Index tuples of length k in the last axis of ``indices`` pick slices of ``data``;
    the first ``batch_dims`` axes of both are matched one to one (flattened to one here)."""
    data, idx = x[0], x[1].long()
    b, k = a.get("batch_dims", 0), x[1].shape[-1]
    batch = int(np.prod(data.shape[:b]))
    dims = data.shape[b:b + k]
    rest = data.shape[b + k:]
    flat = data.reshape(batch, int(np.prod(dims)), *rest)
    tuples = idx.reshape(batch, -1, k)
    size = torch.tensor(dims, dtype=torch.long, device=idx.device)
    tuples = torch.where(tuples < 0, tuples + size, tuples)
    strides = torch.tensor([int(np.prod(dims[j + 1:])) for j in range(k)], dtype=torch.long,
                           device=idx.device)
    linear = (tuples * strides).sum(-1)
    rows = torch.arange(batch, device=idx.device).unsqueeze(1)
    return flat[rows, linear].reshape(*idx.shape[:-1], *rest)


@op("ScatterND")
def _scatter_nd(a, x):
    """A copy of ``data`` with the slices that index tuples (the last axis of ``indices``)
    pick replaced by ``updates``, or combined with them (``reduction``: add, mul, max, min;
    BART's and T5's decoders shift their labels right with one)."""
    data, idx, updates = x[0], x[1].long(), x[2]
    k = idx.shape[-1]
    dims, rest = data.shape[:k], data.shape[k:]
    size = torch.tensor(dims, dtype=torch.long, device=idx.device)
    tuples = idx.reshape(-1, k)
    tuples = torch.where(tuples < 0, tuples + size, tuples)
    strides = torch.tensor([int(np.prod(dims[j + 1:])) for j in range(k)], dtype=torch.long,
                           device=idx.device)
    linear = (tuples * strides).sum(-1)
    flat = data.reshape(int(np.prod(dims)), *rest).clone()
    values = updates.reshape(len(linear), *rest).to(flat.dtype)
    how = a.get("reduction", "none")
    if how == "none":
        flat[linear] = values
    elif how == "add":
        flat = flat.index_put((linear,), values, accumulate=True)
    elif how in ("mul", "max", "min"):
        with warnings.catch_warnings():  # "index_reduce() is in beta"
            warnings.simplefilter("ignore", UserWarning)
            flat = flat.index_reduce(0, linear, values,
                                     {"mul": "prod", "max": "amax", "min": "amin"}[how])
    else:
        raise UnsupportedOpsError(f"ScatterND reduction {how}")
    return flat.reshape(data.shape)


@op("Shape")
def _shape(a, x):
    dims = list(x[0].shape)
    rank = len(dims)
    lo = positive_axis(a.get("start", 0), rank)
    hi = positive_axis(a["end"], rank) if "end" in a else rank
    return torch.tensor(dims[max(lo, 0):min(hi, rank)], dtype=torch.int64)


@op("Expand")
def _expand(a, x):
    shape = torch.broadcast_shapes(x[0].shape, tuple(ints(x[1])))
    return x[0].expand(shape)


@op("Tile")
def _tile(a, x):
    return x[0].repeat(*ints(x[1]))


@op("ConstantOfShape")
def _constant_of_shape(a, x):
    value = a.get("value", torch.zeros(1))
    return torch.full(ints(x[0]), value.reshape(-1)[0].item(), dtype=value.dtype)


@op("Constant")
def _constant(a, x):
    if "value" in a:
        return a["value"]
    for key, dtype in (("value_float", torch.float32), ("value_int", torch.int64),
                       ("value_floats", torch.float32), ("value_ints", torch.int64)):
        if key in a:
            return torch.tensor(a[key], dtype=dtype)
    raise UnsupportedOpsError(f"Constant with attributes {sorted(a)}")


@op("Range")
def _range(a, x):
    return torch.arange(x[0].item(), x[1].item(), x[2].item(), dtype=x[0].dtype)


@op("Size")
def _size(a, x):
    return torch.tensor(x[0].numel(), dtype=torch.int64)


@op("DepthToSpace")
def _depth_to_space(a, x):
    b = int(a["blocksize"])
    n, c, h, w = x[0].shape
    if a.get("mode", "DCR") == "DCR":
        t = x[0].reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        t = x[0].reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
    return t.reshape(n, c // (b * b), h * b, w * b)


@op("SpaceToDepth")
def _space_to_depth(a, x):
    b = int(a["blocksize"])
    n, c, h, w = x[0].shape
    t = x[0].reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
    return t.reshape(n, c * b * b, h // b, w // b)


@op("ScatterElements", "Scatter")  # Scatter (opsets 9-10): ScatterElements by its old name
def _scatter_elements(a, x):
    axis = positive_axis(a.get("axis", 0), x[0].dim())
    idx = x[1].long()
    idx = torch.where(idx < 0, idx + x[0].shape[axis], idx)
    how = a.get("reduction", "none")
    if how == "none":
        return x[0].scatter(axis, idx, x[2])
    reduce = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}.get(how)
    if reduce is None:
        raise UnsupportedOpsError(f"ScatterElements reduction {how}")
    return x[0].scatter_reduce(axis, idx, x[2], reduce)


@op("Pad")
def _pad(a, x):
    mode = a.get("mode", "constant")
    pads = ints(x[1]) if len(x) > 1 else a["pads"]
    value = x[2].item() if len(x) > 2 and x[2] is not None else a.get("value", 0.0)
    if len(x) > 3 and x[3] is not None:
        raise UnsupportedOpsError("Pad with explicit axes")
    n = len(pads) // 2
    flat = []
    for b, e in zip(reversed(pads[:n]), reversed(pads[n:])):
        flat += [b, e]
    return F.pad(x[0], flat, mode=mode, value=value if mode == "constant" else None)


@op("Trilu")
def _trilu(a, x):
    k = int(x[1].item()) if len(x) > 1 and x[1] is not None else 0
    return torch.triu(x[0], k) if a.get("upper", 1) else torch.tril(x[0], k)
