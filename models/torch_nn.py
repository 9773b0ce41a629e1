"""Reference models built from PyTorch's own transformer modules.

* ``torch_encoder`` -- ``nn.TransformerEncoder`` of two
  ``nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)``
  (post-norm, ReLU) on a float ``[1, 10, 32]`` input, mean over the
  sequence, ``Linear(32, 10)``.
* ``torch_mha`` -- ``nn.MultiheadAttention(32, 4, batch_first=True)``
  self-attention (``need_weights=False``) on ``[1, 10, 32]`` followed by a
  ``Linear(32, 10)`` applied per token (output ``[1, 10, 10]``).

Fast path: in eval mode (no grad) ``TransformerEncoderLayer.forward`` calls
the fused kernel ``torch._transformer_encoder_layer_fwd`` and
``MultiheadAttention.forward`` calls ``torch._native_multi_head_attention``
whenever ``torch.backends.mha.get_fastpath_enabled()`` is true and the other
conditions hold (batch_first, no dropout, no autocast, ...). The exporters
call the model under ``torch.no_grad()`` (see :mod:`models.export`), so the
torchscript tracer records those kernels and then fails: it has no symbolic
for ``aten::_transformer_encoder_layer_fwd`` /
``aten::_native_multi_head_attention`` ("UnsupportedOperatorError"). The
dynamo exporter is not affected (``torch.export`` traces the regular path,
``aten.scaled_dot_product_attention``, even with the fast path enabled).
Both modules here therefore disable the fast path for the duration of their
own ``forward`` (:func:`no_mha_fastpath`, restoring the previous setting),
so they export to plain ops with every exporter and nobody has to remember a
global switch; the math is the same (the fast path is an optimisation only).
``enable_nested_tensor=False`` is also set on the encoder (nested tensors only
matter with a ``src_key_padding_mask``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from models.attention import finalize_transformer

__all__ = ["TorchEncoder", "TorchMHA", "no_mha_fastpath", "torch_encoder", "torch_mha"]

DIM = 32
HEADS = 4
MLP = 64
SEQ = 10
NUM_CLASSES = 10


@contextlib.contextmanager
def no_mha_fastpath() -> Iterator[None]:
    """Disable PyTorch's fused MHA/encoder-layer fast path; restore on exit."""
    saved = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(saved)


class TorchEncoder(nn.Module):
    """``nn.TransformerEncoder`` (2 layers), mean pooling, linear classifier."""

    def __init__(self, depth: int = 2) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            d_model=DIM, nhead=HEADS, dim_feedforward=MLP, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(DIM, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with no_mha_fastpath():
            x = self.encoder(x)
        return self.head(x.mean(dim=1))


class TorchMHA(nn.Module):
    """``nn.MultiheadAttention`` self-attention followed by a per-token Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(DIM, HEADS, batch_first=True)
        self.head = nn.Linear(DIM, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with no_mha_fastpath():
            y, _ = self.attn(x, x, x, need_weights=False)
        return self.head(y)


def torch_encoder(seed: int = 0) -> nn.Module:
    """nn.TransformerEncoder (2 post-norm layers), mean pooling, Linear head."""
    torch.manual_seed(seed)
    return finalize_transformer(TorchEncoder())


def torch_mha(seed: int = 0) -> nn.Module:
    """nn.MultiheadAttention self-attention (need_weights=False) + Linear."""
    torch.manual_seed(seed)
    return finalize_transformer(TorchMHA())
