"""ONNX's region-of-interest and detection ops in torch (RoiAlign, MaxRoiPool,
NonMaxSuppression), for ``spa.torch.from_onnx``.

Coordinates are pixel indices: pixel ``i`` of an axis sits at ``i``, its centre.

- **RoiAlign** (Mask R-CNN) follows onnxruntime's kernel: an roi ``[x1, y1, x2, y2]`` is
  scaled by ``spatial_scale`` and shifted by -0.5 (``half_pixel``, opset 16's default) or not
  (``output_half_pixel``, the only behaviour of opset 10, which also widens rois to at least
  one pixel); each bin averages a ``sampling_ratio``² grid of bilinear samples, ``ceil(roi
  size / output size)`` per axis when ``sampling_ratio=0``. A sample beyond one pixel outside
  the map is 0, else clamped into it. ``mode=max`` is onnxruntime's: the largest of the
  sample's four weighted corner terms ``w·v``, maximised over the bin's samples.
- **MaxRoiPool** (Fast R-CNN) rounds the roi ``[batch, x1, y1, x2, y2]`` half away from zero
  and takes the max over each of its ``floor``/``ceil`` bins; an empty bin is 0.
- **NonMaxSuppression**, per batch and class: candidates above ``score_threshold`` by
  falling score (equal scores: lower index first; onnxruntime's heap leaves that order
  open), each kept unless its IoU with a kept box exceeds ``iou_threshold``; rows ``[batch,
  class, box]``. Computed in float32 as onnxruntime does, so that a tie with the threshold
  goes the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from spa.coupling.registry import LATEST
from spa.torch.interpreter import Op, UnsupportedOpsError, given, op
from spa.torch.vision_ops import corners, take_at


# ---- regions of interest --------------------------------------------------------------------
def _roi_taps(pos: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """onnxruntime's RoiAlign interpolation along one axis: a sample beyond one pixel outside
    weighs nothing; otherwise it is clamped to ``[0, size - 1]``."""
    valid = (pos >= -1) & (pos <= size)
    pos = pos.clamp(0, size - 1)
    low = pos.floor().long().clamp(max=size - 1)
    frac = pos - low
    return [(low, (1 - frac) * valid), ((low + 1).clamp(max=size - 1), frac * valid)]


def _roi_samples(start: torch.Tensor, length: torch.Tensor, bins: int, grid: torch.Tensor,
                 most: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Along one axis, each roi's sample coordinates [R, bins, most] (``grid`` [R] of them per
    bin, evenly inside it) and which of the ``most`` slots are samples."""
    step = length / bins
    slot = torch.arange(most, device=start.device, dtype=start.dtype)
    within = (slot + 0.5) * step[:, None] / grid.clamp(min=1)[:, None].to(start.dtype)
    pos = (start[:, None, None] + torch.arange(bins, device=start.device)[None, :, None]
           * step[:, None, None] + within[:, None, :])
    return pos, (slot[None] < grid[:, None])[:, None, :].expand_as(pos)


def _roi_boxes(rois: torch.Tensor, scale: float, half: bool, bins: Sequence[int],
               ratio: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each roi's start and length [R, 2] (x, y) on the map, and its samples per bin per
    axis [R, 2]."""
    box = rois * scale - (0.5 if half else 0.0)
    start, length = box[:, :2], box[:, 2:] - box[:, :2]
    if not half:  # rois narrower than a pixel are widened (onnxruntime, opset 10)
        length = length.clamp(min=1.0)
    if ratio > 0:
        return start, length, torch.full_like(length, ratio, dtype=torch.long)
    return start, length, torch.ceil(length / torch.tensor(bins, device=rois.device)).long()


def _roi_align(default_transform: str) -> Op:
    """RoiAlign with the coordinate transformation of an opset range when none is given."""
    def run(a: dict, x: list) -> torch.Tensor:
        data, rois, batch = x[0], x[1].to(x[0].dtype), x[2].long()
        mode = a.get("mode", "avg")
        transform = a.get("coordinate_transformation_mode", default_transform)
        if mode not in ("avg", "max"):
            raise UnsupportedOpsError(f"RoiAlign with mode={mode}")
        if transform not in ("half_pixel", "output_half_pixel"):
            raise UnsupportedOpsError(f"RoiAlign with coordinate_transformation_mode={transform}")
        bins = (int(a.get("output_width", 1)), int(a.get("output_height", 1)))
        start, length, grid = _roi_boxes(rois, a.get("spatial_scale", 1.0),
                                         transform == "half_pixel", bins,
                                         int(a.get("sampling_ratio", 0)))
        most = [max(int(grid[:, i].max()) if len(grid) else 1, 1) for i in (0, 1)]
        xs, x_live = _roi_samples(start[:, 0], length[:, 0], bins[0], grid[:, 0], most[0])
        ys, y_live = _roi_samples(start[:, 1], length[:, 1], bins[1], grid[:, 1], most[1])
        # every sample as [R, out_h, grid_h, out_w, grid_w]
        ys, xs = ys[:, :, :, None, None], xs[:, None, None, :, :]
        live = y_live[:, :, :, None, None] & x_live[:, None, None, :, :]
        h, w = data.shape[2:]
        flat = data.reshape(*data.shape[:2], -1)
        terms = [take_at(flat, batch, index) * weight.unsqueeze(1)
                 for index, weight in corners([_roi_taps(ys, h), _roi_taps(xs, w)], (h, w))]
        live = live.unsqueeze(1)  # the channel axis
        if mode == "avg":
            count = (grid[:, 0] * grid[:, 1]).clamp(min=1).to(data.dtype)
            return (sum(terms) * live).sum((3, 5)) / count.reshape(-1, 1, 1, 1)
        best = torch.stack(terms).amax(0).masked_fill(~live, -math.inf).amax((3, 5))
        return best.masked_fill(live.sum((3, 5)) == 0, 0.0)  # a bin without samples: 0
    return run


op("RoiAlign", opsets=(10, 15))(_roi_align("output_half_pixel"))
op("RoiAlign", opsets=(16, LATEST))(_roi_align("half_pixel"))


def _bins(start: int, end: int, bins: int, size: int, device: torch.device) -> torch.Tensor:
    """MaxRoiPool's bins along one axis as a mask [bins, size]: bin ``i`` covers ``floor(i·s)
    .. ceil((i + 1)·s)`` from the roi's start (``s`` its length over ``bins``, in float32),
    clipped to the map."""
    step = torch.tensor(max(end - start + 1, 1) / bins, dtype=torch.float32)
    i = torch.arange(bins, dtype=torch.float32)
    lo = (torch.floor(i * step).long() + start).clamp(0, size)
    hi = (torch.ceil((i + 1) * step).long() + start).clamp(0, size)
    pixel = torch.arange(size)
    return ((pixel >= lo[:, None]) & (pixel < hi[:, None])).to(device)


@op("MaxRoiPool")
def _max_roi_pool(a: dict, x: list) -> torch.Tensor:
    data, rois = x[0], x[1]
    pooled_h, pooled_w = (int(v) for v in a["pooled_shape"])
    h, w = data.shape[2:]
    scaled = rois[:, 1:].to(torch.float32) * a.get("spatial_scale", 1.0)
    box = (scaled.sign() * (scaled.abs() + 0.5).floor()).long().tolist()  # C's round()
    out = []  # one roi at a time: the map is not copied per roi
    for b, (x1, y1, x2, y2) in zip(rois[:, 0].long().tolist(), box):
        rows = _bins(y1, y2, pooled_h, h, data.device)  # [pooled_h, H]
        cols = _bins(x1, x2, pooled_w, w, data.device)  # [pooled_w, W]
        across = data[b, :, :, None, :].masked_fill(~cols, -math.inf).amax(-1)  # [C, H, pw]
        best = across[:, None].masked_fill(~rows[:, :, None], -math.inf).amax(2)
        empty = ~(rows.any(1)[:, None] & cols.any(1)[None, :])
        out.append(best.masked_fill(empty, 0.0))
    return torch.stack(out) if out else data.new_zeros(0, data.shape[1], pooled_h, pooled_w)


def _corners_of(boxes: torch.Tensor, center: bool) -> tuple[torch.Tensor, ...]:
    """``x_min, y_min, x_max, y_max`` of boxes [..., 4], in onnxruntime's float32 steps."""
    if center:  # [x_center, y_center, width, height]
        half_w, half_h = boxes[..., 2] / 2, boxes[..., 3] / 2
        return (boxes[..., 0] - half_w, boxes[..., 1] - half_h, boxes[..., 0] + half_w,
                boxes[..., 1] + half_h)
    y0, x0, y1, x1 = boxes.unbind(-1)  # either diagonal
    return torch.minimum(x0, x1), torch.minimum(y0, y1), torch.maximum(x0, x1), \
        torch.maximum(y0, y1)


def _overlaps(corners: tuple[torch.Tensor, ...], i: int, threshold: float) -> torch.Tensor:
    """Whether box ``i``'s IoU with each box exceeds ``threshold`` (never for disjoint or
    empty boxes), in the order of onnxruntime's float32 operations."""
    x0, y0, x1, y1 = corners
    ix = torch.minimum(x1[i], x1) - torch.maximum(x0[i], x0)
    iy = torch.minimum(y1[i], y1) - torch.maximum(y0[i], y0)
    inter = ix * iy
    area = (x1 - x0) * (y1 - y0)
    union = area[i] + area - inter
    meets = (ix > 0) & (iy > 0) & (inter > 0) & (area[i] > 0) & (area > 0) & (union > 0)
    return meets & (inter / union > threshold)


def _suppress(corners: tuple[torch.Tensor, ...], order: torch.Tensor, threshold: float,
              limit: int) -> list[int]:
    """Greedy NMS over the candidates ``order`` (best first): the next one not overlapping a
    kept box is kept, up to ``limit``. One IoU row per kept box, not a full IoU matrix."""
    ranked = tuple(t[order] for t in corners)
    live = torch.ones(len(order), dtype=torch.bool, device=order.device)
    kept: list[int] = []
    while len(kept) < limit and bool(live.any()):
        i = int(live.to(torch.int8).argmax())  # the first live candidate
        kept.append(int(order[i]))
        live &= ~_overlaps(ranked, i, threshold)
        live[i] = False
    return kept


@op("NonMaxSuppression")
def _non_max_suppression(a: dict, x: list) -> torch.Tensor:
    boxes, scores = x[0].to(torch.float32), x[1].to(torch.float32)
    limit_t, iou_t, floor_t = given(x, 2), given(x, 3), given(x, 4)
    limit = max(int(limit_t.reshape(-1)[0]), 0) if limit_t is not None else 0
    iou = float(iou_t.reshape(-1)[0]) if iou_t is not None else 0.0
    # float32 values as Python floats: compared with float32 tensors, they stay float32
    floor = float(floor_t.reshape(-1)[0]) if floor_t is not None else None
    center = bool(a.get("center_point_box", 0))
    rows = []
    for b in range(boxes.shape[0] if limit else 0):
        corners = _corners_of(boxes[b], center)
        for c in range(scores.shape[1]):
            s = scores[b, c]
            order = torch.sort(-s, stable=True).indices  # equal scores: lower index first
            if floor is not None:
                order = order[s[order] > floor]
            rows += [(b, c, i) for i in _suppress(corners, order, iou, limit)]
    return torch.tensor(rows, dtype=torch.int64, device=boxes.device).reshape(-1, 3)
