"""Weights the graph computes from constants (spa/ir/computed.py): folded into constants, so
their layers prune.

Before, such a layer froze every channel its weight touched (no rule slices a weight that is
no constant): timm's NF-ResNet-26 (weight standardisation before every conv) had no prunable
group at all.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from spa.api import CheckOptions, PruneOptions, analyze, prune
from tests.oracle import assert_same_outputs, file_params, prune_checked

RNG = np.random.default_rng(0)


def _init(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def _standardised(prefix: str, shape: tuple[int, ...]) -> tuple[list, list, str]:
    """Nodes and initializers computing a conv weight of ``shape`` as timm's ScaledStdConv2d
    exports it: the raw weight reshaped to [1, out, fan-in], normalised per output channel
    by a BatchNormalization in training mode scaled by a gain, reshaped back."""
    out, fan_in = shape[0], int(np.prod(shape[1:]))
    inits = [_init(f"{prefix}.v", RNG.standard_normal((1, out, fan_in)).astype(np.float32)),
             _init(f"{prefix}.gain", RNG.uniform(0.5, 1.5, out).astype(np.float32)),
             _init(f"{prefix}.zeros", np.zeros(out, np.float32)),
             _init(f"{prefix}.mean", np.zeros(out, np.float32)),
             _init(f"{prefix}.var", np.ones(out, np.float32)),
             _init(f"{prefix}.shape", np.array(shape, np.int64))]
    nodes = [helper.make_node("BatchNormalization", [f"{prefix}.v", f"{prefix}.gain",
                                                     f"{prefix}.zeros", f"{prefix}.mean",
                                                     f"{prefix}.var"],
                              [f"{prefix}.std", f"{prefix}.rm", f"{prefix}.rv"],
                              name=f"{prefix}/bn", training_mode=1,
                              epsilon=1e-5, momentum=1.0),
             helper.make_node("Reshape", [f"{prefix}.std", f"{prefix}.shape"], [f"{prefix}.w"],
                              name=f"{prefix}/reshape")]
    return nodes, inits, f"{prefix}.w"


def _weight_normed(prefix: str, rows: int, cols: int) -> tuple[list, list, str]:
    """``g · v / ‖v‖`` per column of a [rows, cols] MatMul weight (torch's weight_norm)."""
    inits = [_init(f"{prefix}.v", RNG.standard_normal((rows, cols)).astype(np.float32)),
             _init(f"{prefix}.g", RNG.uniform(0.5, 1.5, (1, cols)).astype(np.float32))]
    nodes = [helper.make_node("ReduceL2", [f"{prefix}.v"], [f"{prefix}.norm"], axes=[0],
                              keepdims=1, name=f"{prefix}/norm"),
             helper.make_node("Div", [f"{prefix}.v", f"{prefix}.norm"], [f"{prefix}.dir"],
                              name=f"{prefix}/div"),
             helper.make_node("Mul", [f"{prefix}.dir", f"{prefix}.g"], [f"{prefix}.w"],
                              name=f"{prefix}/mul")]
    return nodes, inits, f"{prefix}.w"


def _model(nodes: list, inits: list, x: list[int], y: list[int]) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "computed", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, x)], [helper.make_tensor_value_info("y", TensorProto.FLOAT, y)],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _nf_block() -> onnx.ModelProto:
    """Two standardised convs: 4 -> 8 -> 6 channels (the 8 prune)."""
    n1, i1, w1 = _standardised("conv1", (8, 4, 3, 3))
    n2, i2, w2 = _standardised("conv2", (6, 8, 1, 1))
    nodes = [*n1, helper.make_node("Conv", ["x", w1], ["h"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["a"], name="relu"),
             *n2, helper.make_node("Conv", ["a", w2], ["y"], name="conv2")]
    return _model(nodes, [*i1, *i2], [1, 4, 8, 8], [1, 6, 8, 8])


def _weight_normed_mlp() -> onnx.ModelProto:
    """Two weight-normed MatMuls: 8 -> 16 -> 4 (the 16 prune)."""
    n1, i1, w1 = _weight_normed("fc1", 8, 16)
    n2, i2, w2 = _weight_normed("fc2", 16, 4)
    nodes = [*n1, helper.make_node("MatMul", ["x", w1], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["a"], name="relu"),
             *n2, helper.make_node("MatMul", ["a", w2], ["y"], name="fc2")]
    return _model(nodes, [*i1, *i2], [2, 8], [2, 4])


@pytest.mark.parametrize("make, ops, size", [(_nf_block, {"BatchNormalization"}, 8),
                                             (_weight_normed_mlp, {"ReduceL2", "Div"}, 16)])
def test_a_weight_computed_from_constants_prunes(tmp_path: Path, make, ops, size) -> None:
    model = make()
    src = tmp_path / "model.onnx"
    onnx.save(model, str(src))
    before = src.read_bytes()
    groups = [(g.size, g.prunable) for g in analyze(src).groups]
    assert (size, True) in groups
    # folded as the model computes them: nothing pruned, the same outputs
    kept = tmp_path / "kept.onnx"
    prune(src, kept, PruneOptions(ratio=0.0), CheckOptions(latency=False))
    assert_same_outputs(src, kept)
    pruned = prune_checked(src, tmp_path, ratio=0.5)
    assert pruned.report.masked_relative_diff < 1e-5
    written = onnx.load(str(pruned.path))
    assert not ops & {n.op_type for n in written.graph.node}
    # the weights written are the computed ones, sliced: the raw values and the gain are gone
    assert file_params(pruned.path) == pruned.report.params_after < file_params(src)
    assert src.read_bytes() == before


def test_what_is_not_folded(tmp_path: Path) -> None:
    """A weight made larger than its constants (a Tile of one filter) stays computed, and the
    channels of its layer frozen; a quantised weight stays integer (its DequantizeLinear is
    kept, and its channels prune as a quantised weight's)."""
    q = RNG.integers(-100, 100, (6, 8, 1, 1)).astype(np.int8)
    inits = [_init("filter", RNG.standard_normal((1, 4, 3, 3)).astype(np.float32)),
             _init("copies", np.array([8, 1, 1, 1], np.int64)),
             _init("q", q), _init("s", np.float32(0.02)), _init("zp", np.int8(0))]
    nodes = [helper.make_node("Tile", ["filter", "copies"], ["w1"], name="tile"),
             helper.make_node("Conv", ["x", "w1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["a"], name="relu"),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["w2"], name="dq"),
             helper.make_node("Conv", ["a", "w2"], ["y"], name="conv2")]
    src = tmp_path / "model.onnx"
    onnx.save(_model(nodes, inits, [1, 4, 8, 8], [1, 6, 8, 8]), str(src))
    assert not [g for g in analyze(src).groups if g.size == 8]  # no constant makes them
    # the Tile's output folded (as a plain constant) would let the 8 channels prune
    folded = onnx.load(str(src))
    tile = folded.graph.node[0]
    folded.graph.initializer.append(_init("w1", np.tile(
        numpy_helper.to_array(folded.graph.initializer[0]), (8, 1, 1, 1))))
    folded.graph.node.remove(tile)
    assert [g.prunable for g in analyze(folded).groups if g.size == 8] == [True]
    pruned = prune_checked(folded, tmp_path, ratio=0.5)
    assert "DequantizeLinear" in {n.op_type for n in onnx.load(str(pruned.path)).graph.node}


def test_torch_exports_of_standardised_and_weight_normed_layers_prune(tmp_path: Path) -> None:
    """As PyTorch's TorchScript exporter writes them: timm's ScaledStdConv2d (F.batch_norm of
    the weight in training mode) and torch's weight_norm parametrisation of a Linear."""
    torch = pytest.importorskip("torch")
    from torch import nn
    from torch.nn import functional as F

    class StdConv(nn.Conv2d):
        def forward(self, x):
            w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                             training=True, momentum=0.0, eps=1e-5).reshape_as(self.weight)
            return F.conv2d(x, w, self.bias, padding=1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = StdConv(3, 16, 3), StdConv(16, 16, 3)
            self.fc1 = nn.utils.parametrizations.weight_norm(nn.Linear(16, 32))
            self.fc2 = nn.Linear(32, 5)

        def forward(self, x):
            x = F.relu(self.c2(F.relu(self.c1(x)))).mean((2, 3))
            return self.fc2(F.relu(self.fc1(x)))

    torch.manual_seed(0)
    src = tmp_path / "net.onnx"
    torch.onnx.export(Net().eval(), (torch.randn(1, 3, 8, 8),), str(src), dynamo=False,
                      opset_version=17)
    sizes = sorted(g.size for g in analyze(src).groups if g.prunable)
    assert sizes == [16, 16, 32]
    pruned = prune_checked(src, tmp_path, ratio=0.5)
    assert pruned.report.masked_relative_diff < 1e-5
    ops = {n.op_type for n in onnx.load(str(pruned.path)).graph.node}
    assert not ops & {"BatchNormalization", "ReduceL2", "Div"}


def test_a_bias_computed_from_constants_prunes(tmp_path: Path) -> None:
    """torchvision's Swin V2 zeroes a third of its qkv bias in the graph (``ScatterND``) before
    the Add after its MatMul: the bias is folded, and the MatMul's channels prune with it."""
    inits = [_init("w1", RNG.standard_normal((8, 16)).astype(np.float32)),
             _init("b1", RNG.standard_normal(16).astype(np.float32)),
             _init("at", np.arange(4, 8, dtype=np.int64).reshape(4, 1)),
             _init("zeros", np.zeros(4, np.float32)),
             _init("w2", RNG.standard_normal((16, 4)).astype(np.float32))]
    nodes = [helper.make_node("ScatterND", ["b1", "at", "zeros"], ["bias"], name="zero_k"),
             helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Add", ["h", "bias"], ["hb"], name="fc1_bias"),
             helper.make_node("Relu", ["hb"], ["a"], name="relu"),
             helper.make_node("MatMul", ["a", "w2"], ["y"], name="fc2")]
    src = tmp_path / "model.onnx"
    onnx.save(_model(nodes, inits, [2, 8], [2, 4]), str(src))
    assert [g.prunable for g in analyze(src).groups if g.size == 16] == [True]
    pruned = prune_checked(src, tmp_path, ratio=0.5)
    written = onnx.load(str(pruned.path))
    assert "ScatterND" not in {n.op_type for n in written.graph.node}
    # the bias written is the one the graph computed, at the kept channels
    want = numpy_helper.to_array(inits[1]).copy()
    want[4:8] = 0
    keep, = [g.keep for g in pruned.plan.groups if g.size == 16]
    bias, = [numpy_helper.to_array(i) for i in written.graph.initializer if tuple(i.dims) == (8,)]
    np.testing.assert_array_equal(bias, want[np.asarray(keep)])


def test_a_mask_added_to_attention_scores_is_not_folded() -> None:
    """A mask made of constants added to a product of two activations (attention scores) is
    no layer's bias: it stays as the graph computes it."""
    from spa.ir.computed import computed_weights
    from spa.ir.load import load_proto

    inits = [_init("tri", np.triu(np.full((16, 16), -1e4, np.float32), 1)),
             _init("neg", np.float32(1.0))]
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1], name="t"),
             helper.make_node("MatMul", ["x", "xt"], ["scores"], name="qk"),
             helper.make_node("Mul", ["tri", "neg"], ["mask"], name="mask"),
             helper.make_node("Add", ["scores", "mask"], ["y"], name="masked")]
    graph = helper.make_graph(nodes, "attn", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, 16, 8])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [1, 16, 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    loaded = load_proto(model)
    assert "Mul" in {n.op for n in loaded.graph.nodes}
    assert computed_weights(loaded.graph) == []
