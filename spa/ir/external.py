"""External data without copies: weights mapped from their file, written one tensor at a time.

A model over 2 GB keeps its tensors in a side file (``<name>.data``): each initializer holds
``location``, ``offset`` and ``length`` instead of bytes. Reading it with onnx would copy every
tensor into the protobuf, and graphsurgeon would copy it again into numpy. Here instead:

* :func:`check_external` checks every reference up front (a relative location inside the
  model's directory, a regular file, long enough), so bad input fails before any work;
* :class:`ExternalValues` stands in for a tensor's values in the graph and loads them as a
  read-only memory map: only the pages a pass reads come into memory, and the kernel may drop
  them again; a pass that changes a weight makes a new array (the rewrite's slices);
* :func:`write_graph` writes a graph's data file tensor by tensor: arrays from memory, mapped
  tensors copied file to file by the kernel (``copy_file_range``), never all at once; the
  ModelProto it returns holds references only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import external_data_helper, helper, numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from spa.errors import ModelLoadError
from spa.ir.dtypes import is_floating
from spa.ir.packed import BITS, is_packed, nbytes, packed_bytes, raw_length

if TYPE_CHECKING:
    from collections.abc import Iterator

ALIGN = 4096  # large tensors start on a page, so that onnxruntime can map them too
SMALL = 64  # non-float tensors up to this many elements stay inline (shape constants, axes)
_COPY_CHUNK = 64 << 20


@dataclass(frozen=True)
class ExternalRef:
    """Where one tensor's bytes are: ``length`` bytes of ``path`` from ``offset``."""

    path: Path
    offset: int
    length: int


def external_ref(tensor: onnx.TensorProto, base_dir: Path, name: str = "<model>"
                 ) -> ExternalRef:
    """The checked reference of an external tensor, or :class:`ModelLoadError`."""
    info = external_data_helper.ExternalDataInfo(tensor)
    where = f"{name}: tensor '{tensor.name}'"
    location = info.location or ""
    rel = Path(location)
    if not location or rel.is_absolute() or ".." in rel.parts:
        raise ModelLoadError(f"{where}: external data location {location!r} must be a relative "
                             "path inside the model's directory")
    path = base_dir / rel
    if not path.is_file():
        raise ModelLoadError(f"{where}: external data file {location!r} is missing "
                             f"(looked in {base_dir})")
    offset = int(info.offset or 0)
    expected = raw_length(tensor.data_type, tensor.dims)
    length = int(info.length) if info.length else expected
    if expected is not None and length != expected:
        raise ModelLoadError(f"{where}: external data length {length} does not match its shape "
                             f"{list(tensor.dims)} ({expected} bytes)")
    size = path.stat().st_size
    if offset < 0 or length is None or offset + length > size:
        raise ModelLoadError(f"{where}: external data file {location!r} is too short "
                             f"({size} bytes; the tensor needs {offset}+{length})")
    return ExternalRef(path, offset, length)


def _numpy_dtype(data_type: int) -> np.dtype | None:
    """The dtype whose bytes are the tensor's bytes; None for packed (4-bit) and strings."""
    if data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED) \
            or data_type in BITS:
        return None
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(data_type))
    except (KeyError, TypeError, ValueError):
        return None


def uses_external(tensor: onnx.TensorProto) -> bool:
    return external_data_helper.uses_external_data(tensor)


def check_external(model: onnx.ModelProto, base_dir: Path, name: str) -> None:
    """Check every external reference of ``model`` (initializers and constant attributes), and
    read the small tensors in: shape constants must be inline for the checker and for shape
    inference (exporters such as dynamo write every initializer to the data file)."""
    for tensor in external_data_helper._get_all_tensors(model):
        if uses_external(tensor):
            ref = external_ref(tensor, base_dir, name)
            if int(np.prod(tensor.dims, dtype=np.int64)) <= SMALL:
                with open(ref.path, "rb") as f:
                    f.seek(ref.offset)
                    tensor.raw_data = f.read(ref.length)
                del tensor.external_data[:]
                tensor.data_location = onnx.TensorProto.DEFAULT


class ExternalValues(LazyValues):
    """Lazily loaded values of an external tensor: a read-only memory map of its bytes."""

    def __init__(self, tensor: onnx.TensorProto, base_dir: Path, name: str = "<model>"):
        super().__init__(tensor)
        self.base_dir = Path(base_dir)
        self.ref = external_ref(tensor, self.base_dir, name)

    def load(self) -> np.ndarray:
        dtype = _numpy_dtype(self.tensor.data_type)
        shape = tuple(int(d) for d in self.tensor.dims)
        if dtype is None or self.ref.length == 0:
            return numpy_helper.to_array(self.tensor, str(self.base_dir))
        mapped = np.memmap(self.ref.path, dtype=dtype, mode="r", offset=self.ref.offset,
                           shape=shape)
        # The bytes of this array: copied file to file, re-exported. (numpy's stubs declare no
        # instance attributes; the array takes this one like any Python object.)
        mapped._spa_source = self  # type: ignore[attr-defined]
        return mapped


def attach_external(graph: gs.Graph, base_dir: Path, name: str = "<model>") -> None:
    """Give every constant of ``graph`` that references external data mapped values."""
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant) and type(v := t._values) is LazyValues \
                and uses_external(v.tensor):
            t._values = ExternalValues(v.tensor, base_dir, name)


def unload(graph: gs.Graph) -> None:
    """Turn mapped values back into references (before exporting a graph, so that the export
    writes references rather than copying the mapped bytes into the protobuf)."""
    for t in graph.tensors().values():
        source = getattr(getattr(t, "_values", None), "_spa_source", None)
        if isinstance(t, gs.Constant) and isinstance(source, ExternalValues):
            t._values = source


def peek(t: gs.Constant) -> np.ndarray:
    """The values of ``t`` without keeping an external tensor mapped in the graph: a pass
    that reads every weight once (scoring) then holds one tensor's pages at a time, not all."""
    v = t._values
    return v.load() if isinstance(v, ExternalValues) else np.asarray(t.values)


def materialise(graph: gs.Graph) -> None:
    """Load every external tensor of ``graph`` (for an in-memory export: onnxruntime fed with
    bytes, or a model saved without a data file)."""
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant) and isinstance(t._values, ExternalValues):
            t.values  # noqa: B018 (the property loads and keeps them)




def _reference(name: str, like, location: str, offset: int, length: int, base_dir: Path
               ) -> ExternalValues:
    tensor = onnx.TensorProto(name=name, dims=[int(d) for d in like.shape],
                              data_type=_onnx_type(like),
                              data_location=onnx.TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", str(offset)),
                       ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return ExternalValues(tensor, base_dir)


def _onnx_type(values) -> int:
    if isinstance(values, LazyValues):
        return values.tensor.data_type
    return helper.np_dtype_to_tensor_dtype(np.asarray(values).dtype)


def goes_external(t: gs.Constant) -> bool:
    """Floating-point tensors always go to the data file; others when larger than ``SMALL``
    elements (shape constants stay inline, where shape inference reads them)."""
    v = t._values
    data_type = _onnx_type(v)
    if data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return False
    return is_floating(data_type) or int(np.prod(v.shape, dtype=np.int64)) > SMALL


def graph_bytes(graph: gs.Graph) -> int:
    """Bytes of every constant of ``graph``, without loading any."""
    return sum(nbytes(t._values) for t in graph.tensors().values()
               if isinstance(t, gs.Constant) and hasattr(t._values, "nbytes"))


def write_graph(graph: gs.Graph, model_path: Path) -> None:
    """Write the data file ``<model_path>.data`` of ``graph`` and point its constants at it.

    Tensors are laid out first (each large one on a page boundary), then written one at a
    time; an array is dropped from the graph as soon as its bytes are out, so the graph ends up
    holding references to the new file only. Export it afterwards (cheaply: references only).
    """
    data_path = model_path.with_name(model_path.name + ".data")
    layout = list(_layout(graph))
    fd = os.open(data_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for t, offset, length in layout:
            values, t._values = t._values, None  # the graph lets go of the array
            _write_values(fd, values, offset, length)
            t._values = _reference(t.name, values, data_path.name, offset, length,
                                   model_path.parent)
            del values
        os.ftruncate(fd, layout[-1][1] + layout[-1][2] if layout else 0)
    finally:
        os.close(fd)


def _layout(graph: gs.Graph) -> Iterator[tuple[gs.Constant, int, int]]:
    offset = 0
    seen: set[str] = set()
    for t in graph.tensors().values():
        if not isinstance(t, gs.Constant) or t.name in seen or not goes_external(t):
            continue
        seen.add(t.name)
        length = nbytes(t._values)
        if length >= ALIGN:
            offset = -(-offset // ALIGN) * ALIGN
        yield t, offset, length
        offset += length


def _write_values(fd: int, values, offset: int, length: int) -> None:
    ref = _mapped(values)
    if ref is not None:
        _copy_range(ref, fd, offset, length)
        return
    arr = values.load() if isinstance(values, LazyValues) else np.asarray(values)
    flat = np.frombuffer(packed_bytes(arr), np.uint8) if is_packed(arr) \
        else np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    if flat.size != length:
        raise ValueError(f"tensor of {flat.size} bytes laid out as {length}")
    view, done = flat.data, 0
    while done < length:
        done += os.pwrite(fd, view[done:], offset + done)


def _mapped(values) -> ExternalRef | None:
    """The file bytes ``values`` are, unchanged (mapped read-only), if any."""
    source = values if isinstance(values, ExternalValues) else getattr(values, "_spa_source", None)
    return source.ref if isinstance(source, ExternalValues) else None


def _copy_range(ref: ExternalRef, fd: int, offset: int, length: int) -> None:
    """Copy ``length`` bytes from ``ref`` to ``fd`` at ``offset``, in the kernel when it can."""
    with open(ref.path, "rb") as src:
        done = 0
        while done < length:
            n = min(_COPY_CHUNK, length - done)
            try:
                copied = os.copy_file_range(src.fileno(), fd, n, ref.offset + done,
                                            offset + done)
            except (AttributeError, OSError):
                copied = os.pwrite(fd, os.pread(src.fileno(), n, ref.offset + done),
                                   offset + done)
            if copied <= 0:
                raise OSError(f"{ref.path}: short read at byte {ref.offset + done}")
            done += copied
