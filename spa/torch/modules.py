"""Write a pruned ONNX model's constants back into the module, then fix the attributes its
``forward`` reads.

Parameters keep their identity (``param.data`` is replaced, the ``nn.Parameter`` object stays),
so references the user holds stay valid; an optimizer should still be built after pruning, since
its state has the old shapes. The attributes are derived from the new tensor shapes, and the
``group`` count of a convolution from the pruned ONNX node that reads its weight: the ONNX plan
and the torch slicing are one truth.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from spa.errors import SpaError

if TYPE_CHECKING:
    from spa.torch.params import ParamMap

# Attribute names that modules (HuggingFace, timm, hand-written) use for their head layout.
HEAD_COUNT = ("num_heads", "num_attention_heads", "n_heads", "n_head", "heads")
KV_HEAD_COUNT = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
HEAD_SIZE = ("head_dim", "attention_head_size", "head_size", "d_head")
INNER_WIDTH = ("all_head_size", "attn_dim", "inner_dim", "split_size")
FUSED_QKV = ("qkv", "c_attn", "query_key_value", "Wqkv", "to_qkv")
QUERY = ("q_proj", "query", "q", "to_q", "wq", "q_lin")
KEY = ("k_proj", "key", "k", "to_k", "wk", "k_lin")


class WriteBackError(SpaError):
    """A parameter read by several layers was pruned inconsistently."""


def write_back(module: nn.Module, params: ParamMap, pruned: onnx.ModelProto) -> int:
    """Set every mapped parameter to its pruned (and possibly compensated) value; returns how
    many tensors changed."""
    values = {i.name: i for i in pruned.graph.initializer}
    tensors: dict[str, torch.Tensor] = dict(module.named_parameters())
    tensors.update(module.named_buffers())
    changed = 0
    for pname, consts in params.by_param().items():
        new = [origin.to_param(numpy_helper.to_array(values[c])) for c, origin in consts
               if c in values]
        if not new:
            continue
        if any(v.shape != new[0].shape or not np.array_equal(v, new[0]) for v in new[1:]):
            raise WriteBackError(f"parameter '{pname}' is read by several layers that were "
                                 "pruned differently; freeze them with ignore=[...]")
        t = tensors[pname]
        value = torch.from_numpy(np.array(new[0], copy=True, order="C"))
        value = value.to(dtype=t.dtype, device=t.device)
        if value.shape != t.shape or not torch.equal(value, t.data):
            t.data = value
            changed += 1
    return changed


def conv_groups(pruned: onnx.ModelProto, params: ParamMap) -> dict[str, int]:
    """``group`` of each Conv/ConvTranspose in the pruned model, by weight parameter name."""
    out: dict[str, int] = {}
    for node in pruned.graph.node:
        if node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 1:
            origin = params.origins.get(node.input[1])
            if origin is not None:
                group = next((a.i for a in node.attribute if a.name == "group"), 1)
                out[origin.param] = int(group)
    return out


def fix_attributes(module: nn.Module, groups: dict[str, int]) -> None:
    """Make every layer's size attributes agree with its (sliced) tensors."""
    for name, m in module.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(m, nn.modules.conv._ConvNd):
            _fix_conv(m, groups.get(prefix + "weight", m.groups))
        elif isinstance(m, nn.Linear):
            m.out_features, m.in_features = m.weight.shape
        elif isinstance(m, nn.modules.batchnorm._NormBase):
            ref = m.weight if m.weight is not None else m.running_mean
            if ref is not None:
                m.num_features = ref.shape[0]
        elif isinstance(m, nn.LayerNorm) and m.weight is not None:
            m.normalized_shape = tuple(m.weight.shape)
        elif isinstance(m, nn.GroupNorm) and m.weight is not None:
            m.num_channels = m.weight.shape[0]
        elif isinstance(m, nn.Embedding):
            m.num_embeddings, m.embedding_dim = m.weight.shape
        elif isinstance(m, nn.PReLU):
            m.num_parameters = m.weight.numel()
        elif (w := _conv1d_weight(m)) is not None:
            m.nf = w.shape[1]
        _fix_heads(m)


def _fix_conv(m: nn.modules.conv._ConvNd, groups: int) -> None:
    m.groups = groups
    if m.transposed:  # weight [in, out / groups, ...]
        m.in_channels, m.out_channels = m.weight.shape[0], m.weight.shape[1] * groups
    else:  # weight [out, in / groups, ...]
        m.out_channels, m.in_channels = m.weight.shape[0], m.weight.shape[1] * groups


def _fix_heads(m: nn.Module) -> None:
    """Head counts of an attention module, from its projections' new widths."""
    size_attr = next((a for a in HEAD_SIZE if isinstance(getattr(m, a, None), int)), None)
    if size_attr is None:
        return
    head_dim = getattr(m, size_attr)
    widths = {n: w for n, c in m.named_children() if (w := _out_width(c)) is not None}
    fused = next((widths[n] for n in FUSED_QKV if n in widths), None)
    query = next((widths[n] for n in QUERY if n in widths), None)
    key = next((widths[n] for n in KEY if n in widths), None)
    if query is not None:
        width = query
    elif fused is not None and fused % 3 == 0:
        width = fused // 3
    else:
        return
    heads = width // head_dim
    _set_ints(m, HEAD_COUNT, heads)
    _set_ints(m, INNER_WIDTH, width)
    if key is not None:
        kv_heads = key // head_dim
        _set_ints(m, KV_HEAD_COUNT, kv_heads)
        if isinstance(getattr(m, "num_key_value_groups", None), int) and kv_heads:
            m.num_key_value_groups = heads // kv_heads


def _conv1d_weight(m: nn.Module) -> torch.Tensor | None:
    """The weight of a HuggingFace Conv1D (GPT-2: weight [in, out], ``nf`` = out), or None."""
    w = getattr(m, "weight", None)
    is_conv1d = isinstance(getattr(m, "nf", None), int) and isinstance(w, torch.Tensor) \
        and w.ndim == 2
    return w if is_conv1d else None


def _out_width(m: nn.Module) -> int | None:
    """Output width of a projection, read off its weight (children are fixed after their
    parent, so their ``out_features`` may still be stale)."""
    if isinstance(m, nn.Linear):
        return m.weight.shape[0]
    w = _conv1d_weight(m)
    if w is not None:
        return w.shape[1]
    return None


def _set_ints(m: nn.Module, names: tuple[str, ...], value: int) -> None:
    for a in names:
        if isinstance(getattr(m, a, None), int):
            setattr(m, a, value)
