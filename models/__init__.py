"""Small reference PyTorch architectures for exercising SPA.

``MODELS`` maps a name to a :class:`ModelSpec`; :func:`build` returns an
eval-mode module together with seeded example inputs. Everything is
deterministic: the same name always yields the same weights and inputs.
BatchNorm layers carry randomised statistics and affine parameters so that
they are never an identity.

This package depends on torch (a torch-only extra) and must not import
``spa``. Use :mod:`models.export` to write ONNX files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from models.cnn import conv1d, densenet, unet, vgg_bn, vgg_view
from models.mobile import efficientnet, mobilenetv2
from models.resnet import resnet_basic, resnet_bottleneck, resnext

__all__ = ["INPUT_SEED", "MODELS", "ModelSpec", "build", "make_inputs", "names"]

#: Seed used for the example inputs (independent of the weight seed).
INPUT_SEED = 1234


def make_inputs(
    shapes: tuple[tuple[int, ...], ...],
    seed: int = INPUT_SEED,
    batch: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """Seeded ``N(0, 1)`` float32 tensors of the given shapes.

    ``batch`` overrides axis 0 of every shape (the first rows are the same
    for any batch size only by accident; don't rely on it).
    """
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        if batch is not None:
            shape = (batch, *shape[1:])
        out.append(torch.randn(shape, generator=g, dtype=torch.float32))
    return tuple(out)


@dataclass(frozen=True)
class ModelSpec:
    """A registered reference model.

    ``build()`` returns a fresh eval-mode module (deterministic weights);
    ``example_inputs()`` returns seeded inputs of ``input_shapes``.
    """

    name: str
    build: Callable[[], nn.Module]
    example_inputs: Callable[[], tuple[torch.Tensor, ...]]
    input_shapes: tuple[tuple[int, ...], ...] = field(default=())
    description: str = ""

    def inputs(self, batch: int | None = None, seed: int = INPUT_SEED) -> tuple[torch.Tensor, ...]:
        """Seeded inputs with an optional batch size override."""
        return make_inputs(self.input_shapes, seed=seed, batch=batch)


_IMAGE = ((1, 3, 32, 32),)
_SEQ = ((1, 4, 64),)


def _spec(
    name: str, builder: Callable[[], nn.Module], shapes: tuple[tuple[int, ...], ...]
) -> ModelSpec:
    doc = (builder.__doc__ or "").strip().splitlines()
    return ModelSpec(
        name=name,
        build=builder,
        example_inputs=partial(make_inputs, shapes),
        input_shapes=shapes,
        description=doc[0] if doc else "",
    )


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        _spec("resnet_basic", resnet_basic, _IMAGE),
        _spec("resnet_bottleneck", resnet_bottleneck, _IMAGE),
        _spec("resnext", resnext, _IMAGE),
        _spec("mobilenetv2", mobilenetv2, _IMAGE),
        _spec("efficientnet", efficientnet, _IMAGE),
        _spec("densenet", densenet, _IMAGE),
        _spec("vgg_bn", vgg_bn, _IMAGE),
        _spec("vgg_view", vgg_view, _IMAGE),
        _spec("unet", unet, _IMAGE),
        _spec("conv1d", conv1d, _SEQ),
    )
}


def names() -> list[str]:
    """Registered model names, in registration order."""
    return list(MODELS)


def build(name: str) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Build model ``name`` (eval mode) and its seeded example inputs."""
    try:
        spec = MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(MODELS)}") from None
    return spec.build(), spec.example_inputs()
