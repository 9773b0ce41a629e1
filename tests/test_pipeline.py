"""SPA as a pipeline step: ``--config``, ``--dry-run``, ``--json`` purity, ``--quiet`` and
progress bars, byte-for-byte determinism across processes, and the worked Makefile example."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from spa import progress
from spa.cli import main
from spa.errors import ExitCode
from tests.test_cli import _conv_net

ROOT = Path(__file__).resolve().parent.parent
# _conv_net: conv1 (8 channels) → conv2 (6) → conv3 (4, a graph output: frozen).
PARAMS = {0.5: 4 * 27 + 4 + 3 * 4 * 9 + 4 * 3, 0.25: 6 * 27 + 6 + 5 * 6 * 9 + 4 * 5}


@pytest.fixture()
def model_path(tmp_path: Path) -> Path:
    p = tmp_path / "net.onnx"
    onnx.save(_conv_net(), str(p))
    return p


def _toml(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "spa.toml"
    p.write_text(text)
    return p


def _env(extra: dict | None) -> dict:
    env = {**os.environ, **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _spa(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m spa`` in a fresh process: C-level writes to stdout would show up too."""
    return subprocess.run([sys.executable, "-m", "spa", *argv], capture_output=True, text=True,
                          env=_env(env), check=True, cwd=ROOT)


def _spa_start(*argv: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "spa", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(env), cwd=ROOT)


# --- --config ------------------------------------------------------------------------------


def test_config_equals_flags_and_flags_win(model_path: Path, tmp_path: Path, capsys) -> None:
    by_flags, by_file = tmp_path / "flags.onnx", tmp_path / "file.onnx"
    assert main(["prune", str(model_path), "-o", str(by_flags), "--ratio", "0.5",
                 "--round-to", "2", "--check-masked", "--json"]) == 0
    flags_report = json.loads(capsys.readouterr().out)
    cfg = _toml(tmp_path, 'ratio = 0.5\nround_to = 2\n"check-masked" = true\njson = true\n')
    assert main(["prune", str(model_path), "--config", str(cfg), "-o", str(by_file)]) == 0
    file_report = json.loads(capsys.readouterr().out)
    assert by_file.read_bytes() == by_flags.read_bytes()
    # --round-to 2 keeps 4 of conv2's 6 channels instead of 3.
    assert file_report["params_after"] == flags_report["params_after"] \
        == 4 * 27 + 4 + 4 * 4 * 9 + 4 * 4
    assert file_report["masked_relative_diff"] <= 1e-4  # check-masked came from the file
    # The command line overrides the file.
    assert main(["prune", str(model_path), "--config", str(cfg), "-o", str(by_file),
                 "--ratio", "0.25", "--round-to", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["params_after"] == PARAMS[0.25]


def test_config_table_wins_over_top_level_and_lists_are_replaced(
        model_path: Path, tmp_path: Path, capsys) -> None:
    plan = tmp_path / "plan.json"
    cfg = _toml(tmp_path, 'ratio = 0.25\nignore = ["conv3"]\n\n[prune]\nratio = 0.5\n'
                f'plan = "{plan}"\n"no-validate" = true\n\n[apply]\n"no_validate" = false\n')
    out = tmp_path / "p.onnx"
    assert main(["prune", str(model_path), "--config", str(cfg), "-o", str(out), "--json"]) == 0
    recipe = json.loads(plan.read_text())["recipe"]
    assert recipe["ratio"] == 0.5 and recipe["ignore"] == ["conv3"]
    # conv3 ignored: conv2's 6 output channels are frozen; conv1's 8 are halved.
    assert json.loads(capsys.readouterr().out)["channels_after"] == 4
    assert main(["prune", str(model_path), "--config", str(cfg), "-o", str(out),
                 "--ignore", "conv1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert json.loads(plan.read_text())["recipe"]["ignore"] == ["conv1"]  # replaced, not added
    assert report["channels_after"] == 3  # now conv1's 8 are frozen and conv2's 6 halved


def test_config_symbolic_dims_table_and_hidden_flag(tmp_path: Path, capsys) -> None:
    model = _conv_net()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    src = tmp_path / "dyn.onnx"
    onnx.save(model, str(src))
    cfg = _toml(tmp_path, "[prune]\nratio = 0.5\ncheck-masked = true\nhidden = true\n"
                "[prune.input-dim]\nheight = 6\nwidth = 5\n")
    assert main(["prune", str(src), "--config", str(cfg), "-o", str(tmp_path / "o.onnx"),
                 "--plan", str(tmp_path / "plan.json"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["masked_relative_diff"] <= 1e-4 and report["params_after"] == PARAMS[0.5]
    assert json.loads((tmp_path / "plan.json").read_text())["recipe"]["hidden_ratio"] == 0.5


@pytest.mark.parametrize("text, key, expect", [
    ("ratoi = 0.5", "ratoi", "unknown key"),
    ("ratio = 1.5", "ratio", "ratio must be in [0, 1), got 1.5"),
    ('ratio = "half"', "ratio", "not a number"),
    ("ratio = true", "ratio", "expected a number"),
    ("round-to = 1.5", "round-to", "not an integer"),
    ("min_channels = 0", "min_channels", "must be at least 1"),
    ('check-masked = "yes"', "check-masked", "expected true or false"),
    ('criterion = "magic"', "criterion", "is not one of"),
    ("ignore = 3", "ignore", "expected a string"),
    ("ratio = [0.1, 0.2]", "ratio", "expected a single value"),
    ('model = "x.onnx"', "model", "unknown key"),
    ('config = "other.toml"', "config", "unknown key"),
    ('input-dim = ["height"]', "input-dim", "NAME=SIZE"),
    ("prune = 3", "prune", "must be a table"),
])
def test_bad_config_is_one_line_naming_the_key(model_path: Path, tmp_path: Path, capsys,
                                               text: str, key: str, expect: str) -> None:
    cfg = _toml(tmp_path, text + "\n")
    out = tmp_path / "o.onnx"
    assert main(["prune", str(model_path), "--config", str(cfg), "-o", str(out)]) \
        == ExitCode.BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("spa: error: --config")
    assert f"'{key}'" in err and expect in err
    assert not out.exists()


def test_config_file_errors_and_per_command_keys(model_path: Path, tmp_path: Path,
                                                 capsys) -> None:
    out = tmp_path / "o.onnx"
    assert main(["prune", str(model_path), "--config", str(tmp_path / "no.toml"), "-o",
                 str(out)]) == ExitCode.BAD_INPUT
    assert "no such file" in capsys.readouterr().err
    bad = _toml(tmp_path, "ratio = = 3\n")
    assert main(["prune", str(model_path), "--config", str(bad), "-o", str(out)]) \
        == ExitCode.BAD_INPUT
    assert "not valid TOML" in capsys.readouterr().err
    # A top-level key must be an option of the command that runs; [prune] is not read by apply.
    plan = tmp_path / "plan.json"
    assert main(["prune", str(model_path), "-o", str(out), "--plan", str(plan),
                 "--no-validate"]) == 0
    cfg = _toml(tmp_path, '[prune]\nratio = 0.5\n[apply]\noutput = "%s"\nno-validate = true\n'
                % (tmp_path / "again.onnx"))
    assert main(["apply", str(model_path), str(plan), "--config", str(cfg)]) == 0
    assert (tmp_path / "again.onnx").read_bytes() == out.read_bytes()
    cfg = _toml(tmp_path, "ratio = 0.5\n")
    assert main(["apply", str(model_path), str(plan), "--config", str(cfg), "-o",
                 str(out)]) == ExitCode.BAD_INPUT
    assert "unknown key 'ratio' for spa apply" in capsys.readouterr().err


def test_config_for_analyze(model_path: Path, tmp_path: Path, capsys) -> None:
    cfg = _toml(tmp_path, '[analyze]\njson = true\nignore = ["conv3"]\n[prune]\nratio = 0.9\n')
    assert main(["analyze", str(model_path), "--config", str(cfg)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["prunable_groups"] == 1 and summary["prunable_channels"] == 8


# --- --dry-run -----------------------------------------------------------------------------


def test_dry_run_writes_no_model_and_predicts(model_path: Path, tmp_path: Path,
                                              capsys) -> None:
    before = set(tmp_path.iterdir())
    plan = tmp_path / "plan.json"
    assert main(["prune", str(model_path), "--dry-run", "--ratio", "0.5", "--json",
                 "--plan", str(plan)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(tmp_path.iterdir()) == before | {plan}  # only the plan that was asked for
    assert summary["dry_run"] is True
    assert [(g["channels"], g["kept"], g["removed"]) for g in summary["groups"]] == \
        [(8, 4, 4), (6, 3, 3)]
    assert summary["params_after"] == PARAMS[0.5]
    assert summary["flops_after"] == 36 * (4 * 27 + 3 * 36 + 4 * 3)
    assert summary["frozen"][0]["reasons"] == ["graph output 'y' (axis 1) keeps its shape"]
    # -o is ignored with --dry-run, and the plan equals the one a real run makes and uses.
    out, real_plan = tmp_path / "p.onnx", tmp_path / "real.json"
    assert main(["prune", str(model_path), "--dry-run", "--ratio", "0.5", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "dry run" in text and "0.262x" not in text and not out.exists()
    assert f"{PARAMS[0.5]:,d}" in text
    assert main(["prune", str(model_path), "--ratio", "0.5", "-o", str(out), "--plan",
                 str(real_plan), "--json", "--no-validate"]) == 0
    assert json.loads(capsys.readouterr().out)["params_after"] == summary["params_after"]
    assert real_plan.read_bytes() == plan.read_bytes()


# --- --json: one document on stdout --------------------------------------------------------


def test_json_stdout_is_one_document_for_every_command(model_path: Path, tmp_path: Path,
                                                       capfd) -> None:
    """capfd reads the file descriptors, so C-level writes to stdout would break json.loads."""
    plan = tmp_path / "plan.json"
    # OBSPA + --check-masked logs a warning (compensation voids the masked oracle).
    prune = ["prune", str(model_path), "-o", str(tmp_path / "p.onnx"), "--json", "--criterion",
             "obspa", "--samples", "2", "--check-masked", "--plan", str(plan)]
    runs = {"analyze": ["analyze", str(model_path), "--json"], "prune": prune,
            "dry-run": ["prune", str(model_path), "--dry-run", "--json"],
            "apply": ["apply", str(model_path), str(plan), "-o", str(tmp_path / "a.onnx"),
                      "--json"]}
    docs, errs = {}, {}
    for name, argv in runs.items():
        assert main(argv) == 0
        out, errs[name] = capfd.readouterr()
        docs[name] = json.loads(out)  # raises unless stdout is exactly one document
    assert docs["analyze"]["prunable_groups"] == 2
    assert docs["prune"]["compensated_layers"] >= 1
    assert docs["apply"]["params_after"] == docs["prune"]["params_after"] == PARAMS[0.25]
    assert docs["dry-run"]["params_after"] == PARAMS[0.25]  # default 0.3 also keeps 6 and 5
    # In a fresh process (pytest holds the logging handlers here): the warning goes to stderr,
    # and --quiet leaves stderr empty.
    res = _spa(*prune)
    assert "masked oracle does not apply" in res.stderr
    assert json.loads(res.stdout)["params_after"] == PARAMS[0.25]
    res = _spa(*prune, "--quiet")
    assert res.stderr == "" and json.loads(res.stdout)["params_after"] == PARAMS[0.25]


# --- --quiet and progress bars -------------------------------------------------------------


class _TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_on_a_terminal_and_never_with_quiet(model_path: Path, tmp_path: Path,
                                                          monkeypatch, capsys) -> None:
    monkeypatch.setattr(progress, "DEFAULT_DELAY", 0.0)  # draw even the fast steps
    argv = ["prune", str(model_path), "-o", str(tmp_path / "p.onnx"), "--criterion", "obspa",
            "--samples", "3", "--json"]
    tty = _TTY()
    monkeypatch.setattr(sys, "stderr", tty)
    assert main(argv) == 0
    drawn = tty.getvalue()
    for step in ("spa: analysis", "spa: hessians", "spa: obspa", "spa: latency"):
        assert step in drawn
    assert "0/3 " in drawn  # the Hessian bar counts the synthetic batches
    tty = _TTY()
    monkeypatch.setattr(sys, "stderr", tty)
    assert main([*argv, "--quiet"]) == 0
    assert tty.getvalue() == ""
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal: no bars by default
    assert main(argv) == 0
    assert "spa:" not in sys.stderr.getvalue()


def test_progress_switch_forced_on_writes_to_its_stream() -> None:
    stream = io.StringIO()
    assert list(progress.progress(range(3), "x")) == [0, 1, 2]  # off: the plain iterable
    assert progress.progress(range(3), "x") == range(3)
    settings = progress.ProgressSettings(enabled=True, stream=stream, delay=0.0)
    with progress.progress_settings(settings):
        assert list(progress.progress(range(4), "counting", unit="thing")) == [0, 1, 2, 3]
    assert "spa: counting:   0%" in stream.getvalue() and "0/4 " in stream.getvalue()
    assert not progress.enabled()  # the switch is back to "when stderr is a terminal"


# --- determinism ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_model(tmp_path_factory) -> Path:
    pytest.importorskip("torch")
    from models.export import export

    return export("resnet_bottleneck", tmp_path_factory.mktemp("ref") / "resnet.onnx")


def test_same_input_same_bytes_across_processes(reference_model: Path, tmp_path: Path
                                                ) -> None:
    """l1, random and obspa (synthetic Hessians), each pruned by two processes with different
    hash seeds and thread counts; all six run at once."""
    runs = []
    for criterion in ("l1", "random", "obspa"):
        for seed, threads in (("1", "1"), ("2", "2")):
            out = tmp_path / f"{criterion}{seed}.onnx"
            plan = tmp_path / f"{criterion}{seed}.json"
            argv = ["prune", str(reference_model), "-o", str(out), "--plan", str(plan),
                    "--ratio", "0.4", "--criterion", criterion, "--samples", "4", "--seed", "3",
                    "--quiet", "--no-validate"]
            env = {"PYTHONHASHSEED": seed, "OMP_NUM_THREADS": threads}
            runs.append((criterion, _spa_start(*argv, env=env), out, plan))
    outputs: dict[str, list[tuple[bytes, bytes]]] = {}
    for criterion, proc, out, plan in runs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        outputs.setdefault(criterion, []).append((out.read_bytes(), plan.read_bytes()))
    for criterion, (first, second) in outputs.items():
        assert first[0] == second[0], f"{criterion}: pruned model bytes differ between runs"
        assert first[1] == second[1], f"{criterion}: plan bytes differ between runs"
        groups = json.loads(first[1])["groups"]
        assert sum(len(g["keep"]) for g in groups) < sum(g["size"] for g in groups)
    assert outputs["l1"][0][1] != outputs["random"][0][1]  # the criteria did choose differently


# --- the worked example: examples/pipeline -------------------------------------------------


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_pipeline_makefile_from_a_fresh_copy(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    example = tmp_path / "pipeline"
    shutil.copytree(ROOT / "examples" / "pipeline", example,
                    ignore=shutil.ignore_patterns("build"))
    res = subprocess.run(["make", "-C", str(example), f"SPA_ROOT={ROOT}",
                          f"PYTHON={sys.executable}", "RUNS=5"], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    build = example / "build"
    for name in ("model.onnx", "pruned.onnx", "plan.json", "report.json", "report.html",
                 "reapplied.onnx", "benchmark.json"):
        assert (build / name).is_file(), name
    assert (build / "reapplied.onnx").read_bytes() == (build / "pruned.onnx").read_bytes()
    report = json.loads((build / "report.json").read_text())
    bench = json.loads((build / "benchmark.json").read_text())
    assert bench["pruned"]["params"] == report["params_after"] < bench["original"]["params"]
    assert bench["original"]["params"] == report["params_before"]
    assert 0 < bench["pruned"]["latency_ms"] and 0 < bench["original"]["latency_ms"]
    assert bench["speedup"] == pytest.approx(bench["original"]["latency_ms"]
                                             / bench["pruned"]["latency_ms"], rel=1e-6)
    assert bench["max_abs_output_change"] >= 0
