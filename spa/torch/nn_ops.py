"""ONNX's layers in torch, for ``spa.torch.from_onnx``: convolutions, Gemm, the normalisations,
the pools, Dropout (the identity: the module runs the graph as exported, for inference), and the
hooks of LSTM, GRU and RNN, which run step by step in spa/torch/recurrent.py.

- Pads: symmetric ones go to the torch op, asymmetric ones are applied to the input first (by
  the pool's identity: -inf for MaxPool, 0 elsewhere); ``auto_pad`` other than ``NOTSET`` and
  ``VALID`` is refused (export with explicit pads), as are ConvTranspose's asymmetric pads.
- BatchNormalization runs in inference mode, on its running statistics (buffers: training
  does not change them).
- Opset 18's GroupNormalization scales per group, 21's per channel: a scale of
  ``num_groups`` entries is spread over each group's channels.
- LpPool is ``(Σ |x|^p)^(1/p)`` over each window.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from spa.torch import recurrent
from spa.torch.interpreter import UnsupportedOpsError, add, op, positive_axis


def _conv_pads(a: dict, spatial: int) -> list[int]:
    if a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise UnsupportedOpsError(f"auto_pad={a['auto_pad']} is not supported; export with "
                                  "explicit pads")
    pads = a.get("pads", [0] * (2 * spatial))
    return pads


def _pad_input(x: torch.Tensor, pads: list[int], value: float = 0.0) -> tuple[torch.Tensor, list]:
    """Symmetric pads go to the op; asymmetric ones are applied here."""
    n = len(pads) // 2
    begin, end = pads[:n], pads[n:]
    if begin == end:
        return x, begin
    flat = []
    for b, e in zip(reversed(begin), reversed(end)):
        flat += [b, e]
    return F.pad(x, flat, value=value), [0] * n


@op("Conv")
def _conv(a, x):
    spatial = x[1].dim() - 2
    inp, pads = _pad_input(x[0], _conv_pads(a, spatial))
    fn = (F.conv1d, F.conv2d, F.conv3d)[spatial - 1]
    return fn(inp, x[1], x[2] if len(x) > 2 else None, stride=a.get("strides", 1),
              padding=pads, dilation=a.get("dilations", 1), groups=a.get("group", 1))


@op("ConvTranspose")
def _conv_transpose(a, x):
    spatial = x[1].dim() - 2
    pads = _conv_pads(a, spatial)
    n = len(pads) // 2
    if pads[:n] != pads[n:]:
        raise UnsupportedOpsError("ConvTranspose with asymmetric pads")
    fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[spatial - 1]
    return fn(x[0], x[1], x[2] if len(x) > 2 else None, stride=a.get("strides", 1),
              padding=pads[:n], output_padding=a.get("output_padding", 0),
              groups=a.get("group", 1), dilation=a.get("dilations", 1))


@op("Gemm")
def _gemm(a, x):
    A = x[0].t() if a.get("transA", 0) else x[0]
    B = x[1].t() if a.get("transB", 0) else x[1]
    out = a.get("alpha", 1.0) * (A @ B)
    if len(x) > 2 and x[2] is not None:
        out = out + a.get("beta", 1.0) * x[2]
    return out


@op("BatchNormalization")
def _batchnorm(a, x):
    return F.batch_norm(x[0], x[3], x[4], x[1], x[2], training=False,
                        eps=a.get("epsilon", 1e-5))


@op("InstanceNormalization")
def _instancenorm(a, x):
    return F.instance_norm(x[0], weight=x[1], bias=x[2], eps=a.get("epsilon", 1e-5))


@op("LayerNormalization")
def _layernorm(a, x):
    axis = positive_axis(a.get("axis", -1), x[0].dim())
    shape = x[0].shape[axis:]
    return F.layer_norm(x[0], shape, x[1], x[2] if len(x) > 2 else None,
                        eps=a.get("epsilon", 1e-5))


@op("RMSNormalization", "SimplifiedLayerNormalization")
def _rmsnorm(a, x):
    axis = positive_axis(a.get("axis", -1), x[0].dim())
    dims = tuple(range(axis, x[0].dim()))
    ms = x[0].pow(2).mean(dim=dims, keepdim=True)
    return x[0] * torch.rsqrt(ms + a.get("epsilon", 1e-5)) * x[1]


@op("GroupNormalization")
def _group_norm(a, x):
    """Opset 18 gives one scale and bias per group, 21 one per channel."""
    groups, eps = int(a["num_groups"]), a.get("epsilon", 1e-5)
    n, c = x[0].shape[:2]
    t = x[0].reshape(n, groups, -1)
    mean = t.mean(-1, keepdim=True)
    var = t.var(-1, unbiased=False, keepdim=True)
    t = ((t - mean) / torch.sqrt(var + eps)).reshape(x[0].shape)
    scale, bias = x[1], x[2]
    if scale.numel() == groups and groups != c:
        scale, bias = (v.repeat_interleave(c // groups) for v in (scale, bias))
    view = (1, c) + (1,) * (x[0].dim() - 2)
    return t * scale.reshape(view) + bias.reshape(view)


@op("LpNormalization")
def _lp_norm(a, x):
    axis = positive_axis(a.get("axis", -1), x[0].dim())
    p = int(a.get("p", 2))
    return x[0] / torch.linalg.vector_norm(x[0], p, dim=axis, keepdim=True)


def _pool(a, x, kind: str):
    spatial = x[0].dim() - 2
    kernel = a["kernel_shape"]
    value = -math.inf if kind == "max" else 0.0
    inp, pads = _pad_input(x[0], _conv_pads(a, spatial), value)
    ceil = bool(a.get("ceil_mode", 0))
    strides = a.get("strides", [1] * spatial)
    if kind == "max":
        fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[spatial - 1]
        return fn(inp, kernel, strides, pads, dilation=a.get("dilations", 1), ceil_mode=ceil)
    avg: Callable[..., torch.Tensor] = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[spatial - 1]
    return avg(inp, kernel, strides, pads, ceil_mode=ceil,
               count_include_pad=bool(a.get("count_include_pad", 0)))


@op("LpPool")
def _lp_pool(a, x):
    """``(Σ |x|^p)^(1/p)`` over each window: an average pool of ``|x|^p`` (zero padding, every
    position counted) times the window's size."""
    p = float(a.get("p", 2))
    powered = {**a, "count_include_pad": 1}
    total = _pool(powered, [x[0].abs().pow(p)], "avg") * float(np.prod(a["kernel_shape"]))
    return total.pow(1.0 / p)


@op("GlobalLpPool")
def _global_lp_pool(a, x):
    p = float(a.get("p", 2))
    return x[0].abs().pow(p).sum(dim=tuple(range(2, x[0].dim())), keepdim=True).pow(1.0 / p)


add("MaxPool", lambda a, x: _pool(a, x, "max"))
add("AveragePool", lambda a, x: _pool(a, x, "avg"))
add("GlobalAveragePool", lambda a, x: x[0].mean(dim=tuple(range(2, x[0].dim())), keepdim=True))
add("GlobalMaxPool", lambda a, x: x[0].amax(dim=tuple(range(2, x[0].dim())), keepdim=True))
add("Dropout", lambda a, x: x[0])


# ---- recurrent layers (spa/torch/recurrent.py) ----------------------------------------------
@op("LSTM")
def _lstm(a, x):
    return recurrent.run("LSTM", a, x)


@op("GRU")
def _gru(a, x):
    return recurrent.run("GRU", a, x)


@op("RNN")
def _rnn(a, x):
    return recurrent.run("RNN", a, x)
