"""Export JAX/Flax (nnx) models to ONNX with jax2onnx (run in ``.venv-frameworks``).

    .venv-frameworks/bin/python models/frameworks/export_jax.py mlp -o mlp.onnx
    .venv-frameworks/bin/python models/frameworks/export_jax.py cnn -o cnn.onnx

Both models are trained for a few epochs on scikit-learn's digits (the same split as
``digits.py``; the test split is written beside the ONNX file as ``<name>_test.npz``), so their
weights and BatchNorm statistics are those of a trained model. The MLP reads the flattened
``SIZE``×``SIZE`` image, the CNN the NHWC image (Flax's layout; jax2onnx keeps it). jax2onnx
runs with its defaults (batch dim symbolic ``B``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax2onnx import to_onnx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import digits  # noqa: E402

FEATURES = digits.SIZE * digits.SIZE


class MLP(nnx.Module):
    """256 → 128 → 64 → 10 with ReLU and GELU."""

    def __init__(self, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(FEATURES, 128, rngs=rngs)
        self.fc2 = nnx.Linear(128, 64, rngs=rngs)
        self.fc3 = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):
        return self.fc3(nnx.gelu(self.fc2(nnx.relu(self.fc1(x)))))


class CNN(nnx.Module):
    """Conv-BN-ReLU, a strided depthwise conv, a 1×1 conv, global mean pool, Linear."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 16, (3, 3), rngs=rngs)
        self.bn1 = nnx.BatchNorm(16, momentum=0.9, rngs=rngs)
        self.dw = nnx.Conv(16, 16, (3, 3), strides=(2, 2), feature_group_count=16, rngs=rngs)
        self.pw = nnx.Conv(16, 32, (1, 1), rngs=rngs)
        self.fc = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = nnx.relu(self.pw(nnx.relu(self.dw(x))))
        return self.fc(jnp.mean(x, axis=(1, 2)))


def _inputs(name: str, images: np.ndarray) -> np.ndarray:
    x = digits.to_inputs(images)
    return x.reshape(len(x), FEATURES) if name == "mlp" else x


def train(model: nnx.Module, name: str, epochs: int) -> float:
    """Adam on the digits training split; returns test accuracy."""
    xtr, ytr, xte, yte = digits.raw_splits()
    xtr, xte = _inputs(name, xtr), _inputs(name, xte)
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x, y):
        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    rng = np.random.default_rng(0)
    model.train()
    for _ in range(epochs):
        order = rng.permutation(len(ytr))
        for i in range(0, len(order), 32):
            b = order[i:i + 32]
            step(model, opt, jnp.asarray(xtr[b]), jnp.asarray(ytr[b]))
    model.eval()
    return float((np.asarray(model(jnp.asarray(xte))).argmax(-1) == yte).mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", choices=["mlp", "cnn"])
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--epochs", type=int, default=None, help="default: 10 (mlp), 20 (cnn)")
    p.add_argument("--opset", type=int, default=None, help="default: jax2onnx's default")
    args = p.parse_args(argv)
    model = (MLP if args.model == "mlp" else CNN)(nnx.Rngs(0))
    acc = train(model, args.model, args.epochs or (10 if args.model == "mlp" else 20))
    print(f"jax test accuracy {acc:.4f}")
    digits.save_test_split(args.output.with_name(args.output.stem + "_test.npz"))
    shape = ("B", FEATURES) if args.model == "mlp" else ("B", digits.SIZE, digits.SIZE, 1)
    kwargs = {"opset": args.opset} if args.opset else {}
    model_proto = to_onnx(model, [shape], model_name=args.model, **kwargs)
    import onnx

    onnx.save(model_proto, str(args.output))
    print(f"wrote {args.output} ({args.output.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    jax.config.update("jax_platforms", "cpu")
    sys.exit(main())
