"""A HuggingFace causal LM exported with its KV cache as plain ONNX ops.

What transformers and optimum write for a decoder without onnxruntime's attention ops: inputs
``input_ids``, ``attention_mask`` and per layer ``past_key_values.<i>.key`` / ``.value``
``[batch, kv_heads, past, head_size]``; outputs ``logits`` and ``present.<i>.key`` / ``.value``
``[batch, kv_heads, past + sequence, head_size]``. Each present is ``Concat(past, k, axis=2)``
(transformers' ``DynamicCache``), attention MatMul/Softmax (``eager``), grouped-query key/value
heads repeated by ``Expand`` + ``Reshape`` (``repeat_kv``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from models.thirdparty import _stub_torchvision, random_biases

if TYPE_CHECKING:
    from pathlib import Path


class CachedLM(nn.Module):
    """``model`` with its cache as flat tensors: ``(input_ids, attention_mask, k0, v0, k1, …)``
    to ``(logits, present k0, present v0, …)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                *pasts: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for layer, k, v in zip(cache.layers, pasts[::2], pasts[1::2], strict=True):
            # the past tensors themselves, not concatenated to an empty start (DynamicCache's
            # own update would write Concat([], past))
            layer.lazy_initialization(k, v)
            layer.keys, layer.values = k, v
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         past_key_values=cache, use_cache=True)
        presents = out.past_key_values.layers
        return (out.logits, *(t for layer in presents for t in (layer.keys, layer.values)))


def decoder_onnx(path: Path, kind: str = "GPT2", *, seq: int = 3, past: int = 2,
                 **config) -> Path:
    """A random-weight ``<kind>LMHeadModel`` / ``<kind>ForCausalLM`` (``<kind>Config(**config)``,
    eager attention) exported by the TorchScript exporter at opset 17, traced on ``seq`` new
    tokens after ``past`` cached ones; batch, sequence and positions dynamic. Biases are random
    (:func:`~models.thirdparty.random_biases`)."""
    _stub_torchvision()
    import transformers

    torch.manual_seed(0)
    cfg = getattr(transformers, f"{kind}Config")(**config)
    cfg._attn_implementation = "eager"
    lm = getattr(transformers, f"{kind}LMHeadModel", None) \
        or getattr(transformers, f"{kind}ForCausalLM")
    model = CachedLM(lm(cfg).eval()).eval()
    random_biases(model)
    layers = cfg.num_hidden_layers
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_size = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    ids = torch.randint(0, cfg.vocab_size, (1, seq))
    mask = torch.ones(1, past + seq, dtype=torch.int64)
    pasts = [torch.randn(1, kv_heads, past, head_size) for _ in range(2 * layers)]
    names = [f"{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    inputs = [f"past_key_values.{n}" for n in names]
    outputs = [f"present.{n}" for n in names]
    dims = {"input_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "total"}}
    dims |= {n: {0: "batch", 2: "past"} for n in inputs}
    dims |= {n: {0: "batch", 2: "total"} for n in outputs}
    torch.onnx.export(model, (ids, mask, *pasts), str(path), opset_version=17, dynamo=False,
                      input_names=["input_ids", "attention_mask", *inputs],
                      output_names=["logits", *outputs], dynamic_axes=dims)
    return path


# Small decoders of each architecture at the same widths (2 layers, hidden 32, 4 heads of 8):
# ``kind → (config, KV heads, whether the heads are the cache's)``. Falcon's one key/value head
# is broadcast to its query heads: its query heads prune, the cache keeps its one head.
LLAMA_WIDTHS = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 4, "vocab_size": 50, "max_position_embeddings": 64}
_WIDTHS = {k: LLAMA_WIDTHS[k] for k in ("hidden_size", "num_hidden_layers",
                                        "num_attention_heads", "vocab_size")}
DECODERS: dict[str, tuple[dict, int, bool]] = {
    "Llama": ({**LLAMA_WIDTHS, "num_key_value_heads": 2}, 2, True),
    "Mistral": ({**LLAMA_WIDTHS, "num_key_value_heads": 2, "sliding_window": None}, 2, True),
    "Qwen2": ({**LLAMA_WIDTHS, "num_key_value_heads": 2}, 2, True),
    "Gemma": ({**LLAMA_WIDTHS, "num_key_value_heads": 2, "head_dim": 8}, 2, True),
    "Phi": ({**LLAMA_WIDTHS}, 4, True),
    "GPTNeoX": ({**LLAMA_WIDTHS}, 4, True),
    "OPT": ({**_WIDTHS, "ffn_dim": 64, "max_position_embeddings": 64,
             "word_embed_proj_dim": 32}, 4, True),
    "Falcon": ({**_WIDTHS, "new_decoder_architecture": False, "multi_query": True}, 4, False),
}
