"""An int8 BERT whose weights are dequantised by plain ops prunes heads and MLP, and stays int8.

A two-layer HuggingFace ``BertModel`` (hidden 128, 2 heads, random weights, eager attention),
exported by PyTorch's TorchScript exporter at opset 17; then every 2-D MatMul weight ``w [K, N]``
becomes what shipped int8 encoders hold: ``q = round(w / s)`` in int8 with one scale per output
column, dequantised in the graph by ``Cast → Mul(s [1, N])`` (:func:`int8_chains`). Before
spa/ir/quant_chain.py those weights were run-time values: nothing in them pruned. Now the same
groups prune as in the float model, under the numeric oracle.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import ml_dtypes  # noqa: E402
import onnx  # noqa: E402

from benchmarks.quality.int8_chain_minilm import int8_chains  # noqa: E402
from models.thirdparty import bert_onnx  # noqa: E402
from spa.api import analyze  # noqa: E402
from spa.coupling import GroupKind  # noqa: E402
from spa.ir.packed import own_dtype  # noqa: E402
from tests.graphs import init_value  # noqa: E402
from tests.oracle import prune_checked  # noqa: E402

HIDDEN, HEADS, LAYERS = 128, 2, 2


def _bert(d: Path) -> Path:
    return bert_onnx(d / "bert.onnx", attention="eager", hidden_size=HIDDEN,
                     num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                     intermediate_size=4 * HIDDEN)


def test_int8_chain_bert_prunes_what_its_float_twin_prunes(tmp_path):
    float_path = _bert(tmp_path)
    model = int8_chains(onnx.load(str(float_path)))
    onnx.checker.check_model(model, full_check=True)
    chains = [n for n in model.graph.node if n.op_type == "Cast" and n.name.endswith(".cast")]
    assert len(chains) == 6 * LAYERS  # Q, K, V, attention output, MLP up and down
    path = tmp_path / "int8.onnx"
    onnx.save(model, str(path))
    kinds = [g.kind for g in analyze(path).prunable_groups]
    assert sorted(kinds, key=str) == sorted((g.kind for g in analyze(float_path).prunable_groups),
                                            key=str)
    assert kinds.count(GroupKind.NEURONS) == LAYERS
    out = prune_checked(path, tmp_path, mlp_ratio=0.3)
    pruned = [g for g in out.plan.groups if len(g.keep) < g.size]
    assert len(pruned) == LAYERS and all(len(g.keep) < 4 * HIDDEN for g in pruned)
    assert out.report.params_after < out.report.params_before
    ints = [n.input[0] for n in onnx.load(str(out.path)).graph.node if n.op_type == "Cast"
            and n.name.endswith(".cast")]
    assert len(ints) == 6 * LAYERS
    assert all(init_value(out.path, name).dtype == np.int8 for name in ints)


@pytest.mark.skipif(not own_dtype(onnx.TensorProto.INT4), reason="this onnx reads int4 as int8")
def test_int4_chain_bert_prunes_and_stays_int4(tmp_path):
    """The same BERT at opset 21 with int4 weights (scales ``max|w| / 7``): its MLP groups prune
    as the float model's do (512 → 359 at 0.3), under the oracle (measured 3e-7), and its 12
    weights stay int4, packed: 157,440 bytes for 314,880 values."""
    path = tmp_path / "int4.onnx"
    model = int8_chains(onnx.load(str(_bert(tmp_path))), ml_dtypes.int4)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    out = prune_checked(path, tmp_path, mlp_ratio=0.3)
    assert [len(g.keep) for g in out.plan.groups if len(g.keep) < g.size] == [359] * LAYERS
    written = onnx.load(str(out.path)).graph
    ints = {n.input[0] for n in written.node if n.op_type == "Cast" and n.name.endswith(".cast")}
    weights = [t for t in written.initializer if t.name in ints]
    assert len(weights) == 6 * LAYERS
    assert all(t.data_type == onnx.TensorProto.INT4 for t in weights)
    values = sum(int(np.prod(t.dims)) for t in weights)
    assert sum(len(t.raw_data) for t in weights) == values // 2 == 157440
