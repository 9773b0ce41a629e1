"""``spa.torch.from_onnx`` runs ONNX's LSTM, GRU and RNN as onnxruntime does, and trains them.

One node at a time against onnxruntime, over the spec's options (directions, layouts, sequence
lengths, initial states, peepholes, ``input_forget``, ``linear_before_reset``, ``clip``,
activations with parameters); then a pruned PyTorch LSTM/GRU tagger as a whole. Before
spa/torch/recurrent.py, from_onnx refused every model with one of these nodes (timm's
Sequencer2D: ``LSTM (36×)``), so ``spa recover`` could not train them.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
from onnx import TensorProto, helper

torch = pytest.importorskip("torch")

import spa.torch as st  # noqa: E402
from spa import validate as val  # noqa: E402

SEQ, BATCH, INPUT, HIDDEN = 5, 3, 4, 6


def _node_model(op: str, *, direction: str = "forward", layout: int = 0, bias: bool = True,
                lens: bool = False, initial: bool = False, peepholes: bool = False,
                **attrs) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """One recurrent node: X (and sequence_lens) as inputs, the rest as initializers."""
    rng = np.random.default_rng(0)
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    dirs = 2 if direction == "bidirectional" else 1
    f32 = np.float32
    x = rng.standard_normal((SEQ, BATCH, INPUT)).astype(f32)
    x = x.transpose(1, 0, 2).copy() if layout else x
    consts = {"W": rng.standard_normal((dirs, gates * HIDDEN, INPUT)).astype(f32) * 0.5,
              "R": rng.standard_normal((dirs, gates * HIDDEN, HIDDEN)).astype(f32) * 0.5}
    names = ["X", "W", "R", "", "", "", "", ""]
    if bias:
        consts["B"] = rng.standard_normal((dirs, 2 * gates * HIDDEN)).astype(f32) * 0.5
        names[3] = "B"
    feeds = {"X": x}
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(x.shape))]
    if lens:
        feeds["L"] = np.array([SEQ, 2, 4][:BATCH], np.int32)
        inputs.append(helper.make_tensor_value_info("L", TensorProto.INT32, [BATCH]))
        names[4] = "L"
    if initial:
        def state() -> np.ndarray:  # drawn sequence-first: the same values in both layouts
            s = rng.standard_normal((dirs, BATCH, HIDDEN)).astype(f32)
            return s.transpose(1, 0, 2).copy() if layout else s
        consts["H0"] = state()
        names[5] = "H0"
        if op == "LSTM":
            consts["C0"] = state()
            names[6] = "C0"
    if peepholes:
        consts["P"] = rng.standard_normal((dirs, 3 * HIDDEN)).astype(f32) * 0.5
        names[7] = "P"
    while names and not names[-1]:
        names.pop()
    outs = ["Y", "Y_h", "Y_c"] if op == "LSTM" else ["Y", "Y_h"]
    node = helper.make_node(op, names, outs, hidden_size=HIDDEN, direction=direction,
                            layout=layout, **attrs)
    graph = helper.make_graph(
        [node], "g", inputs, [helper.make_tensor_value_info(o, TensorProto.FLOAT, None)
                              for o in outs],
        [onnx.numpy_helper.from_array(v, k) for k, v in consts.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)]), feeds


CASES = [
    ("LSTM", {}),
    ("LSTM", {"direction": "reverse", "initial": True}),
    ("LSTM", {"direction": "bidirectional", "lens": True, "initial": True}),
    ("LSTM", {"peepholes": True, "initial": True, "direction": "bidirectional"}),
    ("LSTM", {"input_forget": 1, "bias": False}),
    ("LSTM", {"clip": 0.5}),
    ("LSTM", {"activations": ["HardSigmoid", "Tanh", "Softsign"], "activation_alpha": [0.3],
              "activation_beta": [0.4]}),
    ("GRU", {}),
    ("GRU", {"linear_before_reset": 1, "direction": "bidirectional", "lens": True}),
    ("GRU", {"linear_before_reset": 0, "direction": "reverse", "initial": True, "lens": True}),
    ("RNN", {}),
    ("RNN", {"activations": ["Relu", "Tanh"], "direction": "bidirectional", "lens": True}),
    ("RNN", {"activations": ["LeakyRelu"], "activation_alpha": [0.2], "initial": True}),
]


@pytest.mark.parametrize("op,options", CASES, ids=[f"{o}-{i}" for i, (o, _) in enumerate(CASES)])
def test_recurrent_node_matches_onnxruntime_and_trains(op, options):
    model, feeds = _node_model(op, **options)
    expected = val.run(val.session(model), feeds)
    module = st.from_onnx(model)
    got = module(*[torch.from_numpy(v) for v in feeds.values()])
    for name, value in zip(module.output_names, got):
        assert value.shape == expected[name].shape, name
        np.testing.assert_allclose(value.detach().numpy(), expected[name], rtol=1e-5, atol=1e-5,
                                   err_msg=name)
    sum(v.square().sum() for v in got).backward()
    tensors = module.onnx_tensors()
    for name in ("W", "R", "B", "P", "H0"):
        if name in tensors:
            grad = tensors[name].grad
            assert grad is not None and float(grad.abs().sum()) > 0, name


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_batch_first_layout_is_the_sequence_first_one_transposed(op):
    """onnxruntime's CPU kernels refuse ``layout=1``: the batch-first node must give the
    sequence-first node's outputs (which match onnxruntime above), batch axis first."""
    options = {"initial": True, "lens": True, "direction": "bidirectional"}
    first, feeds = _node_model(op, **options)
    batch_first, _ = _node_model(op, layout=1, **options)
    expected = val.run(val.session(first), feeds)
    feeds["X"] = feeds["X"].transpose(1, 0, 2).copy()
    with torch.no_grad():
        got = st.from_onnx(batch_first)(*[torch.from_numpy(v) for v in feeds.values()])
    np.testing.assert_allclose(got[0].numpy(), expected["Y"].transpose(2, 0, 1, 3), rtol=1e-5,
                               atol=1e-5)
    for value, name in zip(got[1:], ["Y_h", "Y_c"]):
        np.testing.assert_allclose(value.numpy(), expected[name].transpose(1, 0, 2), rtol=1e-5,
                                   atol=1e-5)


def test_unknown_recurrent_activation_is_listed_up_front():
    model, _ = _node_model("RNN", activations=["Gelu"])
    with pytest.raises(st.UnsupportedOpsError, match="Gelu is not supported"):
        st.from_onnx(model)
