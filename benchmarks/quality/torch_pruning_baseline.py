"""The peer baseline: Torch-Pruning's ``MagnitudeImportance`` on the same PyTorch model.

Torch-Pruning (a benchmark-only dependency: ``pip install --no-deps torch-pruning``) prunes the
``nn.Module`` itself, BatchNorm unfolded, with one uniform ratio per layer group (its default),
the classifier ignored. The ratio is searched by bisection until the FLOPs reduction (counted by
Torch-Pruning) reaches the target; the pruned module is exported like the dense one (TorchScript
exporter, opset 17) and evaluated by the same code as SPA's outputs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from spa.passes.allocation import least_ratio


def prune_to_flops(build: Callable[[], nn.Module], example: torch.Tensor, reduction: float,
                   ignore: Callable[[nn.Module], list[nn.Module]]) -> nn.Module:
    """The Torch-Pruning-pruned module whose MACs are at most ``1/reduction`` of the dense."""
    from benchmarks import tp_peer

    dense = build()
    base, _ = tp_peer.count(dense, example)

    def pruned(ratio: float) -> tuple[float, nn.Module]:
        model = copy.deepcopy(dense)
        tp_peer.prune(model, example, ratio, tp_peer.TPRecipe(ignored=ignore(model)))
        macs, _ = tp_peer.count(model, example)
        return base / macs, model

    _, (_, model) = least_ratio(pruned, reduction, 0.95, pruned(0.95), 14)
    return model.eval()


def export(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    return path
