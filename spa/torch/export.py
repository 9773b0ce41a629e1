"""Export a module to ONNX so that its initializers keep their parameter names.

The dynamo exporter with ``optimize=False`` (see :mod:`spa.torch.params` for why not the
TorchScript exporter). The module is exported in eval mode — BatchNorm in inference form with its
running statistics, Dropout as identity — and put back in the mode it was in.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from typing import TYPE_CHECKING

import torch

from spa.errors import SpaError

if TYPE_CHECKING:
    from pathlib import Path

    from torch import nn


class ExportError(SpaError):
    """torch.onnx.export could not export the module."""


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(training)


def export(module: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path, *,
           opset: int | None = None) -> Path:
    """Write ``module(*inputs)`` as ONNX to ``path`` (external data when over 2 GB)."""
    big = sum(p.numel() * p.element_size() for p in module.parameters()) > (1 << 31) - (1 << 26)
    quiet = io.StringIO()
    with eval_mode(module), warnings.catch_warnings(), contextlib.redirect_stdout(quiet):
        warnings.simplefilter("ignore")
        level = logging.getLogger("torch.onnx").level
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        try:
            torch.onnx.export(module, inputs, str(path), dynamo=True, optimize=False,
                              opset_version=opset, external_data=big)
        except Exception as exc:  # torch raises many kinds; the user needs the message
            raise ExportError(f"torch.onnx.export failed: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
        finally:
            logging.getLogger("torch.onnx").setLevel(level)
    return path
