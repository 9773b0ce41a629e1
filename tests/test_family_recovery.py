"""``spa prune folder/ --calib C --recover N`` on a seq2seq folder (spa/pipeline/joined.py).

The pruned encoder and first-step decoder are joined into one graph and distilled from the
dense pair; the trained values are written back into the two files, and the files that read
the decoder's caches back take the decoder's by role, so that the folder's checks (shared
weights byte for byte, step checks, a merged decoder equal to its branches) hold for the
values written.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from spa.api import PruneOptions, prune_family
from spa.cli import main
from spa.errors import ExitCode
from spa.pipeline import encdec, joined
from tests.test_family import CHECKS, _decode, _decode_merged
from tests.test_family_calibration import FLAGS, REVERSE, _digest, _folder, _samples, _weights

pytest.importorskip("torch")


def test_a_trained_model_recovers_what_the_cut_took(tmp_path: Path, capsys) -> None:
    """The BART trained to reverse sequences, cut by magnitude at heads and MLP 0.5 (uniform,
    no refit): it reverses none of 128 held-out sequences; distilled for 100 steps on 96
    others, encoder and decoder together, nearly all, and the with-past decoder decodes
    with the trained values."""
    from benchmarks.optimum_side import reverse_batch
    from benchmarks.seq2seq_calibration import reversing

    ids, mask, _ = reverse_batch(np.random.default_rng(1), 96)
    calib = tmp_path / "calib.npz"
    np.savez(calib, input_ids=ids, attention_mask=mask)
    held = reverse_batch(np.random.default_rng(2), 128)
    before = _digest(REVERSE)
    cut = ["--heads-ratio", "0.5", "--mlp-ratio", "0.5", "--calib", str(calib),
           "--no-reconstruct", "--allocation", "uniform"]
    start, out = tmp_path / "start", tmp_path / "recovered"
    assert main(["prune", str(REVERSE), "-o", str(start), *cut, "--json"]) == ExitCode.OK
    pair = "encoder_model.onnx -> decoder_model.onnx"
    start_joint = json.loads(capsys.readouterr().out)["held_out_together"][pair]
    assert main(["prune", str(REVERSE), "-o", str(out), *cut, "--recover", "100",
                 "--json"]) == ExitCode.OK
    done = json.loads(capsys.readouterr().out)
    assert _digest(REVERSE) == before
    assert reversing(REVERSE, start, *held) < 0.05
    assert reversing(REVERSE, out, *held) > 0.9
    rec = done["recovery"]
    assert rec["kept"] == "recovered" and rec["steps"] == 100
    assert rec["fidelity_after"]["agreement"] > rec["fidelity_before"]["agreement"] + 0.1
    assert rec["encoder"] == "encoder_model.onnx" and rec["decoder"] == "decoder_model.onnx"
    assert rec["trained"]["encoder_model.onnx"] > 0 and rec["trained"]["decoder_model.onnx"] > 0
    # the with-past decoder holds every trained weight but the cross-attention's key and
    # value projections (4 weights and 4 biases: it reads those as caches)
    assert rec["taken"] == {"decoder_with_past_model.onnx":
                            rec["trained"]["decoder_model.onnx"] - 8}
    # the recovery's fidelity counts the logits up to the one that chose EOS; the files
    # written, run together, agree better at every position of the dense decode too
    assert rec["fidelity_after"]["agreement"] > 0.95
    joint = done["held_out_together"][pair]
    assert joint["agreement"] > start_joint["agreement"] + 0.05
    for step in done["step_checks"].values():
        assert step["relative_diff"] < 1e-5
    assert done["files"]["decoder_with_past_model.onnx"]["oracle"].startswith(
        "does not apply: it took")
    assert "trained with" in done["files"]["encoder_model.onnx"]["oracle"]


def _nudged(dense, pruned, calibration, work):
    """A stand-in for the distillation: every trainable value of the joined graph scaled."""
    trained = onnx.ModelProto()
    trained.CopyFrom(pruned)
    for init in trained.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(1.01),
                                              init.name))
    return trained, {"kept": "recovered", "steps": 0, "lr": 0.0, "seconds": 0.0,
                     "measure": "relative_error",
                     "fidelity_before": {"relative_error": 0.5, "samples": 1},
                     "fidelity_after": {"relative_error": 0.4, "samples": 1}}


def test_the_merged_decoder_takes_the_trained_values(tmp_path: Path, capsys) -> None:
    """Encoder, decoders and merged decoder: what trains is the encoder (less the weights
    other files hold too) and the decoder's layers; the with-past decoder and the merged
    decoder's branches take the decoder's values, and the folder decodes as one model."""
    src = _folder(tmp_path, merged=True)
    calib = _samples(tmp_path / "enc.npz")
    options = PruneOptions(heads_ratio=0.5, mlp_ratio=0.5, calib=str(calib))
    out = tmp_path / "small"
    done = prune_family(src, out, options, CHECKS, distil=_nudged)
    rec = done.recovery
    assert set(rec["taken"]) == {"decoder_with_past_model.onnx",
                                 "decoder_model_merged.then_branch.onnx",
                                 "decoder_model_merged.else_branch.onnx"}
    assert all(v > 0 for v in rec["taken"].values())
    assert _decode(out) < 1e-5
    assert _decode_merged(out) < 1e-5
    # the shared embedding did not train: every file still holds it byte for byte
    plain = tmp_path / "plain"
    prune_family(src, plain, options, CHECKS)
    enc, enc_plain = (_weights(d / "encoder_model.onnx") for d in (out, plain))
    shared = [n for n, w in enc.items() if w.ndim == 2 and any(
        v.shape == w.shape and np.array_equal(v, w)
        for v in _weights(out / "decoder_model.onnx").values())]
    assert shared and all(np.array_equal(enc[n], enc_plain[n]) for n in shared)
    assert sum(not np.array_equal(enc[n], enc_plain[n]) for n in enc) \
        == rec["trained"]["encoder_model.onnx"] > 0


def test_the_joined_graph_answers_as_the_two_files(tmp_path: Path) -> None:
    """The encoder's output into the decoder, in one graph, with the decoder's logits: the
    same as the two files run one after the other."""
    import onnxruntime as ort

    src = _folder(tmp_path)
    headers = {n: onnx.load(str(src / n)) for n in ("encoder_model.onnx", "decoder_model.onnx")}
    feeds = encdec.feeds_for(headers, "decoder_model.onnx", ["encoder_model.onnx"])
    assert feeds is not None
    graph = joined.joined(headers["encoder_model.onnx"], headers["decoder_model.onnx"], feeds,
                          5, train=set())
    assert not graph.graph.initializer  # nothing trains: every value is a Constant node
    rng = np.random.default_rng(0)
    ids = rng.integers(4, 100, (2, 7))
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    dec_ids = rng.integers(4, 100, (2, 5))
    enc = ort.InferenceSession(str(src / "encoder_model.onnx"))
    dec = ort.InferenceSession(str(src / "decoder_model.onnx"))
    hidden = enc.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    want = dec.run(["logits"], {feeds.hidden_in: hidden, "encoder_attention_mask": mask,
                                "input_ids": dec_ids})[0]
    got = ort.InferenceSession(graph.SerializeToString()).run(None, {
        "input_ids": ids, joined.MASK: mask, joined.DECODER_IDS: dec_ids,
        joined.DECODER_MASK: np.ones_like(dec_ids)})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_the_logits_that_count_end_with_the_one_that_chose_eos() -> None:
    ids = np.array([[0, 5, 6, 2, 1, 1],    # EOS (2) chosen at position 2
                    [0, 5, 6, 7, 8, 9],    # no EOS: every logit chose a token
                    [0, 2, 1, 1, 1, 1],    # EOS at once
                    [0, 5, 9, 6, 9, 1]])   # the first of two EOS ids (9)
    want = [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]]
    np.testing.assert_array_equal(encdec.decoded_mask(ids[:3], {2}), want[:3])
    np.testing.assert_array_equal(encdec.decoded_mask(ids[3:], {2, 9}), want[3:])


def test_what_recovering_a_folder_needs(tmp_path: Path, capsys) -> None:
    src = _folder(tmp_path)
    out = tmp_path / "small"
    assert main(["prune", str(src), "-o", str(out), *FLAGS, "--recover", "5"]) \
        == ExitCode.BAD_INPUT
    assert "give --calib" in capsys.readouterr().err
    assert not out.exists()
    # spa recover takes files: a folder is sent to spa prune --recover
    calib = _samples(tmp_path / "enc.npz")
    assert main(["recover", str(src), str(src), "-o", str(out), "--calib", str(calib)]) \
        == ExitCode.BAD_INPUT
    assert "spa prune FOLDER -o OUT --calib PATH --recover STEPS" in capsys.readouterr().err
    assert not out.exists()


def test_the_joined_samples_leave_the_encoders_padding_out() -> None:
    """Every sample's padding after the last column any of them attends to is cut from the
    encoder's token inputs (distillation cuts none of the joined graph's); the decoder's
    tokens and their mask are as made."""
    from spa.calibration import Calibration

    def enc(lengths: list[int]) -> dict[str, np.ndarray]:
        mask = (np.arange(12)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
        return {"input_ids": np.where(mask == 1, 7, 1), "attention_mask": mask}

    def dec(n: int) -> dict[str, np.ndarray]:
        return {"input_ids": np.tile([2, 5, 2, 1], (n, 1))}

    feeds = encdec.Feeds("encoder_model.onnx", "last_hidden_state", "encoder_hidden_states",
                         "input_ids", "attention_mask", "encoder_attention_mask")
    encoder = Calibration(enc([3, 9, 4]), enc([5]), "npz", "x.npz")
    decoder = Calibration(dec(3), dec(1), "npz", "y.npz")
    cut = joined.calibration(encoder, decoder, feeds, {2})
    assert cut.train["input_ids"].shape == (3, 9) and cut.held_out[joined.MASK].shape == (1, 9)
    np.testing.assert_array_equal(cut.train[joined.MASK], encoder.train["attention_mask"][:, :9])
    np.testing.assert_array_equal(cut.train[joined.DECODER_MASK], [[1, 1, 0, 0]] * 3)
    whole = joined.calibration(encoder, decoder, feeds, {2}, cut=False)
    assert whole.train["input_ids"].shape == (3, 12)
