"""Float16 copies in a folder (spa/pipeline/variants.py): ``model_fp16.onnx`` beside
``model.onnx``, as transformers.js folders hold them, is planned as the plain file and takes its
written values, cast; the folder's checks hold it to that."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.transformers.float16 import convert_float_to_float16, convert_np_to_float16

from spa import validate as val
from spa.api import PruneOptions, apply_family, prune_family
from spa.cli import main
from spa.errors import ExitCode, ValidationError
from spa.ir.load import load_model, sort_nodes
from spa.pipeline import family, variants
from tests.test_family import CHECKS
from tests.test_family_calibration import _folder, _samples

RNG = np.random.default_rng(5)


def _mlp() -> onnx.ModelProto:
    """x[N,6] → MatMul(6→24) → Add → Relu → MatMul(24→24) → Add → Relu → MatMul(24→4) → Add."""
    inits = {"w1": RNG.standard_normal((6, 24)), "b1": RNG.standard_normal(24) * 0.1,
             "w2": RNG.standard_normal((24, 24)) / 5, "b2": RNG.standard_normal(24) * 0.1,
             "w3": RNG.standard_normal((24, 4)) / 5, "b3": RNG.standard_normal(4) * 0.1}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"], name="fc1"),
             helper.make_node("Add", ["h1", "b1"], ["a1"], name="bias1"),
             helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
             helper.make_node("MatMul", ["r1", "w2"], ["h2"], name="fc2"),
             helper.make_node("Add", ["h2", "b2"], ["a2"], name="bias2"),
             helper.make_node("Relu", ["a2"], ["r2"], name="relu2"),
             helper.make_node("MatMul", ["r2", "w3"], ["h3"], name="fc3"),
             helper.make_node("Add", ["h3", "b3"], ["y"], name="bias3")]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _mlp_folder(tmp_path: Path, edit=None) -> tuple[Path, Path]:
    """A folder of the MLP and its float16 copy (onnxruntime's converter, float inputs and
    outputs kept), and calibration samples beside it."""
    src = tmp_path / "mlp"
    src.mkdir()
    plain = _mlp()
    onnx.save(plain, str(src / "model.onnx"))
    copy = convert_float_to_float16(plain, keep_io_types=True)
    if edit is not None:
        edit(copy)
    onnx.save(copy, str(src / "model_fp16.onnx"))
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=RNG.standard_normal((256, 6)).astype(np.float32))
    return src, calib


def _weights(path: Path) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / np.abs(a).max())


def _outputs(path: Path, x: np.ndarray) -> np.ndarray:
    return val.run(val.session(str(path)), {"x": x})["y"]


def test_a_float16_copy_is_planned_as_its_file_and_takes_its_refits(tmp_path: Path) -> None:
    src, calib = _mlp_folder(tmp_path)
    out = tmp_path / "small"
    done = prune_family(src, out, PruneOptions(ratio=0.5, calib=str(calib)), CHECKS)
    plain, copy = _weights(out / "model.onnx"), _weights(out / "model_fp16.onnx")
    before = _weights(src / "model_fp16.onnx")
    # the same channels kept, and every value the plain file's, cast as the converter casts
    assert plain["w2"].shape == copy["w2"].shape == (12, 12)
    for name, value in copy.items():
        assert value.dtype == np.float16
        assert np.array_equal(value, convert_np_to_float16(plain[name])), name
    # the plain file was refitted: the copy holds the refit, not rows of its own weights
    assert done.reports["model.onnx"].fidelity["reconstructed"]
    own_rows = {row.tobytes() for row in before["w3"]}
    assert not all(row.tobytes() in own_rows for row in copy["w3"])
    took = done.refits_taken["model_fp16.onnx"]
    assert took["from"] == "model.onnx" and took["how"] == "float16-cast" and took["values"] >= 4
    assert 0 < took["relative_diff"] <= max(variants.SPREAD * took["relative_diff_before"],
                                            variants.FLOOR)
    assert "a float16 copy of model.onnx, it took" in done.reports["model_fp16.onnx"].oracle
    assert done.followed and not done.reports["model_fp16.onnx"].calibration
    # on other inputs, the copy answers as the pruned plain file within float16's precision,
    # and as close to the dense model as it does
    x = RNG.standard_normal((64, 6)).astype(np.float32)
    dense = _outputs(src / "model.onnx", x)
    assert _relative(_outputs(out / "model.onnx", x), _outputs(out / "model_fp16.onnx", x)) < 5e-3
    assert _relative(dense, _outputs(out / "model_fp16.onnx", x)) < \
        _relative(dense, _outputs(out / "model.onnx", x)) + 5e-3


def test_a_file_that_is_not_a_cast_copy_is_pruned_apart(tmp_path: Path) -> None:
    """One weight of its own (not the plain one cast): the file is another model, planned on
    its own (its groups tie to nothing), and takes nothing."""
    def edit(m: onnx.ModelProto) -> None:
        w = next(i for i in m.graph.initializer if i.name == "w2")
        w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * np.float16(1.5), "w2"))

    src, calib = _mlp_folder(tmp_path, edit)
    graphs = {n: load_model(src / n).graph for n in ("model.onnx", "model_fp16.onnx")}
    assert variants.cast_copies(graphs) == {}
    done = prune_family(src, tmp_path / "small", PruneOptions(ratio=0.5), CHECKS)
    assert "model_fp16.onnx" not in done.refits_taken and done.ties == 0


def test_cast_copies_finds_the_weights_and_how_they_were_cast(tmp_path: Path) -> None:
    src, _ = _mlp_folder(tmp_path)
    graphs = {n: load_model(src / n).graph for n in ("model.onnx", "model_fp16.onnx")}
    copy = variants.cast_copies(graphs)["model_fp16.onnx"]
    assert copy.plain == "model.onnx" and copy.names == ("w1", "w2", "w3")
    assert copy.values == ("b1", "b2", "b3", "w1", "w2", "w3")
    assert copy.limits == variants.LIMITS[0]
    assert variants.plain_name("decoder_model_merged_fp16.then_branch.onnx") == \
        "decoder_model_merged.then_branch.onnx"
    assert variants.plain_name("model_quantized.onnx") is None


def test_lowered_casts_as_the_float16_converters_do() -> None:
    x = np.array([0, 1e-9, -1e-9, 3e-8, 8e-8, -8e-8, 1.5, -2.25, 7e4, -7e4, 2e4, np.inf, -np.inf,
                  np.nan, 6.1e-5, 0.1], np.float32)
    assert val.same_bits(variants.lowered(x, np.float16), convert_np_to_float16(x))
    occ = variants.lowered(x, np.float16, variants.LIMITS[1])  # onnxconverter-common's limits
    assert occ[1] == np.float16(1e-7) and occ[10] == np.float16(1e4) and occ[8] == np.float16(1e4)
    assert np.isnan(occ[13]) and occ[11] == np.inf and occ[6] == np.float16(1.5)


def test_a_copy_that_keeps_its_own_values_is_caught(tmp_path: Path, monkeypatch) -> None:
    """Without taking the plain file's refits, the copy's weights are no longer the plain
    ones cast: the folder's check refuses, and nothing is written."""
    monkeypatch.setattr(family, "lowered_taken", lambda *args: {})
    src, calib = _mlp_folder(tmp_path)
    out = tmp_path / "small"
    with pytest.raises(ValidationError, match="were the same before pruning and differ after"):
        prune_family(src, out, PruneOptions(ratio=0.5, calib=str(calib)), CHECKS)
    assert not out.exists()


def test_the_answer_check_catches_a_copy_that_parts(tmp_path: Path, monkeypatch) -> None:
    """A copy that took values of the wrong layers answers far from its plain file."""
    real = variants.lowered

    def shuffled(values, dtype, limits=variants.LIMITS[0]):
        out = real(values, dtype, limits)
        return out[::-1].copy() if out.ndim == 1 else out

    src, calib = _mlp_folder(tmp_path)
    monkeypatch.setattr(family, "check_written", lambda *args: None)
    monkeypatch.setattr(variants, "lowered", shuffled)
    with pytest.raises(ValidationError, match="whose float16 copy it is"):
        prune_family(src, tmp_path / "small", PruneOptions(ratio=0.5, calib=str(calib)), CHECKS)


def test_a_saved_folder_plan_applies_to_the_same_bytes(tmp_path: Path, capsys) -> None:
    src, calib = _mlp_folder(tmp_path)
    plan, first, again = tmp_path / "plan.json", tmp_path / "a", tmp_path / "b"
    assert main(["prune", str(src), "-o", str(first), "--ratio", "0.5", "--calib", str(calib),
                 "--plan", str(plan), "--report", str(tmp_path / "r.json")]) == ExitCode.OK
    assert "a float16 copy of model.onnx" in capsys.readouterr().err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["refits_taken"]["model_fp16.onnx"]["how"] == "float16-cast"
    apply_family(src, plan, again, CHECKS)
    digest = {d: {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in d.iterdir()}
              for d in (first, again)}
    assert digest[first] == digest[again]


def test_a_seq2seq_folders_float16_copies(tmp_path: Path, caplog) -> None:
    """The BART folder with a float16 copy of each file (onnxruntime's converter writes the
    decoders' nodes out of order: read sorted). The encoder's copy follows the encoder and
    holds its refitted values, cast. The decoders' copies cannot follow theirs (no float16
    merged decoder reads their caches back, so their self-attention heads are frozen) and are
    pruned apart, as before, rather than freezing those heads in the plain files too."""
    src = _folder(tmp_path)
    for f in sorted(src.glob("*.onnx")):
        onnx.save(convert_float_to_float16(onnx.load(str(f)), keep_io_types=True),
                  str(src / f"{f.stem}_fp16.onnx"))
    unsorted = onnx.load(str(src / "decoder_model_fp16.onnx"))
    assert sort_nodes(unsorted.graph), "the converter's output is out of order"
    assert not sort_nodes(unsorted.graph)  # sorted once, nothing moves again
    out = tmp_path / "small"
    options = PruneOptions(heads_ratio=0.5, mlp_ratio=0.5,
                           calib=str(_samples(tmp_path / "c.npz")))
    done = prune_family(src, out, options, CHECKS)
    took = done.refits_taken["encoder_model_fp16.onnx"]
    assert took["from"] == "encoder_model.onnx" and took["how"] == "float16-cast"
    plain, copy = (_weights(out / f"encoder_model{v}.onnx") for v in ("", "_fp16"))
    cast = [k for k in copy if copy[k].dtype == np.float16 and plain[k].ndim]
    assert len(cast) >= 10
    for key in cast:
        assert np.array_equal(copy[key], convert_np_to_float16(plain[key])), key
    assert "decoder_model_fp16.onnx: pruned apart, not as a float16 copy" in caplog.text
    assert "decoder_model_fp16.onnx" not in done.refits_taken
    # the plain decoders lose as many heads as without the copies beside them
    alone = tmp_path / "alone"
    for f in src.glob("*_fp16.onnx"):
        f.unlink()
    without = prune_family(src, alone, options, CHECKS)
    for name in ("decoder_model.onnx", "decoder_with_past_model.onnx"):
        assert done.reports[name].params_after == without.reports[name].params_after
    assert isinstance(done.steps["decoder_model.onnx -> decoder_with_past_model.onnx"], dict)
