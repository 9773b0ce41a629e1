"""GroupNorm as exporters write it: ``Reshape(x, [N, G, -1]) → InstanceNormalization →
Reshape(·, Shape(x)) → Mul γ → Add β`` (PyTorch's TorchScript and dynamo exporters alike).

Its channels prune a whole group at a time: the views' rule maps channel ``c`` to group
``c // (C/G)`` (spa/coupling/rules/shape.py ``_outer_blocks``), with symbolic batch and spatial
dims too, and the view restored to ``Shape(x)`` keeps ``x``'s channels (``restored_view``).
Before, every channel a GroupNorm read froze ("Reshape … does not map axis 1"): BiT
(timm ``resnetv2_50x1_bit``) had no prunable group at all.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from spa.api import analyze
from tests.oracle import assert_masked_at, prune_checked

torch = pytest.importorskip("torch")
nn = torch.nn


class _Block(nn.Module):
    """conv 3 → 32, GroupNorm(8), ReLU, conv 32 → 16; with ``residual``, a pre-activation
    block on a 32-channel stream (BiT's): ``x + conv(relu(gn(x)))``."""

    def __init__(self, groups: int = 8, residual: bool = False) -> None:
        super().__init__()
        self.residual = residual
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.norm = nn.GroupNorm(groups, 32)
        self.inner = nn.Conv2d(32, 32, 3, padding=1)
        self.head = nn.Conv2d(32, 16, 1)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        x = self.stem(x)
        y = self.inner(torch.relu(self.norm(x)))
        return self.head(x + y if self.residual else torch.relu(y))


def _export(module: nn.Module, path: Path, *, dynamic: bool = False, dynamo: bool = False
            ) -> Path:
    torch.manual_seed(0)
    example = (torch.randn(1, 3, 8, 8),)
    if dynamo:
        torch.onnx.export(module.eval(), example, str(path), dynamo=True)
    else:
        torch.onnx.export(module.eval(), example, str(path), dynamo=False, opset_version=17,
                          input_names=["x"], dynamic_axes={"x": {0: "batch", 2: "h", 3: "w"}}
                          if dynamic else None)
    return path


@pytest.mark.parametrize("how", ["static", "dynamic", "dynamo"])
def test_group_norm_prunes_whole_groups(tmp_path: Path, how: str) -> None:
    torch.manual_seed(0)
    src = _export(_Block(), tmp_path / "gn.onnx", dynamic=how == "dynamic",
                  dynamo=how == "dynamo")
    prunable = sorted(g.size for g in analyze(src).groups if g.prunable)
    assert prunable == [8, 32]  # the GroupNorm's 8 groups of 4 channels; the inner conv's 32
    dims = {"batch": 2, "h": 6, "w": 10} if how == "dynamic" else None
    pruned = prune_checked(src, tmp_path, ratio=0.5, dims=dims)
    written = onnx.load(str(pruned.path))
    inits = {i.name: numpy_helper.to_array(i) for i in written.graph.initializer}
    stem = next(n for n in written.graph.node if n.op_type == "Conv")
    assert inits[stem.input[1]].shape[0] == 16  # 4 of 8 groups of 4 channels
    norm = next(n for n in written.graph.node if n.op_type == "InstanceNormalization")
    assert inits[norm.input[1]].shape == (4,)
    if how == "dynamic":  # the oracle holds at other sizes too
        worst = assert_masked_at(src, pruned, [{"batch": 1, "h": 8, "w": 8},
                                               {"batch": 3, "h": 5, "w": 7}])
        assert max(worst) < 1e-5


def test_group_norm_on_a_residual_stream(tmp_path: Path) -> None:
    """BiT's pre-activation blocks normalise the stream itself: the stream's channels prune in
    the GroupNorm's groups, with the convs that write and read it."""
    torch.manual_seed(0)
    src = _export(_Block(residual=True), tmp_path / "bit.onnx")
    groups = [g for g in analyze(src).groups if g.prunable]
    assert [g.size for g in groups] == [8]  # the stream: the stem's and the inner conv's output
    pruned = prune_checked(src, tmp_path, ratio=0.25, round_to=1)  # 6 of 8 groups
    assert pruned.report.masked_relative_diff < 1e-5
    written = onnx.load(str(pruned.path))
    inits = {i.name: numpy_helper.to_array(i).shape for i in written.graph.initializer}
    stem, inner, head = (n for n in written.graph.node if n.op_type == "Conv")
    assert inits[stem.input[1]][0] == inits[inner.input[1]][0] == inits[head.input[1]][1] == 24


def test_what_still_freezes(tmp_path: Path) -> None:
    """One group (statistics over every channel: PoolFormer's GroupNorm(1, C)), and groups
    that do not divide the channels of the view."""
    torch.manual_seed(0)
    one = _export(_Block(groups=1), tmp_path / "one.onnx")
    groups = analyze(one).groups
    assert sorted(g.size for g in groups if g.prunable) == [32]  # the inner conv
    stem, = [g for g in groups if g.size == 32 and not g.prunable]
    assert "its statistics change when channels go" in " ".join(stem.frozen)
    # a view [1, 6, 4, 4] -> [1, 4, 24]: the 6 channels do not fall into 4 rows
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 4, 4])
    rng = np.random.default_rng(0)

    def init(name: str, value: np.ndarray) -> onnx.TensorProto:
        return numpy_helper.from_array(np.asarray(value), name)

    inits = [init("w1", rng.standard_normal((6, 3, 1, 1)).astype(np.float32)),
             init("rows", np.array([1, 4, 24], np.int64)),
             init("s", np.ones(4, np.float32)), init("b", np.zeros(4, np.float32)),
             init("back", np.array([1, 6, 4, 4], np.int64)),
             init("w2", rng.standard_normal((5, 6, 1, 1)).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], name="c1"),
             helper.make_node("Reshape", ["c", "rows"], ["v"], name="view"),
             helper.make_node("InstanceNormalization", ["v", "s", "b"], ["n"], name="norm"),
             helper.make_node("Reshape", ["n", "back"], ["r"], name="restore"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="c2")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    six, = [g for g in analyze(model).groups if g.size == 6]
    assert not six.prunable


@pytest.mark.parametrize("residual", [False, True])
def test_the_group_normalization_op_prunes_whole_groups(tmp_path: Path, residual: bool) -> None:
    """PyTorch's dynamo exporter at opset 21 writes ``GroupNormalization`` (scale and bias per
    channel): its channels go a group at a time and ``num_groups`` follows."""
    torch.manual_seed(0)
    src = tmp_path / "gn21.onnx"
    torch.onnx.export(_Block(residual=residual).eval(), (torch.randn(1, 3, 8, 8),), str(src),
                      dynamo=True, opset_version=21)
    assert "GroupNormalization" in {n.op_type for n in onnx.load(str(src)).graph.node}
    assert [g.size for g in analyze(src).groups if g.prunable] == ([8] if residual else [8, 32])
    pruned = prune_checked(src, tmp_path, ratio=0.25, round_to=1)
    written = onnx.load(str(pruned.path))
    norm, = [n for n in written.graph.node if n.op_type == "GroupNormalization"]
    assert {a.name: helper.get_attribute_value(a) for a in norm.attribute}["num_groups"] == 6
    inits = {i.name: numpy_helper.to_array(i).shape for i in written.graph.initializer}
    assert inits[norm.input[1]] == inits[norm.input[2]] == (24,)

