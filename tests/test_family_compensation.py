"""OBSPA's compensation of a seq2seq folder (spa/pipeline/family_values.py ``refits_taken``).

Each file that passes caches is planned and compensated from its own statistics; the files
that follow (the with-past decoder, the merged decoder's branches) then take the compensated
values of the plain files' first-step decoder, by role, so that the weights they share stay
byte-identical and the folder decodes as one model.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from spa.api import PruneOptions, prune_family
from spa.cli import main
from spa.errors import ExitCode
from tests.test_family import CHECKS, _decode, _decode_merged
from tests.test_family_calibration import FLAGS, REVERSE, _digest, _folder, _weights

OBSPA = ["--criterion", "obspa"]


def test_the_followers_take_the_compensated_weights(tmp_path: Path, capsys) -> None:
    """Encoder, first-step, with-past and merged decoders: the with-past decoder and the
    merged decoder's with-past branch take the first-step decoder's compensated values (the
    no-past branch is the same graph and computes the same ones), and decode on the caches
    as the first-step decoder does over the whole prefix."""
    src = _folder(tmp_path, merged=True)
    before = _digest(src)
    out = tmp_path / "small"
    assert main(["prune", str(src), "-o", str(out), *FLAGS, *OBSPA, "--json"]) == ExitCode.OK
    done = json.loads(capsys.readouterr().out)
    assert _digest(src) == before
    taken = done["refits_taken"]
    assert sorted(taken) == ["decoder_model_merged.then_branch.onnx",
                             "decoder_with_past_model.onnx"]
    for took in taken.values():
        assert took["from"] == "decoder_model.onnx" and took["how"] == "compensated"
        assert took["values"] >= 4  # out_proj and fc2 of each of the two layers, at least
    files = done["files"]
    assert files["decoder_with_past_model.onnx"]["oracle"].startswith(
        "does not apply: it took")
    assert files["decoder_model.onnx"]["params_after"] < files["decoder_model.onnx"][
        "params_before"]
    for step in done["step_checks"].values():
        assert step["relative_diff"] < 1e-5
    assert _decode(out) < 1e-5
    assert _decode_merged(out) < 1e-5
    # the first-step decoder's weights differ from the same plan's without the update, and
    # the with-past decoder holds them byte for byte
    plain = tmp_path / "plain"
    assert main(["prune", str(src), "-o", str(plain), *FLAGS, *OBSPA, "--no-compensate",
                 "-q"]) == ExitCode.OK
    first, bare = (_weights(d / "decoder_model.onnx") for d in (out, plain))
    later = list(_weights(out / "decoder_with_past_model.onnx").values())
    changed = [w for n, w in first.items() if w.ndim == 2 and n in bare
               and bare[n].shape == w.shape and not np.array_equal(bare[n], w)]
    assert len(changed) >= 4
    for w in changed:
        assert any(v.shape == w.shape and np.array_equal(v, w) for v in later)


def test_without_the_compensation_taken_the_folder_would_be_refused(
        tmp_path: Path, monkeypatch, capsys) -> None:
    """Each file compensates from its own statistics: the shared weights differ until the
    followers take the source's values, and the folder's check refuses such files."""
    from spa.pipeline import encdec

    monkeypatch.setattr(encdec, "take_refits", lambda *a, **k: {})
    src = _folder(tmp_path)
    out = tmp_path / "small"
    assert main(["prune", str(src), "-o", str(out), *FLAGS, *OBSPA]) == ExitCode.VALIDATION_FAILED
    assert "were the same before pruning and differ after" in capsys.readouterr().err
    assert not out.exists()


def test_a_saved_plan_compensates_the_folder_again_to_the_same_bytes(
        tmp_path: Path, capsys) -> None:
    src = _folder(tmp_path)
    plan = tmp_path / "p.json"
    out, again = tmp_path / "small", tmp_path / "again"
    assert main(["prune", str(src), "-o", str(out), *FLAGS, *OBSPA, "--plan", str(plan),
                 "-q"]) == ExitCode.OK
    assert main(["apply", str(src), str(plan), "-o", str(again), "--input-dim",
                 "batch_size=2", "-q"]) == ExitCode.OK
    assert _digest(out) == _digest(again)


def test_compensation_keeps_a_trained_folder_working_without_data(tmp_path: Path) -> None:
    """The BART trained to reverse sequences (tests/models/README.md) at heads and MLP 0.5,
    with no data: by weight magnitude it reverses almost none of 128 held-out sequences;
    OBSPA's compensation, taken by every decoder, keeps most (0.69 of 512 in
    benchmarks/seq2seq_calibration.py)."""
    from benchmarks.optimum_side import reverse_batch
    from benchmarks.seq2seq_calibration import reversing

    held = reverse_batch(np.random.default_rng(2), 128)
    cut = PruneOptions(heads_ratio=0.5, mlp_ratio=0.5)
    l1, obspa = tmp_path / "l1", tmp_path / "obspa"
    prune_family(REVERSE, l1, cut, CHECKS)
    done = prune_family(REVERSE, obspa, dataclasses.replace(cut, criterion="obspa"), CHECKS)
    assert sorted(done.refits_taken) == ["decoder_with_past_model.onnx"]
    assert reversing(REVERSE, l1, *held) < 0.2
    assert reversing(REVERSE, obspa, *held) > 0.5


@pytest.mark.parametrize("criterion, how", [("flap", "compensated and refitted"),
                                            ("wanda", "refitted")])
def test_a_criterion_that_needs_data_plans_the_followers_by_weights(
        tmp_path: Path, capsys, caplog, criterion: str, how: str) -> None:
    """The files that read caches back get no data: a criterion that scores from data only
    stands in as l2 there (their shared groups follow the calibrated decoder's choice); FLAP's
    bias shifts are taken with the refits."""
    from tests.test_family_calibration import _samples

    src = _folder(tmp_path)
    out = tmp_path / "small"
    plan = tmp_path / "p.json"
    assert main(["prune", str(src), "-o", str(out), *FLAGS, "--criterion", criterion,
                 "--calib", str(_samples(tmp_path / "enc.npz")), "--plan", str(plan),
                 "--json"]) == ExitCode.OK
    text = capsys.readouterr()
    assert f"criterion {criterion} scores from data" in caplog.text
    assert "planned by l2" in caplog.text
    assert "which decoder_with_past_model.onnx do not get" in caplog.text
    done = json.loads(text.out)
    assert done["refits_taken"]["decoder_with_past_model.onnx"]["how"] == how
    recipes = {n: f["recipe"] for n, f in json.loads(plan.read_text())["files"].items()}
    assert recipes["decoder_model.onnx"]["criterion"] == criterion
    assert recipes["decoder_with_past_model.onnx"]["criterion"] == "l2"
    assert _decode(out) < 1e-5
