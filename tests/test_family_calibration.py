"""A seq2seq folder pruned with calibration data (spa/pipeline/encdec.py).

The random BART of ``tests/models/optimum_bart`` with its encoder
(``tests/models/optimum_bart_encoder``): ``--calib`` gives the encoder's samples; the first-step
decoder is calibrated on samples made from them (the dense encoder's outputs and the tokens the
dense model decodes); the with-past decoder and the merged decoder's branches follow its plan
and take its refitted weights, so that the folder still decodes as one model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from spa.api import PruneOptions, apply_family, prune_family
from spa.cli import main
from spa.errors import ExitCode, OptionError, ValidationError
from spa.pipeline import encdec
from tests.test_family import BART, CHECKS, MERGED, _decode, _decode_merged

ENCODER = Path(__file__).parent / "models" / "optimum_bart_encoder" / "encoder_model.onnx"
FLAGS = ["--heads-ratio", "0.5", "--mlp-ratio", "0.5", "--input-dim", "batch_size=2"]


def _folder(tmp_path: Path, merged: bool = False) -> Path:
    src = tmp_path / "bart"
    shutil.copytree(BART, src)
    shutil.copy(ENCODER, src)
    if merged:
        shutil.copy(MERGED, src)
    return src


def _samples(path: Path, count: int = 48, seed: int = 0) -> Path:
    """Encoder samples: token ids over the vocabulary, masked after a random length."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, 100, (count, 12))
    mask = np.ones_like(ids)
    for i, n in enumerate(rng.integers(5, 13, count)):
        ids[i, n:], mask[i, n:] = 1, 0
    np.savez(path, input_ids=ids, attention_mask=mask)
    return path


def _digest(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


def _weights(path: Path) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def test_the_decoder_is_calibrated_on_what_the_encoder_and_the_dense_model_make(
        tmp_path: Path, capsys) -> None:
    src = _folder(tmp_path, merged=True)
    calib = _samples(tmp_path / "enc.npz")
    before = _digest(src)
    out = tmp_path / "small"
    assert main(["prune", str(src), "-o", str(out), *FLAGS, "--calib", str(calib),
                 "--json"]) == ExitCode.OK
    done = json.loads(capsys.readouterr().out)
    assert _digest(src) == before
    assert done["decoder_samples"] == {"decoder_model.onnx": {
        "from": "encoder_model.onnx", "encoder_output": "last_hidden_state", "tokens": 32,
        "decoder_start_token_id": 2}}
    files = done["files"]
    # the made samples were not kept (no --plan): the report names no path that is gone
    assert files["decoder_model.onnx"]["calibration"]["path"] is None
    assert files["encoder_model.onnx"]["calibration"]["path"] == str(calib)
    for name in ("encoder_model.onnx", "decoder_model.onnx"):
        fid = files[name]["fidelity"]
        assert files[name]["calibration"]["samples"] + files[name]["calibration"]["held_out"] \
            == 48
        # reconstruction lowers the held-out error of both files' outputs
        assert fid["reconstructed"]["relative_error"] < 0.5 * fid["pruned"]["relative_error"]
    # the two pruned files together: the pruned encoder's outputs into the pruned decoder
    joint = done["held_out_together"]["encoder_model.onnx -> decoder_model.onnx"]
    alone = files["decoder_model.onnx"]["fidelity"]["reconstructed"]
    assert joint["samples"] == alone["samples"] == 5
    assert alone["relative_error"] < joint["relative_error"] < 0.05  # the encoder's error too
    assert joint["agreement"] > 0.95
    followers = ("decoder_with_past_model.onnx", "decoder_model_merged.then_branch.onnx",
                 "decoder_model_merged.else_branch.onnx")
    assert sorted(done["refits_taken"]) == sorted(followers)
    for name in followers:
        assert done["refits_taken"][name]["from"] == "decoder_model.onnx"
        assert done["refits_taken"][name]["values"] > 10
        assert files[name]["fidelity"] == {}  # no data of their own
        assert files[name]["oracle"].startswith("does not apply: it took")
    # one model still: the with-past decoder continues the first-step decoder, down the merged
    # file's branches too, on the refitted weights
    assert _decode(out) < 1e-5
    assert _decode_merged(out) < 1e-5
    assert all(step["relative_diff"] < 1e-5 for step in done["step_checks"].values())
    # ... which the with-past decoder did take: it differs from the same cut without data
    bare = tmp_path / "bare"
    assert main(["prune", str(src), "-o", str(bare), *FLAGS, "-q"]) == ExitCode.OK
    capsys.readouterr()
    mine, theirs = (_weights(f / "decoder_with_past_model.onnx") for f in (out, bare))
    assert any(v.shape == theirs[k].shape and not np.array_equal(v, theirs[k])
               for k, v in mine.items() if k in theirs)


def test_a_text_file_calibrates_the_folder_with_the_tokenizer_beside_it(tmp_path: Path,
                                                                       capsys) -> None:
    """The encoder's samples from lines of text, read with the folder's own tokenizer, which
    the saved plan names where it is."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    src = _folder(tmp_path)
    words = ["<s>", "<pad>", "</s>", "<unk>", *(f"w{i}" for i in range(4, 100))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(src / "tokenizer.json"))
    rng = np.random.default_rng(0)
    text = tmp_path / "lines.txt"
    text.write_text("".join(" ".join(f"w{i}" for i in rng.integers(4, 100, rng.integers(3, 10)))
                            + "\n" for _ in range(40)))
    out, plan = tmp_path / "small", tmp_path / "plan.json"
    assert main(["prune", str(src), "-o", str(out), *FLAGS, "--calib", str(text),
                 "--max-length", "12", "--plan", str(plan), "--json"]) == ExitCode.OK
    done = json.loads(capsys.readouterr().out)
    cal = done["files"]["encoder_model.onnx"]["calibration"]
    assert (cal["kind"], cal["samples"] + cal["held_out"]) == ("text", 40)
    assert cal["tokenizer"] == str(src)
    assert done["files"]["decoder_model.onnx"]["calibration"]["samples"] == cal["samples"]
    assert "tokenizer.json" in {p.name for p in out.iterdir()}  # copied with the folder
    assert _decode(out) < 1e-5
    # the plan names the input folder's tokenizer (not a temporary one): apply reads it again
    apply_family(src, plan, tmp_path / "again", CHECKS)
    assert _digest(tmp_path / "again") == _digest(out)


REVERSE = Path(__file__).parent / "models" / "reverse_bart"


def test_a_trained_model_keeps_doing_its_job_only_with_calibration(tmp_path: Path) -> None:
    """The BART trained to reverse sequences of symbols (tests/models/README.md), pruned at
    heads and MLP 0.5: without data it reverses almost none of 128 held-out sequences; with
    --calib of 96 other sequences (the first-step decoder's samples made by the dense
    model), nearly all, as the dense folder does."""
    from benchmarks.optimum_side import reverse_batch
    from benchmarks.seq2seq_calibration import reversing

    ids, mask, _ = reverse_batch(np.random.default_rng(1), 96)
    calib = tmp_path / "calib.npz"
    np.savez(calib, input_ids=ids, attention_mask=mask)
    held = reverse_batch(np.random.default_rng(2), 128)
    assert reversing(REVERSE, REVERSE, *held) == 1.0
    cut = PruneOptions(heads_ratio=0.5, mlp_ratio=0.5)
    bare, fitted = tmp_path / "bare", tmp_path / "fitted"
    prune_family(REVERSE, bare, cut, CHECKS)
    done = prune_family(REVERSE, fitted, dataclasses.replace(cut, calib=str(calib)), CHECKS)
    assert reversing(REVERSE, bare, *held) < 0.2
    assert reversing(REVERSE, fitted, *held) > 0.95
    joint = done.together["encoder_model.onnx -> decoder_model.onnx"]
    assert joint["agreement"] > 0.95  # on the dense decode, up to its EOS


def test_decoder_samples_are_the_dense_models_greedy_decode(tmp_path: Path) -> None:
    src = _folder(tmp_path)
    arrays = dict(np.load(_samples(tmp_path / "enc.npz", count=6)))
    headers = {n: onnx.load(str(src / n)) for n in ("encoder_model.onnx", "decoder_model.onnx")}
    feeds = encdec.feeds_for(headers, "decoder_model.onnx", ["encoder_model.onnx"])
    assert feeds == encdec.Feeds("encoder_model.onnx", "last_hidden_state",
                                 "encoder_hidden_states", "input_ids", "attention_mask",
                                 "encoder_attention_mask")
    made = encdec.decoder_samples(src / "encoder_model.onnx", src / "decoder_model.onnx", feeds,
                                  arrays, 2, 2, 1, tokens=8)
    enc = ort.InferenceSession(str(src / "encoder_model.onnx"))
    hidden = enc.run(None, arrays)[0]
    np.testing.assert_array_equal(made["encoder_hidden_states"], hidden)
    np.testing.assert_array_equal(made["encoder_attention_mask"], arrays["attention_mask"])
    ids = made["input_ids"]
    assert ids.shape == (6, 8) and (ids[:, 0] == 2).all()
    dec = ort.InferenceSession(str(src / "decoder_model.onnx"))
    logits = dec.run(["logits"], {"input_ids": ids, "encoder_hidden_states": hidden,
                                  "encoder_attention_mask": arrays["attention_mask"]})[0]
    for row, scores in zip(ids, logits):
        ended = False
        for t in range(1, 8):  # each token the argmax after its prefix, pad after EOS
            assert row[t] == (1 if ended else scores[t - 1].argmax())
            ended = ended or row[t] == 2
    # decoded on the caches by the with-past decoder, one token a run: the same samples
    cached = encdec.decoder_samples(src / "encoder_model.onnx", src / "decoder_model.onnx",
                                    feeds, arrays, 2, 2, 1, tokens=8,
                                    step=src / "decoder_with_past_model.onnx")
    assert sorted(cached) == sorted(made)
    for k, v in made.items():
        np.testing.assert_array_equal(cached[k], v)
    from spa.pipeline.ties import pairs

    headers = {p.name: onnx.load(str(p), load_external_data=False) for p in src.glob("*.onnx")}
    assert ("decoder_model.onnx", "decoder_with_past_model.onnx") in pairs(headers)


def test_a_saved_plan_names_the_made_samples_and_applies_to_the_same_bytes(
        tmp_path: Path, capsys) -> None:
    src = _folder(tmp_path)
    calib = _samples(tmp_path / "enc.npz")
    plan = tmp_path / "plans" / "p.json"
    plan.parent.mkdir()
    out = tmp_path / "small"
    report = tmp_path / "r.json"
    assert main(["prune", str(src), "-o", str(out), *FLAGS, "--calib", str(calib), "--plan",
                 str(plan), "--report", str(report), "-q"]) == ExitCode.OK
    made = plan.parent / "p.json.decoder_model.calib.npz"
    assert json.loads(report.read_text())["files"]["decoder_model.onnx"]["calibration"][
        "path"] == str(made)
    assert sorted(p.name for p in plan.parent.iterdir()) == ["p.json", made.name]
    recipe = json.loads(plan.read_text())["files"]["decoder_model.onnx"]["recipe"]
    assert recipe["calibration"]["path"] == str(made)
    again = tmp_path / "again"
    apply_family(src, plan, again, CHECKS)
    capsys.readouterr()
    assert _digest(again) == _digest(out)


def test_what_a_seq2seq_folder_with_data_refuses(tmp_path: Path, capsys) -> None:
    src = _folder(tmp_path)
    calib = _samples(tmp_path / "enc.npz")
    out = tmp_path / "small"
    # no decoder_start_token_id: the decoder's samples cannot be decoded
    config = json.loads((src / "config.json").read_text())
    del config["decoder_start_token_id"]
    (src / "config.json").write_text(json.dumps(config))
    assert main(["prune", str(src), "-o", str(out), *FLAGS, "--calib", str(calib)]) \
        == ExitCode.BAD_INPUT
    assert "states no decoder_start_token_id" in capsys.readouterr().err
    shutil.copy(BART / "config.json", src)
    # samples that are not the encoder's: it is named
    np.savez(tmp_path / "wrong.npz", input_ids=np.zeros((8, 4), np.int64))
    assert main(["prune", str(src), "-o", str(out), *FLAGS, "--calib",
                 str(tmp_path / "wrong.npz")]) == ExitCode.BAD_INPUT
    assert "encoder_model.onnx: calibration data lacks arrays for graph inputs " \
        "['attention_mask']" in capsys.readouterr().err
    assert not out.exists()


def test_a_follower_that_keeps_its_own_weights_is_caught(tmp_path: Path,
                                                        monkeypatch) -> None:
    """Without the refitted values taken, the two decoders' shared weights differ: the folder
    is refused, and nothing is written."""
    monkeypatch.setattr(encdec, "take_refits", lambda *args: {})
    src = _folder(tmp_path)
    calib = _samples(tmp_path / "enc.npz")
    out = tmp_path / "small"
    with pytest.raises(ValidationError, match="were the same before pruning and differ after"):
        prune_family(src, out, PruneOptions(heads_ratio=0.5, mlp_ratio=0.5, calib=str(calib)),
                     CHECKS)
    assert not out.exists()


def test_a_precision_variant_takes_the_refits_of_weights_it_holds_byte_for_byte(
        tmp_path: Path) -> None:
    """Only the plain files' first-step decoder is calibrated; a variant's decoders follow and
    take its refitted values where they held the same weights (here: copies of the plain
    files under transformers.js's ``_quantized`` names), so the tied weights stay equal."""
    src = _folder(tmp_path)
    for name in ("encoder_model", "decoder_model", "decoder_with_past_model"):
        shutil.copy(src / f"{name}.onnx", src / f"{name}_quantized.onnx")
    calib = _samples(tmp_path / "enc.npz")
    done = prune_family(src, tmp_path / "small", PruneOptions(
        heads_ratio=0.5, mlp_ratio=0.5, calib=str(calib)), CHECKS)
    assert sorted(done.decoder_samples) == ["decoder_model.onnx"]
    assert sorted(done.refits_taken) == ["decoder_model_quantized.onnx",
                                         "decoder_with_past_model.onnx",
                                         "decoder_with_past_model_quantized.onnx"]
    assert all(s["relative_diff"] < 1e-5 for s in done.steps.values()) and len(done.steps) == 2


def test_a_decoder_without_an_encoder_beside_it_is_refused(tmp_path: Path) -> None:
    with pytest.raises(OptionError, match="reads 'encoder_hidden_states' from an encoder"):
        encdec.feeds_for({n: onnx.load(str(BART / n), load_external_data=False)
                          for n in ("decoder_model.onnx",)}, "decoder_model.onnx", [])


def test_decoder_tokens_sets_the_length_of_the_made_samples(tmp_path: Path, capsys) -> None:
    src = _folder(tmp_path)
    plan = tmp_path / "p.json"
    assert main(["prune", str(src), "--dry-run", *FLAGS, "--calib",
                 str(_samples(tmp_path / "enc.npz")), "--decoder-tokens", "12", "--plan",
                 str(plan), "-q"]) == ExitCode.OK
    made = np.load(tmp_path / "p.json.decoder_model.calib.npz")
    assert made["input_ids"].shape == (48, 12)
    with pytest.raises(SystemExit) as exc:
        main(["prune", str(src), "--dry-run", *FLAGS, "--calib", str(tmp_path / "enc.npz"),
              "--decoder-tokens", "0"])
    assert exc.value.code == ExitCode.BAD_INPUT
    assert "--decoder-tokens: must be at least 1, got 0" in capsys.readouterr().err
