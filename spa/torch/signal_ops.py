"""ONNX's signal ops in torch (DFT, STFT, the windows, MelWeightMatrix), for
``spa.torch.from_onnx``; the spec's semantics, onnxruntime's where the spec leaves room.

- Complex values are a trailing axis ``[re]`` or ``[re, im]``. DFT and STFT are ``torch.fft``,
  so gradients flow; a one-sided inverse DFT (IRFFT) of length ``n`` reads the first
  ``⌊n/2⌋ + 1`` bins, as numpy's ``irfft`` and ONNX's reference do.
- Windows are cosine sums ``Σ_k (-1)^k a_k cos(2πkn/N)``, ``N`` = size (periodic) or size - 1:
  Hann ``(1/2, 1/2)``, Hamming ``(25/46, 21/46)``, Blackman ``(0.42, 0.5, 0.08)``.
- MelWeightMatrix is onnxruntime's: ``num_mel_bins + 2`` mel points spaced by
  ``(mel(hi) - mel(lo)) / (num_mel_bins + 2)``, each at bin ``⌊(dft_length + 1)·hz / rate⌋``,
  triangles of height 1 between neighbours.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from onnx import TensorProto

from spa.coupling.registry import LATEST
from spa.torch.arrays import torch_dtype as _dtype
from spa.torch.interpreter import given, int_of, op

Tensor = torch.Tensor


def _complex(t: Tensor) -> Tensor:
    """``[..., 1]`` (real) or ``[..., 2]`` (re, im) as a real or complex tensor of ``[...]``."""
    t = t if t.dtype in (torch.float32, torch.float64) else t.float()  # torch.fft's types
    return t[..., 0] if t.shape[-1] == 1 else torch.complex(t[..., 0], t[..., 1])


def _pair(y: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.stack((y.real, y.imag), -1).to(dtype)


def _dft(t: Tensor, axis: int, length: int | None, inverse: bool, onesided: bool) -> Tensor:
    """DFT of ``t`` (trailing re/im axis) along ``axis`` over ``length`` points (the axis's
    length, or ``2(m - 1)`` for IRFFT)."""
    axis = axis % t.dim()
    signal = _complex(t)
    if inverse and onesided:
        n = length or 2 * (signal.shape[axis] - 1)
        return torch.fft.irfft(signal, n, dim=axis).unsqueeze(-1).to(t.dtype)
    n = length or signal.shape[axis]
    y = (torch.fft.ifft if inverse else torch.fft.fft)(signal, n, dim=axis)
    return _pair(y.narrow(axis, 0, n // 2 + 1) if onesided else y, t.dtype)


def _scalar(x: list, i: int) -> int | None:
    value = given(x, i)
    return None if value is None else int_of(value)


@op("DFT", opsets=(17, 19))
def _dft_17(a: dict, x: list) -> Tensor:
    return _dft(x[0], a.get("axis", 1), _scalar(x, 1), bool(a.get("inverse", 0)),
                bool(a.get("onesided", 0)))


@op("DFT", opsets=(20, LATEST))
def _dft_20(a: dict, x: list) -> Tensor:
    axis = _scalar(x, 2)
    return _dft(x[0], -2 if axis is None else axis, _scalar(x, 1),
                bool(a.get("inverse", 0)), bool(a.get("onesided", 0)))


@op("STFT")
def _stft(a: dict, x: list) -> Tensor:
    """DFTs of ``frame_length``-sample frames ``frame_step`` apart, each times ``window``:
    ``[batch, frames, bins, 2]``."""
    signal, window = x[0], given(x, 2)
    length = _scalar(x, 3) or (len(window) if window is not None else signal.shape[1])
    frames = _complex(signal.unfold(1, length, int_of(x[1])).movedim(-1, -2))
    if window is not None:
        frames = frames * window
    y = torch.fft.fft(frames, dim=-1)
    return _pair(y[..., :length // 2 + 1] if a.get("onesided", 1) else y, signal.dtype)


def _cosine_window(coefficients: Sequence[float]) -> Callable[[dict, list], Tensor]:
    def run(a: dict, x: list) -> Tensor:
        size = int_of(x[0])
        n = torch.arange(size, dtype=torch.float64)
        period = size if a.get("periodic", 1) else size - 1
        w = torch.stack([(-1) ** k * c * torch.cos(2 * math.pi * k * n / period)
                         for k, c in enumerate(coefficients)]).sum(0)
        dtype = _dtype(a.get("output_datatype", TensorProto.FLOAT), "window output_datatype")
        if not dtype.is_floating_point:  # truncated: a peak of 1 summed to 1 - 1e-16 stays 1
            w = w.round(decimals=9)
        return w.to(dtype)
    return run


for _name, _coefficients in {"HannWindow": (0.5, 0.5), "HammingWindow": (25 / 46, 21 / 46),
                             "BlackmanWindow": (0.42, 0.5, 0.08)}.items():
    op(_name)(_cosine_window(_coefficients))


def _mel(hz: float) -> float:
    return 2595 * math.log10(1 + hz / 700)


@op("MelWeightMatrix")
def _mel_weight_matrix(a: dict, x: list) -> Tensor:
    """``[⌊dft_length/2⌋ + 1, num_mel_bins]``: column i rises from bin ``e_i`` to 1 at
    ``e_{i+1}`` and falls to 0 at ``e_{i+2}`` (a one-bin rise is the single 1 at its peak)."""
    mels, dft, rate = int_of(x[0]), int_of(x[1]), int_of(x[2])
    low, high = _mel(float(x[3])), _mel(float(x[4]))
    points = low + (high - low) / (mels + 2) * torch.arange(mels + 2, dtype=torch.float64)
    hz = 700 * (10 ** (points / 2595) - 1)
    edges = torch.floor((dft + 1) * hz / rate)
    left, peak, right = edges[:-2], edges[1:-1], edges[2:]
    j = torch.arange(dft // 2 + 1, dtype=torch.float64).unsqueeze(1)
    rise = torch.where(j == peak, 1.0, (j - left) / (peak - left).clamp(min=1))
    out = torch.where((j >= left) & (j <= peak), rise, 0.0)
    out = torch.where((j >= peak) & (j < right), (right - j) / (right - peak).clamp(min=1), out)
    return out.to(_dtype(a.get("output_datatype", TensorProto.FLOAT),
                         "MelWeightMatrix output_datatype"))
