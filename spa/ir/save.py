"""Write a graph back to ONNX: export, re-infer shapes, full check, atomic write.

``onnx.checker.check_model(full_check=True)`` runs first (on a weight-less copy: structure and
strict shape inference); the output is then written into a temporary directory beside the
destination and renamed into place, so a failed run leaves no partial file. Models whose weights
exceed 2 GB (or whose input used external data) are written with their floating-point tensors in
``<name>.data`` next to the model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import external_data_helper

from spa.errors import OutputPathError, ValidationError
from spa.ir.load import LoadedModel, _one_line, _with_inferred_shapes, weightless

TWO_GB = 2 * 1024**3


def to_onnx(loaded: LoadedModel, graph: gs.Graph | None = None) -> onnx.ModelProto:
    """Export ``graph`` (default: the loaded one) with the original model's header."""
    graph = loaded.graph if graph is None else graph
    exported = gs.export_onnx(graph, do_type_check=False)
    model = onnx.ModelProto()
    model.CopyFrom(loaded.proto_header)
    model.graph.CopyFrom(exported.graph)
    # Shapes of pruned activations changed; drop every intermediate shape and infer afresh.
    del model.graph.value_info[:]
    return model


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape inference on the rewritten model (on a weight-less copy, so any size works).

    Not strict: onnx cannot infer some valid ops (GroupNormalization-21, say); the full checker
    and onnxruntime validation still run on the result.
    """
    return _with_inferred_shapes(model, "the rewritten model", ValidationError)


def check_output_path(out: str | os.PathLike[str], *, input_path: Path | None) -> Path:
    """Reject an output path that cannot be written before any work is done."""
    out_p = Path(out)
    if out_p.is_dir():
        raise OutputPathError(f"{out_p}: output path is a directory")
    if not out_p.parent.exists():
        raise OutputPathError(f"{out_p}: parent directory {out_p.parent} does not exist")
    if not os.access(out_p.parent, os.W_OK):
        raise OutputPathError(f"{out_p}: directory {out_p.parent} is not writable")
    if input_path is not None and out_p.exists() and out_p.resolve() == input_path.resolve():
        raise OutputPathError(f"{out_p}: refusing to overwrite the input model")
    return out_p


def save_model(model: onnx.ModelProto, out: str | os.PathLike[str], *, external: bool = False,
               input_path: Path | None = None) -> Path:
    """Check and write ``model`` to ``out`` atomically; return the path written.

    With external data, ``model``'s tensors are turned into references to the written file
    (onnx does that in place): use the in-memory model before saving, not after.
    """
    out_p = check_output_path(out, input_path=input_path)
    try:  # structure and strict shape inference; the weights are numpy-made, sized by design
        onnx.checker.check_model(weightless(model), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ValidationError(f"the rewritten model fails onnx.checker: {_one_line(exc)}") \
            from exc
    external = external or tensor_bytes(model) >= TWO_GB
    tmp_dir = Path(tempfile.mkdtemp(prefix=".spa-", dir=out_p.parent))
    try:
        tmp_model = tmp_dir / out_p.name
        data_name = out_p.name + ".data"
        if external:
            _mark_weights_external(model, data_name)
        onnx.save_model(model, str(tmp_model))
        if external and (tmp_dir / data_name).exists():  # absent when every tensor is tiny
            os.replace(tmp_dir / data_name, out_p.parent / data_name)
        os.replace(tmp_model, out_p)
    except OSError as exc:
        raise OutputPathError(f"{out_p}: cannot write: {_one_line(exc)}") from exc
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_p


def _mark_weights_external(model: onnx.ModelProto, location: str) -> None:
    """Send every floating-point initializer to ``location``; integer tensors (shape constants,
    axes) stay inline, where shape inference and the checker can read them."""
    for t in model.graph.initializer:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
        if t.HasField("raw_data") and np.issubdtype(dtype, np.floating):
            external_data_helper.set_external_data(t, location)


def tensor_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)
