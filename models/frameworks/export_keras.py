"""Export Keras models to ONNX with tf2onnx, as a user would (run in ``.venv-frameworks``).

    .venv-frameworks/bin/python models/frameworks/export_keras.py mobilenetv2 -o m.onnx
    .venv-frameworks/bin/python models/frameworks/export_keras.py digits_cnn -o d.onnx --nchw

Models: Keras Applications ``MobileNetV2``, ``ResNet50``, ``EfficientNetB0`` (``weights=None``,
random init, small input so the export is quick) and a small CNN trained on scikit-learn's
digits (its test split is written beside the ONNX file as ``<name>_test.npz``). tf2onnx runs
with its default settings; the input stays NHWC unless ``--nchw`` (tf2onnx's
``--inputs-as-nchw``) is given. TensorFlow pins its own numpy/protobuf, hence the separate venv.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf2onnx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import digits  # noqa: E402

INPUT = "input"
APPLICATIONS = {"mobilenetv2": "MobileNetV2", "resnet50": "ResNet50",
                "efficientnetb0": "EfficientNetB0"}


def applications(name: str, size: int) -> tf.keras.Model:
    """A Keras Applications model with random weights and ``size``×``size`` RGB input."""
    build = getattr(tf.keras.applications, APPLICATIONS[name])
    tf.keras.utils.set_random_seed(0)
    model = build(weights=None, input_shape=(size, size, 3), classes=10)
    calibrate_batchnorm(model, np.random.default_rng(0).standard_normal((8, size, size, 3)))
    return model


def calibrate_batchnorm(model: tf.keras.Model, x: np.ndarray) -> None:
    """Give every BatchNormalization the statistics of its input on ``x`` and a random affine.

    A fresh Keras model's BN layers (mean 0, variance 1, γ 1, β 0) let activations die out
    through 50 layers: the output is a constant, and any check of the pruned model would pass
    trivially. Real statistics keep every layer's output alive, as in a trained model.
    """
    rng = np.random.default_rng(1)
    for layer in model.layers:
        if not isinstance(layer, tf.keras.layers.BatchNormalization):
            continue
        probe = tf.keras.Model(model.inputs, layer.input)
        h = np.asarray(probe(x, training=False))
        axes = tuple(range(h.ndim - 1))
        c = h.shape[-1]
        gamma = rng.uniform(0.5, 1.5, c)
        beta = rng.normal(0.0, 0.2, c)
        layer.set_weights([w.astype(np.float32) for w in
                           (gamma, beta, h.mean(axis=axes), h.var(axis=axes) + 1e-3)])


def digits_cnn(epochs: int) -> tuple[tf.keras.Model, float]:
    """A small CNN (Conv/BN/ReLU6, depthwise, Flatten + Dense head) trained on digits;
    returns it with its Keras test accuracy. Functional, since tf2onnx's ``from_keras`` cannot
    name a Keras 3 ``Sequential`` model's outputs."""
    tf.keras.utils.set_random_seed(0)
    layers = tf.keras.layers
    x = inp = tf.keras.Input((digits.SIZE, digits.SIZE, 1))
    x = layers.Conv2D(16, 3, padding="same", use_bias=False)(x)
    x = layers.ReLU(max_value=6.0)(layers.BatchNormalization()(x))
    x = layers.DepthwiseConv2D(3, strides=2, padding="same")(x)
    x = layers.Conv2D(32, 1, activation="relu")(x)
    x = layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    x = layers.Flatten()(layers.MaxPooling2D(2)(x))
    x = layers.Dense(64, activation="relu")(x)
    model = tf.keras.Model(inp, layers.Dense(10)(x))
    xtr, ytr, xte, yte = digits.raw_splits()
    model.compile(optimizer=tf.keras.optimizers.Adam(3e-3),
                  loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(digits.to_inputs(xtr), ytr, epochs=epochs, batch_size=32, verbose=0)
    _, acc = model.evaluate(digits.to_inputs(xte), yte, verbose=0)
    return model, float(acc)


def idioms(size: int) -> tf.keras.Model:
    """Random-init Keras layers whose ONNX forms differ from PyTorch's: ZeroPadding + valid
    strided Conv, hard sigmoid/swish, Conv2DTranspose, channels-last Concatenate, Dense and
    BatchNormalization on a 4-D NHWC tensor, Conv1D on a reshaped sequence, 1-D pooling."""
    tf.keras.utils.set_random_seed(0)
    layers = tf.keras.layers
    inp = tf.keras.Input((size, size, 3))
    x = layers.Conv2D(16, 3, strides=2)(layers.ZeroPadding2D(1)(inp))
    x = layers.Activation("hard_swish")(layers.BatchNormalization()(x))
    a = layers.Conv2D(16, 3, padding="same", activation="hard_sigmoid")(x)
    b = layers.Conv2DTranspose(8, 3, strides=2, padding="same")(x)
    b = layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(b)
    x = layers.Concatenate()([a, b, x])
    x = layers.Dense(24)(x)  # a Dense on NHWC: a MatMul over the channels axis
    x = layers.ReLU()(layers.BatchNormalization()(x))
    x = layers.Reshape((-1, 24))(x)
    x = layers.Conv1D(32, 3, padding="same", activation="relu")(x)
    x = layers.GlobalAveragePooling1D()(x)
    model = tf.keras.Model(inp, layers.Dense(10)(x))
    calibrate_batchnorm(model, np.random.default_rng(0).standard_normal((8, size, size, 3)))
    return model


def pixel_shuffle(size: int) -> tf.keras.Model:
    """A random-init ESPCN-style ×2 super-resolution network in TensorFlow's own ops:
    ``tf.nn.space_to_depth`` on the input side and ``tf.nn.depth_to_space`` (DCR order, unlike
    PyTorch's PixelShuffle) before the last conv."""
    tf.keras.utils.set_random_seed(0)
    layers = tf.keras.layers
    inp = tf.keras.Input((size, size, 3))
    x = layers.Conv2D(16, 3, padding="same", activation="relu")(inp)
    x = layers.Lambda(lambda t: tf.nn.space_to_depth(t, 2))(x)  # 64 channels at size / 2
    x = layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    x = layers.Conv2D(48, 3, padding="same", activation="relu")(x)
    x = layers.Lambda(lambda t: tf.nn.depth_to_space(t, 2))(x)  # 12 channels at size
    x = layers.Conv2D(12 * 4, 3, padding="same", activation="relu")(x)
    x = layers.Lambda(lambda t: tf.nn.depth_to_space(t, 2))(x)  # 12 channels at size · 2
    return tf.keras.Model(inp, layers.Conv2D(3, 3, padding="same")(x))


def export(model: tf.keras.Model, out: Path, *, nchw: bool, opset: int | None) -> None:
    shape = (None, *model.input_shape[1:])
    spec = (tf.TensorSpec(shape, tf.float32, name=INPUT),)
    kwargs = {"opset": opset} if opset else {}
    tf2onnx.convert.from_keras(model, input_signature=spec, output_path=str(out),
                               inputs_as_nchw=[INPUT] if nchw else None, **kwargs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", choices=[*APPLICATIONS, "digits_cnn", "idioms", "pixel_shuffle"])
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--size", type=int, default=96, help="input height/width (applications)")
    p.add_argument("--nchw", action="store_true", help="tf2onnx --inputs-as-nchw")
    p.add_argument("--opset", type=int, default=None, help="default: tf2onnx's default")
    p.add_argument("--epochs", type=int, default=15, help="digits_cnn training epochs")
    args = p.parse_args(argv)
    if args.model == "digits_cnn":
        model, acc = digits_cnn(args.epochs)
        digits.save_test_split(args.output.with_name(args.output.stem + "_test.npz"))
        print(f"keras test accuracy {acc:.4f}")
    elif args.model == "idioms":
        model = idioms(args.size // 3)
    elif args.model == "pixel_shuffle":
        model = pixel_shuffle(args.size // 3)
    else:
        model = applications(args.model, args.size)
    export(model, args.output, nchw=args.nchw, opset=args.opset)
    print(f"wrote {args.output} ({np.round(args.output.stat().st_size / 1e6, 2)} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
