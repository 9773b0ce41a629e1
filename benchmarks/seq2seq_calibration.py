"""Seq2seq folders pruned with calibration data against without (spa/pipeline/encdec.py).

The 🤗 Optimum exports of :mod:`benchmarks.optimum_exports` (random weights, seeded; hidden
64, 4 heads, 2 layers; made in Optimum's venv on the first run), each folder pruned with
``--heads-ratio 0.5 --mlp-ratio 0.5 --input-dim batch_size=2``:

* ``data-free``: no data (magnitude criterion, one ratio per group);
* ``calibrated``: ``--calib`` of the encoder's samples (the decoder's are made from them:
  the dense encoder's outputs and 32 greedily decoded tokens), sensitivity allocation and
  reconstruction, the with-past decoders taking the first-step decoder's refitted weights;
* ``calibrated, no reconstruction``: the same with ``--no-reconstruct``;
* ``data-free, obspa``: no data, ``--criterion obspa`` (synthetic Hessian, the kept weights
  compensated; the with-past decoders take the first-step decoder's compensated weights);
* ``calibrated, obspa``: ``--calib`` and ``--criterion obspa`` (the Hessian from the
  calibration samples, then reconstruction).

Samples are seeded random token ids over each model's vocabulary (lengths 6–16, masked after),
or standard normal log-mel features for Whisper: random models answer nothing a corpus could
tell. Measured on ``HELD_OUT`` other samples of the same kind, never used to calibrate: the
dense folder decodes 16 tokens greedily, on past EOS (random models often end at once); each
pruned folder is then fed the dense tokens (teacher forcing: next-token agreement with the
dense model and the KL divergence of its distribution, at every position) and decodes on its
own (the share of positions whose token matches the dense decode, and of whole sequences).
Finally each calibrated folder, and each compensated without data, generates 8 tokens under
Optimum's ORTModel class in its venv, as :mod:`benchmarks.optimum_exports` runs them.

    python -m benchmarks.seq2seq_calibration [--only bart,t5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx

from benchmarks.common import write_result
from benchmarks.optimum_exports import FLAGS, ROOT, WORK, exported, side, venv
from benchmarks.optimum_side import REVERSE, reverse_batch
from spa import validate as val
from spa.pipeline import PruneOptions, encdec

NAMES = ("bart", "marian", "pegasus", "t5", "mt5", "whisper")
CALIB, HELD_OUT, TOKENS = 256, 64, 16
ENCODER, DECODER = "encoder_model.onnx", "decoder_model.onnx"
VARIANTS = {"data-free": [], "calibrated": ["--calib"],
            "calibrated, no reconstruction": ["--calib", "--no-reconstruct"],
            "data-free, obspa": ["--criterion", "obspa"],
            "calibrated, obspa": ["--calib", "--criterion", "obspa"]}
GENERATED = ("calibrated", "data-free, obspa")  # the variants run under Optimum too


def samples(folder: Path, count: int, seed: int) -> dict[str, np.ndarray]:
    """``count`` encoder samples: token ids and mask, or log-mel features (see the module)."""
    rng = np.random.default_rng(seed)
    inputs = {i.name: i for i in onnx.load(str(folder / ENCODER),
                                           load_external_data=False).graph.input}
    if "input_features" in inputs:
        dims = [d.dim_value for d in inputs["input_features"].type.tensor_type.shape.dim[1:]]
        return {"input_features": rng.standard_normal((count, *dims)).astype(np.float32)}
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    ids = rng.integers(4, vocab, (count, 16))
    mask = np.ones_like(ids)
    for i, n in enumerate(rng.integers(6, 17, count)):
        ids[i, n:], mask[i, n:] = 1, 0
    return {"input_ids": ids, "attention_mask": mask}


def _start(folder: Path) -> int:
    return encdec.read_token_config(folder)["decoder_start_token_id"]


def _logits(folder: Path, feeds: encdec.Feeds, held: dict, ids: np.ndarray) -> np.ndarray:
    """The decoder's logits of ``folder`` fed the token ids ``ids`` (teacher forcing)."""
    enc = val.session(str(folder / ENCODER), what=ENCODER)
    dec = val.session(str(folder / DECODER), what=DECODER)
    hidden = val.run(enc, {k: held[k] for k in (i.name for i in enc.get_inputs())})
    fed = {feeds.hidden_in: hidden[feeds.hidden], feeds.ids: ids}
    if feeds.mask is not None and feeds.mask_in is not None:
        fed[feeds.mask_in] = held[feeds.mask]
    return val.run(dec, fed)["logits"]


def measure(dense: Path, pruned: Path, held: dict) -> dict:
    headers = {n: onnx.load(str(dense / n), load_external_data=False) for n in (ENCODER, DECODER)}
    feeds = encdec.feeds_for(headers, DECODER, [ENCODER])
    assert feeds is not None
    start = _start(dense)  # decoded past EOS: random models often end at once
    ref = encdec.decoder_samples(dense / ENCODER, dense / DECODER, feeds, held, start, None,
                                 None, TOKENS)[feeds.ids]
    mine = encdec.decoder_samples(pruned / ENCODER, pruned / DECODER, feeds, held, start, None,
                                  None, TOKENS)[feeds.ids]
    a, b = (_logits(f, feeds, held, ref[:, :-1]).astype(np.float64) for f in (dense, pruned))
    live = np.ones(ref[:, 1:].shape, bool)
    pa, pb = (np.exp(x - x.max(-1, keepdims=True)) for x in (a, b))
    pa, pb = pa / pa.sum(-1, keepdims=True), pb / pb.sum(-1, keepdims=True)
    kl = (pa * (np.log(pa + 1e-30) - np.log(pb + 1e-30))).sum(-1)
    return {"teacher_forced_agreement": float((a.argmax(-1) == b.argmax(-1))[live].mean()),
            "teacher_forced_kl": float(kl[live].mean()),
            "decoded_token_agreement": float((mine[:, 1:] == ref[:, 1:])[live].mean()),
            "decoded_sequences_equal": float(np.mean([np.array_equal(x[m], y[m]) for x, y, m
                                                      in zip(mine[:, 1:], ref[:, 1:], live)])),
            "positions": int(live.sum())}


def prune(name: str, dense: Path, label: str, flags: list[str], calib: Path,
          cut: list[str] = FLAGS) -> dict:
    out = WORK / "calibrated" / f"{name}-{label.replace(', ', '-').replace(' ', '-')}"
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    args = [x for f in flags for x in ([f, str(calib)] if f == "--calib" else [f])]
    cmd = [sys.executable, "-m", "spa", "prune", str(dense), "-o", str(out), *cut, *args,
           "--json", "-q"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    entry: dict = {"command": " ".join(cmd[1:]), "exit": done.returncode}
    if done.returncode:
        entry["error"] = done.stderr.strip().splitlines()[-1:]
        return entry
    report = json.loads(done.stdout)
    entry["output"] = out
    entry["params"] = {n: [r["params_before"], r["params_after"]]
                       for n, r in report["files"].items()}
    entry["fidelity"] = {n: r["fidelity"] for n, r in report["files"].items() if r["fidelity"]}
    entry["refits_taken"] = report["refits_taken"]
    if report.get("recovery"):  # --recover (benchmarks/seq2seq_recovery.py)
        entry["recovery"] = {k: report["recovery"][k] for k in (
            "fidelity_before", "fidelity_after", "kept", "steps", "lr", "seconds", "values",
            "trained", "taken")}
    entry["step_checks"] = {k: v if isinstance(v, str) else v["relative_diff"]
                            for k, v in report["step_checks"].items()}
    return entry


def reversing(dense: Path, folder: Path, ids: np.ndarray, mask: np.ndarray,
              labels: np.ndarray) -> float:
    """The share of sequences ``folder`` reverses exactly, decoding greedily to its EOS."""
    headers = {n: onnx.load(str(dense / n), load_external_data=False) for n in (ENCODER, DECODER)}
    feeds = encdec.feeds_for(headers, DECODER, [ENCODER])
    assert feeds is not None
    eos, pad = REVERSE["eos_token_id"], REVERSE["pad_token_id"]
    out = encdec.decoder_samples(folder / ENCODER, folder / DECODER, feeds,
                                 {"input_ids": ids, "attention_mask": mask},
                                 REVERSE["decoder_start_token_id"], eos, pad,
                                 labels.shape[1] + 1)[feeds.ids][:, 1:]
    want = np.where(labels == -100, pad, labels)
    return float(np.mean((out == want).all(axis=1)))


#: The trained BART's cuts (heads and MLP ratios), each data-free and with --calib.
TRAINED_CUTS = (0.25, 0.5)


def reverse_folder(python: Path, entry: dict) -> Path | None:
    """The trained BART's Optimum folder, trained and exported in Optimum's venv on the first
    run (what that printed goes in ``entry["training"]``); None when that failed."""
    dense, done = WORK / "onnx" / "reverse", WORK / "onnx" / "reverse.exported"
    if not done.exists():
        shutil.rmtree(dense, ignore_errors=True)
        entry["training"] = side(python, "train", str(WORK / "hf" / "reverse"), str(dense))
        if "error" in entry["training"]:
            return None
        done.touch()
    return dense


def reverse_data() -> tuple[Path, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The trained BART's calibration file (``CALIB`` sequences, seed 1) and 512 held-out
    sequences (seed 2) with their reversals."""
    ids, mask, _ = reverse_batch(np.random.default_rng(1), CALIB)
    calib = WORK / "calibrated" / "reverse.calib.npz"
    calib.parent.mkdir(parents=True, exist_ok=True)
    np.savez(calib, input_ids=ids, attention_mask=mask)
    return calib, reverse_batch(np.random.default_rng(2), 512)


def trained(python: Path) -> dict:
    """The BART trained to reverse sequences (benchmarks/optimum_side.py ``train``): exact
    reversals of 512 held-out sequences, dense and pruned with and without ``--calib`` (256
    other sequences), decoded by :func:`reversing` and generated under Optimum's
    ORTModelForSeq2SeqLM (its caches, the merged decoder: ``reverse-eval``)."""
    entry: dict = {}
    dense = reverse_folder(python, entry)
    if dense is None:
        return entry
    calib, held = reverse_data()
    entry["dense"] = reversing(dense, dense, *held)
    entry["dense_under_optimum"] = side(python, "reverse-eval", str(dense))
    for ratio in TRAINED_CUTS:
        cut = ["--heads-ratio", str(ratio), "--mlp-ratio", str(ratio)]
        for label, flags in VARIANTS.items():
            row = prune("reverse", dense, f"{ratio}-{label}", flags, calib, cut)
            if row["exit"] == 0:
                out = row.pop("output")
                row["exact_reversals"] = reversing(dense, out, *held)
                row["under_optimum"] = side(python, "reverse-eval", str(out))
                row["held_out"] = measure(dense, out, {"input_ids": held[0],
                                                       "attention_mask": held[1]})
            entry[f"{ratio} {label}"] = row
            print(f"reverse {ratio} {label}: {row.get('exact_reversals', row.get('error'))}")
    return entry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated names (default: all seq2seq exports and "
                    "'reverse', the trained BART)")
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(NAMES)
    exports = [n for n in names if n != "reverse"]
    python = venv()
    results: dict = {}
    for name in exports:
        dense = exported(python, name)
        if isinstance(dense, dict):
            results[name] = dense
            continue
        count = CALIB if name != "whisper" else CALIB // 4  # 1 MB of features a sample
        calib = WORK / "calibrated" / f"{name}.calib.npz"
        calib.parent.mkdir(parents=True, exist_ok=True)
        np.savez(calib, **samples(dense, count, seed=0))
        held = samples(dense, HELD_OUT if name != "whisper" else HELD_OUT // 4, seed=1)
        entry: dict = {"calibration_samples": count, "held_out_samples":
                       len(next(iter(held.values())))}
        for label, flags in VARIANTS.items():
            done = prune(name, dense, label, flags, calib)
            if done["exit"] == 0:
                out = done.pop("output")
                done["held_out"] = measure(dense, out, held)
                if label in GENERATED:
                    done["generate"] = side(python, "generate", name, str(out))
            entry[label] = done
            print(f"{name} {label}: {done.get('held_out', done.get('error'))}")
        results[name] = entry
    if args.only is None or "reverse" in names:
        results["reverse"] = trained(python)
    write_result("seq2seq_calibration", {
        "flags": FLAGS, "decoder_tokens": PruneOptions().decoder_tokens, "measured_tokens": TOKENS,
        "models": results})


if __name__ == "__main__":
    main()
