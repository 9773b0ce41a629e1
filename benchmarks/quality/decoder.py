"""A decoder LLM calibrated on text: a small GPT-2 trained here on fortunes, pruned with and
without calibration text.

    python -m benchmarks.quality.decoder [--steps 3000] [--calib-lines 1024]

No pretrained causal LM ships in a package, so one is trained here, as the digits models are: a
byte-level BPE tokenizer (2048 tokens) and a 4-layer GPT-2 (hidden 256, 8 heads, 128
positions), trained with AdamW on the calibration fortunes (:func:`real.fortune_sets`) packed
into 64-token windows, then exported with its KV cache (``models/hf_decoder.CachedLM``, as
transformers writes it); all cached in ``build/quality/decoder``. Pruned at heads and MLP 0.25,
and at 0.5 (the pruned heads' KV-cache heads with them), each way:

* ``l1-uniform``: no data (SPA's default);
* ``post-obspa-lines``: ``--calib-lines`` calibration sentences, each a prompt padded to 64
  tokens (OBSPA on calibration Hessians, sensitivity allocation, reconstruction);
* ``post-obspa-pack``: the same sentences ``--pack``'ed into 64-token windows;
* ``recover``: ``spa recover`` from ``post-obspa-lines`` on the same sentences, for
  ``--recover-seconds`` (its caches lost heads: the teacher makes its own empty ones).

Evaluated on 1000 sentences of the evaluation fortunes (never used to train or calibrate), each
a prompt: the share of attended positions whose next-token arg-max is the dense model's, and
the perplexity of the true next token.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np

from benchmarks.common import write_result
from benchmarks.quality import real
from benchmarks.quality.pipeline import SPA, run_measured

WORK = real.CACHE / "decoder"
VOCAB, LAYERS, HIDDEN, HEADS, POSITIONS, WINDOW = 2048, 4, 256, 8, 128, 64
CUTS = {r: ["--heads-ratio", r, "--mlp-ratio", r, "--ratio", r] for r in ("0.25", "0.5")}
CALIBRATED = ["--criterion", "obspa", "--hessian", "calibration", "--max-length", str(WINDOW)]


def tokenizer(text: list[str], path: Path) -> Path:
    """A byte-level BPE of ``VOCAB`` tokens trained on ``text``, ``[PAD]`` first (id 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["[PAD]"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path))
    return path


def train(text: list[str], tok_path: Path, path: Path, steps: int, seed: int) -> Path:
    """The GPT-2 trained on ``text`` packed into windows, exported to ``path``."""
    import torch
    from tokenizers import Tokenizer

    from models.hf_decoder import CachedLM
    from models.thirdparty import _stub_torchvision

    _stub_torchvision()  # transformers imports torchvision when it is installed
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    tok = Tokenizer.from_file(str(tok_path))
    ids = np.fromiter((t for e in tok.encode_batch(text) for t in e.ids), np.int64)
    windows = torch.from_numpy(ids[:len(ids) - len(ids) % WINDOW].reshape(-1, WINDOW))
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=POSITIONS, n_embd=HIDDEN, n_layer=LAYERS,
                     n_head=HEADS, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cfg._attn_implementation = "eager"
    model = GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=steps, pct_start=0.05)
    rng = np.random.default_rng(seed)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        batch = windows[torch.from_numpy(rng.choice(len(windows), 32, replace=False))]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"train step {step} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    model.eval()
    head = HIDDEN // HEADS
    names = [f"{i}.{kv}" for i in range(LAYERS) for kv in ("key", "value")]
    pasts = [torch.zeros(1, HEADS, 2, head) for _ in names]
    dims = {"input_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "total"}}
    dims |= {f"past_key_values.{n}": {0: "batch", 2: "past"} for n in names}
    dims |= {f"present.{n}": {0: "batch", 2: "total"} for n in names}
    torch.onnx.export(CachedLM(model).eval(), (windows[:1, :3], torch.ones(1, 5, dtype=torch.int64),
                                              *pasts), str(path), opset_version=17, dynamo=False,
                      input_names=["input_ids", "attention_mask",
                                   *(f"past_key_values.{n}" for n in names)],
                      output_names=["logits", *(f"present.{n}" for n in names)],
                      dynamic_axes=dims)
    return path


def prompts(tok_path: Path, text: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``text`` as right-padded prompts of at most ``WINDOW`` tokens: ids and mask."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_path))
    tok.enable_truncation(WINDOW)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(text)
    return np.array([e.ids for e in enc]), np.array([e.attention_mask for e in enc])


def logits(model: Path, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The model's logits on the prompts (empty caches of its own head counts), 50 at a time."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model))
    pasts = {i.name: i.shape for i in sess.get_inputs() if i.name.startswith("past")}
    out = []
    for s in range(0, len(ids), 50):
        feeds = {"input_ids": ids[s:s + 50], "attention_mask": mask[s:s + 50]}
        feeds |= {k: np.zeros((len(feeds["input_ids"]), shape[1], 0, shape[3]), np.float32)
                  for k, shape in pasts.items()}
        out.append(sess.run(["logits"], feeds)[0])
    return np.concatenate(out)


def evaluate(dense: np.ndarray, model: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> dict:
    """Next-token agreement with the dense model and perplexity, at the positions whose next
    token is attended."""
    at = (mask[:, :-1] == 1) & (mask[:, 1:] == 1)
    z = model[:, :-1][at].astype(np.float64)
    z -= z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    nll = -logp[np.arange(len(z)), ids[:, 1:][at]]
    return {"agreement": float(np.mean(z.argmax(-1) == dense[:, :-1][at].argmax(-1))),
            "perplexity": float(np.exp(nll.mean())), "positions": int(at.sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--calib-lines", type=int, default=1024)
    parser.add_argument("--recover-seconds", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    calib_text, eval_text = real.fortune_sets()
    WORK.mkdir(parents=True, exist_ok=True)
    tok = WORK / "tokenizer.json"
    if not tok.exists():
        tokenizer(calib_text, tok)
    dense = WORK / f"gpt2_fortunes_{args.steps}.onnx"
    t0 = time.perf_counter()
    if not dense.exists():
        train(calib_text, tok, dense, args.steps, args.seed)
    train_seconds = time.perf_counter() - t0
    rng = np.random.default_rng(args.seed)
    calib = WORK / f"calib_{args.calib_lines}.txt"
    calib.write_text("".join(calib_text[i] + "\n" for i in np.sort(
        rng.permutation(len(calib_text))[:args.calib_lines])), encoding="utf-8")
    evaluation = [eval_text[i] for i in np.sort(rng.permutation(len(eval_text))[:1000])]
    ids, mask = prompts(tok, evaluation)
    reference = logits(dense, ids, mask)
    body: dict = {"model": {"layers": LAYERS, "hidden": HIDDEN, "heads": HEADS, "vocab": VOCAB,
                            "train_steps": args.steps, "window": WINDOW,
                            "train_seconds": train_seconds if train_seconds > 1 else None},
                  "cuts": CUTS, "calibration_lines": args.calib_lines,
                  "evaluation_sentences": len(evaluation),
                  "dense": evaluate(reference, reference, ids, mask), "variants": {},
                  "recover": {}}
    calibrated = ["--calib", str(calib), "--tokenizer", str(tok), *CALIBRATED]
    variants = {"l1-uniform": ["--criterion", "l1", "--allocation", "uniform"],
                "post-obspa-lines": calibrated, "post-obspa-pack": [*calibrated, "--pack"]}
    for (ratio, cut), (variant, flags) in itertools.product(CUTS.items(), variants.items()):
        label = f"{variant}-{ratio}"
        out, report = WORK / f"{label}.onnx", WORK / f"{label}.report.json"
        entry = run_measured([*SPA, "prune", str(dense), "-o", str(out), "--report",
                              str(report), "-q", *cut, *flags], WORK / f"{label}.log")
        if entry["exit_code"] == 0:
            r = json.loads(report.read_text())
            entry.update({"flops_reduction": r["flops_before"] / r["flops_after"],
                          "params_reduction": r["params_before"] / r["params_after"],
                          "calibration": r["calibration"], "fidelity": r["fidelity"],
                          "generation": r["generation"],
                          "evaluation": evaluate(reference, logits(out, ids, mask), ids, mask)})
        body["variants"][label] = entry
        print(label, json.dumps({k: entry.get(k) for k in ("evaluation", "fidelity")}),
              flush=True)
    for ratio in CUTS:
        label, start = f"recover-{ratio}", WORK / f"post-obspa-lines-{ratio}.onnx"
        out, report = WORK / f"{label}.onnx", WORK / f"{label}.report.json"
        entry = run_measured([*SPA, "recover", str(dense), str(start), "-o", str(out),
                              *calibrated[:4], "--max-length", str(WINDOW), "--time-budget",
                              str(args.recover_seconds), "--report", str(report)],
                             WORK / f"{label}.log")
        if entry["exit_code"] == 0:
            r = json.loads(report.read_text())
            entry.update({k: r[k] for k in ("fidelity_before", "fidelity_after", "kept",
                                            "steps", "lr")})
            entry["evaluation"] = evaluate(reference, logits(out, ids, mask), ids, mask)
        body["recover"][label] = entry
        print(label, json.dumps({k: entry.get(k) for k in ("evaluation", "kept")}), flush=True)
    write_result("decoder_calibration", body)


if __name__ == "__main__":
    main()
