"""An attention bias several layers share: each layer's heads go alone (spa/ir/load.py
``_select_shared_head_biases``, the Gather rule's ``_selects``, passes/rewrite.py).

T5 computes its relative position bias once (in its first layer, the mask added) and every
layer adds that tensor to its scores; MPNet expands one bias for all of its layers. The loader
gives each reader a ``Gather`` of all heads, so a layer's heads are its own group; the bias
stays whole, and the written model keeps a Gather only where a layer lost heads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from models.export import export_module  # noqa: E402
from models.thirdparty import HF_MODELS  # noqa: E402
from spa.api import analyze  # noqa: E402
from spa.coupling import GroupKind  # noqa: E402
from spa.ir.load import SELECT  # noqa: E402
from tests.oracle import prune_checked  # noqa: E402


@pytest.fixture(scope="module", params=["torchscript", "dynamo"])
def t5(tmp_path_factory, request) -> Path:
    """The T5 encoder; exported by dynamo (static sizes) its bias is folded into a constant
    both layers add to their scores."""
    module, inputs = HF_MODELS["hf_t5_encoder"]()
    return export_module(module, inputs, tmp_path_factory.mktemp("t5") / "t5.onnx",
                         exporter=request.param)


def _selects(path: Path) -> dict[str, list[int]]:
    m = onnx.load(str(path))
    values = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    return {n.name: values[n.input[1]].tolist() for n in m.graph.node if n.name.endswith(SELECT)}


def test_each_layer_has_its_own_heads(t5: Path) -> None:
    heads = [g for g in analyze(t5).prunable_groups if g.kind is GroupKind.HEADS]
    assert len(heads) == 2  # one per layer; before, one group spanned both
    assert all(g.size == 4 for g in heads)


def test_layers_lose_their_own_heads_under_the_oracle(t5: Path, tmp_path: Path) -> None:
    done = prune_checked(t5, tmp_path, heads_ratio=0.5, mlp_ratio=0.0, criterion="random",
                         seed=3)
    kept = [gp.keep for gp in done.plan.groups if gp.size == 4]
    assert len(kept) == 2 and all(len(k) == 2 for k in kept)
    selects = _selects(done.path)
    assert sorted(map(tuple, selects.values())) == sorted(kept)  # each layer reads its heads
    assert len(set(kept)) == 2  # this seed keeps other heads in each layer


def test_a_model_that_keeps_its_heads_reads_the_bias_as_before(t5: Path, tmp_path: Path
                                                              ) -> None:
    done = prune_checked(t5, tmp_path, heads_ratio=0.0, mlp_ratio=0.5)
    assert _selects(done.path) == {}
    ops = [n.op_type for n in onnx.load(str(done.path)).graph.node]
    assert ops.count("Gather") == [n.op_type for n in onnx.load(str(t5)).graph.node
                                   ].count("Gather")
    assert np.isclose(done.report.masked_relative_diff or 0.0, 0.0, atol=1e-5)


def test_a_constant_two_convolutions_add_is_no_attention_bias(tmp_path: Path) -> None:
    """A constant 4-D tensor two layers add is given views only when they add it to attention
    scores (a MatMul's output): two Conv outputs keep reading it directly."""
    from onnx import TensorProto, helper

    from spa.ir.load import load_model

    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 2, 2])
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w1", (4, 4, 1, 1)), ("w2", (4, 4, 1, 1)), ("bias", (1, 4, 2, 2)))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
             helper.make_node("Add", ["c1", "bias"], ["a1"], name="add1"),
             helper.make_node("Conv", ["a1", "w2"], ["c2"], name="conv2"),
             helper.make_node("Add", ["c2", "bias"], ["y"], name="add2")]
    path = tmp_path / "convs.onnx"
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                                opset_imports=[helper.make_opsetid("", 17)]), str(path))
    graph = load_model(str(path)).graph
    assert [n.name for n in graph.nodes if n.name.endswith(SELECT)] == []
