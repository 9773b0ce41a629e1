"""Per-weight saliencies from one batch, for the gradient criteria (passes/importance/gradient).

``w·g`` (taylor, snip) needs one backward pass; ``w·Hg`` (grasp, crop) a second one through the
first (double backward): ``Hg = ∂/∂w (g · stop_grad(g))``. The module runs in the mode it is in
(train mode for prune-at-init, so BatchNorm uses batch statistics as training will), and its
parameters' ``.grad`` are left as they were.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from spa.errors import OptionError

if TYPE_CHECKING:
    from spa.torch.params import ParamMap

Batch = tuple[Sequence[torch.Tensor] | torch.Tensor, torch.Tensor]
LossFn = Callable[[object, torch.Tensor], torch.Tensor]


def default_loss(output: object, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the first output against integer class targets."""
    logits = first_tensor(output)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def first_tensor(output: object) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)) and output:
        return first_tensor(output[0])
    raise OptionError(f"the module returned {type(output).__name__}, not a tensor to take a "
                      "loss of; pass loss_fn=")


def saliency(module: nn.Module, batch: Batch, needs: str, loss_fn: LossFn | None = None
             ) -> dict[str, np.ndarray]:
    """``{parameter name: w·g or w·Hg}`` for every parameter that requires grad."""
    if batch is None:
        raise OptionError("gradient criteria need one batch: batch=(inputs, targets)")
    inputs, target = batch
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    loss = (loss_fn or default_loss)(module(*inputs), target)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
        raise OptionError("the loss is not a differentiable scalar: this model cannot be "
                          "differentiated here; use a data-free criterion (l1, l2, fpgm, obspa)")
    grads = torch.autograd.grad(loss, params, create_graph=needs == "whg", allow_unused=True)
    if needs == "whg":
        flow = sum((g * g.detach()).sum() for g in grads if g is not None)
        grads = torch.autograd.grad(flow, params, allow_unused=True)
    return {n: (p.detach() * g).double().cpu().numpy()
            for (n, p), g in zip(named, grads) if g is not None}


def on_constants(per_param: dict[str, np.ndarray], params: ParamMap) -> dict[str, np.ndarray]:
    """The same saliencies laid out like the ONNX constants the analysis scores."""
    return {const: origin.to_constant(per_param[origin.param])
            for const, origin in params.origins.items() if origin.param in per_param}
