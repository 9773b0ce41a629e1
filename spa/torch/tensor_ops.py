"""ONNX's remaining tensor, random, bitwise and signal ops in torch, for
``spa.torch.from_onnx``.

(Being written: see the functions below; each registers itself with
:func:`spa.torch.interpreter.op`.)
"""

from __future__ import annotations
