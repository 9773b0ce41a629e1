"""Architectures written by others, built small and with random weights, for slow sweeps.

HuggingFace ``transformers`` models are built from small configs (no download; nothing is
fetched), timm/torchvision vision transformers from their registries with ``pretrained=False``.
Each builder returns ``(module, example_inputs)``; the module returns one tensor (the last hidden
state or the logits), so exporters see a plain graph. None of these packages is a dependency of
SPA: install them for the sweep with ``pip install transformers`` and
``pip install --no-deps torchvision==0.28.* timm pillow``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "intermediate_size": 128}


class FirstOutput(nn.Module):
    """Call a HuggingFace model and return one tensor of its output."""

    def __init__(self, model: nn.Module, key: str = "last_hidden_state"):
        super().__init__()
        self.model = model
        self.key = key

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return getattr(self.model(*args), self.key)


def _stub_torchvision() -> None:
    """transformers and timm import torchvision when it is installed; its C extension is not
    (see models.torchvision_compat), so stub its registrations first."""
    from models.torchvision_compat import import_torchvision

    try:
        import_torchvision()
    except ImportError:
        pass


def _ids(seq: int = 8) -> tuple[torch.Tensor, ...]:
    return (torch.randint(0, 100, (1, seq), generator=torch.Generator().manual_seed(0)),)


def _hf(config_name: str, model_name: str, inputs: Callable[[], tuple[torch.Tensor, ...]],
        key: str = "last_hidden_state", **config):
    def build() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        _stub_torchvision()
        import transformers

        torch.manual_seed(0)
        cfg = getattr(transformers, config_name)(**config)
        cfg._attn_implementation = "eager"
        model = getattr(transformers, model_name)(cfg).eval()
        return FirstOutput(model, key).eval(), inputs()

    return build


def random_biases(model: nn.Module, std: float = 0.02) -> None:
    """Draw ``model``'s biases at random. HuggingFace initialises them to zero, so the
    TorchScript exporter stores one zero tensor for all of them (shared by every layer), and a
    wrong bias slice would not show in the oracle."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, std)


def bert_onnx(path: Path, *, attention: str = "eager", seq: int = 16, vocab_size: int = 1000,
              biases: bool = False, **config) -> Path:
    """A random-weight ``BertModel`` (``BertConfig(vocab_size=…, **config)``, ``attention``
    the attention implementation) returning its last hidden state, exported by the
    TorchScript exporter at opset 17 with inputs ``input_ids`` and ``attention_mask`` (batch
    and sequence dynamic), traced on one sequence of ``seq`` tokens. ``biases``: random biases
    (:func:`random_biases`), not zeros."""
    _stub_torchvision()
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=vocab_size, **config)
    cfg._attn_implementation = attention
    model = FirstOutput(transformers.BertModel(cfg).eval()).eval()
    if biases:
        random_biases(model)
    ids, mask = torch.randint(0, vocab_size, (1, seq)), torch.ones(1, seq, dtype=torch.long)
    dims = {0: "batch", 1: "sequence"}
    torch.onnx.export(model, (ids, mask), str(path), opset_version=17, dynamo=False,
                      input_names=["input_ids", "attention_mask"], output_names=["hidden"],
                      dynamic_axes={"input_ids": dims, "attention_mask": dims, "hidden": dims})
    return path


def _pixels(size: int = 32) -> Callable[[], tuple[torch.Tensor, ...]]:
    return lambda: (torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)),)


HF_MODELS: dict[str, Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]] = {
    "hf_bert": _hf("BertConfig", "BertModel", _ids, vocab_size=100, **SMALL),
    "hf_distilbert": _hf("DistilBertConfig", "DistilBertModel", _ids, vocab_size=100, dim=64,
                         n_layers=2, n_heads=4, hidden_dim=128),
    "hf_roberta": _hf("RobertaConfig", "RobertaModel", _ids, vocab_size=100, **SMALL),
    "hf_gpt2": _hf("GPT2Config", "GPT2Model", _ids, vocab_size=100, n_embd=64, n_layer=2,
                   n_head=4, n_positions=32),
    # lm_head tied to the embedding (the vocabulary large enough that a second copy shows)
    "hf_gpt2_lm": _hf("GPT2Config", "GPT2LMHeadModel", _ids, key="logits", vocab_size=1000,
                      n_embd=64, n_layer=2, n_head=4, n_positions=32),
    "hf_llama": _hf("LlamaConfig", "LlamaModel", _ids, vocab_size=100, num_key_value_heads=2,
                    **SMALL),
    "hf_qwen2": _hf("Qwen2Config", "Qwen2Model", _ids, vocab_size=100, num_key_value_heads=2,
                    **SMALL),
    "hf_vit": _hf("ViTConfig", "ViTModel", _pixels(), image_size=32, patch_size=8, **SMALL),
    "hf_clip_vision": _hf("CLIPVisionConfig", "CLIPVisionModel", _pixels(), image_size=32,
                          patch_size=8, **SMALL),
    "hf_whisper_encoder": _hf(
        "WhisperConfig", "WhisperModel", lambda: (torch.randn(1, 16, 32),), vocab_size=100,
        d_model=64, encoder_layers=2, encoder_attention_heads=4, decoder_layers=1,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16,
        max_source_positions=16, max_target_positions=16, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, decoder_start_token_id=1),
    "hf_t5_encoder": _hf("T5Config", "T5EncoderModel", _ids, vocab_size=100, d_model=64,
                         d_kv=16, d_ff=128, num_layers=2, num_heads=4),
}


def _whisper_encoder_only(build):
    def wrapped():
        module, inputs = build()
        return FirstOutput(module.model.encoder), inputs

    return wrapped


HF_MODELS["hf_whisper_encoder"] = _whisper_encoder_only(HF_MODELS["hf_whisper_encoder"])


def _timm(name: str, size: int = 224, **kwargs):
    def build() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        _stub_torchvision()
        import timm

        torch.manual_seed(0)
        return timm.create_model(name, pretrained=False, **kwargs).eval(), _pixels(size)()

    return build


VISION_TRANSFORMERS: dict[str, Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]] = {
    "timm_vit_tiny": _timm("vit_tiny_patch16_224", depth=2),
    "timm_deit_tiny": _timm("deit_tiny_patch16_224", depth=2),
    "timm_swin_tiny": _timm("swin_tiny_patch4_window7_224", depths=(1, 1, 1, 1)),
    "timm_levit_128s": _timm("levit_128s"),
    "timm_mobilevit_xxs": _timm("mobilevit_xxs", size=256),
}
