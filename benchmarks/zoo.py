"""The four models of the speed benchmarks, each with its Torch-Pruning recipe.

torchvision ResNet-50, MobileNetV3-Large and ViT-B/16 at 224 px, and the BERT-base-sized encoder
of ``transformer_speed`` (12×768, 12 heads, MLP 3072, sequence 128); random init, seed 0. Each
entry builds the ``nn.Module`` (the same weights every call, so SPA and Torch-Pruning start from
the same model) and exports it with the TorchScript exporter at opset 17.

What each tool prunes at ``ratio`` r:

- CNNs: both remove r of the channels of every coupled group (classifier kept).
- ViT-B/16: SPA removes r of the heads and of the MLP neurons and keeps the hidden size (its
  default). Torch-Pruning cannot remove heads of ``nn.MultiheadAttention``; its torchvision
  example prunes the hidden size (rounded to the head count) and the MLP, so it cuts more FLOPs
  at the same r. The speed benchmark compares them at their FLOPs, not at r.
- BERT: both remove r of the heads and of the MLP neurons and keep the hidden size (Torch-Pruning
  with ``num_heads``, ``prune_num_heads=True`` and the hidden-size producers ignored). Its layer
  reshapes the attention context with the hidden size ``C``, so, as Torch-Pruning's own timm
  example does for timm's ``Attention``, the layer's forward is replaced by one that reshapes
  with ``-1`` before pruning.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from benchmarks.tp_peer import TPRecipe, default_recipe


@dataclass(frozen=True)
class Entry:
    label: str
    build: Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]
    recipe: Callable[[nn.Module], TPRecipe]
    input_names: tuple[str, ...] = ("input",)


def _torchvision(name: str) -> Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]:
    def build() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        from models.torchvision_compat import import_torchvision

        tv = import_torchvision()
        torch.manual_seed(0)
        model = tv.models.get_model(name, weights=None).eval()
        return model, (torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)),)

    return build


def _bert() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    from benchmarks.transformer_speed import build_bert_base

    return build_bert_base()


def _bert_layer_forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``models.bert.BertLayer.forward`` with the context reshaped to ``-1``, not ``C``."""
    from models.attention import attend

    B, S, _ = x.shape
    q, k, v = (self._heads(p(x)) for p in (self.query, self.key, self.value))
    ctx = attend(q, k, v, mask, sdpa=self.sdpa).transpose(1, 2).reshape(B, S, -1)
    x = self.norm1(x + self.out(ctx))
    return self.norm2(x + self.output(self.act(self.intermediate(x))))


def _bert_recipe(model: nn.Module) -> TPRecipe:
    layers = list(model.layers)
    for layer in layers:
        layer.forward = types.MethodType(_bert_layer_forward, layer)
    heads = {p: layer.heads for layer in layers for p in (layer.query, layer.key, layer.value)}
    # The hidden size's producers: ignoring them keeps the residual stream, as SPA does.
    hidden = [m for layer in layers for m in (layer.out, layer.output)]
    ignored = [*hidden, model.pooler, model.classifier]

    def fix(pruner) -> None:
        for layer in layers:
            layer.heads = pruner.num_heads[layer.query]
            layer.head_dim = layer.query.out_features // layer.heads

    return TPRecipe(ignored=ignored, num_heads=heads, prune_num_heads=True, fixups=[fix])


MODELS: dict[str, Entry] = {
    "resnet50": Entry("torchvision ResNet-50, 224 px", _torchvision("resnet50"),
                      lambda m: default_recipe(m, 1000)),
    "mobilenet_v3_large": Entry("torchvision MobileNetV3-Large, 224 px",
                                _torchvision("mobilenet_v3_large"),
                                lambda m: default_recipe(m, 1000)),
    "vit_b_16": Entry("torchvision ViT-B/16, 224 px", _torchvision("vit_b_16"),
                      lambda m: default_recipe(m, 1000)),
    "bert_base": Entry("BERT-base-sized encoder (12×768, 12 heads, MLP 3072, vocab 30522, "
                       "seq 128)", _bert, _bert_recipe, ("input_ids", "attention_mask")),
}


def no_mha_fastpath() -> None:
    """Switch off ``nn.MultiheadAttention``'s inference fast path: under ``no_grad`` in eval
    mode it calls ``aten::_native_multi_head_attention``, which the TorchScript exporter cannot
    export (torchvision's ViT and Swin use the module)."""
    torch.backends.mha.set_fastpath_enabled(False)


def export(entry: Entry, model: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path) -> Path:
    """TorchScript exporter, opset 17, the entry's input names."""
    from models.export import export_module

    no_mha_fastpath()
    return export_module(model, inputs, path, exporter="torchscript", opset=17,
                         input_names=list(entry.input_names))


def tp_pruned(entry: Entry, ratio: float) -> tuple[nn.Module, tuple[torch.Tensor, ...], dict]:
    """A fresh copy of the model pruned by Torch-Pruning at ``ratio``, and the seconds taken."""
    from benchmarks import tp_peer

    model, inputs = entry.build()
    recipe = entry.recipe(model)
    example = inputs[0] if len(inputs) == 1 else inputs
    seconds = tp_peer.prune(model, example, ratio, recipe)
    return model.eval(), inputs, seconds


def export_resnet50(path: Path) -> Path:
    """torchvision ResNet-50 (random init, seed 0), TorchScript exporter, opset 17."""
    entry = MODELS["resnet50"]
    return export(entry, *entry.build(), path)
