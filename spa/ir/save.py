"""Write a graph back to ONNX: export, re-infer shapes, full check, atomic write.

``onnx.checker.check_model(full_check=True)`` runs first (on a weight-less copy: structure and
strict shape inference); the output is then written into a temporary directory beside the
destination (:class:`Staging`) and renamed into place, so a failed run leaves no partial file.

Models whose input used external data, or whose weights exceed 2 GB, are *streamed*
(:func:`streamed`): their tensors go to ``<name>.data`` one at a time, from memory or copied
file to file from the input's data file (spa/ir/external.py), and no protobuf ever holds the
weights. Other models are exported in memory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import external_data_helper
from onnx_graphsurgeon.exporters.onnx_exporter import (
    OnnxExporter,
    check_duplicate_node_names,
)
from onnx_graphsurgeon.ir.tensor import SparseValues
from onnx_graphsurgeon.logger import G_LOGGER

from spa.errors import OutputPathError, ValidationError, one_line
from spa.ir.contrib import onnx_view
from spa.ir.dtypes import is_floating, onnx_type
from spa.ir.external import graph_bytes, materialise, unload, write_graph
from spa.ir.ir3 import check_declared, declare_initializers
from spa.ir.load import LoadedModel, _with_inferred_shapes, weightless
from spa.ir.packed import is_packed, packed_bytes, raw_length
from spa.ir.values import RAW_DTYPES
from spa.ir.wire import binary_protobuf, serialized_pieces

TWO_GB = 2 * 1024**3


def to_onnx(loaded: LoadedModel, graph: gs.Graph | None = None, *, references: bool = False
            ) -> onnx.ModelProto:
    """Export ``graph`` (default: the loaded one) with the original model's header.

    External tensors are read into the protobuf, unless ``references``: then they stay
    references to their data file (cheap; for writing with :func:`write_streamed`).
    """
    graph = loaded.graph if graph is None else graph
    if references:
        unload(graph)
    else:
        materialise(graph)
    model = onnx.ModelProto()
    model.CopyFrom(loaded.proto_header)
    _export_graph_into(model.graph, graph)
    declare_initializers(model)  # IR 3: initializers are graph inputs too
    return model


def _export_graph_into(target: onnx.GraphProto, graph: gs.Graph) -> None:
    """onnx-graphsurgeon's ``export_graph`` (and ``make_graph``), written straight into
    ``target``: a GraphProto made first and copied in would copy every weight once more.
    Without value_info: shapes of pruned activations changed, they are inferred afresh."""
    check_duplicate_node_names(graph.nodes, level=G_LOGGER.WARNING)
    target.node.extend(OnnxExporter.export_node(node) for node in graph.nodes)
    target.name = graph.name
    target.input.extend(OnnxExporter.export_value_info_proto(t, False) for t in graph.inputs)
    target.output.extend(OnnxExporter.export_value_info_proto(t, False) for t in graph.outputs)
    constants = [t for t in graph.tensors().values() if isinstance(t, gs.Constant)]
    for t in constants:
        if not isinstance(t._values, SparseValues) and not _array_into(target, t):
            target.initializer.append(OnnxExporter.export_tensor_proto(t))
    target.sparse_initializer.extend(OnnxExporter.export_sparse_tensor_proto(t)
                                     for t in constants if isinstance(t._values, SparseValues))
    if graph.doc_string:
        target.doc_string = graph.doc_string
    _drop_outer_initializers(target)


def _drop_outer_initializers(graph: onnx.GraphProto, outer: frozenset[str] = frozenset()
                             ) -> None:
    """Leave a constant that a subgraph (If branch, Loop body) reads from an enclosing scope in
    that scope only: onnx-graphsurgeon writes it into the subgraph's initializers too, a second
    copy of the weight (names are unique across scopes, so the name says it is the same)."""
    for i in reversed(range(len(graph.initializer)) if outer else ()):
        if graph.initializer[i].name in outer:
            del graph.initializer[i]
    scope: frozenset[str] | None = None
    for node in graph.node:
        for a in node.attribute:
            for sub in [a.g] if a.HasField("g") else a.graphs:
                scope = scope or outer | {t.name for t in graph.initializer}
                _drop_outer_initializers(sub, scope)


def _array_into(target: onnx.GraphProto, t: gs.Constant) -> bool:
    """Add ``t`` to ``target``'s initializers as onnx-graphsurgeon exports an array of a plain
    type (``make_tensor`` from its bytes), but built in place, not made and then copied in; an
    array of a packed type (int4) packed, which onnx-graphsurgeon cannot (spa/ir/packed.py).
    False (nothing added) for anything else: lazy values, a type to convert on export."""
    values = t._values
    if not isinstance(values, np.ndarray):
        return False
    data_type = onnx_type(values.dtype)  # not gs's dtype_to_onnx: it files e4m3fnuz as e4m3fn
    if (data_type not in RAW_DTYPES and not is_packed(values)) \
            or onnx_type(t.export_dtype) != data_type:
        return False
    tensor = target.initializer.add()
    tensor.data_type = data_type
    tensor.name = t.name
    tensor.dims.extend(values.shape)
    tensor.raw_data = packed_bytes(values) if is_packed(values) else values.tobytes()
    # the bytes are inline: a constant loaded from a data file is not external here
    if t.data_location not in (None, onnx.TensorProto.EXTERNAL):
        tensor.data_location = t.data_location
    return True


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape inference on the rewritten model (on a weight-less copy, so any size works).

    Not strict: onnx cannot infer some valid ops (GroupNormalization-21, say); the full checker
    and onnxruntime validation still run on the result.
    """
    return _with_inferred_shapes(model, "the rewritten model", ValidationError)


def known_dims(model: onnx.ModelProto,
               shapes: dict[str, tuple[int | None, ...]]) -> onnx.ModelProto:
    """``model`` with the dims that shape inference left unknown filled from ``shapes`` (the
    input's declared shapes, cut to the kept channels), where the ranks agree. A head count
    computed at run time (``Reshape(x, Concat(Shape(x)[:2], [-1]))``) is beyond ONNX
    inference; without this, the written file knew less than the one read, and its MACs
    counted such a dim as 1. Dims inference found are never changed."""
    for vi in model.graph.value_info:
        known = shapes.get(vi.name)
        dims = vi.type.tensor_type.shape.dim
        if known is None or len(dims) != len(known):
            continue
        for dim, value in zip(dims, known):
            if value is not None and not dim.HasField("dim_value"):
                dim.dim_value = value
    return model


def check_output_folder(out: Path) -> None:
    """Reject an output folder that cannot be written (it must be absent or empty, its parent
    must exist) before any work is done."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputPathError(f"{out}: exists and is not an empty directory")
    if not out.parent.is_dir():
        raise OutputPathError(f"{out}: parent directory {out.parent} does not exist")


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """A temporary folder beside ``out``, renamed into place when the block ends and removed
    when it raises: a failed run leaves nothing half-written (``out``: absent or empty)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        tmp.chmod(0o777 & ~_umask())  # mkdtemp's is private; the folder is the user's
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def external_data_files(model: onnx.ModelProto) -> set[str]:
    """The file names ``model``'s initializers keep their data in."""
    return {e.value for t in model.graph.initializer for e in t.external_data
            if e.key == "location"}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output_path(out: str | os.PathLike[str], *, input_path: Path | None,
                      input_files: tuple[Path, ...] = ()) -> Path:
    """Reject an output path that cannot be written before any work is done (``input_files``:
    the input's external data files, which the output's data file must not replace)."""
    out_p = Path(out)
    if out_p.is_dir():
        raise OutputPathError(f"{out_p}: output path is a directory")
    if not out_p.parent.exists():
        raise OutputPathError(f"{out_p}: parent directory {out_p.parent} does not exist")
    if not os.access(out_p.parent, os.W_OK):
        raise OutputPathError(f"{out_p}: directory {out_p.parent} is not writable")
    if input_path is not None and out_p.exists() and out_p.resolve() == input_path.resolve():
        raise OutputPathError(f"{out_p}: refusing to overwrite the input model")
    data = out_p.with_name(out_p.name + ".data")
    if data.exists() and any(data.resolve() == f.resolve() for f in input_files):
        raise OutputPathError(f"{out_p}: its data file {data.name} would overwrite the input "
                              "model's external data")
    return out_p


class Staging:
    """A temporary directory beside the output: files are written there, checked, and renamed
    into place by :meth:`commit`; leaving the ``with`` block removes whatever is left."""

    def __init__(self, out: str | os.PathLike[str], *, input_path: Path | None = None,
                 input_files: tuple[Path, ...] = ()):
        self.out = check_output_path(out, input_path=input_path, input_files=input_files)
        try:
            self.dir = Path(tempfile.mkdtemp(prefix=".spa-", dir=self.out.parent))
        except OSError as exc:
            raise OutputPathError(f"{self.out}: cannot write in {self.out.parent}: "
                                  f"{one_line(exc)}") from exc
        self.model_path = self.dir / self.out.name

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def commit(self) -> Path:
        data_name = self.out.name + ".data"
        try:
            if (self.dir / data_name).exists():  # absent when every tensor is inline
                os.replace(self.dir / data_name, self.out.parent / data_name)
            os.replace(self.model_path, self.out)
        except OSError as exc:
            raise OutputPathError(f"{self.out}: cannot write: {one_line(exc)}") from exc
        return self.out


def streamed(loaded: LoadedModel) -> bool:
    """Written tensor by tensor with a data file: external input, or over 2 GB of weights."""
    return loaded.external_data or graph_bytes(loaded.graph) >= TWO_GB


TOO_BIG_TO_REFIT = ("reconstruction holds the model in memory: models over 2 GB need "
                    "--no-reconstruct")


def one_protobuf(loaded: LoadedModel) -> bool:
    """Whether the weights fit one protobuf (under 2 GB), as onnxruntime takes a model from
    memory: reconstruction holds the dense and the pruned model so, whatever file form the
    weights came in (external data included)."""
    return graph_bytes(loaded.graph) < TWO_GB


def write_streamed(loaded: LoadedModel, model_path: Path, graph: gs.Graph | None = None, *,
                   check: bool = True) -> onnx.ModelProto:
    """Write ``graph`` as ``model_path`` + ``<name>.data``, one tensor at a time; the graph's
    constants then refer to the written file. Returns the (weight-less) ModelProto written."""
    graph = loaded.graph if graph is None else graph
    write_graph(graph, model_path)
    model = to_onnx(loaded, graph, references=True)
    if check:
        model = infer_shapes(model)
        full_check(model)
    try:
        model_path.write_bytes(model.SerializeToString())
    except OSError as exc:
        raise OutputPathError(f"{model_path}: cannot write: {one_line(exc)}") from exc
    return model


def save_model(model: onnx.ModelProto, out: str | os.PathLike[str], *, external: bool = False,
               input_path: Path | None = None) -> Path:
    """Check and write an in-memory ``model`` to ``out`` atomically; return the path written.

    With external data, ``model``'s tensors are turned into references to the written file
    (onnx does that in place): use the in-memory model before saving, not after.
    """
    with Staging(out, input_path=input_path) as stage:
        full_check(model)
        write_proto(model, stage.model_path, external=external)
        return stage.commit()


def write_proto(model: onnx.ModelProto, path: Path, *, external: bool = False) -> None:
    """Write an in-memory model (its weights to ``<name>.data`` when external or ≥ 2 GB)."""
    external = external or tensor_bytes(model) >= TWO_GB
    try:
        if external:
            _mark_weights_external(model, path.name + ".data")
        # What onnx.save_model writes, serialised in pieces (spa/ir/wire.py), unless onnx must
        # write it: a text format, external data, or over 2 GB (onnx raises its own error).
        pieces = None if external or _needs_onnx_save(model, path) else serialized_pieces(model)
        if pieces is None or sum(len(p) for p in pieces) > onnx.checker.MAXIMUM_PROTOBUF:
            onnx.save_model(model, str(path))
        else:
            with open(path, "wb") as f:
                f.writelines(pieces)
    except OSError as exc:
        raise OutputPathError(f"{path}: cannot write: {one_line(exc)}") from exc


def _needs_onnx_save(model: onnx.ModelProto, path: Path) -> bool:
    """A text format (by the file's extension), or tensors to write to external data."""
    return not binary_protobuf(path) or any(
        external_data_helper.uses_external_data(t)
        for t in external_data_helper._get_all_tensors(model))


def full_check(model: onnx.ModelProto) -> None:
    try:  # structure and strict shape inference; the weights are numpy-made, sized by design
        onnx.checker.check_model(onnx_view(weightless(model)), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ValidationError(f"the rewritten model fails onnx.checker: {one_line(exc)}") \
            from exc
    check_declared(model)  # the weight-less copy is IR 4, which lacks this rule of IR 3


def _mark_weights_external(model: onnx.ModelProto, location: str) -> None:
    """Send every floating-point initializer to ``location``; integer tensors (shape constants,
    axes) stay inline, where shape inference and the checker can read them."""
    for t in model.graph.initializer:
        if t.HasField("raw_data") and is_floating(t.data_type):
            external_data_helper.set_external_data(t, location)


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the initializers' ``raw_data`` (every read of which copies it: a plain tensor's
    length is taken from its shape; the loader checked that they agree)."""
    total = 0
    for t in model.graph.initializer:
        if not t.HasField("raw_data"):
            continue
        total += raw_length(t.data_type, t.dims) or len(t.raw_data)
    return total
