"""The files of one model pruned together (spa/pipeline/family.py).

``tests/models/optimum_bart/``: the two decoders 🤗 Optimum exports for a random BART
(hidden 64, 4 heads, 2 decoder layers): ``decoder_model.onnx`` writes the caches
(``present.N.{decoder,encoder}.{key,value}``), ``decoder_with_past_model.onnx`` reads them back
(``past_key_values.N.…``). Pruned one file at a time, the with-past decoder loses cache heads the
first-step decoder keeps; pruned as a folder, the two lose the same heads and still decode as
one model: each step the with-past decoder takes matches a full run of the first-step decoder
over the whole prefix.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from spa.api import CheckOptions, PruneOptions, apply_family, prune, prune_family
from spa.cli import main
from spa.errors import ExitCode, PlanMismatchError, ValidationError
from spa.pipeline import family, family_checks, merged, ties
from spa.plan import FolderPlan, Plan

BART = Path(__file__).parent / "models" / "optimum_bart"
MERGED = Path(__file__).parent / "models" / "optimum_bart_merged" / "decoder_model_merged.onnx"
HEADS = PruneOptions(heads_ratio=0.5, mlp_ratio=0.5)
CHECKS = CheckOptions(input_dims=(("batch_size", 2),))


def _folder(tmp_path: Path) -> Path:
    """The fixture, with a merged decoder (a copy: left out by name) beside it."""
    src = tmp_path / "bart"
    shutil.copytree(BART, src)
    shutil.copy(src / "decoder_model.onnx", src / "decoder_model_merged.onnx")
    return src


def _digest(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


def _decode(folder: Path, steps: int = 4) -> float:
    """The worst relative difference between the with-past decoder's logits, step by step on the
    caches the first-step decoder and then itself wrote, and the first-step decoder's logits
    over the whole prefix: 0 up to rounding when the two files are one model."""
    first = ort.InferenceSession(str(folder / "decoder_model.onnx"))
    later = ort.InferenceSession(str(folder / "decoder_with_past_model.onnx"))
    rng = np.random.default_rng(0)
    encoded = rng.standard_normal((1, 6, 64)).astype(np.float32)
    mask = np.ones((1, 6), np.int64)
    tokens = rng.integers(0, 100, (1, 2 + steps)).astype(np.int64)

    def full(t: int) -> dict[str, np.ndarray]:
        names = [o.name for o in first.get_outputs()]
        return dict(zip(names, first.run(None, {"input_ids": tokens[:, :t],
                                                "encoder_hidden_states": encoded,
                                                "encoder_attention_mask": mask})))

    past = {k.replace("present", "past_key_values"): v for k, v in full(2).items()
            if k.startswith("present")}
    reads = {i.name for i in later.get_inputs()}
    names = [o.name for o in later.get_outputs()]
    worst = 0.0
    for t in range(2, 2 + steps):
        feeds = {"input_ids": tokens[:, t:t + 1], "encoder_attention_mask": mask,
                 **{k: v for k, v in past.items() if k in reads}}
        out = dict(zip(names, later.run(None, feeds)))
        ref = full(t + 1)["logits"][0, -1]
        worst = max(worst, float(np.abs(out["logits"][0, -1] - ref).max() / np.abs(ref).max()))
        past.update({k.replace("present", "past_key_values"): v for k, v in out.items()
                     if k.startswith("present")})
    return worst


def _decode_merged(folder: Path, steps: int = 4, name: str = "decoder_model_merged.onnx"
                   ) -> float:
    """:func:`_decode` through the merged decoder, as a runtime drives it: the first step down
    its no-past branch, fed the placeholder caches a runtime sizes from the config (4 heads,
    length 0), then the with-past branch on the decoder caches written so far (the encoder's
    come from the first step: the with-past branch writes placeholders for them)."""
    sess = ort.InferenceSession(str(folder / name))
    rng = np.random.default_rng(0)
    encoded = rng.standard_normal((1, 6, 64)).astype(np.float32)
    mask = np.ones((1, 6), np.int64)
    tokens = rng.integers(0, 100, (1, 2 + steps)).astype(np.int64)
    names = [o.name for o in sess.get_outputs()]
    empty = {i.name: np.zeros((1, 4, 0, 16), np.float32) for i in sess.get_inputs()
             if i.name.startswith("past_key_values")}

    def run(ids: np.ndarray, past: dict[str, np.ndarray], cached: bool) -> dict[str, np.ndarray]:
        return dict(zip(names, sess.run(None, {
            "input_ids": ids, "encoder_hidden_states": encoded, "encoder_attention_mask": mask,
            "use_cache_branch": np.array([cached]), **past})))

    def read_back(out: dict[str, np.ndarray], *kinds: str) -> dict[str, np.ndarray]:
        return {k.replace("present", "past_key_values"): v for k, v in out.items()
                if k.startswith("present") and k.split(".")[2] in kinds}

    past = read_back(run(tokens[:, :2], empty, False), "decoder", "encoder")
    worst = 0.0
    for t in range(2, 2 + steps):
        out = run(tokens[:, t:t + 1], past, True)
        ref = run(tokens[:, :t + 1], empty, False)["logits"][0, -1]
        worst = max(worst, float(np.abs(out["logits"][0, -1] - ref).max() / np.abs(ref).max()))
        past.update(read_back(out, "decoder"))
    return worst


def _heads(model: Path, name: str) -> int:
    m = onnx.load(str(model), load_external_data=False)
    v = next(v for v in (*m.graph.input, *m.graph.output) if v.name == name)
    return v.type.tensor_type.shape.dim[1].dim_value


def test_a_folder_prunes_its_decoders_alike(tmp_path: Path) -> None:
    src = _folder(tmp_path)
    before = _digest(src)
    out = tmp_path / "small"
    done = prune_family(src, out, HEADS, CHECKS)
    assert _digest(src) == before  # the input is never modified
    assert sorted(f.name for f in out.iterdir()) == [
        "config.json", "decoder_model.onnx", "decoder_with_past_model.onnx"]
    assert "decoder_model_merged.onnx" in done.skipped
    for name in ("present.0.decoder.key", "present.1.encoder.value"):
        assert _heads(out / "decoder_model.onnx", name) == 2  # 4 heads before
    assert _heads(out / "decoder_with_past_model.onnx", "past_key_values.1.encoder.value") == 2
    first = done.reports["decoder_model.onnx"]
    assert first.params_after < 0.62 * first.params_before  # heads too: 115,703 -> 68,087
    for report in done.reports.values():
        assert report.masked_relative_diff is not None and report.masked_relative_diff < 1e-5
    assert done.followed >= 1  # the cross-attention heads: decided where their weights are
    assert _decode(BART) < 1e-5
    assert _decode(out) < 1e-5
    # every weight the two files share is still the same
    a, b = (onnx.load(str(out / n)) for n in ("decoder_model.onnx",
                                              "decoder_with_past_model.onnx"))
    shared = {hashlib.sha256(numpy_helper.to_array(t).tobytes()).hexdigest()
              for t in a.graph.initializer if len(t.dims) == 2}
    same = [t for t in b.graph.initializer if len(t.dims) == 2 and hashlib.sha256(
        numpy_helper.to_array(t).tobytes()).hexdigest() in shared]
    assert len(same) == sum(1 for t in b.graph.initializer if len(t.dims) == 2) >= 16


def test_a_file_with_nothing_to_prune_is_copied_as_it_is(tmp_path: Path) -> None:
    src = tmp_path / "bart"
    shutil.copytree(BART, src)
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"], name="relu")], "g", [x], [y])),
        str(src / "postprocess.onnx"))
    out = tmp_path / "small"
    done = prune_family(src, out, HEADS, CHECKS, plan_path=tmp_path / "plan.json")
    assert (out / "postprocess.onnx").read_bytes() == (src / "postprocess.onnx").read_bytes()
    assert "nothing to prune in it" in done.skipped["postprocess.onnx"]
    assert sorted(done.reports) == ["decoder_model.onnx", "decoder_with_past_model.onnx"]
    assert _decode(out) < 1e-5
    saved = FolderPlan.load(tmp_path / "plan.json")
    assert saved.copied == ("postprocess.onnx",)  # applied, it is copied again
    again = apply_family(src, saved, tmp_path / "again", CHECKS)
    assert "copied as it is" in again.skipped["postprocess.onnx"]
    assert _digest(tmp_path / "again") == _digest(out)


def _conv_folder(tmp_path: Path) -> tuple[Path, Path]:
    """A folder of one model file (a small conv net) beside a labels file, and 40 calibration
    samples for it."""
    src = tmp_path / "net"
    src.mkdir()
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 3, 6, 6])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w1", (8, 3, 3, 3)), ("w2", (4, 8, 3, 3)))]
    nodes = [onnx.helper.make_node("Conv", ["x", "w1"], ["a"], name="c1", pads=[1] * 4),
             onnx.helper.make_node("Relu", ["a"], ["r"], name="r1"),
             onnx.helper.make_node("Conv", ["r", "w2"], ["y"], name="c2", pads=[1] * 4)]
    onnx.save(onnx.helper.make_model(
        onnx.helper.make_graph(nodes, "net", [x], [y], inits),
        opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=10), str(src / "net.onnx"))
    (src / "labels.txt").write_text("a\nb\n")
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=rng.standard_normal((40, 3, 6, 6)).astype(np.float32))
    return src, calib


def test_a_folder_whose_files_pass_nothing_takes_calibration_data(tmp_path: Path) -> None:
    """A folder of one model file (a decoder beside its config, here a small conv net) is
    calibrated and reconstructed as the file alone would be, its other files copied."""
    src, calib = _conv_folder(tmp_path)
    out = tmp_path / "small"
    plan = tmp_path / "plan.json"
    done = prune_family(src, out, PruneOptions(ratio=0.5, calib=str(calib)), CheckOptions(),
                        plan_path=plan)
    report = done.reports["net.onnx"]
    assert report.params_after < report.params_before
    assert report.calibration["samples"] == 36 and report.reconstruction
    assert (out / "labels.txt").read_text() == "a\nb\n"
    # the plan's recipe names the data: applied, the refit is made again, byte for byte
    again = apply_family(src, plan, tmp_path / "again", CheckOptions())
    assert again.reports["net.onnx"].reconstruction
    assert _digest(tmp_path / "again") == _digest(out)


def test_a_folder_whose_files_pass_nothing_recovers_its_pruned_file(tmp_path: Path,
                                                                    capsys) -> None:
    """``--recover`` distils the one pruned file of such a folder into the output folder, the
    other files copied beside it; a folder that pruned several files is refused."""
    pytest.importorskip("torch")
    src, calib = _conv_folder(tmp_path)
    out = tmp_path / "small"
    assert main(["prune", str(src), "-o", str(out), "--ratio", "0.5", "--calib", str(calib),
                 "--recover", "2", "--json", "-q"]) == ExitCode.OK
    done = json.loads(capsys.readouterr().out)["files"]["net.onnx"]
    assert done["recovery"]["steps"] >= 1 and "recovered" in done["fidelity"]
    assert done["output"] == str(out / "net.onnx")
    assert sorted(p.name for p in out.iterdir()) == ["labels.txt", "net.onnx"]
    assert ort.InferenceSession(str(out / "net.onnx")).run(
        None, {"x": np.zeros((1, 3, 6, 6), np.float32)})[0].shape[1] == 4
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    shutil.copy(src / "net.onnx", src / "other.onnx")  # two files to prune: which to distil?
    again = tmp_path / "again"
    assert main(["prune", str(src), "-o", str(again), "--ratio", "0.5", "--calib", str(calib),
                 "--recover", "2", "-q"]) == ExitCode.BAD_INPUT
    assert "--recover distils one pruned file, and 2 were pruned" in capsys.readouterr().err
    assert not again.exists()


def test_one_file_at_a_time_breaks_the_pair(tmp_path: Path) -> None:
    out = tmp_path / "apart"
    out.mkdir()
    for name in ("decoder_model.onnx", "decoder_with_past_model.onnx"):
        prune(BART / name, out / name, HEADS, CHECKS)
    assert _heads(out / "decoder_model.onnx", "present.0.decoder.key") == 4
    assert _heads(out / "decoder_with_past_model.onnx", "past_key_values.0.decoder.key") == 2
    with pytest.raises(Exception, match="past_key_values"):
        _decode(out)


def test_a_shared_weight_written_differently_is_caught(tmp_path: Path) -> None:
    out = tmp_path / "small"
    prune_family(BART, out, HEADS, CHECKS)
    analyses = {n: family.prepare(family.load_model(str(BART / n)), HEADS, CHECKS).analysis
                for n in ("decoder_model.onnx", "decoder_with_past_model.onnx")}
    headers = {n: onnx.load(str(BART / n)) for n in analyses}
    pairs = ties.tied_sites(analyses, headers)
    weights = [p for p in pairs if not p[0][1][0].startswith("present")]
    assert weights
    family_checks.check_written(out, sorted(analyses), pairs)  # as written: they agree
    (_, (name, _)), _ = weights[0]
    model = onnx.load(str(out / "decoder_model.onnx"))
    t = next(t for t in model.graph.initializer if t.name == name)
    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 1.001, name))
    onnx.save(model, str(out / "decoder_model.onnx"))
    with pytest.raises(ValidationError, match="differ after"):
        family_checks.check_written(out, sorted(analyses), pairs)


def test_the_step_check_catches_decoders_that_part(tmp_path: Path, monkeypatch) -> None:
    """Each file pruned by its own plan (the ties not followed, the weight check off): the
    caches keep their shapes, but the cross-attention heads the two decoders keep differ, and
    the step check refuses to write the folder."""
    monkeypatch.setattr(ties, "follow", lambda analyses, plans, pairs, prefer=(), last=(): (
        {n: {} for n in analyses}, 0, []))
    monkeypatch.setattr(family, "check_written", lambda *args: None)
    out = tmp_path / "small"
    with pytest.raises(ValidationError, match="does not continue what the pruned"):
        prune_family(BART, out, HEADS, CHECKS)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_dry_run_of_a_folder_plans_each_file_and_writes_nothing(tmp_path: Path, capsys
                                                                   ) -> None:
    src = _folder(tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert main(["prune", str(src), "--dry-run", "--heads-ratio", "0.5", "--json"]) == ExitCode.OK
    summary = json.loads(capsys.readouterr().out)
    assert sorted(summary["files"]) == ["decoder_model.onnx", "decoder_with_past_model.onnx"]
    first, later = (summary["files"][n] for n in sorted(summary["files"]))
    assert first["params_after"] < first["params_before"]
    assert later["params_after"] < later["params_before"]
    assert summary["groups_following"] >= 1 and summary["tied_spaces"] >= 16
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_analyze_reads_a_folder_as_it_is_pruned(tmp_path: Path, capsys) -> None:
    """``spa analyze folder/`` analyses each file with the caches between files free: the
    first-step decoder's heads are prunable there, frozen when the file is analysed alone."""
    src = _folder(tmp_path)
    assert main(["analyze", str(src), "--json"]) == ExitCode.OK
    files = json.loads(capsys.readouterr().out)["files"]
    assert sorted(files) == ["decoder_model.onnx", "decoder_with_past_model.onnx"]
    together = sum(g["prunable"] for g in files["decoder_model.onnx"]["groups"])
    assert main(["analyze", str(src / "decoder_model.onnx"), "--json"]) == ExitCode.OK
    alone = sum(g["prunable"] for g in json.loads(capsys.readouterr().out)["groups"])
    assert (together, alone) == (6, 2)


@pytest.mark.parametrize("flags, expect", [
    (["--calib", "x.npz"], "reads 'encoder_hidden_states' from an encoder, and no other file"),
    (["--calib", "synthetic"], "--calib synthetic makes each file's inputs alone"),
])
def test_what_a_folder_refuses(tmp_path: Path, capsys, flags: list[str], expect: str) -> None:
    out = tmp_path / "small"
    assert main(["prune", str(BART), "-o", str(out), *flags]) == ExitCode.BAD_INPUT
    assert expect in capsys.readouterr().err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_the_cli_prunes_a_folder(tmp_path: Path, capsys) -> None:
    src = _folder(tmp_path)
    out = tmp_path / "small"
    report = tmp_path / "r.json"
    assert main(["prune", str(src), "-o", str(out), "--heads-ratio", "0.5", "--mlp-ratio", "0.5",
                 "--input-dim", "batch_size=2", "--report", str(report)]) == ExitCode.OK
    text = capsys.readouterr()
    assert "decoder_with_past_model.onnx:" in text.out and f"wrote {out}" in text.out
    assert "decoder_model_merged.onnx: a merged decoder SPA cannot split: its graph is not a " \
        "single If" in text.err
    assert '"groups_following"' in report.read_text()
    assert "step check decoder_model.onnx -> decoder_with_past_model.onnx: 3 tokens" in text.out
    assert _decode(out) < 1e-5
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    assert main(["prune", str(src), "-o", str(tmp_path / "taken")]) == ExitCode.BAD_INPUT
    assert "not an empty directory" in capsys.readouterr().err


def test_a_saved_folder_plan_applies_to_the_same_bytes(tmp_path: Path, capsys) -> None:
    """``spa prune folder/ --plan`` saves every file's plan; ``spa apply folder/ plan.json``
    writes the same folder, byte for byte, checked as the prune was."""
    src = _folder(tmp_path)
    plan = tmp_path / "plan.json"
    done = prune_family(src, tmp_path / "a", HEADS, CHECKS, plan_path=plan)
    saved = FolderPlan.load(plan)
    assert sorted(saved.files) == sorted(done.reports) and saved.copied == ()
    assert main(["apply", str(src), str(plan), "-o", str(tmp_path / "b"),
                 "--input-dim", "batch_size=2"]) == ExitCode.OK
    out = capsys.readouterr().out
    assert "step check decoder_model.onnx -> decoder_with_past_model.onnx: 3 tokens" in out
    assert "the plans lose the same entries of each" in out
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert len(_digest(tmp_path / "b")) == 3  # both decoders and the config
    # a dry run saves the same plan
    assert main(["prune", str(src), "--dry-run", "--heads-ratio", "0.5", "--mlp-ratio", "0.5",
                 "--plan", str(tmp_path / "dry.json")]) == ExitCode.OK
    assert (tmp_path / "dry.json").read_text() == plan.read_text()


def test_a_folder_plan_whose_files_part_is_refused(tmp_path: Path) -> None:
    """Plans edited so that a cache's heads differ between the decoders are refused before any
    work, naming the tensors."""
    plan = tmp_path / "plan.json"
    prune_family(BART, tmp_path / "a", HEADS, CHECKS, plan_path=plan)
    body = json.loads(plan.read_text())
    heads = [g for g in body["files"]["decoder_with_past_model.onnx"]["groups"]
             if g["size"] == 4]
    assert any(g["keep"] != [0, 1] for g in heads)
    for g in heads:
        g["keep"] = [0, 1]
    plan.write_text(json.dumps(body))
    out = tmp_path / "b"
    with pytest.raises(PlanMismatchError, match="would lose different entries"):
        apply_family(BART, plan, out, CHECKS)
    assert not out.exists()


def test_plans_of_one_file_and_of_a_folder_are_not_mixed_up(tmp_path: Path, capsys) -> None:
    plan = tmp_path / "plan.json"
    prune_family(BART, tmp_path / "a", HEADS, CHECKS, plan_path=plan)
    with pytest.raises(PlanMismatchError, match="the plan of a folder of ONNX files"):
        Plan.load(plan)
    one = tmp_path / "one.json"
    prune(BART / "decoder_model.onnx", tmp_path / "one.onnx", HEADS, CHECKS, plan_path=one)
    with pytest.raises(PlanMismatchError, match="the plan of one ONNX file"):
        FolderPlan.load(one)
    other = tmp_path / "other"  # a folder with one more ONNX file than the plan knows
    shutil.copytree(BART, other)
    shutil.copy(other / "decoder_model.onnx", other / "encoder_model.onnx")
    assert main(["apply", str(other), str(plan), "-o", str(tmp_path / "b")]) \
        == ExitCode.BAD_INPUT
    assert "encoder_model.onnx" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_a_merged_decoder_is_pruned_through_its_branches(tmp_path: Path, capsys) -> None:
    """Optimum's merged decoder (one If, a decoder in each branch) is split, its branches pruned
    with the two separate decoders (the weights they share tie them to the same heads) and
    merged back; a runtime drives it as before, placeholder caches of the original head count
    in the first step included."""
    src = tmp_path / "bart"
    shutil.copytree(BART, src)
    shutil.copy(MERGED, src)
    before = _digest(src)
    assert _decode_merged(src) < 1e-5
    out = tmp_path / "small"
    assert main(["prune", str(src), "-o", str(out), "--heads-ratio", "0.5", "--mlp-ratio", "0.5",
                 "--json"]) == ExitCode.OK
    done = json.loads(capsys.readouterr().out)
    assert _digest(src) == before
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "decoder_model.onnx", "decoder_model_merged.onnx",
        "decoder_with_past_model.onnx"]
    assert done["merged"]["decoder_model_merged.onnx"]["relative_diff"] < 1e-6
    branch = done["files"]["decoder_model_merged.else_branch.onnx"]
    assert branch["output"] == str(out / "decoder_model_merged.onnx")
    assert branch["input"] == f"{src / 'decoder_model_merged.onnx'} (else_branch)"
    assert done["files"]["decoder_model.onnx"]["input"] == str(src / "decoder_model.onnx")
    assert branch["params_after"] == done["files"]["decoder_model.onnx"]["params_after"] \
        < 0.62 * branch["params_before"]
    for name in ("present.0.decoder.key", "present.1.encoder.value"):
        assert _heads(out / "decoder_model_merged.onnx", name) == 2  # as the separate ones
        assert _heads(out / "decoder_model.onnx", name) == 2
    assert _decode_merged(out) < 1e-5
    assert _decode(out) < 1e-5
    # the with-past branch's placeholder encoder caches say the kept head count too
    m = onnx.load(str(out / "decoder_model_merged.onnx"))
    then = next(a.g for a in m.graph.node[0].attribute if a.name == "then_branch")
    held = [numpy_helper.to_array(n.attribute[0].t).shape for n in then.node
            if n.op_type == "Constant" and n.output[0].startswith("present.")]
    assert held and all(h == (0, 2, 1, 16) for h in held)


def test_a_folder_of_an_encoder_side_and_a_merged_decoder_alone(tmp_path: Path) -> None:
    """transformers.js folders ship the merged decoder without the separate ones: its two
    branches are then the only decoders, tied to each other by their caches and weights."""
    src = tmp_path / "web"
    src.mkdir()
    shutil.copy(MERGED, src)
    shutil.copy(BART / "config.json", src)
    out = tmp_path / "small"
    plan = tmp_path / "plan.json"
    done = prune_family(src, out, HEADS, CHECKS, plan_path=plan)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "decoder_model_merged.onnx"]
    assert sorted(done.steps) == [
        "decoder_model_merged.else_branch.onnx -> decoder_model_merged.then_branch.onnx"]
    assert _heads(out / "decoder_model_merged.onnx", "present.1.decoder.value") == 2
    assert _decode_merged(out) < 1e-5
    again = apply_family(src, plan, tmp_path / "again", CHECKS)  # the plan names the branches
    assert sorted(again.reports) == sorted(done.reports)
    assert _digest(tmp_path / "again") == _digest(out)


def test_a_merged_decoder_alone_points_to_its_folder(tmp_path: Path, capsys) -> None:
    assert main(["prune", str(MERGED), "-o", str(tmp_path / "m.onnx")]) \
        == ExitCode.NOTHING_PRUNABLE
    assert "pruned through its two branches when its folder is pruned: spa prune folder/ -o " \
        "out/" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_merged_decoder_is_known_by_its_graph(tmp_path: Path) -> None:
    """transformers.js folders hold variants (``decoder_model_merged_quantized.onnx``): a file
    whose graph is a single If is split as a merged decoder whatever its name; here the copy's
    weights, byte for byte the same, tie its heads to the plain one's (variants pass nothing
    to each other). Read whole, its step check against the other files' branches
    could not run (its with-past branch writes placeholder caches)."""
    src = tmp_path / "web"
    src.mkdir()
    shutil.copy(MERGED, src)
    shutil.copy(MERGED, src / "decoder_model_merged_quantized.onnx")
    out = tmp_path / "small"
    done = prune_family(src, out, HEADS, CHECKS)
    assert sorted(done.merged) == ["decoder_model_merged.onnx",
                                   "decoder_model_merged_quantized.onnx"]
    for name in done.merged:
        assert _heads(out / name, "present.1.decoder.value") == 2
        assert _decode_merged(out, name=name) < 1e-5
    kept = [np.asarray(numpy_helper.to_array(t)) for t in onnx.load(
        str(out / "decoder_model_merged.onnx")).graph.initializer]
    again = [np.asarray(numpy_helper.to_array(t)) for t in onnx.load(
        str(out / "decoder_model_merged_quantized.onnx")).graph.initializer]
    assert len(kept) == len(again) and all(np.array_equal(a, b) for a, b in zip(kept, again))


def test_a_variant_passes_nothing_to_the_plain_files(tmp_path: Path) -> None:
    """A quantised variant SPA cannot split (``quantize_dynamic`` puts a DynamicQuantizeLinear
    beside the If; here an Identity) is copied as it is, and its caches, though named as the
    plain files' are, tie nothing: the plain merged decoder still loses heads."""
    src = tmp_path / "web"
    src.mkdir()
    shutil.copy(MERGED, src)
    m = onnx.load(str(MERGED))
    m.graph.node.append(onnx.helper.make_node("Identity", ["input_ids"], ["ids"], name="extra"))
    m.graph.output.append(onnx.helper.make_tensor_value_info("ids", onnx.TensorProto.INT64,
                                                             None))
    onnx.save(m, str(src / "decoder_model_merged_quantized.onnx"))
    out = tmp_path / "small"
    done = prune_family(src, out, HEADS, CHECKS)
    assert "copied as it is" in done.skipped["decoder_model_merged_quantized.onnx"]
    assert done.kept_whole == [] and done.steps and all(
        "quantized" not in pair for pair in done.steps)
    assert _heads(out / "decoder_model_merged.onnx", "present.1.decoder.value") == 2
    assert (out / "decoder_model_merged_quantized.onnx").read_bytes() == \
        (src / "decoder_model_merged_quantized.onnx").read_bytes()
    assert [family.variant(n) for n in ("decoder_model_merged_quantized.onnx",
                                        "encoder_model_fp16.onnx", "decoder_model.onnx",
                                        "decoder_model_merged_q4f16.then_branch.onnx")] == [
        "_quantized", "_fp16", "", "_q4f16"]


def test_a_merged_decoder_that_parts_from_its_branches_is_caught(tmp_path: Path,
                                                                 monkeypatch) -> None:
    src = tmp_path / "web"
    src.mkdir()
    shutil.copy(MERGED, src)

    def doubled(template, pieces):  # one weight the branches share, doubled
        merged = real(template, pieces)
        w = next(t for t in merged.graph.initializer if len(t.dims) == 2)
        w.CopyFrom(numpy_helper.from_array(2 * numpy_helper.to_array(w), w.name))
        return merged

    real = merged.merge
    monkeypatch.setattr(merged, "merge", doubled)
    out = tmp_path / "small"
    with pytest.raises(ValidationError, match="merged back, its branches answer"):
        prune_family(src, out, HEADS, CHECKS)
    assert not out.exists()


def test_a_folder_gets_one_html_page(tmp_path: Path) -> None:
    """``--report-html`` for a folder: what ties the files, then each file's sections (its ids
    made unique per file); a dry run's page holds the plans' predictions."""
    import re

    src = tmp_path / "bart"
    shutil.copytree(BART, src)
    shutil.copy(MERGED, src)
    page, dry = tmp_path / "r.html", tmp_path / "dry.html"
    assert main(["prune", str(src), "-o", str(tmp_path / "small"), "--heads-ratio", "0.5",
                 "--report-html", str(page), "-q"]) == ExitCode.OK
    assert main(["prune", str(src), "--dry-run", "--heads-ratio", "0.5", "--report-html",
                 str(dry), "-q"]) == ExitCode.OK
    for path, measured in ((page, True), (dry, False)):
        text = path.read_text()
        names = re.findall(r'<h2 id="file-\d+">([^<]+)</h2>', text)
        assert names == ["decoder_model.onnx", "decoder_model_merged.else_branch.onnx",
                         "decoder_model_merged.then_branch.onnx",
                         "decoder_with_past_model.onnx"]
        ids = re.findall(r' id="([^"]+)"', text)
        assert len(ids) == len(set(ids)) > 4 * 4
        assert ("step check decoder_model.onnx -&gt; decoder_with_past_model.onnx" in text) \
            is measured
        assert ("its branches pruned as" in text) is measured
        assert "<script" not in text and "http" not in text.replace(
            "http-equiv", "")  # self-contained


def test_a_latency_target_plans_the_folder_as_one(tmp_path: Path, capsys) -> None:
    """``--target latency``: each file is timed and planned, the tied groups follow one plan
    (the group with the most members), the files are not planned again when they miss (a plan
    of one alone would untie them), and the folder still decodes as one model. The with-past
    decoder's self-attention heads are not timed: the copy timed at static sizes freezes
    them."""
    src = _folder(tmp_path)
    out = tmp_path / "small"
    assert main(["prune", str(src), "-o", str(out), "--target", "latency", "--ratio", "0.3",
                 "--input-dim", "batch_size=2", "--json"]) == ExitCode.OK
    done = json.loads(capsys.readouterr().out)
    for f in done["files"].values():
        assert f["params_after"] < 0.8 * f["params_before"]
        assert f["latency_ms_after"] > 0
        # each plan follows the other file's in some groups: its own table's prediction is
        # not what was written, and is not reported
        assert f["latency_target"] == {}
    assert done["groups_following"] >= 1
    assert all(s["relative_diff"] < 1e-5 for s in done["step_checks"].values())
    assert _decode(out) < 1e-5


def test_a_folder_with_a_float16_copy_recovers_its_plain_file(tmp_path: Path,
                                                              capsys) -> None:
    """transformers.js's layout: ``net.onnx`` beside its float16 copy. ``--recover`` distils
    the plain file alone (the copy is not calibrated), and the copy takes the trained values,
    cast: the two stay one model."""
    pytest.importorskip("torch")
    from onnxruntime.transformers.float16 import convert_float_to_float16

    src, calib = _conv_folder(tmp_path)
    onnx.save(convert_float_to_float16(onnx.load(str(src / "net.onnx")), keep_io_types=True),
              str(src / "net_fp16.onnx"))
    flags = ["--ratio", "0.5", "--calib", str(calib), "--round-to", "1", "--json", "-q"]
    start, out = tmp_path / "start", tmp_path / "small"
    assert main(["prune", str(src), "-o", str(start), *flags]) == ExitCode.OK
    capsys.readouterr()
    assert main(["prune", str(src), "-o", str(out), *flags, "--recover", "20"]) == ExitCode.OK
    body = json.loads(capsys.readouterr().out)
    plain = body["files"]["net.onnx"]
    assert plain["recovery"]["steps"] >= 1 and "recovered" in plain["fidelity"]
    assert body["recovery"]["file"] == "net.onnx" and body["recovery"]["values"] == 2
    trained = {k: v for k, v in _weights(out / "net.onnx").items()}
    before = _weights(start / "net.onnx")
    if body["recovery"]["kept"] == "recovered":
        assert any(not np.array_equal(trained[k], before[k]) for k in trained)
        assert "trained by --recover" in plain["oracle"]
    # the copy holds the plain file's written values, cast to float16
    copy = _weights(out / "net_fp16.onnx")
    for k, v in trained.items():
        np.testing.assert_array_equal(copy[k], v.astype(np.float16))


def _weights(path: Path) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer
            if len(i.dims) >= 2}
