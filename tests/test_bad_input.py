"""Bad input beyond tests/test_cli.py: each case ends in one typed line on stderr and exit code
2, leaves every input file byte for byte as it was, and leaves nothing in the output directory
(no file at ``-o``, no ``.data``, no ``.spa-*`` staging directory). A model that onnx.checker
accepts but that breaks a rule of ONNX (a Conv weight that does not fit its input, repeated node
names, shapes that conflict) is bad input too; a valid graph without nodes is not: it has
nothing to prune (exit 4)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import IR_VERSION, Builder
from test_cli import _conv_net

from spa.cli import main
from spa.errors import ExitCode


def _hashes(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())
            if p.is_file()}


def _external(src: Path) -> Path:
    """``src/net.onnx`` with every tensor in ``src/net.onnx.data``."""
    src.mkdir(exist_ok=True)
    onnx.save_model(_conv_net(), str(src / "net.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="net.onnx.data", size_threshold=0)
    return src / "net.onnx"


def _plain(src: Path) -> Path:
    src.mkdir(exist_ok=True)
    onnx.save(_conv_net(), str(src / "net.onnx"))
    return src / "net.onnx"


def _corrupt(src: Path) -> list[str]:
    model = _plain(src)
    data = bytearray(model.read_bytes())
    for i in range(40, len(data), 13):
        data[i] ^= 0xA5
    model.write_bytes(bytes(data))
    return ["prune", str(model)]


def _png(src: Path) -> list[str]:
    src.mkdir()
    png = src / "photo.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
    return ["prune", str(png)]


def _missing_data(src: Path) -> list[str]:
    model = _external(src)
    (src / "net.onnx.data").unlink()
    return ["prune", str(model)]


def _short_data(src: Path) -> list[str]:
    model = _external(src)
    data = src / "net.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    return ["prune", str(model)]


def _escaping_data(src: Path) -> list[str]:
    """A location outside the model's directory is refused, whatever lies there."""
    model = _external(src)
    proto = onnx.load(str(model), load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../elsewhere.data"
    (src.parent / "elsewhere.data").write_bytes((src / "net.onnx.data").read_bytes())
    model.write_bytes(proto.SerializeToString())
    return ["prune", str(model)]


def _plan(body) -> Callable[[Path], list[str]]:
    def make(src: Path) -> list[str]:
        model = _plain(src)
        plan = src / "plan.json"
        plan.write_text(body if isinstance(body, str) else json.dumps(body))
        return ["apply", str(model), str(plan)]

    return make


def _calib(arrays: dict[str, np.ndarray] | bytes | None) -> Callable[[Path], list[str]]:
    def make(src: Path) -> list[str]:
        model = _plain(src)
        calib = src / "calib.npz"
        if isinstance(arrays, bytes):
            calib.write_bytes(arrays)
        elif arrays is not None:
            np.savez(calib, **arrays)
        return ["prune", str(model), "--criterion", "activation", "--calib", str(calib)]

    return make


def _invalid(build: Callable[[], onnx.ModelProto]) -> Callable[[Path], list[str]]:
    """A model that onnx.checker accepts but that breaks a rule of ONNX."""
    def make(src: Path) -> list[str]:
        src.mkdir()
        onnx.save(build(), str(src / "net.onnx"))
        return ["prune", str(src / "net.onnx")]

    return make


def _conv_weight_misfit() -> onnx.ModelProto:
    """conv2 reads conv1's 8 channels with a weight made for 5."""
    model = _conv_net()
    w2 = next(t for t in model.graph.initializer if t.name == "w2")
    w2.CopyFrom(onnx.numpy_helper.from_array(np.ones((6, 5, 3, 3), np.float32), "w2"))
    return model


def _renamed(count: int) -> Callable[[], onnx.ModelProto]:
    """The first ``count`` nodes all named 'twin'."""
    def build() -> onnx.ModelProto:
        model = _conv_net()
        for node in model.graph.node[:count]:
            node.name = "twin"
        return model

    return build


def _matmul_misfit() -> onnx.ModelProto:
    """fc2 multiplies fc1's [2, 16] output by a [12, 4] weight."""
    b = Builder()
    h = b.op("Relu", b.op("MatMul", "x", b.weight(8, 16), name="fc1"))
    b.op("MatMul", h, b.weight(12, 4), name="fc2", outputs=["y"])
    graph = b.graph({"x": [2, 8]}, {"y": [2, 4]})
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)],
                                  ir_version=IR_VERSION)


X = np.zeros((8, 1, 3, 6, 6), np.float32)[:, 0]  # 8 samples of the [1, 3, 6, 6] input

CASES = {
    "corrupt bytes": (_corrupt, "not a readable ONNX model"),
    "a PNG file": (_png, "not a readable ONNX model"),
    "missing external data file": (_missing_data, "external data file 'net.onnx.data' is missing"),
    "external data file too short": (_short_data, "is too short"),
    "external data outside the model's directory": (_escaping_data, "must be a relative path "
                                                    "inside the model's directory"),
    "plan that is a JSON list": (_plan([1, 2]), "not a valid SPA plan"),
    "plan without groups": (_plan({"format": 1, "fingerprint": "x"}), "not a valid SPA plan"),
    "plan with a wrong type": (_plan({"format": 1, "fingerprint": "x", "groups": 5}),
                               "not a valid SPA plan"),
    "plan of another format": (_plan({"format": 99}), "not a plan of format 1"),
    "plan that is empty": (_plan(""), "not a valid SPA plan"),
    "calibration file missing": (_calib(None), "no such calibration file"),
    "calibration file not npz": (_calib(b"x,y\n1,2\n"), "not an .npz file"),
    "calibration arrays misnamed": (_calib({"image": X}), "lacks arrays for graph inputs ['x']"),
    "calibration arrays of the wrong rank": (_calib({"x": X[:, 0]}), "has shape [8, 6, 6]"),
    "calibration arrays of the wrong size": (_calib({"x": X[:, :, :4]}), "has shape [8, 3, 4, 6]"),
    "calibration arrays of the wrong kind": (_calib({"x": X.astype(bool)}), "holds bool"),
    "conv weight that does not fit its input": (
        _invalid(_conv_weight_misfit),
        "invalid model: Conv node 'conv2' reads 8 input channels, but its weight 'w2' "
        "[6, 5, 3, 3] (group=1) takes 5"),
    "two nodes of one name": (_invalid(_renamed(2)), "node name 'twin' is given to 2 nodes "
                              "(Conv, Relu); ONNX node names must be unique"),
    "four nodes of one name": (_invalid(_renamed(4)), "node name 'twin' is given to 4 nodes"),
    "matmul of misfit shapes": (_invalid(_matmul_misfit), "invalid model: shape inference finds "
                                "a conflict: [ShapeInferenceError] Inference error(s): "
                                "(op_type:MatMul, node name: fc2)"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_typed_line_and_touches_nothing(tmp_path: Path, capsys, case) -> None:
    make, expect = CASES[case]
    src, out_dir = tmp_path / "src", tmp_path / "out"
    out_dir.mkdir()
    argv = make(src)
    before = _hashes(src)
    out = out_dir / "pruned.onnx"
    assert main([*argv, "-o", str(out)]) == ExitCode.BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err.startswith("spa: error: ") and "\n" not in err and "Traceback" not in err
    assert expect in err
    assert _hashes(src) == before
    assert list(out_dir.iterdir()) == []


def test_unwritable_output_directory(tmp_path: Path, capsys) -> None:
    """Even root cannot create files in /proc: the staging directory fails with a typed error
    (not a traceback), and nothing is written anywhere."""
    model = _plain(tmp_path / "src")
    before = _hashes(model.parent)
    assert main(["prune", str(model), "-o", "/proc/pruned.onnx"]) == ExitCode.BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert "cannot write in /proc" in err and "\n" not in err
    assert _hashes(model.parent) == before


def test_output_data_file_must_not_replace_the_inputs(tmp_path: Path, capsys) -> None:
    """An output whose ``<name>.data`` is the input's data file would rewrite the input."""
    src = tmp_path / "src"
    src.mkdir()
    onnx.save_model(_conv_net(), str(src / "net.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="other.onnx.data", size_threshold=0)
    before = _hashes(src)
    assert main(["prune", str(src / "net.onnx"), "-o", str(src / "other.onnx")]) \
        == ExitCode.BAD_INPUT
    assert "would overwrite the input model's external data" in capsys.readouterr().err
    assert _hashes(src) == before


def test_output_equal_to_input_by_another_spelling(tmp_path: Path, capsys) -> None:
    model = _plain(tmp_path / "src")
    before = _hashes(model.parent)
    other = model.parent / ".." / "src" / model.name
    assert main(["prune", str(model), "-o", str(other)]) == ExitCode.BAD_INPUT
    assert "refusing to overwrite the input model" in capsys.readouterr().err
    assert _hashes(model.parent) == before


def test_exit_code_and_stderr_of_the_real_process(tmp_path: Path) -> None:
    """The same through ``python -m spa``: exit status 2, one line, no traceback."""
    argv = _missing_data(tmp_path / "src")
    res = subprocess.run([sys.executable, "-m", "spa", *argv, "-o", str(tmp_path / "o.onnx")],
                         capture_output=True, text=True, env={**os.environ, "SPA_DEBUG": ""})
    assert res.returncode == ExitCode.BAD_INPUT
    assert res.stderr.count("\n") == 1 and "is missing" in res.stderr
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("build", [_conv_weight_misfit, _renamed(3), _matmul_misfit],
                         ids=["conv weight", "repeated names", "matmul"])
def test_invalid_model_is_refused_by_analyze_too(tmp_path: Path, capsys, build) -> None:
    path = tmp_path / "net.onnx"
    onnx.save(build(), str(path))
    assert main(["analyze", str(path)]) == ExitCode.BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err.startswith("spa: error: ") and ("invalid model" in err or "must be unique" in err)


@pytest.mark.parametrize("initializers", [False, True])
def test_graph_without_nodes_has_nothing_to_prune(tmp_path: Path, capsys, initializers) -> None:
    """A graph whose outputs are its input (or an initializer) is valid ONNX: ``analyze``
    shows it, ``prune`` says there is nothing to prune and why (exit 4), and writes nothing."""
    F = onnx.TensorProto.FLOAT
    x = onnx.helper.make_tensor_value_info("x", F, [1, 3])
    if initializers:
        graph = onnx.helper.make_graph(
            [], "empty", [x], [onnx.helper.make_tensor_value_info("w", F, [2, 3])],
            [onnx.numpy_helper.from_array(np.ones((2, 3), np.float32), "w")])
    else:
        graph = onnx.helper.make_graph([], "empty", [x], [x])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)],
                                   ir_version=IR_VERSION)
    onnx.checker.check_model(model, full_check=True)
    path, out = tmp_path / "empty.onnx", tmp_path / "out" / "pruned.onnx"
    out.parent.mkdir()
    onnx.save(model, str(path))
    assert main(["analyze", str(path)]) == ExitCode.OK
    assert "nodes 0" in capsys.readouterr().out
    assert main(["prune", str(path), "-o", str(out)]) == ExitCode.NOTHING_PRUNABLE
    err = capsys.readouterr().err.strip()
    assert err == "spa: error: no prunable channel group in the model: its graph has no nodes " \
                  "(the outputs are inputs or constants)"
    assert list(out.parent.iterdir()) == []


def test_unnamed_node_takes_no_name_in_use(tmp_path: Path, capsys) -> None:
    """An unnamed node is named after its op and position; a node that already has that name
    keeps it and the unnamed one takes another, so the pruned file's names stay unique."""
    model = _conv_net()
    model.graph.node[0].name = ""  # would become "Conv_0"
    model.graph.node[1].name = "Conv_0"
    path, out = tmp_path / "net.onnx", tmp_path / "pruned.onnx"
    onnx.save(model, str(path))
    assert main(["prune", str(path), "-o", str(out), "--check-masked", "--ratio", "0.5"]) \
        == ExitCode.OK
    names = [n.name for n in onnx.load(str(out)).graph.node]
    assert sorted(names) == ["Conv_0", "Conv_0_2", "conv2", "conv3", "relu2"]
