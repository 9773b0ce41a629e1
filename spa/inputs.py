"""Sizes of the symbolic input dims, for every input SPA makes up (validation, latency,
synthetic Hessians), resolved once per run.

A graph input's dim is fixed (an integer) or symbolic: a name (``height``) or, unnamed, the key
``input[axis]``. Every symbolic dim gets one size, the first of these that applies:

1. ``flag`` — ``--input-dim NAME=SIZE`` (``input_dims`` of the options) always wins;
2. ``metadata`` — the model's ``metadata_props``: an entry named like the dim (``batch: 1``),
   or an image size (``imgsz``, ``image_size``, ``img_size``, ``input_size``: ``640`` or
   ``[640, 640]``, as Ultralytics writes) for the spatial dims of an input, height then width.
   Taken as given;
3. ``weight`` — a dim a layer contracts with a static weight dim, read straight from the
   input: the channels of a Conv's input (the weight's input channels times its groups),
   the last dim of a MatMul's or Gemm's (the weight's rows). No run has another size
   (🤗 Optimum's ViT names its image channels ``num_channels``);
4. its *kind*, from its name (``batch``, ``N``, ``bs`` …; ``height``, ``width``, ``h``, ``w``
   …; ``seq``, ``sequence_length``, ``S``, ``tokens`` …) or else from its position (axis 0:
   batch; the axes around a fixed channel count ≤ 4 of a rank-4 float input, NCHW or NHWC:
   spatial; axis 1 of a rank-2 integer input: sequence), gives a ladder of sizes::

       batch 1;  spatial 32, 64, …, 1024;  sequence 8, 16, …, 128;  unknown 1, 8, 32, 128

   All these dims climb their ladders together (a dim at its top stays there) until
   onnxruntime runs the original model on random inputs of those sizes; last, all at 1
   (broadcasting can make a model run only there, SPA's old default). The size found is
   labelled ``name``, ``position`` or ``default`` (unknown kind) when it is the first rung, and
   ``searched`` otherwise. The model is not run when no dim has a choice (only batch dims, or
   every size given).

When no rung runs, :class:`~spa.errors.InputDimsError` names the dims and the flag. Dims of
one name share one size (ONNX names equal dims alike).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
import numpy.typing as npt
import onnx_graphsurgeon as gs

from spa.errors import InputDimsError
from spa.ir.load import contracted_axes

log = logging.getLogger(__name__)

#: Runs the model at the given sizes: None when it ran, else onnxruntime's message.
Probe = Callable[[dict[str, int]], str | None]
IMAGE_SIZE_KEYS = ("imgsz", "image_size", "img_size", "imagesize", "input_size")


class Kind(Enum):
    """What a symbolic dim measures; it decides the sizes tried."""

    BATCH = "batch"
    SPATIAL = "spatial"
    SEQUENCE = "sequence"
    UNKNOWN = "unknown"

    @property
    def ladder(self) -> tuple[int, ...]:
        """The sizes tried, smallest first."""
        return LADDERS[self]


LADDERS = {Kind.BATCH: (1,), Kind.SPATIAL: (32, 64, 128, 256, 512, 1024),
           Kind.SEQUENCE: (8, 16, 32, 64, 128), Kind.UNKNOWN: (1, 8, 32, 128)}


_NAMES = {
    Kind.BATCH: r"n|b|bs|batch.*|.*_batch|num_?batch.*",
    Kind.SPATIAL: r"h|w|.*height.*|.*width.*|img_?[hw]|image_?[hw]|[hw]_?in|in_?[hw]",
    Kind.SEQUENCE: r"s|t|l|.*seq.*|.*tokens?|.*length|.*_len|time.*|frames?",
}


@dataclass(frozen=True)
class InputDims:
    """The size of every symbolic input dim (by name), and how each was chosen."""

    sizes: dict[str, int] = field(default_factory=dict)
    how: dict[str, str] = field(default_factory=dict)

    @property
    def items(self) -> tuple[tuple[str, int], ...]:
        return tuple(self.sizes.items())

    def describe(self) -> str:
        """``height=32 (name), width=32 (name)``."""
        return ", ".join(f"{k}={v} ({self.how.get(k, '?')})" for k, v in self.sizes.items())


@dataclass(frozen=True)
class SymbolicDim:
    """One symbolic dim of the graph inputs (the first place its key appears)."""

    key: str  # the dim's name, or ``input[axis]`` when it has none
    kind: Kind
    named: bool  # the kind came from the name (else from the position)


def dim_key(input_name: str, axis: int, dim: object) -> str | None:
    """The key of a symbolic dim; None for a fixed one."""
    if isinstance(dim, (int, np.integer)) and dim > 0:
        return None
    return dim if isinstance(dim, str) and dim else f"{input_name}[{axis}]"


def symbolic_dims(inputs: Sequence[gs.Tensor]) -> dict[str, SymbolicDim]:
    """Every symbolic dim of the graph inputs, by key, in order of first appearance."""
    found: dict[str, SymbolicDim] = {}
    for t in inputs:
        for axis, d in enumerate(t.shape or ()):
            key = dim_key(t.name, axis, d)
            if key is not None and key not in found:
                found[key] = _classify(key, t, axis, named=isinstance(d, str) and bool(d))
    return found


def _classify(key: str, t: gs.Tensor, axis: int, *, named: bool) -> SymbolicDim:
    if named:
        for kind, pattern in _NAMES.items():
            if re.fullmatch(pattern, key.lower()):
                return SymbolicDim(key, kind, True)
    return SymbolicDim(key, _kind_at(t, axis), False)


def _kind_at(t: gs.Tensor, axis: int) -> Kind:
    """A dim's kind from where it sits: batch first, spatial around image channels, tokens."""
    shape = list(t.shape)
    floating = _is_float(t.dtype)
    if axis == 0 and len(shape) >= 2:
        return Kind.BATCH
    if floating and len(shape) == 4:
        channels = 1 if _channel_like(shape[1]) else 3 if _channel_like(shape[3]) else None
        if channels is not None and axis != channels:
            return Kind.SPATIAL
    if not floating and len(shape) == 2 and axis == 1:
        return Kind.SEQUENCE
    return Kind.UNKNOWN


def _is_float(dtype: npt.DTypeLike) -> bool:
    try:
        return dtype is not None and np.issubdtype(np.dtype(dtype), np.floating)
    except TypeError:  # a type numpy does not know (bfloat16, say)
        return False


def _channel_like(d: object) -> bool:
    return isinstance(d, (int, np.integer)) and bool(0 < d <= 4)


def from_metadata(dims: Mapping[str, SymbolicDim], inputs: Sequence[gs.Tensor],
                  metadata: Mapping[str, str]) -> dict[str, int]:
    """Sizes the model's metadata states: entries named like a dim, and image sizes."""
    meta = {k.lower(): v for k, v in metadata.items()}
    sizes = {k: n[0] for k in dims if len(n := _ints(meta.get(k.lower(), ""))) == 1}
    image = next((_ints(meta[k]) for k in IMAGE_SIZE_KEYS if k in meta), [])
    for t in inputs if image else ():
        spatial = [k for a, d in enumerate(t.shape or ()) if (k := dim_key(t.name, a, d))
                   and dims[k].kind is Kind.SPATIAL]
        if len(image) in (1, len(spatial)):
            for k, size in zip(spatial, image * len(spatial) if len(image) == 1 else image):
                sizes.setdefault(k, size)
    return sizes


def from_weights(inputs: Sequence[gs.Tensor]) -> dict[str, int]:
    """Sizes a layer reading an input fixes: the length of the weight dim it contracts with
    the input's (a Conv's input channels, a MatMul's or Gemm's inner dim), by dim key. Dims
    that two layers would size differently are left out."""
    found: dict[str, set[int]] = {}
    for t in inputs:
        shape = list(t.shape or ())
        for node, x in _readers(t):
            axis, length = _contracted(node, x, len(shape))
            key = dim_key(t.name, axis, shape[axis]) if axis is not None else None
            if key is not None and length:
                found.setdefault(key, set()).add(length)
    return {k: lengths.pop() for k, lengths in found.items() if len(lengths) == 1}


def _readers(t: gs.Tensor, depth: int = 0) -> Iterator[tuple[gs.Node, gs.Tensor]]:
    """The nodes reading ``t``, or reading it through Casts and Identities (CLIP casts its
    pixels to the convolution's type first), each with the tensor it reads."""
    for node in t.outputs if isinstance(t, gs.Variable) and depth < 4 else ():
        if node.op in ("Cast", "Identity") and node.outputs:
            yield from _readers(node.outputs[0], depth + 1)
        else:
            yield node, t


def _contracted(node: gs.Node, x: gs.Tensor, rank: int) -> tuple[int | None, int]:
    """(axis of ``x``, length) that ``node``'s constant weight contracts ``x`` with; (None, 0)
    when it has none."""
    w = node.inputs[1] if len(node.inputs) > 1 else None
    if node.inputs[0] is not x or not isinstance(w, gs.Constant) or rank < 2:
        return None, 0
    shape = w.shape
    if node.op == "Conv" and len(shape) == rank:
        return 1, int(shape[1]) * int(node.attrs.get("group", 1))
    axes = contracted_axes(node)
    if axes is None or len(shape) < 2:
        return None, 0  # no product by a matrix
    if node.op == "Gemm" and (rank != 2 or len(shape) != 2 or axes[0] != 1):
        return None, 0  # a Gemm reading x transposed
    return axes[0] % rank, int(shape[axes[1]])


def _ints(text: str) -> list[int]:
    values = [int(v) for v in re.findall(r"\d+", text)]
    return values if values and all(v > 0 for v in values) and len(values) <= 3 else []


def resolve(inputs: Sequence[gs.Tensor], metadata: Mapping[str, str],
            given: Mapping[str, int], probe: Probe) -> InputDims:
    """The sizes of every symbolic dim of ``inputs`` by the rule of this module."""
    dims = symbolic_dims(inputs)
    sizes = {k: given[k] for k in dims if k in given}
    how = dict.fromkeys(sizes, "flag")
    for k, n in from_metadata(dims, inputs, metadata).items():
        if k not in sizes:
            sizes[k], how[k] = n, "metadata"
    for k, n in from_weights(inputs).items():
        if k in dims and k not in sizes:
            sizes[k], how[k] = n, "weight"
    open_dims = [d for k, d in dims.items() if k not in sizes]
    found = _climb(open_dims, sizes, probe) if any(len(d.kind.ladder) > 1 for d in open_dims) \
        else {d.key: d.kind.ladder[0] for d in open_dims}
    for d in open_dims:
        sizes[d.key], how[d.key] = found[d.key], _how(d, found[d.key])
    _warn_unused(given, dims)
    result = InputDims({k: sizes[k] for k in dims}, {k: how[k] for k in dims})
    if result.sizes:
        log.info("symbolic input dims: %s", result.describe())
    return result


def _how(d: SymbolicDim, size: int) -> str:
    if size != d.kind.ladder[0]:
        return "searched"
    return "name" if d.named else "default" if d.kind is Kind.UNKNOWN else "position"


def _warn_unused(given: Mapping[str, int], dims: Mapping[str, SymbolicDim]) -> None:
    unused = [k for k in given if k not in dims]
    if unused:
        log.warning("--input-dim %s: the model has no symbolic input dim of that name (its "
                    "symbolic dims: %s)", ", ".join(unused), ", ".join(dims) or "none")


def _rungs(open_dims: list[SymbolicDim]) -> Iterator[dict[str, int]]:
    """The sizes tried, in order: every ladder's next rung together (a dim at its top stays
    there), then all at 1 (broadcasting can make a model run only there)."""
    for rung in range(max(len(d.kind.ladder) for d in open_dims)):
        yield {d.key: d.kind.ladder[min(rung, len(d.kind.ladder) - 1)] for d in open_dims}
    yield {d.key: 1 for d in open_dims}


def _climb(open_dims: list[SymbolicDim], fixed: dict[str, int], probe: Probe) -> dict[str, int]:
    """The first sizes of :func:`_rungs` at which the model runs; :class:`InputDimsError` when
    none does."""
    error = ""
    for sizes in _rungs(open_dims):
        error = probe(fixed | sizes) or ""
        if not error:
            return sizes
        log.info("the model does not run with input dims %s: %s", sizes, error)
    searched = [d for d in open_dims if len(d.kind.ladder) > 1]
    tried = sorted({1} | {n for d in searched for n in d.kind.ladder})
    raise InputDimsError(
        f"onnxruntime runs the model at none of the sizes tried for its symbolic input dims "
        f"{', '.join(d.key for d in searched)} ({', '.join(map(str, tried))}): give them with "
        f"--input-dim NAME=SIZE (last error: {error[:200]})")
