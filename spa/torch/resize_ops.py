"""ONNX's Resize (opsets 10 on) and Upsample (opsets 7-9) in torch, for ``spa.torch.from_onnx``.

Axis by axis, output index ``i`` of an axis of length ``m`` (input length ``n``, scale ``s``)
reads the source position the coordinate mapping gives: ``half_pixel`` ``(i + 1/2)/s - 1/2``
(``pytorch_half_pixel`` the same, but 0 when ``m = 1``), ``align_corners`` ``i (n-1)/(m-1)``,
``asymmetric`` ``i/s``; ``nearest`` rounds it by ``nearest_mode``, ``linear`` weighs the two
neighbours (positions clamped to the input), as onnxruntime computes them.
``tf_crop_and_resize``, ``half_pixel_symmetric``, cubic, ``antialias``, ``axes`` and a
``keep_aspect_ratio_policy`` other than ``stretch`` are refused. Opset 10's Resize and
Upsample take no region and no sizes and map asymmetrically (Upsample's nearest rounds down).
Where ``F.interpolate`` computes the same positions (:func:`_interpolated`), it runs instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from spa.coupling.registry import LATEST
from spa.torch.interpreter import UnsupportedOpsError, given, ints, op


@op("Resize", opsets=(10, 10))
def _resize_10(a, x):
    """Opset 10's Resize takes (X, scales): no region, no sizes, asymmetric coordinates."""
    return _resize({"coordinate_transformation_mode": "asymmetric",
                    "nearest_mode": "floor", **a}, [x[0], None, x[1]])


@op("Resize", opsets=(11, LATEST))
def _resize(a, x):
    """Nearest and linear resizes, axis by axis, with every coordinate mapping of the spec but
    ``tf_crop_and_resize`` and ``half_pixel_symmetric``, and every ``nearest_mode``: source
    positions computed as onnxruntime computes them (torch's interpolate maps half-pixel
    only, and its nearest is ``asymmetric`` rounded down: TF1 exports' ``asymmetric`` linear
    resizes came out wrong). Output lengths: ``sizes``, else ``⌊length · scale⌋``."""
    mode = a.get("mode", "nearest")
    coords = a.get("coordinate_transformation_mode", "half_pixel")
    if mode not in ("nearest", "linear") or coords not in _COORDS \
            or a.get("antialias", 0) or a.get("axes") is not None \
            or a.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise UnsupportedOpsError(f"Resize mode {mode}, coordinate_transformation_mode {coords}"
                                  " (antialias, axes and keep_aspect_ratio_policy unset only)")
    sizes = ints(given(x, 3))
    scales = [float(s) for s in given(x, 2).reshape(-1).tolist()] if sizes is None else \
        [m / n for m, n in zip(sizes, x[0].shape)]
    out = sizes or [int(math.floor(n * s)) for n, s in zip(x[0].shape, scales)]
    nearest = a.get("nearest_mode", "round_prefer_floor") if mode == "nearest" else None
    return _resampled(x[0], out, scales, coords, nearest)


@op("Upsample")
def _upsample(a, x):
    """Opset 7–9 (Resize's predecessor): scales by attribute (7) or input (9), nearest
    (rounded down) or linear, asymmetric coordinates."""
    scales = [float(s) for s in (a["scales"] if "scales" in a else x[1].reshape(-1).tolist())]
    mode = a.get("mode", "nearest")
    if mode not in ("nearest", "linear", "bilinear"):
        raise UnsupportedOpsError(f"Upsample mode {mode}")
    out = [int(math.floor(n * s)) for n, s in zip(x[0].shape, scales)]
    return _resampled(x[0], out, scales, "asymmetric", "floor" if mode == "nearest" else None)


# source position of output index i, from (i, input length, output length, scale)
_COORDS: dict[str, Callable[[torch.Tensor, int, int, float], torch.Tensor]] = {
    "half_pixel": lambda i, n, m, s: (i + 0.5) / s - 0.5,
    "pytorch_half_pixel": lambda i, n, m, s: (i + 0.5) / s - 0.5 if m > 1 else i * 0.0,
    "align_corners": lambda i, n, m, s: i * ((n - 1) / (m - 1)) if m > 1 else i * 0.0,
    "asymmetric": lambda i, n, m, s: i / s,
}
_ROUND: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "round_prefer_floor": lambda c: torch.ceil(c - 0.5),
    "round_prefer_ceil": lambda c: torch.floor(c + 0.5),
    "floor": torch.floor,
    "ceil": torch.ceil,
}


def _resampled(t: torch.Tensor, sizes: list[int], scales: list[float], coords: str,
               nearest: str | None) -> torch.Tensor:
    """``t`` resampled to ``sizes`` axis by axis: source positions by ``coords``; the
    ``nearest`` rounding of them, else linear between the two neighbours (positions clamped to
    the input)."""
    if nearest is not None and nearest not in _ROUND:
        raise UnsupportedOpsError(f"Resize nearest_mode {nearest}")
    fast = _interpolated(t, sizes, scales, coords, nearest)
    if fast is not None:
        return fast
    for axis, (n, m, s) in enumerate(zip(t.shape, sizes, scales)):
        if n == m:
            continue
        pos = _COORDS[coords](torch.arange(m, dtype=torch.float64), n, m, s)
        if nearest is not None:
            t = t.index_select(axis, _ROUND[nearest](pos).clamp(0, n - 1).long())
            continue
        pos = pos.clamp(0, n - 1)
        lo = pos.floor().long()
        hi = (lo + 1).clamp(max=n - 1)
        w = (pos - lo).to(t.dtype).reshape([-1 if d == axis else 1 for d in range(t.dim())])
        t = t.index_select(axis, lo) * (1 - w) + t.index_select(axis, hi) * w
    return t


def _interpolated(t: torch.Tensor, sizes: list[int], scales: list[float], coords: str,
                  nearest: str | None) -> torch.Tensor | None:
    """``F.interpolate`` where it computes the positions of :func:`_resampled` (forward and
    backward ×2.3 faster for a bilinear 2× upsample, benchmarks/from_onnx_resize.py): batch
    and channels kept, each spatial
    scale the size ratio; linear with half-pixel positions, or nearest rounded down from
    asymmetric ones at a power-of-two factor (where ``i · n/m`` is exact in float32). Not
    corner-aligned positions: torch computes their step ``(n-1)/(m-1)`` in float32, 6e-6
    relative off onnxruntime's values on a 4×6 map. None elsewhere."""
    rank, shape = t.dim(), list(t.shape)
    if rank not in (3, 4, 5) or not t.is_floating_point() or sizes[:2] != shape[:2] \
            or any(s != m / n for n, m, s in zip(shape[2:], sizes[2:], scales[2:])):
        return None
    if nearest is None and (coords == "half_pixel"
                            or coords == "pytorch_half_pixel" and min(sizes[2:]) > 1):
        mode = {3: "linear", 4: "bilinear", 5: "trilinear"}[rank]
        return F.interpolate(t, size=sizes[2:], mode=mode, align_corners=False)
    powers = all(m % n == 0 and (m // n) & (m // n - 1) == 0
                 for n, m in zip(shape[2:], sizes[2:]))
    if nearest == "floor" and coords == "asymmetric" and powers:
        return F.interpolate(t, size=sizes[2:], mode="nearest")
    return None
