"""Random PyTorch CNNs from a seed, exported with ``torch.onnx.export`` (the fuzzer's second
source, for a fraction of seeds; see ``tests/fuzz_graphs.py``).

The ONNX-built graphs cover ops one by one; these cover what an exporter actually writes for
common modules: folded or kept BatchNorm, ``view``/``flatten`` heads, ``torch.split``/``cat``,
channel shuffles, squeeze-and-excite, grouped and depthwise convs, ``interpolate``, and run-time
shape arithmetic when the batch is dynamic.
"""

from __future__ import annotations

import io

import numpy as np
import onnx
import torch
from torch import nn
from torch.nn import functional as F


class Block(nn.Module):
    """One random block: its ``forward`` is chosen by ``kind``."""

    def __init__(self, rng: np.random.Generator, kind: str, cin: int):
        super().__init__()
        self.kind = kind
        r = lambda lo, hi: int(rng.integers(lo, hi + 1))  # noqa: E731
        if kind == "cbr":
            groups = int(rng.choice([g for g in (1, 2, 4) if cin % g == 0]))
            cout = groups * r(1, 12 // groups + 1)
            self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, groups=groups),
                                      nn.BatchNorm2d(cout), nn.ReLU())
        elif kind == "residual":
            cout = cin if rng.random() < 0.6 else r(2, 12)
            self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout),
                                      nn.ReLU(), nn.Conv2d(cout, cout, 3, padding=1),
                                      nn.BatchNorm2d(cout))
            self.proj = nn.Identity() if cout == cin else nn.Conv2d(cin, cout, 1)
        elif kind == "dwsep":
            cout = r(2, 12)
            self.body = nn.Sequential(nn.Conv2d(cin, cin * 2, 3, padding=1, groups=cin),
                                      nn.BatchNorm2d(cin * 2), nn.ReLU6(),
                                      nn.Conv2d(cin * 2, cout, 1), nn.BatchNorm2d(cout))
        elif kind == "se":
            cout, mid = cin, max(1, cin // 4)
            self.body = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, mid, 1), nn.ReLU(),
                                      nn.Conv2d(mid, cin, 1), nn.Hardsigmoid())
        elif kind == "inception":
            widths = [r(1, 6) for _ in range(r(2, 3))]
            self.branches = nn.ModuleList(nn.Conv2d(cin, w, k, padding=k // 2)
                                          for w, k in zip(widths, (1, 3, 5)))
            cout = sum(widths)
        elif kind in ("split", "shuffle"):
            half = cin // 2
            self.half = half
            self.body = nn.Sequential(nn.Conv2d(cin - half, cin - half, 3, padding=1), nn.ReLU())
            cout = cin
        elif kind == "attn_pool":
            cout = cin
        elif kind == "upsample":
            cout = r(2, 12)
            self.body = nn.Conv2d(cin, cout, 3, padding=1)
        else:  # pool
            cout = cin
        self.cout = cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kind
        if k in ("cbr", "dwsep"):
            return self.body(x)
        if k == "residual":
            return F.relu(self.body(x) + self.proj(x))
        if k == "se":
            return x * self.body(x)
        if k == "inception":
            return torch.cat([b(x) for b in self.branches], dim=1)
        if k in ("split", "shuffle"):
            a, b = torch.split(x, [self.half, x.shape[1] - self.half], dim=1)
            y = torch.cat([a, self.body(b)], dim=1)
            if k == "shuffle" and self.half * 2 == x.shape[1]:
                n, c, h, w = y.shape
                y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
            return y
        if k == "attn_pool":
            n, c, h, w = x.shape
            t = x.view(n, c, -1)
            return (t * t.softmax(dim=-1)).view(n, c, h, w)
        if k == "upsample":
            return self.body(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return F.max_pool2d(x, 2) if x.shape[-1] >= 2 and x.shape[-2] >= 2 else x


class RandomNet(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.size = int(rng.integers(4, 9))
        self.cin = int(rng.integers(1, 4))
        c, size = self.cin, self.size
        blocks = []
        kinds = ["cbr", "cbr", "residual", "dwsep", "se", "inception", "split", "shuffle",
                 "attn_pool", "upsample", "pool"]
        for _ in range(int(rng.integers(2, 7))):
            kind = str(rng.choice(kinds))
            if (kind == "upsample" and size > 8) or (kind == "pool" and size < 4) \
                    or (kind in ("split", "shuffle") and c < 2):
                kind = "cbr"
            blocks.append(Block(rng, kind, c))
            c = blocks[-1].cout
            size = size * 2 if kind == "upsample" else (size // 2 if kind == "pool" else size)
        self.blocks = nn.Sequential(*blocks)
        self.flat = bool(rng.random() < 0.4) and c * size * size <= 1024
        self.head = nn.Linear(c * size * size if self.flat else c, int(rng.integers(2, 7)))
        _randomise(self, rng)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(x)
        x = torch.flatten(x, 1) if self.flat else F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.head(x)


def _randomise(module: nn.Module, rng: np.random.Generator) -> None:
    """Non-trivial BatchNorm statistics and per-channel weight magnitudes (criteria must rank)."""
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.3, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
                m.weight.normal_(1, 0.5, generator=gen)
                m.bias.normal_(0, 0.3, generator=gen)
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                scale = torch.exp(torch.empty(m.weight.shape[0]).uniform_(-1.5, 1.5,
                                                                         generator=gen))
                m.weight.mul_(scale.view(-1, *([1] * (m.weight.dim() - 1))))


def torch_model(seed: int) -> tuple[onnx.ModelProto, bool, list[str]]:
    """(model, dynamic batch?, block kinds) for ``seed``: TorchScript export at opset 17, with
    constant folding (BN folded into convs) or without, static or dynamic batch."""
    rng = np.random.default_rng(seed + 10**6)
    net = RandomNet(seed).eval()
    dynamic, fold = bool(rng.random() < 0.4), bool(rng.random() < 0.5)
    x = torch.randn(2 if dynamic else 1, net.cin, net.size, net.size)
    buf = io.BytesIO()
    torch.onnx.export(net, (x,), buf, dynamo=False, opset_version=17, input_names=["x"],
                      output_names=["y"], do_constant_folding=fold,
                      dynamic_axes={"x": {0: "N"}, "y": {0: "N"}} if dynamic else None)
    kinds = [b.kind for b in net.blocks] + [f"head:{'flatten' if net.flat else 'pool'}",
                                            f"fold:{fold}", f"dynamic:{dynamic}"]
    return onnx.load_from_string(buf.getvalue()), dynamic, kinds
