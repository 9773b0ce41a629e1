"""Compile speed and memory of ``spa prune`` on an onnxruntime-genai int4 folder (issue #16).

A random-init Llama with GQA (hidden 768, 8 layers, MLP 3072, 12 query heads and 4 KV heads of
64, vocab 16000), written by onnxruntime-genai's builder as an int4 CPU folder
(:mod:`models.genai_llm`; built once, cached under ``build/genai_bench/``).

The builder writes ``accuracy_level=4`` (onnxruntime quantises each ``MatMulNBits`` input to
int8 per block); the variants run on the folder as built: the oracle compares the pruned and
the masked model with float activations (spa/pipeline/checks.py's ``float_session``; at level 4
int8 rounding turned float error into 0.008 of the logits' scale and validation refused the
model). Each variant runs
``python -m spa prune DIR -o OUT …`` as a subprocess, folder to folder, with validation on (the
default: the masked oracle and, for width-only plans, 32 greedy tokens against the masked
original): wall seconds (median of ``--runs``) and peak RSS (GNU time's ``%M``, of the command
alone: :func:`benchmarks.quality.pipeline.run_measured`) over the size of the model's files
(``*.onnx`` and their external data). Params and FLOPs come from ``--report``; last,
onnxruntime-genai's ``Generator`` runs the output folder for 32 tokens.

    python -m benchmarks.genai_folder [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

from benchmarks.common import write_result
from benchmarks.quality.pipeline import run_measured
from models.genai_llm import build_folder, generate, make_hf

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "build" / "genai_bench"
LAYERS = 8
SIZES = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
         "num_key_value_heads": 4}
VOCAB = 16000
PROMPT = [5, 17, 99, 3, 42, 7, 250, 11]
VARIANTS = {"width": ["--mlp-ratio", "0.3", "--heads-ratio", "0.5"],
            "width+depth": ["--mlp-ratio", "0.3", "--heads-ratio", "0.5", "--depth-ratio", "0.25"]}


def folder() -> Path:
    """The int4 folder, built once."""
    out = WORK / "int4"
    if not (out / "genai_config.json").exists():
        build_folder(make_hf(WORK, "Llama", LAYERS, vocab=VOCAB, sizes=SIZES), out)
    return out


def model_bytes(d: Path) -> int:
    """The size of the folder's model: its ONNX files and their external data."""
    return sum(f.stat().st_size for f in d.iterdir() if ".onnx" in f.name)


def _shown(cmd: list[str]) -> str:
    """``cmd`` as ``spa prune …`` with paths from the checkout's root (no ``--report``)."""
    return " ".join(["spa", *cmd[3:-2]]).replace(f"{ROOT}/", "")


def measure(dense: Path, label: str, flags: list[str], runs: int) -> dict:
    size = model_bytes(dense)
    out, report = WORK / label, WORK / f"{label}.report.json"
    cmd = [sys.executable, "-m", "spa", "prune", str(dense), "-o", str(out), *flags,
           "--report", str(report)]
    entries = []
    for _ in range(runs):  # each run writes a new folder (spa refuses a non-empty one)
        shutil.rmtree(out, ignore_errors=True)
        entries.append(run_measured(cmd, WORK / f"{label}.log"))
    failed = [e for e in entries if e["exit_code"]]
    if failed:
        print(f"{label}: exit {failed[0]['exit_code']}", flush=True)
        return {"command": _shown(cmd), "exit_code": failed[0]["exit_code"],
                "seconds": failed[0]["seconds"], "peak_rss_bytes": failed[0]["peak_rss_bytes"],
                "error": (failed[0].get("error") or "").strip().splitlines()[-1:]}
    r = json.loads(report.read_text())
    rss = max(e["peak_rss_bytes"] or 0 for e in entries)
    tokens = generate(out, PROMPT, 32)
    row = {"command": _shown(cmd),
           "seconds_median": statistics.median(e["seconds"] for e in entries),
           "seconds": [e["seconds"] for e in entries],
           "peak_rss_bytes": rss, "rss_over_model": rss / size,
           "output_model_bytes": model_bytes(out),
           **{k: r[k] for k in ("params_before", "params_after", "flops_before", "flops_after")},
           "stage_seconds": r["seconds"], "dropped_blocks": len(r.get("dropped_blocks") or ()),
           "generation_check": r.get("generation"),
           "masked_relative_diff": r.get("masked_relative_diff"),
           "generator_tokens": len(tokens)}
    print(f"{label}: {row['seconds_median']:.1f} s, peak RSS {rss / 2**20:.0f} MiB = "
          f"{row['rss_over_model']:.2f}× the model, params {row['params_before']:,} → "
          f"{row['params_after']:,}, Generator {len(tokens)} tokens", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    dense = folder()
    config = json.loads((dense / "genai_config.json").read_text())["model"]["decoder"]
    results = {label: measure(dense, label, flags, args.runs)
               for label, flags in VARIANTS.items()}
    write_result("genai_folder", {
        "model": f"int4 Llama, GQA: hidden {SIZES['hidden_size']}, {LAYERS} layers, MLP "
                 f"{SIZES['intermediate_size']}, {SIZES['num_attention_heads']} heads / "
                 f"{SIZES['num_key_value_heads']} KV heads, vocab {VOCAB}",
        "model_bytes": model_bytes(dense), "genai_config": config, "runs": args.runs,
        "results": results})


if __name__ == "__main__":
    main()
