"""ONNX's sampling, normalisation and rearranging ops in torch, for ``spa.torch.from_onnx``.

Coordinates are pixel indices: pixel ``i`` of an axis sits at ``i``, its centre.

- **GridSample** is ``F.grid_sample``, whose modes, paddings and corner alignment agree with
  onnxruntime's to float rounding (nearest rounds half to even in both). Opset 16 names the
  modes ``bilinear``/``nearest``/``bicubic``, opset 20 ``linear``/``nearest``/``cubic``; a
  name of the other opset is refused, as onnxruntime refuses it. Cubic on 5-D input is
  refused: neither torch nor onnxruntime has it.
- **AffineGrid** maps the base grid ``[x, y, (z), 1]`` by ``theta``; the base runs over
  pixel centres from -1 to 1 (``align_corners=1``) or ``(2i + 1)/n - 1``. A one-pixel axis
  with ``align_corners=1`` (the spec divides by zero) sits at 1, as in onnxruntime.
- **DeformConv** samples the input N-linearly at ``o·stride - pad_begin + k·dilation +
  offset`` (offsets per offset group, kernel position and axis, in that order), each corner
  of the cell outside the input counting zero; then scales by the mask and contracts with
  ``W`` per group. Gradients reach the input, ``W``, the offsets and the mask.
- **LRN** sums squares over channels ``c - floor((size-1)/2) .. c + ceil((size-1)/2)``
  (torch's ``local_response_norm`` centres even windows the other way); **MVN** divides by
  the standard deviation plus 1e-9, the spec's function body (onnxruntime's kernel omits the
  1e-9 and gives NaN for a constant slice).
- **MaxUnpool** scatters into zeros at MaxPool's indices, which count over the whole output
  tensor; **Col2Im** adds each column back at its window's pixels, N-D (onnxruntime's 3-D
  kernel misplaces dilated columns; ONNX's reference agrees with this one);
  **CenterCropPad** crops (start rounded down) or zero-pads (the odd pixel at the end).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from spa.coupling.registry import LATEST
from spa.torch.interpreter import Op, UnsupportedOpsError, given, op


def _ints(t: torch.Tensor) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


def _spatial_attrs(a: dict, rank: int) -> tuple[list[int], list[int], list[int], list[int]]:
    """``strides``, ``dilations``, begin pads and end pads, defaulted, for ``rank`` axes."""
    pads = list(a.get("pads", [0] * (2 * rank)))
    return (list(a.get("strides", [1] * rank)), list(a.get("dilations", [1] * rank)),
            pads[:rank], pads[rank:])


# ---- sampling -------------------------------------------------------------------------------
def _grid_sample(names: dict[str, str]) -> Op:
    """GridSample with the mode names of an opset range (ONNX's → torch's; the first is the
    default)."""
    def run(a: dict, x: list) -> torch.Tensor:
        name = a.get("mode", next(iter(names)))
        padding = a.get("padding_mode", "zeros")
        data, grid = x[0], x[1]
        if name not in names:
            raise UnsupportedOpsError(f"GridSample with mode={name} (this opset's modes: "
                                      f"{', '.join(names)})")
        if padding not in ("zeros", "border", "reflection"):
            raise UnsupportedOpsError(f"GridSample with padding_mode={padding}")
        if data.dim() not in (4, 5) or (names[name] == "bicubic" and data.dim() == 5):
            raise UnsupportedOpsError(f"GridSample with mode={name} on {data.dim()}-D input")
        return F.grid_sample(data, grid.to(data.dtype), mode=names[name],
                             padding_mode=padding, align_corners=bool(a.get("align_corners", 0)))
    return run


op("GridSample", opsets=(16, 19))(
    _grid_sample({"bilinear": "bilinear", "nearest": "nearest", "bicubic": "bicubic"}))
op("GridSample", opsets=(20, LATEST))(
    _grid_sample({"linear": "bilinear", "nearest": "nearest", "cubic": "bicubic"}))


def _base_axis(n: int, align: bool, like: torch.Tensor) -> torch.Tensor:
    if not align:
        return (torch.arange(n, dtype=like.dtype, device=like.device) * 2 + 1) / n - 1
    if n == 1:  # the spec's step 2/(n-1) is undefined; onnxruntime's linspace gives the end
        return torch.ones(1, dtype=like.dtype, device=like.device)
    return torch.linspace(-1, 1, n, dtype=like.dtype, device=like.device)


@op("AffineGrid")
def _affine_grid(a: dict, x: list) -> torch.Tensor:
    theta, spatial = x[0], _ints(x[1])[2:]
    align = bool(a.get("align_corners", 0))
    axes = torch.meshgrid(*[_base_axis(n, align, theta) for n in spatial], indexing="ij")
    # homogeneous points [x, y, (z), 1]: the last spatial axis is x
    points = torch.stack([*reversed(axes), torch.ones_like(axes[0])], -1).reshape(1, -1,
                                                                                  len(spatial) + 1)
    grid = points @ theta.transpose(1, 2)
    return grid.reshape(theta.shape[0], *spatial, len(spatial))


def _zero_outside_taps(pos: torch.Tensor, size: int
                       ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Linear interpolation along one axis: (index, weight) of the cell's low and high
    corner, a corner outside ``[0, size)`` weighing nothing."""
    low = pos.floor()
    frac = pos - low
    low_i = low.long()
    taps = []
    for i, w in ((low_i, 1 - frac), (low_i + 1, frac)):
        inside = (i >= 0) & (i < size)
        taps.append((i.clamp(0, size - 1), w * inside))
    return taps


def corners(taps: Sequence[list[tuple[torch.Tensor, torch.Tensor]]], sizes: Sequence[int]
             ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The corners of an N-linear cell from each axis's taps: flat index (row-major over
    ``sizes``) and weight."""
    out = []
    for choice in itertools.product(*taps):
        flat, weight = choice[0]
        for (i, w), size in zip(choice[1:], sizes[1:]):
            flat, weight = flat * size + i, weight * w
        out.append((flat, weight))
    return out


def take_at(flat: torch.Tensor, rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``flat[rows[r], :, index[r, ...]]``: ``flat`` [B, C, S], ``rows`` [R], ``index`` [R, ...]
    → [R, C, ...], without copying ``flat`` per row."""
    b, c, s = flat.shape
    at = rows.reshape(-1, *[1] * (index.dim() - 1)) * s + index
    picked = flat.transpose(0, 1).reshape(c, b * s).index_select(1, at.reshape(-1))
    return picked.reshape(c, *index.shape).movedim(0, 1)


def _window_positions(kernel: Sequence[int], out: Sequence[int], strides: Sequence[int],
                      dilations: Sequence[int], begins: Sequence[int], device: torch.device
                      ) -> list[torch.Tensor]:
    """Per axis, the input coordinate ``o·stride + k·dilation - pad_begin`` of each (kernel
    offset, window) pair of a sliding window, as [K, P] (both flattened row-major)."""
    r = len(kernel)
    grids = torch.meshgrid(*[torch.arange(n, device=device) for n in [*kernel, *out]],
                           indexing="ij")
    k, p = math.prod(kernel), math.prod(out)
    return [(grids[r + i] * strides[i] + grids[i] * dilations[i] - begins[i]).reshape(k, p)
            for i in range(r)]


@op("DeformConv")
def _deform_conv(a: dict, x: list) -> torch.Tensor:
    data, weight, offset = x[0], x[1], x[2]
    bias, mask = given(x, 3), given(x, 4)
    n, c, *size = data.shape
    kernel, out = list(weight.shape[2:]), list(offset.shape[2:])
    r, k, p = len(size), math.prod(weight.shape[2:]), math.prod(offset.shape[2:])
    groups, offset_groups = int(a.get("group", 1)), int(a.get("offset_group", 1))
    strides, dilations, begins, _ = _spatial_attrs(a, r)
    base = _window_positions(kernel, out, strides, dilations, begins, data.device)
    shifts = offset.reshape(n * offset_groups, k, r, p)
    taps = [_zero_outside_taps(base[i].to(offset.dtype) + shifts[:, :, i], size[i])
            for i in range(r)]
    flat = data.reshape(n * offset_groups, c // offset_groups, -1)
    rows = torch.arange(n * offset_groups, device=data.device)
    cols = sum(take_at(flat, rows, i) * w.unsqueeze(1) for i, w in corners(taps, size))
    assert isinstance(cols, torch.Tensor)  # [N·offset groups, C/offset groups, K, P]
    if mask is not None:
        cols = cols * mask.reshape(n * offset_groups, 1, k, p)
    cols = cols.reshape(n, groups, c // groups * k, p)
    kernels = weight.reshape(groups, -1, c // groups * k)
    y = torch.einsum("gok,ngkp->ngop", kernels, cols).reshape(n, -1, *out)
    return y if bias is None else y + bias.reshape(1, -1, *[1] * r)


# ---- normalisation --------------------------------------------------------------------------
@op("LRN")
def _lrn(a: dict, x: list) -> torch.Tensor:
    data, size = x[0], int(a["size"])
    n, c = data.shape[:2]
    squares = data.square().reshape(n, 1, c, -1)  # channels as a pooling axis
    window = F.pad(squares, (0, 0, (size - 1) // 2, size // 2))
    mean = F.avg_pool2d(window, (size, 1), stride=1)  # Σ/size: the spec's alpha/size
    scale = a.get("bias", 1.0) + a.get("alpha", 1e-4) * mean.reshape(data.shape)
    return data / scale.pow(a.get("beta", 0.75))


@op("MeanVarianceNormalization")
def _mean_variance_normalization(a: dict, x: list) -> torch.Tensor:
    axes = tuple(a.get("axes", (0, 2, 3)))
    centred = x[0] - x[0].mean(axes, keepdim=True)
    variance = centred.square().mean(axes, keepdim=True)
    # the floor keeps sqrt's gradient finite for a constant slice (infinite at 0 times 0)
    return centred / (variance.clamp(min=1e-30).sqrt() + 1e-9)


# ---- rearranging ----------------------------------------------------------------------------
@op("MaxUnpool")
def _max_unpool(a: dict, x: list) -> torch.Tensor:
    data, index, shape = x[0], x[1], given(x, 2)
    if shape is not None:
        size = _ints(shape)
    else:
        kernel = list(a["kernel_shape"])
        strides, _, begins, ends = _spatial_attrs(a, len(kernel))
        size = [*data.shape[:2], *[(d - 1) * s + k - b - e for d, s, k, b, e in zip(
            data.shape[2:], strides, kernel, begins, ends)]]
    flat = data.new_zeros(math.prod(size))
    return flat.scatter(0, index.reshape(-1).long(), data.reshape(-1)).reshape(size)


@op("Col2Im")
def _col2im(a: dict, x: list) -> torch.Tensor:
    data, image, block = x[0], _ints(x[1]), _ints(x[2])
    strides, dilations, begins, ends = _spatial_attrs(a, len(image))
    windows = [(i + b + e - (d * (k - 1) + 1)) // s + 1 for i, b, e, d, k, s in zip(
        image, begins, ends, dilations, block, strides)]
    where = _window_positions(block, windows, strides, dilations, begins, data.device)
    inside = torch.stack([(p >= 0) & (p < size) for p, size in zip(where, image)]).all(0)
    flat = torch.zeros_like(where[0])
    for p, size in zip(where, image):
        flat = flat * size + p
    n, c = data.shape[0], data.shape[1] // math.prod(block)
    columns = data.reshape(n, c, -1)[:, :, inside.reshape(-1)]  # pixels in the padding drop
    out = data.new_zeros(n, c, math.prod(image))
    return out.index_add(2, flat[inside], columns).reshape(n, c, *image)


@op("CenterCropPad")
def _center_crop_pad(a: dict, x: list) -> torch.Tensor:
    out, target = x[0], _ints(x[1])
    rank = out.dim()
    for axis, want in zip(a.get("axes", range(rank)), target):
        axis %= rank
        have = out.shape[axis]
        if have > want:
            out = out.narrow(axis, (have - want) // 2, want)
        elif have < want:
            pads = [0] * (2 * (rank - axis))
            pads[-2:] = [(want - have) // 2, want - have - (want - have) // 2]
            out = F.pad(out, pads)
    return out
