"""A BERT after onnxruntime's transformer optimiser prunes under the numeric oracle.

all-MiniLM-L6-v2's shape with two layers and random weights (HuggingFace ``BertModel``),
exported by PyTorch's TorchScript exporter at opset 17, then
``optimize_model(model_type="bert")``. With eager attention the optimiser fuses
``EmbedLayerNormalization``, ``Attention``, ``SkipLayerNormalization`` and ``BiasGelu``; with
SDPA attention (transformers' default) only the last two. The eager graph is also quantised
to int4 by onnxruntime, as ``MatMulNBits`` and in QDQ form (blocked ``DequantizeLinear``): heads
and MLP still prune, in whole blocks. Before the
contrib op rules, SPA pruned nothing in any of them (no prunable group: exit 4).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from models.thirdparty import bert_onnx  # noqa: E402
from spa.api import analyze  # noqa: E402
from spa.coupling import GroupKind  # noqa: E402
from spa.passes.blocks import find_blocks  # noqa: E402
from tests.oracle import prune_checked, runs_as_onnxruntime  # noqa: E402

HIDDEN, HEADS, LAYERS = 384, 12, 2


def _optimised(attention: str, d: Path, *, biases: bool = False) -> Path:
    from onnxruntime.transformers.optimizer import optimize_model

    bert_onnx(d / "bert.onnx", attention=attention, hidden_size=HIDDEN,
              num_hidden_layers=LAYERS, num_attention_heads=HEADS,
              intermediate_size=4 * HIDDEN, biases=biases)
    optimised = optimize_model(str(d / "bert.onnx"), model_type="bert", num_heads=HEADS,
                               hidden_size=HIDDEN)
    optimised.save_model_to_file(str(d / "opt.onnx"))
    return d / "opt.onnx"


def _int4(path: Path, qdq: bool = False) -> Path:
    """``path`` with its MatMuls quantised to 4 bits by onnxruntime (``MatMulNBits``, blocks
    of 32: one head, or 32 MLP neurons, a block); ``qdq``: the same in QDQ form (a blocked
    uint4 ``DequantizeLinear`` before each MatMul, opset 21)."""
    import onnx
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    config = DefaultWeightOnlyQuantConfig(
        block_size=32, is_symmetric=False,
        quant_format=QuantFormat.QDQ if qdq else QuantFormat.QOperator)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(path)), block_size=32, is_symmetric=False,
                                     algo_config=config)
    quantizer.process()
    out = path.with_name("int4.onnx")
    quantizer.model.save_model_to_file(str(out))
    return out


FUSED = {"eager": {"EmbedLayerNormalization": 1, "Attention": LAYERS,
                   "SkipLayerNormalization": 2 * LAYERS, "BiasGelu": LAYERS},
         "sdpa": {"SkipLayerNormalization": 2 * LAYERS, "BiasGelu": LAYERS}}
# int4: the dense layers after the attention (output, MLP up and down) become MatMulNBits.
FUSED["eager-int4"] = {**FUSED["eager"], "MatMulNBits": 3 * LAYERS}
# Prunable groups (heads, MLP neurons) per attention form: the residual stream stays frozen by
# the norms. SDPA's heads merge by the hidden state's leading dims, which ONNX inference loses
# (``[?, ?, ?]``); the output projection's weight fixes the merged dim (spa/ir/load.py).
PRUNABLE = {"eager": {GroupKind.HEADS: LAYERS, GroupKind.NEURONS: LAYERS},
            "sdpa": {GroupKind.HEADS: LAYERS, GroupKind.NEURONS: LAYERS}}
# int4 in QDQ form: the MatMuls stay, each after a blocked DequantizeLinear.
FUSED["eager-int4-qdq"] = FUSED["eager"]
PRUNABLE["eager-int4"] = PRUNABLE["eager-int4-qdq"] = PRUNABLE["eager"]


@pytest.mark.parametrize("attention", ["eager", "sdpa", "eager-int4", "eager-int4-qdq"])
def test_optimised_bert_prunes_heads_and_mlp_under_the_oracle(tmp_path, attention):
    import onnx

    path = _optimised(attention.split("-")[0], tmp_path)
    if "-int4" in attention:
        path = _int4(path, qdq=attention.endswith("-qdq"))
    nodes = onnx.load(str(path)).graph.node
    ops = Counter(n.op_type for n in nodes if n.domain == "com.microsoft")
    assert ops == Counter(FUSED[attention])
    blocked = [n for n in nodes if n.op_type == "DequantizeLinear"
               and any(a.name == "block_size" and a.i == 32 for a in n.attribute)]
    assert len(blocked) == (3 * LAYERS if attention.endswith("-qdq") else 0)
    prunable = Counter(g.kind for g in analyze(path).prunable_groups)
    assert prunable == Counter(PRUNABLE[attention])
    out = prune_checked(path, tmp_path, ratio=0.3, mlp_ratio=0.3)
    pruned = [g for g in out.plan.groups if len(g.keep) < g.size]
    assert len(pruned) == sum(PRUNABLE[attention].values())
    assert out.report.flops_after < out.report.flops_before


def test_optimised_bert_drops_post_norm_blocks_under_the_oracle(tmp_path):
    """Post-norm layers (``SkipLayerNormalization(branch, stream, …, bias)`` after the attention
    and after the MLP) are four candidate blocks; dropping one leaves the plain norm of the
    stream, which the masked original (the branch's weight and bias zeroed) computes too."""
    import onnx

    path = _optimised("eager", tmp_path, biases=True)
    blocks = find_blocks(analyze(path).model.graph)
    assert len(blocks.candidates) == 2 * LAYERS and not blocks.refused
    for drop, width in ((1, {}), (2, {"heads_ratio": 0.5, "mlp_ratio": 0.5})):
        out = prune_checked(path, tmp_path, name=f"drop{drop}.onnx", ratio=0, drop_blocks=drop,
                            **width)
        assert len(out.plan.dropped) == drop
        norms = Counter(n.op_type for n in onnx.load(str(out.path)).graph.node
                        if n.op_type.endswith("LayerNormalization"))
        assert norms == Counter({"SkipLayerNormalization": 2 * LAYERS - drop,
                                 "LayerNormalization": drop, "EmbedLayerNormalization": 1})


def test_optimised_bert_with_shared_zero_biases_has_no_blocks(tmp_path):
    """HuggingFace's zero biases are one tensor in the export (the exporter stores equal
    constants once), so each fused norm's bias is shared: it cannot go with one branch."""
    blocks = find_blocks(analyze(_optimised("eager", tmp_path)).model.graph)
    assert not blocks.candidates
    assert all("is computed or shared" in why for why in blocks.refused.values())


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_from_onnx_runs_the_pruned_optimised_bert(tmp_path, attention):
    """spa recover trains such a model: ``from_onnx`` runs its contrib ops
    (EmbedLayerNormalization with its mask index, Attention, SkipLayerNormalization,
    BiasGelu) as onnxruntime does, on padded samples, dense and pruned."""
    import numpy as np
    import onnxruntime as ort

    path = _optimised(attention, tmp_path)
    out = prune_checked(path, tmp_path, ratio=0.3, mlp_ratio=0.3)
    rng = np.random.default_rng(0)
    for model in (path, out.path):
        feeds = {}
        for i in ort.InferenceSession(str(model)).get_inputs():
            dtype = np.int32 if "int32" in i.type else np.int64
            feeds[i.name] = rng.integers(1, 100, (2, 9)).astype(dtype)
        mask = next(n for n in feeds if "mask" in n)
        feeds[mask][:] = 1
        feeds[mask][1, 6:] = 0
        runs_as_onnxruntime(model, feeds)
