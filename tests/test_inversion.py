"""spa.torch.inversion: calibration inputs synthesised from the dense model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from spa.errors import OptionError
from spa.torch.interpreter import from_onnx
from spa.torch.inversion import Weights, synthesize

torch.set_num_threads(1)


def _classifier(bn: bool, seed: int = 0, fixed: bool = False) -> onnx.ModelProto:
    """image [batch, 3, 16, 16] → Conv(8) [→ BatchNorm] → Relu → GlobalAveragePool → Gemm(4), the
    class k scoring channels 2k and 2k+1 (so every class is reachable). ``fixed``: exported
    with a batch of 1, which a Reshape to ``[1, 8]`` holds (in place of the Flatten)."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.kron(np.eye(4), [[1, 1]]).astype(np.float32), "fc")]
    nodes = [helper.make_node("Conv", ["image", "w"], ["c"], pads=[1, 1, 1, 1])]
    if bn:
        stats = {"scale": np.ones(8), "bias": np.zeros(8), "mean": rng.standard_normal(8),
                 "var": rng.uniform(0.5, 2.0, 8)}
        inits += [numpy_helper.from_array(v.astype(np.float32), k) for k, v in stats.items()]
        nodes.append(helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"],
                                      ["b"]))
    nodes += [helper.make_node("Relu", ["b" if bn else "c"], ["r"]),
              helper.make_node("GlobalAveragePool", ["r"], ["p"]),
              helper.make_node("Reshape", ["p", "to"], ["f"]) if fixed else
              helper.make_node("Flatten", ["p"], ["f"]),
              helper.make_node("Gemm", ["f", "fc"], ["logits"], transB=1)]
    if fixed:
        inits.append(numpy_helper.from_array(np.array([1, 8], np.int64), "to"))
    batch = 1 if fixed else "batch"
    graph = helper.make_graph(
        nodes, "classifier",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _embedding() -> onnx.ModelProto:
    """ids [batch, seq] (int64) → Gather from a 50-row table → ReduceMean."""
    table = numpy_helper.from_array(np.ones((50, 4), np.float32), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["e"]),
         helper.make_node("ReduceMean", ["e"], ["y"], axes=[1])], "embed",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [table])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _bn_loss(model: onnx.ModelProto, x: np.ndarray) -> float:
    """DeepInversion's loss at the one BatchNorm: ‖μ_b − μ‖ + ‖σ²_b − σ²‖ of its input."""
    w = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w"))
    tensors = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    c = torch.nn.functional.conv2d(torch.from_numpy(x), torch.tensor(w), padding=1)
    mean, var = c.mean((0, 2, 3)).numpy(), c.var((0, 2, 3), unbiased=False).numpy()
    return float(np.linalg.norm(mean - tensors["mean"]) + np.linalg.norm(var - tensors["var"]))


def test_shapes_dtypes_and_dims() -> None:
    s = synthesize(_classifier(bn=False), 6, steps=3)
    assert s.arrays["image"].shape == (6, 3, 16, 16)
    assert s.arrays["image"].dtype == np.float32
    assert s.method == "classes"
    assert "class-conditional" in s.detail and "3 Adam steps" in s.detail


def test_same_seed_same_inputs_other_seed_other_inputs() -> None:
    model = _classifier(bn=False)
    a, b, c = (synthesize(model, 4, steps=3, seed=s).arrays["image"] for s in (0, 0, 1))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_batchnorm_matching_reduces_the_batchnorm_loss() -> None:
    model = _classifier(bn=True)
    noise = synthesize(model, 16, method="noise").arrays["image"]
    s = synthesize(model, 16, steps=60, weights=Weights(classes=0.0))
    assert s.method == "batchnorm" and "1 BatchNorm inputs" in s.detail
    assert _bn_loss(model, s.arrays["image"]) < 0.5 * _bn_loss(model, noise)


@pytest.mark.parametrize("bn", [True, False])
def test_a_model_fixed_at_one_sample_inverts_as_the_symbolic_one(bn) -> None:
    """A graph holding its batch of 1 in a Reshape runs one sample at a time (the statistics
    and class terms still over the whole batch): the same images as the symbolic-batch
    model's. It crashed before (the Reshape met 8 samples)."""
    free = synthesize(_classifier(bn=bn), 8, steps=20)
    one = synthesize(_classifier(bn=bn, fixed=True), 8, steps=20)
    assert one.method == free.method == ("batchnorm" if bn else "classes")
    np.testing.assert_allclose(one.arrays["image"], free.arrays["image"], rtol=1e-4, atol=1e-4)


def test_class_term_moves_predictions_towards_the_targets() -> None:
    model = _classifier(bn=False)
    noise = synthesize(model, 16, method="noise").arrays["image"]
    s = synthesize(model, 16, steps=60)
    predict = from_onnx(model)
    with torch.no_grad():
        before = predict(torch.from_numpy(noise)).argmax(1).numpy()
        after = predict(torch.from_numpy(s.arrays["image"])).argmax(1).numpy()
    # 16 targets over 4 classes, 4 each: inversion covers the classes noise does not
    assert np.bincount(after, minlength=4).tolist() == [4, 4, 4, 4]
    assert np.bincount(before, minlength=4).max() > 4


def test_activation_matching_is_reported() -> None:
    s = synthesize(_classifier(bn=False), 4, steps=3, method="activations")
    assert s.method == "activations" and "1 conv outputs matched" in s.detail


def test_token_ids_are_drawn_over_the_embedding_rows_and_said_so() -> None:
    s = synthesize(_embedding(), 200, dims={"seq": 7})
    ids = s.arrays["ids"]
    assert ids.shape == (200, 7) and ids.dtype == np.int64
    assert ids.min() >= 0 and ids.max() == 49
    assert s.method == "random" and "50 rows of its embedding table" in s.detail


def test_batchnorm_method_on_a_folded_model_is_an_error() -> None:
    with pytest.raises(OptionError, match="folded"):
        synthesize(_classifier(bn=False), 2, method="batchnorm")
