"""``spa.torch.from_onnx`` runs each op as of the model's opset (the registry's opset ranges).

Softmax, LogSoftmax and Hardmax changed meaning at opset 13: before, the input is flattened to
2-D at ``axis`` (default 1) and each row is normalised, i.e. jointly over ``axis..-1``; from 13
on, along ``axis`` alone (default -1). Each is checked against onnxruntime on a tiny graph at
opsets 11 and 13, with the default axis and explicit ones.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

torch = pytest.importorskip("torch")

from graphs import IR_VERSION  # noqa: E402

import spa.torch as st  # noqa: E402
from spa import validate as val  # noqa: E402

OPS = ["Softmax", "LogSoftmax", "Hardmax"]
SHAPE = [2, 3, 4, 5]


def _model(op: str, opset: int, axis: int | None):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, SHAPE)
    attrs = {} if axis is None else {"axis": axis}
    node = helper.make_node(op, ["x"], ["y"], **attrs)
    return helper.make_model(helper.make_graph([node], "g", [x], [y]), ir_version=IR_VERSION,
                             opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize("axis", [None, 0, 1, 2, -1])
def test_softmax_family_matches_onnxruntime(op, opset, axis):
    model = _model(op, opset, axis)
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    expected = val.run(val.session(model.SerializeToString()), {"x": x})["y"]
    with torch.no_grad():
        got = st.from_onnx(model)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_the_two_opsets_differ_where_the_semantics_do():
    """The default axis at opset 11 (rows of the input flattened at axis 1) and at 13 (the last
    axis alone) give different results: the check above would catch a one-size-fits-all op."""
    x = torch.from_numpy(np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32))
    with torch.no_grad():
        old, new = (st.from_onnx(_model("Softmax", v, None))(x) for v in (11, 13))
    assert torch.allclose(old.sum(dim=(1, 2, 3)), torch.ones(2), atol=1e-5)
    assert torch.allclose(new.sum(dim=-1), torch.ones(2, 3, 4), atol=1e-5)
    assert not torch.allclose(old, new)
