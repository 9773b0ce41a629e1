"""Torch-Pruning, driven the way its own examples drive it, as the peer of every benchmark.

Torch-Pruning (``pip install --no-deps torch-pruning``; a benchmark-only dependency) prunes the
``nn.Module`` itself. Its examples (``examples/timm_models``, ``examples/torchvision_models``,
``examples/transformers``) share one recipe, reproduced here so that SPA is compared with
Torch-Pruning used as its authors use it, not with a strawman:

- importance ``MagnitudeImportance(p=1)`` (L1, the same criterion as SPA's ``l1``);
- the classifier (a Linear, or a conv, with ``num_classes`` outputs) is ignored, so the output
  keeps its shape;
- attention modules that expose ``num_heads`` and a fused ``qkv`` Linear get ``num_heads`` so that
  Torch-Pruning prunes within heads; after pruning their ``num_heads``/``head_dim``/``attn_dim``
  attributes are recomputed, since the module's ``forward`` reshapes with them;
- torchvision's ``VisionTransformer`` uses ``round_to = num_heads`` and has ``hidden_dim`` reset
  after pruning (its ``forward`` reads it).

A model that needs anything beyond the recipe is recorded as a Torch-Pruning failure: the
coverage benchmark asks what each tool does on a model it was not tailored for.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class TPRecipe:
    """How Torch-Pruning is set up for one model (what its examples would pass)."""

    ignored: list[nn.Module] = field(default_factory=list)
    num_heads: dict[nn.Module, int] = field(default_factory=dict)
    prune_num_heads: bool = False  # remove whole heads (else: dims within each head)
    round_to: int | None = None
    fixups: list[Callable[[object], None]] = field(default_factory=list)  # run after pruning


def classifiers(model: nn.Module, num_classes: int) -> list[nn.Module]:
    """Layers whose output is the class logits: the examples' ``out_features == num_classes``
    test, extended to convolutions (SqueezeNet's classifier is a 1×1 conv)."""
    return [m for m in model.modules()
            if (isinstance(m, nn.Linear) and m.out_features == num_classes)
            or (isinstance(m, nn.modules.conv._ConvNd) and m.out_channels == num_classes)]


def _fused_qkv_attention(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "num_heads")
            and isinstance(getattr(m, "qkv", None), nn.Linear)]


def _reset_head_attributes(attention: list[nn.Module]) -> Callable[[object], None]:
    def fix(pruner) -> None:
        for m in attention:
            m.num_heads = pruner.num_heads.get(m.qkv, m.num_heads)
            m.head_dim = m.qkv.out_features // (3 * m.num_heads)
            if hasattr(m, "attn_dim"):
                m.attn_dim = m.num_heads * m.head_dim
    return fix


def default_recipe(model: nn.Module, num_classes: int) -> TPRecipe:
    """The generic recipe of Torch-Pruning's timm and torchvision examples."""
    recipe = TPRecipe(ignored=classifiers(model, num_classes))
    attention = _fused_qkv_attention(model)
    if attention:
        recipe.num_heads = {m.qkv: int(m.num_heads) for m in attention}
        recipe.fixups.append(_reset_head_attributes(attention))
    if type(model).__name__ == "VisionTransformer" and hasattr(model, "conv_proj"):
        recipe.round_to = model.encoder.layers[0].num_heads
        recipe.fixups.append(lambda _p: setattr(model, "hidden_dim",
                                                model.conv_proj.out_channels))
    return recipe


def make_pruner(model: nn.Module, example, ratio: float, recipe: TPRecipe):
    """Build Torch-Pruning's pruner (this traces the model and builds its DependencyGraph)."""
    import torch_pruning as tp

    return tp.pruner.MetaPruner(
        model, example, importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=ratio, ignored_layers=recipe.ignored, round_to=recipe.round_to,
        # Fresh dicts: MetaPruner updates its mutable default ``out_channel_groups`` in place,
        # which would leak one model's heads into the next pruner of the same process.
        num_heads=dict(recipe.num_heads), out_channel_groups={}, in_channel_groups={},
        prune_num_heads=recipe.prune_num_heads, prune_head_dims=not recipe.prune_num_heads,
        head_pruning_ratio=ratio if recipe.prune_num_heads else 0.0)


def prune(model: nn.Module, example, ratio: float, recipe: TPRecipe) -> dict[str, float]:
    """Prune ``model`` in place; returns the seconds taken by the graph build and the pruning
    (wall), and the CPU seconds of the whole (all threads of the process)."""
    c0, t0 = time.process_time(), time.perf_counter()
    pruner = make_pruner(model, example, ratio, recipe)
    t1 = time.perf_counter()
    pruner.step()
    for fix in recipe.fixups:
        fix(pruner)
    t2 = time.perf_counter()
    return {"dependency_graph": t1 - t0, "prune": t2 - t1, "total": t2 - t0,
            "cpu": time.process_time() - c0}


def count(model: nn.Module, example) -> tuple[int, int]:
    """Torch-Pruning's own (MACs, params) count of a module."""
    import torch_pruning as tp

    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(model, example)
    return int(macs), int(params)
