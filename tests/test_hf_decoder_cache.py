"""A transformers GPT-2 with its KV cache as plain ONNX ops prunes heads, MLP and the cache.

:func:`models.hf_decoder.decoder_onnx` exports a random-weight two-layer ``GPT2LMHeadModel``
(hidden 32, 4 heads of 8, MLP 128, vocabulary 50) as transformers' ``DynamicCache`` writes it:
``present.<i>.key = Concat(past_key_values.<i>.key, k, axis=2)``, a graph output. Each Concat
pairs its past and present on the head axis (spa/coupling/rules/slicing.py), so a layer's heads
prune with its four cache tensors; the oracle holds on random inputs, and 32 greedy tokens of
the pruned decoder (each step's presents fed back as pasts) equal the masked original's.

A Llama of the same size does not prune its heads yet: its attention output is viewed by the
hidden state's shape, ``reshape(*hidden.shape[:-1], -1)``, and ONNX shape inference loses the
batch and sequence names through rotary embedding and the mask, so which dims the ``-1``
merges cannot be told. With grouped-query heads (``repeat_kv``'s Expand is followed) the query
heads stop there too, and the key's reshape keeps its head_dim factor, which the scores
contract. Both keep their caches' shapes (fail closed) and prune their MLP.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from models.hf_decoder import decoder_onnx  # noqa: E402
from spa.api import analyze  # noqa: E402
from spa.coupling import GroupKind  # noqa: E402
from tests.oracle import prune_checked  # noqa: E402

LAYERS, HEADS, HIDDEN, VOCAB = 2, 4, 32, 50
NAMES = [f"{i}.{kv}" for i in range(LAYERS) for kv in ("key", "value")]
LLAMA = {"hidden_size": HIDDEN, "intermediate_size": 64, "num_hidden_layers": LAYERS,
         "num_attention_heads": HEADS, "vocab_size": VOCAB, "max_position_embeddings": 64}


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> Path:
    return decoder_onnx(tmp_path_factory.mktemp("gpt2") / "gpt2.onnx", "GPT2", n_embd=HIDDEN,
                        n_layer=LAYERS, n_head=HEADS, vocab_size=VOCAB, n_positions=64)


def _shapes(path: Path) -> dict[str, list[int | str]]:
    graph = onnx.load(str(path)).graph
    return {vi.name: [d.dim_value or d.dim_param for d in vi.type.tensor_type.shape.dim]
            for vi in (*graph.input, *graph.output)}


def test_gpt2_cache_pairs_and_groups(gpt2):
    a = analyze(gpt2)
    assert [(c.past[0], c.present[0], c.head_size) for c in a.kv_cache] == \
        [(f"past_key_values.{n}", f"present.{n}", HIDDEN // HEADS) for n in NAMES]
    prunable = sorted((g.kind.value, g.size) for g in a.prunable_groups)
    assert prunable == [("heads", HEADS)] * LAYERS + [("neurons", 4 * HIDDEN)] * LAYERS


def test_gpt2_prunes_heads_mlp_and_the_cache(tmp_path, gpt2):
    out = prune_checked(gpt2, tmp_path, heads_ratio=0.5, mlp_ratio=0.5)
    report = out.report
    assert (report.params_before, report.params_after) == (30606, 18222)
    assert report.masked_relative_diff < 1e-6
    assert report.signature_changes == [
        f"graph {side} '{name}.{n}' axis 1: {HEADS} -> {HEADS // 2}"
        for side, name in (("input", "past_key_values"), ("output", "present")) for n in NAMES]
    assert report.generation == {"tokens": 32, "equal": True}
    shapes = _shapes(out.path)
    for n in NAMES:
        assert shapes[f"past_key_values.{n}"] == ["batch", HEADS // 2, "past", HIDDEN // HEADS]
        assert shapes[f"present.{n}"][:2] == ["batch", HEADS // 2]
    assert shapes["logits"] == ["batch", "sequence", VOCAB]


@pytest.mark.parametrize("kv_heads", [HEADS, 2], ids=["mha", "gqa"])
def test_llama_heads_and_cache_stay_frozen(tmp_path, kv_heads):
    path = decoder_onnx(tmp_path / "llama.onnx", "Llama", num_key_value_heads=kv_heads, **LLAMA)
    a = analyze(path)
    assert len(a.kv_cache) == 2 * LAYERS  # declared by the Concats, but ...
    heads = [g for g in a.groups if g.kind is GroupKind.HEADS]
    assert heads and not any(g.prunable for g in heads)  # ... the heads do not reach them
    why = "cannot tell which dims" if kv_heads == HEADS else \
        "summed over in a product of two activations"
    assert all(any(why in r for r in g.frozen) for g in heads)
    out = prune_checked(path, tmp_path, heads_ratio=0.5, mlp_ratio=0.5)
    assert out.report.signature_changes == [] and out.report.generation == {}  # the MLP only
