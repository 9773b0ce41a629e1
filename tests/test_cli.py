"""The ``spa`` command end to end: analyze, prune, apply, and every bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from spa.cli import main
from spa.errors import ExitCode


def _conv_net() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in
             [("w1", (8, 3, 3, 3)), ("b1", (8,)), ("w2", (6, 8, 3, 3)), ("w3", (4, 6, 1, 1))]]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="conv1", pads=[1] * 4),
             helper.make_node("Relu", ["a"], ["r"], name="relu1"),
             helper.make_node("Conv", ["r", "w2"], ["b"], name="conv2", pads=[1] * 4),
             helper.make_node("Relu", ["b"], ["s"], name="relu2"),
             helper.make_node("Conv", ["s", "w3"], ["y"], name="conv3")]
    graph = helper.make_graph(nodes, "net",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


@pytest.fixture()
def model_path(tmp_path: Path) -> Path:
    p = tmp_path / "net.onnx"
    onnx.save(_conv_net(), str(p))
    return p


def test_analyze_json_lists_groups_and_frozen(model_path: Path, capsys) -> None:
    assert main(["analyze", str(model_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [g["channels"] for g in out["groups"]] == [8, 6, 4]
    assert [g["prunable"] for g in out["groups"]] == [True, True, False]
    assert out["groups"][2]["frozen"] == ["graph output 'y' (axis 1) keeps its shape"]
    assert out["params"] == 8 * 27 + 8 + 6 * 8 * 9 + 4 * 6
    assert out["flops"] == 36 * (8 * 27 + 6 * 72 + 4 * 6)


def test_analyze_explain_prints_reasons(model_path: Path, capsys) -> None:
    assert main(["analyze", str(model_path), "--explain"]) == 0
    assert "because graph output 'y' (axis 1) keeps its shape" in capsys.readouterr().out


def test_prune_then_apply_round_trip(model_path: Path, tmp_path: Path, capsys) -> None:
    out, plan, report = tmp_path / "p.onnx", tmp_path / "plan.json", tmp_path / "r.json"
    argv = ["prune", str(model_path), "-o", str(out), "--ratio", "0.5", "--plan", str(plan),
            "--report", str(report), "--check-masked"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "params" in table and "latency ms" in table
    rep = json.loads(report.read_text())
    assert rep["params_after"] == 4 * 27 + 4 + 3 * 4 * 9 + 4 * 3
    assert rep["flops_after"] == 36 * (4 * 27 + 3 * 36 + 4 * 3)
    assert rep["masked_relative_diff"] <= 1e-4
    for key in ("params_before", "flops_before", "groups", "frozen", "latency_ms_before",
                "latency_ms_after"):
        assert key in rep
    weights = {i.name: i.dims for i in onnx.load(str(out)).graph.initializer}
    assert list(weights["w2"]) == [3, 4, 3, 3]
    again = tmp_path / "again.onnx"
    assert main(["apply", str(model_path), str(plan), "-o", str(again)]) == 0
    assert again.read_bytes() == out.read_bytes()


def test_global_and_flops_target(model_path: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "p.onnx"
    assert main(["prune", str(model_path), "-o", str(out), "--target", "flops", "--ratio", "0.4",
                 "--json", "--no-validate"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert 1 - rep["flops_after"] / rep["flops_before"] >= 0.4
    assert main(["prune", str(model_path), "-o", str(out), "--global", "--ratio", "0.5",
                 "--json", "--no-validate"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["channels_after"] == 7  # 14 prunable channels, half removed across both groups


def test_python_dash_m_spa_works(model_path: Path, tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "spa", "analyze", str(model_path), "--json"],
                         capture_output=True, text=True, check=True)
    assert json.loads(res.stdout)["prunable_groups"] == 2


def test_a_reader_that_stops_early_gets_no_traceback(model_path: Path) -> None:
    """``spa analyze model.onnx | head -1``: the pipe closes after one line; spa leaves quietly
    with 141 (128 + SIGPIPE), as shell tools do, instead of a BrokenPipeError traceback."""
    spa = subprocess.Popen([sys.executable, "-m", "spa", "analyze", str(model_path),
                            "--explain"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert spa.stdout is not None and spa.stderr is not None
    spa.stdout.close()  # the reader is gone before spa writes a line
    err = spa.stderr.read().decode()
    assert spa.wait(timeout=120) == 141 and err == "", err


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


@pytest.mark.parametrize("content, expect", [
    (None, "no such file"),
    (b"hello, this is not a model", "not a readable ONNX model"),
    ("truncate", "not a readable ONNX model"),
])
def test_bad_model_files(model_path: Path, tmp_path: Path, capsys, content, expect) -> None:
    bad = tmp_path / "bad.onnx"
    if content == "truncate":
        bad.write_bytes(model_path.read_bytes()[:300])
    elif content is not None:
        bad.write_bytes(content)
    out = tmp_path / "out.onnx"
    assert main(["prune", str(bad), "-o", str(out)]) == ExitCode.BAD_INPUT
    assert expect in _err(capsys)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".spa-")] == []


def test_directory_as_model_and_as_output(model_path: Path, tmp_path: Path, capsys) -> None:
    # a folder is the files of one model (spa/pipeline/family.py), pruned into another folder
    assert main(["prune", str(tmp_path), "-o", str(tmp_path / "o.onnx")]) == ExitCode.BAD_INPUT
    assert "cannot be in the input folder" in _err(capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["prune", str(empty), "-o", str(tmp_path / "o")]) == ExitCode.BAD_INPUT
    assert "is a directory with no ONNX file in it" in _err(capsys)
    assert main(["prune", str(model_path), "-o", str(tmp_path)]) == ExitCode.BAD_INPUT
    assert "output path is a directory" in _err(capsys)
    missing = tmp_path / "nowhere" / "o.onnx"
    assert main(["prune", str(model_path), "-o", str(missing)]) == ExitCode.BAD_INPUT
    assert "does not exist" in _err(capsys)


@pytest.mark.parametrize("ratio", ["1.0", "-0.1", "abc"])
def test_bad_ratio(model_path: Path, tmp_path: Path, capsys, ratio: str) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["prune", str(model_path), "-o", str(tmp_path / "o.onnx"), "--ratio", ratio])
    assert exc.value.code == ExitCode.BAD_INPUT
    assert "--ratio" in _err(capsys)
    assert not (tmp_path / "o.onnx").exists()


def test_unsupported_opset_and_ir(tmp_path: Path, capsys) -> None:
    model = _conv_net()
    model.opset_import[0].version = onnx.defs.onnx_opset_version() + 5
    p = tmp_path / "future.onnx"
    onnx.save(model, str(p))
    assert main(["analyze", str(p)]) == ExitCode.BAD_INPUT
    assert "opset" in _err(capsys)
    model = _conv_net()
    model.ir_version = onnx.IR_VERSION + 1
    onnx.save(model, str(p))
    assert main(["analyze", str(p)]) == ExitCode.BAD_INPUT
    assert "IR version" in _err(capsys)


def test_checker_failure_is_reported(tmp_path: Path, capsys) -> None:
    model = _conv_net()
    model.graph.node[1].input[0] = "does_not_exist"
    p = tmp_path / "broken.onnx"
    onnx.save(model, str(p))
    assert main(["prune", str(p), "-o", str(tmp_path / "o.onnx")]) == ExitCode.BAD_INPUT
    assert "broken.onnx" in _err(capsys)


def test_input_is_never_modified_and_never_overwritten(model_path: Path, capsys) -> None:
    before = model_path.read_bytes()
    assert main(["prune", str(model_path), "-o", str(model_path)]) == ExitCode.BAD_INPUT
    assert "refusing to overwrite the input" in _err(capsys)
    assert model_path.read_bytes() == before


def test_plan_for_another_model_is_refused(model_path: Path, tmp_path: Path, capsys) -> None:
    plan = tmp_path / "plan.json"
    assert main(["prune", str(model_path), "-o", str(tmp_path / "p.onnx"), "--plan", str(plan),
                 "--no-validate"]) == 0
    other = _conv_net()
    other.graph.node[1].op_type = "Sigmoid"
    other_path = tmp_path / "other.onnx"
    onnx.save(other, str(other_path))
    capsys.readouterr()
    out = tmp_path / "o2.onnx"
    assert main(["apply", str(other_path), str(plan), "-o", str(out)]) == ExitCode.BAD_INPUT
    assert "plan was made for model" in _err(capsys)
    body = json.loads(plan.read_text())
    body["groups"][0]["keep"] = [0, 0]
    plan.write_text(json.dumps(body))
    assert main(["apply", str(model_path), str(plan), "-o", str(out)]) == ExitCode.BAD_INPUT
    assert "keep indices" in _err(capsys)
    plan.write_text("{not json")
    assert main(["apply", str(model_path), str(plan), "-o", str(out)]) == ExitCode.BAD_INPUT
    assert "not a valid SPA plan" in _err(capsys)
    assert not out.exists()


@pytest.mark.parametrize("keep", [[0.5, 2, 5, 6], [0, 2.0, 5], ["0", 2], [True, 2]])
def test_plan_with_non_integer_keep_indices_is_refused(model_path: Path, tmp_path: Path, capsys,
                                                       keep) -> None:
    """Keep indices are integers: 0.5 was truncated to 0 and the plan applied (exit 0)."""
    plan = tmp_path / "plan.json"
    assert main(["prune", str(model_path), "-o", str(tmp_path / "p.onnx"), "--plan", str(plan),
                 "--no-validate", "-q"]) == 0
    body = json.loads(plan.read_text())
    body["groups"][0]["keep"] = keep
    plan.write_text(json.dumps(body))
    capsys.readouterr()
    out = tmp_path / "o.onnx"
    assert main(["apply", str(model_path), str(plan), "-o", str(out)]) == ExitCode.BAD_INPUT
    err = _err(capsys)
    assert "not a valid SPA plan" in err and "must be an integer" in err
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--report", "--report-html", "--plan"])
@pytest.mark.parametrize("command", ["prune", "dry-run", "apply"])
def test_bad_report_path_fails_before_any_work(model_path: Path, tmp_path: Path, capsys, flag,
                                               command) -> None:
    """An output into a missing directory exits 2 before the model is written (it was written,
    and then the report failed)."""
    out = tmp_path / "o.onnx"
    missing = str(tmp_path / "nowhere" / "r.out")
    if command == "apply":
        if flag == "--plan":
            pytest.skip("apply reads --plan")
        plan = tmp_path / "plan.json"
        assert main(["prune", str(model_path), "-o", str(tmp_path / "p.onnx"), "--plan",
                     str(plan), "-q"]) == 0
        argv = ["apply", str(model_path), str(plan), "-o", str(out), flag, missing]
    else:
        argv = ["prune", str(model_path), "-o", str(out), flag, missing]
        argv += ["--dry-run"] if command == "dry-run" else []
    capsys.readouterr()
    assert main(argv) == ExitCode.BAD_INPUT
    assert "does not exist" in _err(capsys)
    assert not out.exists()


def test_two_outputs_to_one_file_are_refused(model_path: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "o.onnx"
    assert main(["prune", str(model_path), "-o", str(out), "--report", str(out)]) \
        == ExitCode.BAD_INPUT
    assert "same file" in _err(capsys)
    assert not out.exists()


def test_nothing_prunable_exit_code(tmp_path: Path, capsys) -> None:
    w = numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="only")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    p = tmp_path / "one.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                 ir_version=10), str(p))
    assert main(["prune", str(p), "-o", str(tmp_path / "o.onnx")]) == ExitCode.NOTHING_PRUNABLE
    assert "no prunable channel group" in _err(capsys)


def test_input_dim_sizes_symbolic_dims(tmp_path: Path, capsys) -> None:
    """A 3×3 convolution without padding cannot run on a 1×1 input: SPA sizes the symbolic
    dims by their names (32); --input-dim sizes them, and sizes that do not run fail
    validation with a typed error (no output written)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in
             [("w1", (8, 3, 3, 3)), ("w2", (4, 8, 1, 1))]]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="conv1"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, 3, "height", "width"])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, None)], inits)
    src = tmp_path / "dyn.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                ir_version=10), str(src))
    out = tmp_path / "o.onnx"
    assert main(["prune", str(src), "-o", str(out), "--ratio", "0.5", "--input-dim", "height=1",
                 "--input-dim", "width=1"]) == ExitCode.VALIDATION_FAILED
    assert "onnxruntime failed to run" in _err(capsys) and not out.exists()
    assert main(["prune", str(src), "-o", str(out), "--ratio", "0.5", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["input_dims"] == {"height": 32, "width": 32}
    assert rep["input_dims_from"] == {"height": "name", "width": "name"}
    assert main(["prune", str(src), "-o", str(out), "--ratio", "0.5", "--check-masked",
                 "--input-dim", "height=6", "--input-dim", "width=5", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["masked_relative_diff"] <= 1e-4 and rep["channels_after"] == 4
    with pytest.raises(SystemExit):
        main(["prune", str(src), "-o", str(out), "--input-dim", "height"])


@pytest.mark.parametrize("argv", [["--version"], ["--help"]])
def test_version_and_help_import_no_heavy_module(argv: list[str]) -> None:
    """``spa --version`` and ``spa --help`` took over a second, importing onnx (its ml_dtypes
    alone is 0.6 s) and the whole pass library; they now import neither."""
    code = "\n".join([
        "import sys", "from spa.cli import main", "try:", f"    main({argv!r})",
        "except SystemExit:", "    pass",
        "print('HEAVY', [m for m in ('onnx', 'onnx_graphsurgeon', 'numpy', 'spa.passes', 'spa.api')"
        " if m in sys.modules])"])
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY []" in res.stdout, res.stdout


def test_graphsurgeon_messages_go_through_logging(caplog, capsys) -> None:
    """onnx-graphsurgeon printed its warnings; they are log records now (shown with -v)."""
    import logging

    from onnx_graphsurgeon.logger import G_LOGGER

    import spa.ir  # noqa: F401  (routes the messages)

    with caplog.at_level(logging.INFO, logger="spa.onnx_graphsurgeon"):
        G_LOGGER.warning("duplicate node name 'n'")
    assert capsys.readouterr().out == ""
    assert [r.getMessage() for r in caplog.records] == [
        "onnx-graphsurgeon: duplicate node name 'n'"]
