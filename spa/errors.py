"""Typed errors a user can act on.

Every error SPA raises on bad input derives from :class:`SpaError`; the CLI turns these into one
line on stderr and a documented exit code, never a traceback. ``assert`` is kept for SPA's own
invariants. Text quoted from other libraries (onnxruntime, onnx) goes through :func:`one_line`:
one line, no terminal colour codes.
"""

from __future__ import annotations

import re
from enum import IntEnum

# CSI sequences (colours: ESC [ 1 ; 31 m), OSC sequences, and two-character escapes.
_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-~])?")


class ExitCode(IntEnum):
    """Process exit codes of the ``spa`` command (documented in the README)."""

    OK = 0
    BAD_INPUT = 2
    VALIDATION_FAILED = 3
    NOTHING_PRUNABLE = 4


class SpaError(Exception):
    """Base class of every error SPA reports to a user."""

    exit_code: ExitCode = ExitCode.BAD_INPUT


class ModelLoadError(SpaError):
    """The model file is missing, unreadable, not ONNX, truncated or otherwise invalid."""


class InvalidModelError(ModelLoadError):
    """The model breaks a rule of ONNX that onnx.checker does not test (node names unique in a
    graph, a Conv weight that fits its input, shapes that infer without conflict)."""


class UnsupportedModelError(SpaError):
    """The model is valid ONNX but uses something SPA cannot read (IR or opset version)."""


class UnsupportedOpsError(SpaError):
    """The ONNX model uses ops that spa.torch.from_onnx cannot run in PyTorch."""


class OptionError(SpaError):
    """An option has a value outside its domain (a ratio outside [0, 1), say)."""


class InputDimsError(SpaError):
    """No size of the model's symbolic input dims lets onnxruntime run it (``--input-dim``)."""


class PlanMismatchError(SpaError):
    """A saved plan does not belong to the model it is applied to."""


class OutputPathError(SpaError):
    """The output path cannot be written (a directory, a missing parent, no permission)."""


class SpillError(SpaError):
    """Activations beyond the memory budget could not be spilled to disk (a full disk, a
    temporary directory that cannot be written)."""


class ValidationError(SpaError):
    """The pruned model failed validation (onnxruntime, shapes, or the numeric oracle)."""

    exit_code = ExitCode.VALIDATION_FAILED


class NothingPrunableError(SpaError):
    """Every channel group of the model is frozen; nothing can be removed."""

    exit_code = ExitCode.NOTHING_PRUNABLE


def one_line(message: BaseException | str, limit: int = 300) -> str:
    """``message`` on one line, without ANSI escape sequences, cut to ``limit`` characters."""
    text = " ".join(_ANSI.sub("", str(message)).split())
    return text[:limit] + ("…" if len(text) > limit else "")
