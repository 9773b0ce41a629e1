"""Decoders as 🤗 Optimum exports them, from files the exporter wrote.

``tests/models/optimum_falcon.onnx``: a random-weight Falcon-7B-style decoder (one layer,
hidden 32, 4 query heads of 8 sharing one key/value head, MLP 64, vocabulary 40), exported by
``optimum-cli export onnx --task text-generation-with-past`` (optimum-onnx 0.1.0, transformers
4.57, torch 2.13; tests/models/README.md). Optimum needs a transformers older than the one this
project tests with, so the file is kept rather than made here.

Its attention reads the fused projection ``[batch, sequence, 6, 8]`` three ways: the query
heads ``Slice(0, -2)``, the key head ``Gather([-2])``, the value head ``Gather([-1])``. Its
rotary embedding is built from ``position_ids`` and its causal mask is cut to the keys' length
at run time, which leaves ONNX inference unsure of the batch of the attention scores. Before,
the query heads froze; now they prune under the oracle at batch 2, the Gathers' indices are
renumbered, and the one key/value head and the caches keep their shapes.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from oracle import prune_checked

from spa.api import analyze
from spa.coupling import GroupKind

FALCON = Path(__file__).parent / "models" / "optimum_falcon.onnx"
QUERY_HEADS, HEAD_SIZE = 4, 8


def test_optimum_falcon_prunes_its_query_heads(tmp_path):
    a = analyze(FALCON)
    fused = [g for g in a.groups if any(m.space == ("onnx::MatMul_475", 1) for m in g.members)]
    assert sorted((g.kind, g.size, g.prunable) for g in fused) == sorted(
        [(GroupKind.HEADS, QUERY_HEADS, True), (GroupKind.HEADS, 1, False),
         (GroupKind.HEADS, 1, False)])  # the query heads; the key head; the value head
    out = prune_checked(FALCON, tmp_path, heads_ratio=0.5, mlp_ratio=0.5,
                        dims={"batch_size": 2, "sequence_length": 3, "past_sequence_length": 4,
                              "past_sequence_length + sequence_length": 7})
    assert out.report.masked_relative_diff < 1e-6
    assert out.report.signature_changes == []  # the one key/value head stays
    pruned = onnx.load(str(out.path))
    weights = {t.name: t for t in pruned.graph.initializer}
    # Two query heads of 8 columns each, then the key and the value head.
    assert list(weights["onnx::MatMul_475"].dims) == [32, (2 + 2) * HEAD_SIZE]
    picks = sorted(onnx.numpy_helper.to_array(weights[n.input[1]]).tolist()
                   for n in pruned.graph.node
                   if n.op_type == "Gather" and n.input[1] in weights
                   and n.name.endswith(("self_attention/Gather_2", "self_attention/Gather_3")))
    assert picks == [[2], [3]]
