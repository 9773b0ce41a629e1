"""Normalisation of how a file stores its weights: ``Constant`` nodes (paddle2onnx), a weight
read through ``Identity``, external data, initializers that are graph inputs too (IR 3). Each
form prunes under the masked oracle exactly as the initializer form does."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from graphs import Builder, init_shapes, init_value, kept_slices
from oracle import ROUNDING, group_sizes, oracle_relative, prune_checked, save

from spa.cli import main
from spa.errors import ExitCode

X = {"x": [1, 3, 4, 4]}
PRUNED = {"c1.w": (4, 3, 3, 3), "c1.b": (4,), "c2.w": (4, 4, 3, 3), "c2.b": (4,)}


def _conv_relu_conv(width: int = 8) -> onnx.ModelProto:
    b = Builder()
    y = b.conv(b.op("Relu", b.conv("x", 3, width, name="c1")), width, 4, name="c2")
    return b.model(X, {y: [1, 4, 4, 4]})


def test_weights_as_constant_nodes(tmp_path):
    m = _conv_relu_conv()
    consts = [onnx.helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=t)
              for t in m.graph.initializer]
    nodes = consts + list(m.graph.node)
    del m.graph.initializer[:]
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    onnx.checker.check_model(m, full_check=True)
    assert group_sizes(m) == [(8, True), (4, False)]
    out = prune_checked(m, tmp_path, ratio=0.5)
    assert init_shapes(out.path) == PRUNED


def test_weight_through_identity(tmp_path):
    b = Builder()
    w = b.op("Identity", b.weight(8, 3, 3, 3, name="c1.w"), name="id")
    y = b.op("Conv", "x", w, b.weight(8, name="c1.b"), name="c1", pads=[1, 1, 1, 1])
    y = b.conv(b.op("Relu", y), 8, 4, name="c2")
    m = b.model(X, {y: [1, 4, 4, 4]})
    assert group_sizes(m) == [(8, True), (4, False)]
    out = prune_checked(m, tmp_path, ratio=0.5)
    assert init_shapes(out.path) == PRUNED


@pytest.mark.parametrize("width", [32, 4])
@pytest.mark.parametrize("ratio", [0.5, 0.0])
def test_external_data(tmp_path, ratio, width):
    m = _conv_relu_conv(width)
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    src = src_dir / "model.onnx"
    on_disk = onnx.ModelProto()
    on_disk.CopyFrom(m)  # save_model turns the tensors it writes out into references
    onnx.save_model(on_disk, str(src), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    assert (src_dir / "model.onnx.data").stat().st_size > 0
    out = prune_checked(src, tmp_path, ratio=ratio)
    kept = width - int(ratio * width)
    assert init_shapes(out.path) == {"c1.w": (kept, 3, 3, 3), "c1.b": (kept,),
                                     "c2.w": (4, kept, 3, 3), "c2.b": (4,)}
    assert (tmp_path / "pruned.onnx.data").stat().st_size > 0  # written as external data too
    rows = kept_slices(init_value(m, "c1.b"), init_value(out.path, "c1.b"), 0)
    assert kept_slices(init_value(m, "c2.w"), init_value(out.path, "c2.w"), 1) == rows


def test_external_data_with_shape_constants(tmp_path):
    """The dynamo exporter writes every initializer, shape constants included, to ``.data``.
    The output keeps its weights external but its integer constants (Reshape target, reduce
    axes) inline, so the full checker's shape inference can read them."""
    b = Builder()
    y = b.op("ReduceMean", b.op("Relu", b.conv("x", 3, 8, name="c1")), b.const([2, 3]),
             keepdims=1, name="pool")
    y = b.op("Reshape", y, b.const([1, 8]), name="flat")
    y = b.gemm(y, 8, 4, name="fc")
    m = b.model(X, {y: [1, 4]}, opset=18)
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    onnx.save_model(m, str(src_dir / "m.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="m.onnx.data", size_threshold=0)
    out = prune_checked(src_dir / "m.onnx", tmp_path, ratio=0.5)
    assert init_shapes(out.path)["fc.w"] == (4, 4)
    inline = {i.name for i in onnx.load(str(out.path), load_external_data=False).graph.initializer
              if i.data_location != onnx.TensorProto.EXTERNAL}
    assert inline and all(init_value(out.path, n).dtype.kind == "i" for n in inline)


def _ir3_model() -> onnx.ModelProto:
    """c1 (3→8) → Relu → c2 (8→8) → Relu → c3 (8→4), as an IR 3 / opset 7 file lists it: every
    initializer is a graph input too. c1 and c2 read one zero bias, which the import copies for
    c2 (an initializer the file did not have)."""
    b = Builder()
    zero = b.const(np.zeros(8, np.float32), name="zero8")
    h = b.op("Conv", "x", b.weight(8, 3, 3, 3, name="c1.w"), zero, name="c1", pads=[1] * 4)
    h = b.op("Conv", b.op("Relu", h), b.weight(8, 8, 3, 3, name="c2.w"), zero, name="c2",
             pads=[1] * 4)
    y = b.conv(b.op("Relu", h), 8, 4, name="c3")
    graph = b.graph(X, {y: [1, 4, 4, 4]})
    graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                       for t in graph.initializer)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 7)],
                                   ir_version=3)
    onnx.checker.check_model(model, full_check=True)
    return model


def _declared(model: onnx.ModelProto) -> dict[str, list[int]]:
    return {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}


def test_ir3_initializers_stay_graph_inputs(tmp_path, capsys):
    """The pruned file keeps IR 3 and its rule: each initializer, pruned or new, is declared
    as a graph input of its new shape; the file passes the full check at IR 3."""
    out = prune_checked(_ir3_model(), tmp_path, ratio=0.5)
    pruned = onnx.load(str(out.path))
    assert pruned.ir_version == 3 and pruned.opset_import[0].version == 7
    onnx.checker.check_model(pruned, full_check=True)
    declared = _declared(pruned)
    assert declared == {"x": [1, 3, 4, 4], **{t.name: list(t.dims)
                                              for t in pruned.graph.initializer}}
    assert declared["c2.w"] == [4, 4, 3, 3] and declared["c3.w"] == [4, 4, 3, 3]
    assert declared["zero8"] == [4]  # the shared bias, its copy joined again (one tensor)
    assert not any("__spa_copy" in name for name in declared)
    src, cli_out = save(_ir3_model(), tmp_path / "ir3.onnx"), tmp_path / "cli.onnx"
    assert main(["prune", str(src), "-o", str(cli_out), "--check-masked", "--ratio", "0.5"]) \
        == ExitCode.OK
    assert oracle_relative(capsys.readouterr().out) <= ROUNDING
    onnx.checker.check_model(onnx.load(str(cli_out)), full_check=True)
