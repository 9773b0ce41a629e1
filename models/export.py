"""Export the reference models (or any module) to ONNX.

Two exporters are supported:

* ``"torchscript"`` -- the legacy tracer, ``torch.onnx.export(..., dynamo=False)``
  at ``opset_version = opset or 17``. With ``optimize=True``
  (``do_constant_folding=True``) and an eval-mode model its eval peephole
  pass folds every BatchNormalization that directly follows a Conv into that
  Conv, so only "free-standing" BatchNorms (e.g. DenseNet's pre-activation
  ones) remain; ``optimize=False`` keeps all BatchNormalization nodes.
  ``x.view(x.size(0), -1)`` becomes ``Constant -> Reshape`` for static
  shapes and ``Shape -> Gather -> Unsqueeze -> Concat -> Reshape`` with
  ``dynamic_batch=True``; ``torch.flatten(x, 1)`` becomes ``Flatten``.
* ``"dynamo"`` -- ``torch.onnx.export(..., dynamo=True)`` (``torch.export``
  + onnxscript). Its default opset in torch 2.13 is **20**
  (``torch.onnx._constants.ONNX_DEFAULT_OPSET``); the torchlib op
  implementations target opset 18, so asking for ``opset < 18`` goes through
  the ONNX version converter. With ``optimize=True`` (the default) the
  onnxscript optimizer runs and also fuses Conv+BatchNormalization and
  constant-folds shapes: both flatten styles become a single ``Reshape``
  with a constant shape (``[1, -1]``/``[1, 1024]`` static, ``[-1, 1024]``
  with ``dynamic_batch``). ``optimize=False`` keeps BatchNormalization but
  leaves a lot of Shape/Expand/CastLike noise around it. The model is always
  written as a single self-contained file (``external_data=False``); torch's
  own default would write a ``<name>.onnx.data`` side file even for these
  tiny models.

Input names are ``input`` (one input) or ``input0``, ``input1``, ...,
unless the model's :class:`~models.ModelSpec` declares them (the transformer
models: ``input_ids``, ``attention_mask``); output names ``output`` or
``output0``, ... ``dynamic_batch=True`` makes axis 0 of every input and
output a symbolic dimension named ``batch``.

Transformer models (``models.TRANSFORMER_MODELS``) export with both
exporters. Hand-written attention is always ``MatMul``/``Softmax``;
``F.scaled_dot_product_attention`` (the ``*_sdpa`` models, and PyTorch's own
``nn.MultiheadAttention``) is decomposed by the torchscript exporter and by
dynamo below opset 23, and becomes the fused ONNX ``Attention`` op with dynamo
at ``opset >= 23``. At opset 23 exactly, ``optimize=True`` also runs
onnxscript's ONNX fusions, which turn the hand-written RMSNorm of ``gpt``
into ``RMSNormalization``.

CLI::

    python -m models.export NAME -o PATH [--exporter torchscript|dynamo]
        [--opset N] [--dynamic-batch] [--no-optimize]
    python -m models.export --list        # the CNN registry (MODELS)
    python -m models.export --list-all    # also the transformer models
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "DYNAMO_DEFAULT_OPSET",
    "EXPORTERS",
    "TORCHSCRIPT_DEFAULT_OPSET",
    "export",
    "export_module",
    "io_names",
    "main",
]

EXPORTERS = ("torchscript", "dynamo")
TORCHSCRIPT_DEFAULT_OPSET = 17
#: What ``torch.onnx.export(dynamo=True)`` uses when no opset is given (torch 2.13).
DYNAMO_DEFAULT_OPSET = 20

_NOISY_LOGGERS = (
    "torch.onnx",
    "torch.export",
    "torch._export",
    "torch._dynamo",
    "torch.fx",
    "torch._subclasses",
    "onnxscript",
    "onnx_ir",
)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence exporter warnings and log records below ERROR."""
    saved: list[tuple[logging.Logger, int]] = []
    for name in _NOISY_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level))
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


def io_names(prefix: str, count: int) -> list[str]:
    """``["input"]`` for one tensor, else ``["input0", "input1", ...]``."""
    if count == 1:
        return [prefix]
    return [f"{prefix}{i}" for i in range(count)]


def _count_outputs(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> int:
    with torch.no_grad():
        out = module(*inputs)
    if isinstance(out, torch.Tensor):
        return 1
    if isinstance(out, Sequence):
        return len(out)
    raise TypeError(f"unsupported model output type {type(out).__name__}")


def export_module(
    module: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    path: str | Path,
    *,
    exporter: str = "torchscript",
    opset: int | None = None,
    dynamic_batch: bool = False,
    optimize: bool = True,
    input_names: Sequence[str] | None = None,
) -> Path:
    """Export an arbitrary eval-mode ``module`` called as ``module(*inputs)``.

    ``optimize`` maps to ``do_constant_folding`` (torchscript) or to the
    onnxscript optimizer (dynamo). For ``dynamic_batch`` with the dynamo
    exporter, pass inputs whose batch size is not 1 (``torch.export``
    specialises size-1 dimensions); :func:`export` does this for you.
    ``input_names`` defaults to :func:`io_names` ``("input", len(inputs))``.
    Returns the written path.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module.eval()
    in_names = list(input_names) if input_names else io_names("input", len(inputs))
    if len(in_names) != len(inputs):
        raise ValueError(f"{len(in_names)} input names for {len(inputs)} inputs")
    out_names = io_names("output", _count_outputs(module, inputs))

    with _quiet(), torch.no_grad():
        if exporter == "torchscript":
            dynamic_axes = None
            if dynamic_batch:
                dynamic_axes = {n: {0: "batch"} for n in (*in_names, *out_names)}
            torch.onnx.export(
                module,
                inputs,
                str(path),
                dynamo=False,
                opset_version=opset or TORCHSCRIPT_DEFAULT_OPSET,
                input_names=in_names,
                output_names=out_names,
                dynamic_axes=dynamic_axes,
                do_constant_folding=optimize,
                verbose=False,
            )
        else:
            dynamic_shapes = None
            if dynamic_batch:
                dynamic_shapes = tuple({0: "batch"} for _ in inputs)
            program = torch.onnx.export(
                module,
                inputs,
                dynamo=True,
                opset_version=opset,
                input_names=in_names,
                output_names=out_names,
                dynamic_shapes=dynamic_shapes,
                optimize=optimize,
                verbose=False,
            )
            assert program is not None
            program.save(str(path), external_data=False)
    return path


def export(
    name: str,
    path: str | Path,
    *,
    exporter: str = "torchscript",
    opset: int | None = None,
    dynamic_batch: bool = False,
    optimize: bool = True,
) -> Path:
    """Export registered model ``name`` to ``path`` and return ``path``.

    ``exporter="torchscript"`` uses opset ``opset or 17``;
    ``exporter="dynamo"`` uses torch's default (20 in torch 2.13) unless
    ``opset`` is given. The file is self-contained (no ``.data`` side file)
    and loads with ``onnx.load(path)``. With ``dynamic_batch=True`` axis 0
    of inputs and outputs is the symbolic dimension ``batch``. ``name`` may
    come from ``MODELS`` or ``TRANSFORMER_MODELS``; declared input names
    (``spec.input_names``) are used.
    """
    from models import get_spec

    spec = get_spec(name)
    module, inputs = spec.build(), spec.example_inputs()
    if dynamic_batch and exporter == "dynamo":
        inputs = spec.inputs(batch=2)
    return export_module(
        module,
        inputs,
        path,
        exporter=exporter,
        opset=opset,
        dynamic_batch=dynamic_batch,
        optimize=optimize,
        input_names=spec.input_names,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    from models import ALL_MODELS, MODELS

    parser = argparse.ArgumentParser(
        prog="python -m models.export", description="Export a reference model to ONNX."
    )
    parser.add_argument("name", nargs="?", help="model name (see --list)")
    parser.add_argument("-o", "--output", type=Path, help="output .onnx path (default: NAME.onnx)")
    parser.add_argument("--exporter", choices=EXPORTERS, default="torchscript")
    parser.add_argument("--opset", type=int, default=None)
    parser.add_argument("--dynamic-batch", action="store_true", help="make axis 0 symbolic")
    parser.add_argument(
        "--no-optimize",
        action="store_true",
        help="disable constant folding / onnxscript optimizer",
    )
    parser.add_argument("--list", action="store_true", help="list the CNN models and exit")
    parser.add_argument(
        "--list-all", action="store_true", help="list all models (with transformers) and exit"
    )
    args = parser.parse_args(argv)

    if args.list or args.list_all:
        for spec in (ALL_MODELS if args.list_all else MODELS).values():
            shapes = ", ".join("x".join(map(str, s)) for s in spec.input_shapes)
            print(f"{spec.name:20s} {shapes:14s} {spec.description}")
        return 0
    if args.name is None:
        parser.error("NAME is required unless --list is given")
    if args.name not in ALL_MODELS:
        parser.error(f"unknown model {args.name!r}; choose from: {', '.join(ALL_MODELS)}")
    out = args.output or Path(f"{args.name}.onnx")
    path = export(
        args.name,
        out,
        exporter=args.exporter,
        opset=args.opset,
        dynamic_batch=args.dynamic_batch,
        optimize=not args.no_optimize,
    )
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
