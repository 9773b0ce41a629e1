"""The PyTorch front end: prune an ``nn.Module`` in place, or get a trainable module from ONNX.

``spa.torch.prune(module, example_inputs, ratio=0.5, criterion="obspa")`` plans on the exported
ONNX graph exactly as ``spa prune`` does and slices the module's own parameters and buffers;
``spa.torch.apply`` replays a saved plan; ``spa.torch.from_onnx`` turns any (pruned) ONNX model
into a trainable module. Needs the ``torch`` extra.
"""

from __future__ import annotations

from spa.torch.frontend import TorchPruneReport, apply, prune
from spa.torch.interpreter import OnnxModule, UnsupportedOpsError, from_onnx

__all__ = ["OnnxModule", "TorchPruneReport", "UnsupportedOpsError", "apply", "from_onnx", "prune"]
