"""onnxruntime-genai folders without onnxruntime-genai: a one-layer GQA decoder with a KV cache
(tests/test_rules_contrib.py's) in a folder with a ``genai_config.json`` prunes into a folder
whose config has the pruned head counts; a config that disagrees with the graph is refused."""

from __future__ import annotations

import json

import onnx
import pytest
from oracle import RTOL
from test_rules_contrib import _gqa_model

from spa.api import CheckOptions, PruneOptions, analyze, prune
from spa.errors import ExitCode, InvalidModelError, OutputPathError

DECODER = {"filename": "model.onnx", "head_size": 16, "hidden_size": 6,
           "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 1,
           "inputs": {"past_key_names": "past_k", "past_value_names": "past_v"}}


def _folder(path, **decoder):
    path.mkdir()
    onnx.save(_gqa_model(past=True), path / "model.onnx")
    config = {"model": {"type": "llama", "decoder": DECODER | decoder}}
    (path / "genai_config.json").write_text(json.dumps(config))
    (path / "tokenizer.json").write_text('{"model": "stand-in"}')
    return path


def test_folder_prunes_with_its_config(tmp_path):
    src = _folder(tmp_path / "src")
    assert analyze(src).prunable_groups  # the folder's decoder
    report, _ = prune(src, tmp_path / "out", PruneOptions(ratio=0.0, heads_ratio=0.5),
                      CheckOptions(check_masked=True, latency=False, rtol=RTOL))
    decoder = json.loads((tmp_path / "out" / "genai_config.json").read_text())["model"]["decoder"]
    assert decoder == DECODER | {"num_attention_heads": 2, "num_key_value_heads": 1}
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"model": "stand-in"}'
    assert "graph output 'present_v' axis 1: 2 -> 1" in report.signature_changes
    assert report.masked_relative_diff is not None and report.masked_relative_diff <= RTOL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


@pytest.mark.parametrize(("decoder", "words"), [
    ({"num_key_value_heads": 1}, "num_key_value_heads=1, the attention nodes have [2]"),
    ({"num_attention_heads": 8}, "num_attention_heads=8, the attention nodes have [4]"),
    ({"num_hidden_layers": 2}, "num_hidden_layers=2, the graph has 1 attention nodes"),
    ({"head_size": 8}, "head_size=8, the KV caches' last dim is 16"),
], ids=["kv_heads", "heads", "layers", "head_size"])
def test_config_that_disagrees_is_refused(tmp_path, decoder, words):
    src = _folder(tmp_path / "src", **decoder)
    with pytest.raises(InvalidModelError) as err:
        prune(src, tmp_path / "out", PruneOptions(heads_ratio=0.5), CheckOptions(latency=False))
    assert words in str(err.value) and "genai_config.json disagrees with model.onnx" in str(
        err.value)
    assert err.value.exit_code is ExitCode.BAD_INPUT
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_output_folder_that_holds_files_is_refused(tmp_path):
    src = _folder(tmp_path / "src")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(OutputPathError, match="exists and is not an empty directory"):
        prune(src, tmp_path / "out", PruneOptions(heads_ratio=0.5), CheckOptions(latency=False))
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_constant_declared_with_another_shape_loads():
    """onnxruntime-genai's builder declares its ``[1]`` constants as scalars; onnxruntime runs
    that, and the declared shape of a Constant adds nothing to its value's: not a conflict."""
    from onnx import TensorProto, helper

    from spa.ir.load import load_proto

    one = helper.make_node("Constant", [], ["one"], value=helper.make_tensor(
        "v", TensorProto.INT64, [1], [1]))
    add = helper.make_node("Add", ["x", "one"], ["y"])
    graph = helper.make_graph(
        [one, add], "g", [helper.make_tensor_value_info("x", TensorProto.INT64, [3])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [3])],
        value_info=[helper.make_tensor_value_info("one", TensorProto.INT64, [])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert load_proto(model).graph.outputs[0].shape == [3]
