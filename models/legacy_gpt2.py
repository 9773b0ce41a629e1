"""A GPT-2 exported in the graph form onnxruntime's transformer optimiser fuses.

onnxruntime's GPT-2 attention fusion (``FusionGptAttentionNoPast``) matches the attention
that transformers 4.x traced to: the causal mask sliced from a ``bias`` buffer by the scores'
sizes, ``Where`` instead of an added mask, ``Conv1D`` as ``addmm`` (``Gemm``), and a graph with
one input (``input_ids``). transformers 5 builds its masks otherwise and the fusion no longer
matches, so this module runs a random-weight HuggingFace ``GPT2Model``'s own layers (embeddings,
``c_attn``, ``c_proj``, MLP, norms) through that older attention. It returns the last hidden
state; no KV cache.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from models.thirdparty import _stub_torchvision, random_biases


class LegacyGPT2(nn.Module):
    """``model``'s layers, attention as transformers 4.x wrote it (``GPT2Attention._attn``)."""

    def __init__(self, model: nn.Module, n_positions: int):
        super().__init__()
        self.model = model
        self.heads = model.config.n_head
        causal = torch.tril(torch.ones(n_positions, n_positions, dtype=torch.bool))
        self.register_buffer("bias", causal.view(1, 1, n_positions, n_positions))

    def _split(self, x: torch.Tensor, key: bool = False) -> torch.Tensor:
        x = x.view(*x.size()[:-1], self.heads, x.size(-1) // self.heads)
        return x.permute(0, 2, 3, 1) if key else x.permute(0, 2, 1, 3)

    def _attention(self, block: nn.Module, x: torch.Tensor, past: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        q, k, v = block.attn.c_attn(x).split(x.size(-1), dim=2)
        q, k, v = self._split(q), self._split(k, key=True), self._split(v)
        present = None
        if past is not None:  # [2, B, N, P, d]: keys and values of the positions before
            k = torch.cat((past[0].transpose(-2, -1), k), dim=-1)
            v = torch.cat((past[1], v), dim=-2)
            present = torch.stack((k.transpose(-2, -1), v))
        w = torch.matmul(q, k) / (float(v.size(-1)) ** 0.5)
        nd, ns = w.size(-2), w.size(-1)
        w = torch.where(self.bias[:, :, ns - nd:ns, :ns], w, torch.tensor(-1e4))
        a = torch.matmul(nn.functional.softmax(w, dim=-1), v).permute(0, 2, 1, 3).contiguous()
        return block.attn.c_proj(a.view(*a.size()[:-2], a.size(-2) * a.size(-1))), present

    def forward(self, ids: torch.Tensor, *pasts: torch.Tensor
                ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        start = pasts[0].size(-2) if pasts else 0
        positions = torch.arange(start, ids.size(-1) + start, dtype=torch.long).unsqueeze(0)
        h = self.model.wte(ids) + self.model.wpe(positions)
        presents = []
        for i, block in enumerate(self.model.h):
            a, present = self._attention(block, block.ln_1(h), pasts[i] if pasts else None)
            h = h + a
            h = h + block.mlp(block.ln_2(h))
            presents.append(present)
        return (self.model.ln_f(h), *presents) if pasts else self.model.ln_f(h)


def gpt2_onnx(path: Path, *, seq: int = 16, vocab_size: int = 1000, n_positions: int = 64,
              past: bool = False, **config) -> Path:
    """A random-weight ``GPT2Model`` (``GPT2Config(vocab_size=…, **config)``) in the legacy
    form above, exported by the TorchScript exporter at opset 17 with input ``input_ids``
    (batch and sequence dynamic), traced on one sequence of ``seq`` tokens. Biases are random
    (:func:`~models.thirdparty.random_biases`). ``past``: with a KV cache, as onnxruntime's
    GPT-2 tools export it: inputs ``past_<i>`` ``[2, B, N, P, d]`` and outputs ``present_<i>``
    ``[2, B, N, P + S, d]`` (keys and values of layer ``i``)."""
    _stub_torchvision()
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=vocab_size, n_positions=n_positions, **config)
    model = LegacyGPT2(transformers.GPT2Model(cfg).eval(), n_positions).eval()
    random_biases(model)
    ids = torch.randint(0, vocab_size, (1, seq))
    dims = {"input_ids": {0: "batch", 1: "sequence"}, "hidden": {0: "batch", 1: "sequence"}}
    layers, heads = cfg.n_layer, cfg.n_head
    pasts = [torch.randn(2, 1, heads, 3, cfg.n_embd // heads) for _ in range(layers)] \
        if past else []
    names = [f"past_{i}" for i in range(len(pasts))]
    outputs = [f"present_{i}" for i in range(len(pasts))]
    dims |= {n: {1: "batch", 3: "past"} for n in names}
    dims |= {n: {1: "batch", 3: "total"} for n in outputs}
    torch.onnx.export(model, (ids, *pasts), str(path), opset_version=17, dynamo=False,
                      input_names=["input_ids", *names], output_names=["hidden", *outputs],
                      dynamic_axes=dims)
    return path
