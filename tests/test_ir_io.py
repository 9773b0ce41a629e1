"""The copy-free reading and writing of spa/ir: pieces serialise to exactly the bytes of
``SerializeToString``, inline weights load as read-only views with the values onnx gives, the
header copied field by field equals a whole copy, and a pruned file is written byte for byte as
``onnx.save_model`` writes it."""

from __future__ import annotations

import mmap

import numpy as np
import onnx
from graphs import Builder
from onnx import TensorProto, helper, numpy_helper

from spa.api import CheckOptions, PruneOptions, prune
from spa.ir.load import _header_of, load_model
from spa.ir.values import InlineValues
from spa.ir.wire import raw_data_spans, serialized_pieces


def _every_field() -> onnx.ModelProto:
    """A model setting every ModelProto and GraphProto field, in and around the graph."""
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 3])
    w = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "W")
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(np.array([1.0], np.float32), "S"),
                                       numpy_helper.from_array(np.array([0], np.int64), "S_i"),
                                       [3])
    g = helper.make_graph([helper.make_node("Add", ["X", "W"], ["Y"], doc_string="d")], "g",
                          [x], [y], [w, w], doc_string="graph doc", value_info=[x],
                          sparse_initializer=[sparse])
    g.quantization_annotation.add().tensor_name = "W"
    g.metadata_props.add().key = "graph key"
    fn = helper.make_function("dom", "F", ["a"], ["b"], [helper.make_node("Relu", ["a"], ["b"])],
                              [helper.make_opsetid("", 17)])
    m = helper.make_model(g, functions=[fn], doc_string="model doc", producer_name="p",
                          opset_imports=[helper.make_opsetid("", 17),
                                         helper.make_opsetid("dom", 1)])
    m.metadata_props.add().key = "model key"
    m.training_info.add().algorithm.name = "algorithm"
    m.model_version, m.domain = 3, "d"
    return m


def test_pieces_are_the_serialised_bytes():
    m = _every_field()
    assert b"".join(serialized_pieces(m)) == m.SerializeToString()
    # header, graph tag, graph head, 2 × (tag, tensor), graph rest, header rest
    assert len(serialized_pieces(m)) == 9
    del m.graph.initializer[:]
    assert b"".join(serialized_pieces(m)) == m.SerializeToString()
    unknown = onnx.ModelProto()
    unknown.ParseFromString(_every_field().SerializeToString() + b"\xa8\x1f\x05")  # field 501
    assert serialized_pieces(unknown) == [unknown.SerializeToString()]


def test_header_equals_a_whole_copy_without_graph():
    m = _every_field()
    whole = onnx.ModelProto()
    whole.CopyFrom(m)
    whole.ClearField("graph")
    assert _header_of(m).SerializeToString() == whole.SerializeToString()


def test_inline_weights_load_as_read_only_views(tmp_path):
    b = Builder()
    y = b.conv("x", 3, 8, name="c1")
    path = tmp_path / "m.onnx"
    onnx.save(b.model({"x": [1, 3, 4, 4]}, {y: [1, 8, 4, 4]}), str(path))
    graph = load_model(path).graph
    weight = graph.tensors()["c1.w"]
    lazy = weight._values
    assert type(lazy) is InlineValues and lazy.mapped is not None
    values = weight.values
    expected = numpy_helper.to_array(onnx.load(str(path)).graph.initializer[0])
    assert values.dtype == expected.dtype and values.shape == (8, 3, 3, 3)
    np.testing.assert_array_equal(values, expected)
    assert not values.flags.writeable
    base = values
    while not isinstance(base, memoryview):  # reshape ← frombuffer ← the file's memoryview
        base = base.base
    assert isinstance(base.obj, mmap.mmap)
    copied = InlineValues(lazy.tensor).load()  # no file: a view of one copy
    np.testing.assert_array_equal(copied, expected)
    assert not copied.flags.writeable


def test_raw_data_spans_point_at_each_tensor():
    m = _every_field()
    m.graph.initializer[1].name = "V"
    m.graph.initializer[1].raw_data = np.ones(6, np.float32).tobytes()
    data = m.SerializeToString()
    spans = raw_data_spans(data)
    assert list(spans) == ["W", "V"]
    for t in m.graph.initializer:
        offset, length = spans[t.name]
        assert length == 24 and data[offset:offset + length] == t.raw_data
    m.graph.initializer[1].name = "W"  # a repeated name
    assert raw_data_spans(m.SerializeToString()) is None
    graph_field = onnx.GraphProto(name="second").SerializeToString()
    assert raw_data_spans(data + b"\x3a" + bytes([len(graph_field)]) + graph_field) is None


def test_pruned_file_is_what_onnx_save_writes(tmp_path):
    b = Builder()
    y = b.conv(b.op("Relu", b.conv("x", 3, 8, name="c1")), 8, 4, name="c2")
    src = tmp_path / "m.onnx"
    onnx.save(b.model({"x": [1, 3, 4, 4]}, {y: [1, 4, 4, 4]}), str(src))
    out = tmp_path / "p.onnx"
    prune(src, out, PruneOptions(ratio=0.5), CheckOptions(validate=False, latency=False))
    written = out.read_bytes()
    again = tmp_path / "again.onnx"
    onnx.save_model(onnx.load_from_string(written), str(again))
    assert again.read_bytes() == written
    assert onnx.load_from_string(written).graph.initializer[0].dims[0] == 4


def test_a_session_takes_the_large_weights_beside_the_bytes_and_answers_the_same():
    """``validate.session`` hands a ModelProto's large plain initializers to onnxruntime beside
    its bytes (external data filled from memory) rather than inside them: the same outputs,
    small ones (a Reshape's shape) stay inside, and a feed still overrides an initializer
    that is also an input (sensitivity's fed weights)."""
    from spa import validate as val

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 32)).astype(np.float32)  # 8 KiB: apart
    b = rng.standard_normal(64).astype(np.float32)  # 256 B: inside
    shape = np.array([-1, 8, 8], np.int64)
    g = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["h"], transB=1),
         helper.make_node("Reshape", ["h", "shape"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32]),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, [64, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(a, n) for a, n in ((w, "w"), (b, "b"), (shape, "shape"))])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    apart = val._Apart()
    data = val._serialized(m, apart)
    assert apart.names == ["w"] and len(data) < w.nbytes < len(m.SerializeToString())
    x = rng.standard_normal((5, 32)).astype(np.float32)
    expected = (x @ w.T + b).reshape(-1, 8, 8)
    sess = val.session(m)
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], expected, rtol=1e-5, atol=1e-5)
    fed = sess.run(None, {"x": x, "w": 2 * w})[0]
    np.testing.assert_allclose(fed, (x @ (2 * w).T + b).reshape(-1, 8, 8), rtol=1e-5, atol=1e-5)
    import onnxruntime as ort

    inside = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    assert np.array_equal(sess.run(None, {"x": x})[0], inside.run(None, {"x": x})[0])


def test_nodes_out_of_topological_order_are_read_in_order(tmp_path) -> None:
    """onnxruntime's float16 converter writes some nodes after their readers; onnx.checker
    refuses such a graph, onnxruntime sorts it. SPA reads it in a stable topological order and
    prunes it as the sorted graph: the same file, byte for byte, and the input untouched."""
    from spa.ir.load import sort_nodes

    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w1", (4, 8)), ("w2", (8, 3)))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]

    def model(order: list[int]) -> onnx.ModelProto:
        graph = helper.make_graph([nodes[k] for k in order], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
                                  inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                 ir_version=9)

    shuffled = model([2, 0, 1])
    assert sort_nodes(shuffled.graph) and [n.name for n in shuffled.graph.node] == \
        ["fc1", "relu", "fc2"]
    assert not sort_nodes(model([0, 1, 2]).graph)
    src = {k: tmp_path / f"{k}.onnx" for k in ("sorted", "shuffled")}
    onnx.save(model([0, 1, 2]), str(src["sorted"]))
    onnx.save(model([2, 0, 1]), str(src["shuffled"]))
    before = src["shuffled"].read_bytes()
    outs = {}
    for k, path in src.items():
        outs[k] = tmp_path / f"{k}_small.onnx"
        prune(str(path), str(outs[k]), PruneOptions(ratio=0.5), CheckOptions(latency=False))
    assert outs["sorted"].read_bytes() == outs["shuffled"].read_bytes()
    assert src["shuffled"].read_bytes() == before
