"""Shared helpers for the reference architectures.

Every builder in :mod:`models` goes through :func:`finalize`, which
re-initialises the weights deterministically (Kaiming-style, so activations
keep a sane scale through the network), randomises every BatchNorm's running
statistics and affine parameters (so that BatchNorm is *not* an identity and
folding/pruning bugs become visible), and puts the module in eval mode.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["conv_bn_act", "finalize", "randomize_batchnorm", "reinit_weights"]

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVT_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@torch.no_grad()
def randomize_batchnorm(
    module: nn.Module, calib_input: tuple[torch.Tensor, ...] | None = None
) -> None:
    """Randomise all BatchNorm layers of ``module`` in place.

    Without ``calib_input``: ``running_mean ~ N(0, 0.1)``,
    ``running_var ~ U(0.5, 1.5)``. With ``calib_input`` the statistics are
    taken relative to the per-channel mean ``mu`` and variance ``var`` that
    each BatchNorm actually sees on that input (in eval mode, layer by layer,
    with all earlier BatchNorms already randomised):
    ``running_mean = mu + N(0, 0.1) * sqrt(var)``,
    ``running_var = var * U(0.5, 1.5)`` -- i.e. the same distributions when
    the activations are already standardised, but no drift of the
    activation scale through deep residual stacks. In both cases
    ``weight ~ U(0.5, 1.5)`` and ``bias ~ N(0, 0.1)``.
    Uses the global torch RNG, so seed it first.
    """
    bns = [m for m in module.modules() if isinstance(m, _BN_TYPES)]
    for m in bns:
        if m.affine:
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0.0, 0.1)
    if calib_input is None:
        for m in bns:
            if m.running_mean is not None and m.running_var is not None:
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        return

    def hook(m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        assert isinstance(m, _BN_TYPES)
        x = args[0]
        dims = [d for d in range(x.dim()) if d != 1]
        mu = x.mean(dim=dims)
        var = x.var(dim=dims, unbiased=False).clamp_min(1e-3)
        if m.running_mean is not None and m.running_var is not None:
            m.running_mean.copy_(mu + torch.randn_like(mu) * 0.1 * var.sqrt())
            m.running_var.copy_(var * torch.empty_like(var).uniform_(0.5, 1.5))

    was_training = module.training
    module.eval()
    handles = [m.register_forward_pre_hook(hook) for m in bns]
    try:
        module(*calib_input)
    finally:
        for h in handles:
            h.remove()
    module.train(was_training)


@torch.no_grad()
def reinit_weights(module: nn.Module) -> None:
    """Kaiming-normal (fan-in) init for convs and linears; small random biases.

    Fan-in Kaiming keeps the second moment of ReLU activations roughly
    constant from layer to layer, so neither exploding nor vanishing outputs.
    """
    for m in module.modules():
        if isinstance(m, _CONV_TYPES + _CONVT_TYPES):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if isinstance(m, _CONVT_TYPES):
                # kaiming's fan_in for ConvTranspose is computed on the wrong
                # axis; rescale to the effective fan-in of one output pixel.
                cin = m.in_channels // m.groups
                taps = math.prod(m.kernel_size) / math.prod(m.stride)
                std = math.sqrt(2.0 / max(1.0, cin * taps))
                m.weight.normal_(0.0, std)
            if m.bias is not None:
                m.bias.normal_(0.0, 0.05)
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="linear")
            if m.bias is not None:
                m.bias.normal_(0.0, 0.05)


def finalize(module: nn.Module, input_shape: tuple[int, ...] | None = None) -> nn.Module:
    """Re-init weights, randomise BatchNorm, switch to eval mode.

    The caller is expected to have seeded the global RNG (``torch.manual_seed``)
    before constructing ``module``. If ``input_shape`` is given (without the
    batch axis), BatchNorm statistics are calibrated on a batch of 8 random
    inputs of that shape (see :func:`randomize_batchnorm`).
    """
    reinit_weights(module)
    calib = None
    if input_shape is not None:
        g = torch.Generator().manual_seed(0)
        calib = (torch.randn((8, *input_shape), generator=g),)
    randomize_batchnorm(module, calib)
    module.eval()
    return module


def conv_bn_act(
    cin: int,
    cout: int,
    kernel_size: int = 3,
    stride: int = 1,
    groups: int = 1,
    act: type[nn.Module] | None = nn.ReLU,
) -> nn.Sequential:
    """``Conv2d(bias=False) -> BatchNorm2d -> act`` with "same" padding."""
    layers: list[nn.Module] = [
        nn.Conv2d(
            cin,
            cout,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            groups=groups,
            bias=False,
        ),
        nn.BatchNorm2d(cout),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)
