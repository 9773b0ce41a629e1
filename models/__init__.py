"""Small reference PyTorch architectures for exercising SPA.

``MODELS`` maps a name to a :class:`ModelSpec`; :func:`build` returns an
eval-mode module together with seeded example inputs. Everything is
deterministic: the same name always yields the same weights and inputs.
BatchNorm layers carry randomised statistics and affine parameters so that
they are never an identity.

``TRANSFORMER_MODELS`` is a second registry of tiny attention models (ViT,
BERT, a Llama-style GPT, ``nn.TransformerEncoder``, ``nn.MultiheadAttention``;
``*_sdpa`` variants use ``F.scaled_dot_product_attention``). It is kept apart
from ``MODELS`` so that code iterating over ``MODELS`` (the CNN zoo) is
unaffected; :func:`build`, :func:`get_spec` and :func:`models.export.export`
accept names from both (``ALL_MODELS``). Their inputs are described by
:class:`InputSpec` (named, float or int64 token/mask tensors).

This package depends on torch (a torch-only extra) and must not import
``spa``. Use :mod:`models.export` to write ONNX files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import torch
from torch import nn

from models.bert import bert, bert_sdpa
from models.cnn import conv1d, densenet, unet, vgg_bn, vgg_view
from models.gpt import gpt, gpt_sdpa
from models.mobile import efficientnet, mobilenetv2
from models.resnet import resnet_basic, resnet_bottleneck, resnext
from models.torch_nn import torch_encoder, torch_mha
from models.vit import vit, vit_sdpa

__all__ = [
    "ALL_MODELS",
    "INPUT_SEED",
    "MODELS",
    "TRANSFORMER_MODELS",
    "InputSpec",
    "ModelSpec",
    "build",
    "get_spec",
    "make_inputs",
    "make_typed_inputs",
    "names",
]

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
class InputSpec:
    """One named model input and how to fill it.

    ``fill`` is ``"normal"`` (float32 ``N(0, 1)``), ``"tokens"`` (int64
    uniform in ``[low, high)``) or ``"mask"`` (int64 ones with the last
    ``padding`` positions of axis 1 set to 0, the same for every row).
    """

    name: str
    shape: tuple[int, ...]
    fill: Literal["normal", "tokens", "mask"] = "normal"
    low: int = 0
    high: int = 0
    padding: int = 0

    @property
    def dtype(self) -> torch.dtype:
        """``torch.float32`` for ``"normal"``, else ``torch.int64``."""
        return torch.float32 if self.fill == "normal" else torch.int64

    def make(self, g: torch.Generator, batch: int | None = None) -> torch.Tensor:
        """Draw this input from ``g`` (``batch`` overrides axis 0)."""
        shape = self.shape if batch is None else (batch, *self.shape[1:])
        if self.fill == "normal":
            return torch.randn(shape, generator=g, dtype=torch.float32)
        if self.fill == "tokens":
            return torch.randint(self.low, self.high, shape, generator=g, dtype=torch.int64)
        if self.fill == "mask":
            mask = torch.ones(shape, dtype=torch.int64)
            if self.padding:
                mask[:, shape[1] - self.padding :] = 0
            return mask
        raise ValueError(f"unknown fill {self.fill!r}")


def make_typed_inputs(
    specs: tuple[InputSpec, ...],
    seed: int = INPUT_SEED,
    batch: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """Seeded inputs for ``specs``, drawn in order from one generator.

    For all-``"normal"`` specs this gives exactly :func:`make_inputs` of
    their shapes.
    """
    g = torch.Generator().manual_seed(seed)
    return tuple(spec.make(g, batch) for spec in specs)


@dataclass(frozen=True)
class ModelSpec:
    """A registered reference model.

    ``build()`` returns a fresh eval-mode module (deterministic weights);
    ``example_inputs()`` returns seeded inputs of ``input_shapes``. When
    ``input_specs`` is given it describes the inputs (names, dtypes, value
    ranges) and ``input_shapes`` must be their shapes; otherwise the inputs
    are float ``N(0, 1)`` tensors with the exporter's default names.
    """

    name: str
    build: Callable[[], nn.Module]
    example_inputs: Callable[[], tuple[torch.Tensor, ...]]
    input_shapes: tuple[tuple[int, ...], ...] = field(default=())
    description: str = ""
    input_specs: tuple[InputSpec, ...] = field(default=())

    @property
    def input_names(self) -> list[str] | None:
        """Declared input names, or ``None`` for the default ``input``/``inputN``."""
        return [s.name for s in self.input_specs] if self.input_specs else None

    def inputs(self, batch: int | None = None, seed: int = INPUT_SEED) -> tuple[torch.Tensor, ...]:
        """Seeded inputs with an optional batch size override."""
        if self.input_specs:
            return make_typed_inputs(self.input_specs, seed=seed, batch=batch)
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


def _typed_spec(name: str, builder: Callable[[], nn.Module], *inputs: InputSpec) -> ModelSpec:
    doc = (builder.__doc__ or "").strip().splitlines()
    return ModelSpec(
        name=name,
        build=builder,
        example_inputs=partial(make_typed_inputs, inputs),
        input_shapes=tuple(i.shape for i in inputs),
        description=doc[0] if doc else "",
        input_specs=inputs,
    )


_PIXELS = InputSpec("input", (1, 3, 32, 32))
_TOKENS = InputSpec("input_ids", (1, 12), fill="tokens", low=0, high=100)
_MASK = InputSpec("attention_mask", (1, 12), fill="mask", padding=3)
_EMBEDDED = InputSpec("input", (1, 10, 32))

TRANSFORMER_MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        _typed_spec("vit", vit, _PIXELS),
        _typed_spec("vit_sdpa", vit_sdpa, _PIXELS),
        _typed_spec("bert", bert, _TOKENS, _MASK),
        _typed_spec("bert_sdpa", bert_sdpa, _TOKENS, _MASK),
        _typed_spec("gpt", gpt, _TOKENS),
        _typed_spec("gpt_sdpa", gpt_sdpa, _TOKENS),
        _typed_spec("torch_encoder", torch_encoder, _EMBEDDED),
        _typed_spec("torch_mha", torch_mha, _EMBEDDED),
    )
}

#: Every registered model: ``MODELS`` (CNNs) then ``TRANSFORMER_MODELS``.
ALL_MODELS: dict[str, ModelSpec] = {**MODELS, **TRANSFORMER_MODELS}


def names(include_transformers: bool = False) -> list[str]:
    """Registered model names, in registration order (CNNs only by default)."""
    return list(ALL_MODELS if include_transformers else MODELS)


def get_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of ``name`` from either registry."""
    try:
        return ALL_MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(ALL_MODELS)}") from None


def build(name: str) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """Build model ``name`` (eval mode) and its seeded example inputs."""
    spec = get_spec(name)
    return spec.build(), spec.example_inputs()
