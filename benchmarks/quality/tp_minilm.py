"""Torch-Pruning on all-MiniLM-L6-v2: whole heads and MLP neurons, the hidden size kept.

Set up as Torch-Pruning's ``examples/transformers`` prunes Hugging Face BERT: ``num_heads`` for
each self-attention's query/key/value Linears with ``prune_num_heads=True``
(``head_pruning_ratio`` = the heads ratio), ``MagnitudeImportance(p=1)``, and, to keep the
residual stream as SPA does, the hidden size's producers ignored (the attention output and MLP
output Linears, the embeddings). Transformers' ``BertSelfAttention`` reshapes with
``(-1, head_size)``, so only ``num_attention_heads``/``all_head_size`` need resetting afterwards.
The pruned encoder is exported like the dense one (:func:`.real.export_minilm`'s exporter).
"""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks.quality.real import build_sentence_encoder, export_minilm
from benchmarks.tp_peer import TPRecipe, make_pruner


def prune_minilm(ratio: float, out: Path, dynamo: bool = True) -> Path:
    """Prune ``ratio`` of the heads and of the MLP neurons of every layer; export to ``out``."""
    model = build_sentence_encoder()
    layers = list(model.bert.encoder.layer)
    attention = [layer.attention.self for layer in layers]
    heads = {lin: a.num_attention_heads for a in attention for lin in (a.query, a.key, a.value)}
    hidden = [m for layer in layers for m in (layer.attention.output.dense, layer.output.dense)]
    ignored = [*hidden, model.bert.embeddings]
    if getattr(model.bert, "pooler", None) is not None:
        ignored.append(model.bert.pooler)
    ids = torch.randint(1000, 2000, (1, 16))
    example = (ids, torch.ones_like(ids), torch.zeros_like(ids))
    pruner = make_pruner(model, example, ratio,
                         TPRecipe(ignored=ignored, num_heads=heads, prune_num_heads=True))
    pruner.step()
    for a in attention:
        a.num_attention_heads = pruner.num_heads.get(a.query, a.num_attention_heads)
        a.all_head_size = a.query.out_features
    return export_minilm(out, dynamo, model=model.eval())
