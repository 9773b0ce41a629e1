"""onnxruntime-genai int4 folders of random-init HuggingFace decoders, built offline.

:func:`make_hf` writes a random-weight ``LlamaForCausalLM`` (or Qwen2) with GQA and a word-level
tokenizer (``w3 … w{vocab-1}``); :func:`build_folder` runs onnxruntime-genai's builder on it
(``-p int4 -e cpu``: ``MatMulNBits``, ``GroupQueryAttention`` with rotary inside, fused
``Skip``/``SimplifiedLayerNormalization``); :func:`generate` runs its ``Generator`` greedily.
Each step runs in a subprocess from the checkout's root (the builder is a ``__main__`` module;
transformers imports torchvision, stubbed first). Nothing is downloaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_MAKE = """
import json, sys
from models.torchvision_compat import import_torchvision
try:
    import_torchvision()
except ImportError:
    pass
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
torch.manual_seed(0)
out, vocab, kind, sizes = sys.argv[1], int(sys.argv[2]), sys.argv[4], json.loads(sys.argv[5])
cfg = getattr(transformers, f"{kind}Config")(
    num_hidden_layers=int(sys.argv[3]), vocab_size=vocab, max_position_embeddings=256,
    bos_token_id=1, eos_token_id=2, **sizes)
getattr(transformers, f"{kind}ForCausalLM")(cfg).save_pretrained(out)
words = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab)}
tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.Whitespace()
PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                        unk_token="<unk>").save_pretrained(out)
"""
_BUILD = """
import runpy, sys
from models.torchvision_compat import import_torchvision
try:
    import_torchvision()
except ImportError:
    pass
sys.argv = ["builder", *sys.argv[1:]]
runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")
"""
SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
         "num_key_value_heads": 2}


def make_hf(d: Path, kind: str = "Llama", layers: int = 2, *, vocab: int = 1000,
            sizes: dict[str, int] | None = None) -> Path:
    """A random-init HuggingFace ``kind`` model (Llama, Qwen2) of ``layers`` layers and its
    tokenizer in ``d/hf``; ``sizes``: the config's widths and head counts (default
    :data:`SMALL`)."""
    subprocess.run([sys.executable, "-c", _MAKE, str(d / "hf"), str(vocab), str(layers), kind,
                    json.dumps(sizes or SMALL)],
                   cwd=ROOT, check=True, capture_output=True, timeout=600)
    return d / "hf"


def build_folder(hf: Path, out: Path, *extra: str, precision: str = "int4") -> Path:
    """The builder's CPU folder of ``hf`` in ``out`` (int4 ``MatMulNBits`` weights, or fp32
    ``MatMul`` ones)."""
    subprocess.run([sys.executable, "-c", _BUILD, "-i", str(hf), "-o", str(out), "-p", precision,
                    "-e", "cpu", "-c", str(out.parent / "cache"), *extra],
                   cwd=ROOT, check=True, capture_output=True, timeout=600)
    return out


def generate(folder: Path, prompt: list[int], steps: int = 32) -> list[int]:
    """``steps`` greedy tokens of onnxruntime-genai's ``Generator`` on ``folder``."""
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + steps, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([prompt], np.int32))
    tokens = []
    while not gen.is_done():
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    return tokens
