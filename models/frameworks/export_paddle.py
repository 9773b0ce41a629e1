"""Export a small PaddlePaddle network to ONNX with paddle2onnx (run in ``.venv-paddle``).

    .venv-paddle/bin/python models/frameworks/export_paddle.py -o lcnet.onnx [--opset 11]

The network is a PP-LCNet / MobileNetV3-style stack with random weights: Conv + BatchNorm +
Hardswish, a depthwise conv with a squeeze-and-excite gate (Hardsigmoid), ReLU6, a
Conv2DTranspose branch concatenated with a 1×1 branch, adaptive average pooling, Flatten and a
Linear head. It is saved with ``paddle.jit.save`` and converted with ``paddle2onnx.export``
(default settings, opset 11 unless ``--opset``). BatchNorm statistics are randomised so that
the network is never close to an identity. Paddle pins its own onnx version, hence its own venv
(``bash scripts/setup_frameworks.sh --paddle``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import paddle
import paddle2onnx
from paddle import nn


class ConvBN(nn.Layer):
    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1,
                 act: type[nn.Layer] | None = nn.Hardswish):
        super().__init__()
        self.conv = nn.Conv2D(cin, cout, k, stride, k // 2, groups=groups, bias_attr=False)
        self.bn = nn.BatchNorm2D(cout)
        self.act = act() if act else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class SE(nn.Layer):
    def __init__(self, c: int, r: int = 4):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2D(1)
        self.reduce = nn.Conv2D(c, c // r, 1)
        self.expand = nn.Conv2D(c // r, c, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x):
        return x * self.gate(self.expand(nn.functional.relu(self.reduce(self.pool(x)))))


class LCNet(nn.Layer):
    def __init__(self):
        super().__init__()
        self.stem = ConvBN(3, 16, stride=2)
        self.dw = ConvBN(16, 16, groups=16)
        self.se = SE(16)
        self.pw = ConvBN(16, 32, k=1, act=nn.ReLU6)
        self.up = nn.Conv2DTranspose(32, 16, 2, stride=2)
        self.down = ConvBN(16, 16, stride=2)
        self.side = ConvBN(32, 16, k=1)
        self.pool = nn.AdaptiveAvgPool2D(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.pw(self.se(self.dw(self.stem(x))))
        y = paddle.concat([self.down(self.up(x)), self.side(x)], axis=1)
        return self.fc(paddle.flatten(self.pool(y), 1))


def randomise_batchnorm(model: nn.Layer, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for layer in model.sublayers():
        if isinstance(layer, nn.BatchNorm2D):
            c = layer.weight.shape[0]
            layer.weight.set_value(rng.uniform(0.5, 1.5, c).astype("float32"))
            layer.bias.set_value(rng.normal(0, 0.2, c).astype("float32"))
            layer._mean.set_value(rng.normal(0, 0.2, c).astype("float32"))
            layer._variance.set_value(rng.uniform(0.5, 1.5, c).astype("float32"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--opset", type=int, default=11)
    p.add_argument("--size", type=int, default=32)
    args = p.parse_args(argv)
    paddle.seed(0)
    model = LCNet()
    randomise_batchnorm(model)
    model.eval()
    spec = [paddle.static.InputSpec([None, 3, args.size, args.size], "float32", "x")]
    with tempfile.TemporaryDirectory() as tmp:
        prefix = str(Path(tmp) / "inference")
        paddle.jit.save(model, prefix, input_spec=spec)
        model_file = next(f for f in Path(tmp).iterdir() if f.suffix in (".json", ".pdmodel"))
        paddle2onnx.export(str(model_file), prefix + ".pdiparams", str(args.output),
                           opset_version=args.opset)
    print(f"wrote {args.output} ({args.output.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
