"""Validation on by default (issue #12, item 1): the numeric oracle runs whenever it applies to
the plan, integer and bool outputs must equal their reference exactly, and the report says what
ran and, where the oracle does not apply, why.

The regression at the heart of it: a Shape value as a graph output changed from [1, 8, 4, 4]
to [1, 6, 4, 4] and ``spa prune`` exited 0. With the Shape rule's fix undone, the default
command line must now refuse the model (exit 3) and write nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import Builder

from spa.cli import main
from spa.coupling import context
from spa.coupling.rules import shape
from spa.errors import ExitCode
from spa.validate import weight_free_outputs

I64 = onnx.TensorProto.INT64


def _shape_output_model(path: Path) -> Path:
    """``z = Conv(Relu(Conv(x)))`` and a second output ``s = Shape(Relu(Conv(x)))``."""
    b = Builder()
    y = b.op("Relu", b.conv("x", 3, 8, name="c1"), name="relu")
    z = b.conv(y, 8, 4, name="c2")
    s = b.op("Shape", y, name="shape")
    onnx.save(b.model({"x": [1, 3, 4, 4]}, {z: [1, 4, 4, 4], s: ([4], I64)}), str(path))
    return path


def _conv_model(path: Path) -> Path:
    b = Builder()
    y = b.conv(b.op("Relu", b.conv("x", 3, 8, name="c1")), 8, 4, name="c2")
    onnx.save(b.model({"x": [1, 3, 4, 4]}, {y: [1, 4, 4, 4]}), str(path))
    return path


@pytest.fixture()
def shape_rule_bug(monkeypatch):
    """The Shape rule as it was: a Shape value leaving the graph did not keep its dims."""
    monkeypatch.setattr(context.NodeContext, "is_graph_output", lambda self, t: False)
    monkeypatch.setattr(shape, "_only_copied_into_reshapes", lambda ctx, x, out: True)


def _report(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


def test_oracle_runs_by_default(tmp_path: Path, capsys) -> None:
    model = _conv_model(tmp_path / "m.onnx")
    assert main(["prune", str(model), "-o", str(tmp_path / "p.onnx"), "--ratio", "0.5",
                 "--json", "-q"]) == ExitCode.OK
    report = _report(capsys)
    assert report["oracle"] == "held"
    assert report["masked_relative_diff"] is not None and report["masked_relative_diff"] < 1e-5


@pytest.mark.parametrize("flags, expect", [
    (["--no-check"], "off (--no-check)"),
    (["--no-validate"], "not run (--no-validate)"),
    (["--criterion", "obspa"], "does not apply: the plan compensates the kept weights"),
])
def test_report_says_why_the_oracle_did_not_run(tmp_path: Path, capsys, flags, expect) -> None:
    model = _conv_model(tmp_path / "m.onnx")
    assert main(["prune", str(model), "-o", str(tmp_path / "p.onnx"), "--ratio", "0.5",
                 "--json", "-q", *flags]) == ExitCode.OK
    report = _report(capsys)
    assert report["oracle"].startswith(expect)
    assert report["masked_relative_diff"] is None


@pytest.mark.parametrize("flags", [[], ["--criterion", "obspa"], ["--check-masked"]])
def test_changed_shape_output_cannot_ship(tmp_path: Path, capsys, shape_rule_bug,
                                          flags) -> None:
    """With the rule bug back, the default validation (oracle, or with OBSPA's compensation
    the exact check of weight-free outputs against the original) refuses the model."""
    model = _shape_output_model(tmp_path / "m.onnx")
    out = tmp_path / "p.onnx"
    code = main(["prune", str(model), "-o", str(out), "--ratio", "0.3", *flags])
    err = capsys.readouterr().err
    assert code == ExitCode.VALIDATION_FAILED, err
    assert "int64 output" in err and "'shape_out0'" in err and "[1, 8, 4, 4]" in err
    assert not out.exists() and list(tmp_path.iterdir()) == [model]


def test_only_no_check_lets_the_bug_through(tmp_path: Path, capsys, shape_rule_bug) -> None:
    """The same model with every check off is written (what the checks are there to stop):
    proof that the test above fails for the right reason."""
    model = _shape_output_model(tmp_path / "m.onnx")
    out = tmp_path / "p.onnx"
    assert main(["prune", str(model), "-o", str(out), "--ratio", "0.3", "--no-validate",
                 "-q"]) == ExitCode.OK
    import onnxruntime as ort

    s = ort.InferenceSession(str(out)).run(["shape_out0"],
                                           {"x": np.zeros((1, 3, 4, 4), np.float32)})[0]
    assert s.tolist() != [1, 8, 4, 4]


def test_weight_free_outputs() -> None:
    """Shape and Size values are weight-free; ArgMax of a conv output is not (pruning with
    compensation may change it, and only the oracle can judge it)."""
    b = Builder()
    y = b.op("Relu", b.conv("x", 3, 8, name="c1"))
    s = b.op("Shape", y)
    n = b.op("Size", y)
    a = b.op("ArgMax", y, axis=1)
    k = b.op("Add", b.op("Gather", s, b.const(np.int64(1)), axis=0), b.const(np.int64(1)))
    outputs = {s: ([4], I64), n: ([], I64), a: ([1, 1, 4, 4], I64), k: ([], I64)}
    m = b.model({"x": [1, 3, 4, 4]}, outputs)
    assert weight_free_outputs(m) == {s, n, k}
