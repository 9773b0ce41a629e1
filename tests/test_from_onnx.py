"""``spa.torch.from_onnx``: a pruned ONNX model as a trainable module.

Every reference model, exported by both exporters and pruned by ``spa prune``: the interpreted
module computes what onnxruntime computes, its float constants are parameters that gradients
reach, and a few optimizer steps lower a loss. Unsupported ops are listed up front.
"""

from __future__ import annotations

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
    stats = {n.input[i] for n in graph.node if n.op_type == "BatchNormalization" for i in (3, 4)}
    arrays = [onnx.numpy_helper.to_array(i) for i in graph.initializer if i.name not in stats]
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
             helper.make_node("Det", ["a"], ["b"]),
             helper.make_node("Custom", ["b"], ["y"], domain="my.ops")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17),
                                             helper.make_opsetid("my.ops", 1)])
    with pytest.raises(st.UnsupportedOpsError, match=r"Custom \(1×\), Det \(1×\)"):
        st.from_onnx(model)
