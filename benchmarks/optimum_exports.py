"""🤗 Optimum's ONNX exports, pruned as users bring them (docs/transformers.md).

Most transformers reach ONNX through ``optimum-cli export onnx``. optimum-onnx 0.1.0 needs
transformers 4.57, older than this project's, so the exports are made in a venv of their own
(``build/optimum/venv``: torch 2.13.0, transformers 4.57.6, optimum-onnx 0.1.0, and onnx and
onnxruntime as this project pins them, from the package registry on the first run) by
:mod:`benchmarks.optimum_side`, from random models built from configs (seeded; hidden 64,
4 heads, 2 layers). Then, with this project's
``python -m spa prune … --heads-ratio 0.5 --mlp-ratio 0.5 --input-dim batch_size=2``:

* encoders and ViT: ``model.onnx``, as a file;
* seq2seq models (BART, Marian, Pegasus, T5, mT5, Whisper) and decoders (Llama, Qwen2,
  Mistral, Gemma, Granite, StableLM, Phi-3, GPT-2, Falcon): the export folder, pruned together
  (spa/pipeline/family.py).

Per export: params before and after and groups pruned of each file, the numeric oracle's
relative difference, the folder's step check and config edits; then, back in Optimum's venv,
each folder generates 8 greedy tokens under its ORTModel class (``ORTModelForSeq2SeqLM``,
``ORTModelForSpeechSeq2Seq``, ``ORTModelForCausalLM``), dense and pruned (the tokens, or the
error). A pruned seq2seq folder holds the merged decoder too (pruned through its branches),
which Optimum loads when it is there: it generates once with it and once with the separate
decoders alone (a copy without it). Random weights: the tokens say the folder runs, not how
well.

    python -m benchmarks.optimum_exports [--only bart,llama]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.common import write_result
from benchmarks.optimum_side import MODELS

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "build" / "optimum"
VENV = WORK / "venv"
SIDE = ("torch==2.13.0", "transformers==4.57.6", "optimum-onnx==0.1.0", "onnx==1.23.2",
        "onnxruntime==1.32.0")
MERGED = "decoder_model_merged.onnx"  # pruned through its branches; Optimum prefers it
FLAGS = ["--heads-ratio", "0.5", "--mlp-ratio", "0.5", "--input-dim", "batch_size=2"]


def venv() -> Path:
    """Optimum's venv, made once (and again when :data:`SIDE` changes)."""
    python, made = VENV / "bin" / "python", VENV / "spa-side.txt"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    if not made.exists() or made.read_text() != "\n".join(SIDE):
        subprocess.run([str(python), "-m", "pip", "install", "-q", *SIDE], check=True)
        made.write_text("\n".join(SIDE))
    return python


def side(python: Path, *args: str) -> dict:
    """One command of benchmarks/optimum_side.py in Optimum's venv: its JSON line."""
    done = subprocess.run([str(python), str(Path(__file__).parent / "optimum_side.py"), *args],
                          capture_output=True, text=True, cwd=WORK)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {"error": done.stderr[-500:]}


def prune(name: str, folder: Path) -> dict:
    """``spa prune`` on the export: ``model.onnx`` of an encoder, else the folder."""
    kind = MODELS[name][4]
    src = folder / "model.onnx" if kind == "encoder" else folder
    out = WORK / "pruned" / (f"{name}.onnx" if kind == "encoder" else name)
    if out.is_dir():
        shutil.rmtree(out)
    out.unlink(missing_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-m", "spa", "prune", str(src), "-o", str(out),
                           *FLAGS, "--json", "-q"], capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        return {"exit": done.returncode, "error": done.stderr.strip().splitlines()[-1:]}
    report = json.loads(done.stdout)
    files = {"model.onnx": report} if kind == "encoder" else report["files"]
    entry: dict = {"exit": 0, "output": str(out.relative_to(ROOT)), "files": {
        n: {k: r[k] for k in ("params_before", "params_after", "groups", "groups_pruned",
                              "masked_relative_diff")} for n, r in files.items()}}
    if kind != "encoder":
        entry.update({k: report[k] for k in ("skipped", "step_checks", "config_edits",
                                             "kept_whole", "groups_following", "merged")})
    return entry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated names (default: all)")
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(MODELS)
    WORK.mkdir(parents=True, exist_ok=True)
    python = venv()
    results = {}
    for name in names:
        folder = exported(python, name)
        if isinstance(folder, dict):
            results[name] = folder
            continue
        entry = {"kind": MODELS[name][4], "task": MODELS[name][3], **prune(name, folder)}
        if entry["kind"] != "encoder":
            entry["generate_dense"] = side(python, "generate", name, str(folder))
            if entry["exit"] == 0:
                pruned = ROOT / entry["output"]
                entry["generate_pruned"] = side(python, "generate", name, str(pruned))
                if (pruned / MERGED).exists():  # Optimum ran it: now the decoders alone
                    entry["generate_separate"] = side(python, "generate", name,
                                                      str(_without_merged(pruned)))
        results[name] = entry
        print(f"{name}: {_line(entry)}")
    write_result("optimum_exports", {
        "side_venv": list(SIDE), "flags": FLAGS, "models": results})


def exported(python: Path, name: str) -> Path | dict:
    """NAME's export folder, made once in Optimum's venv; or ``{"export": error}``."""
    folder, done = WORK / "onnx" / name, WORK / "onnx" / f"{name}.exported"
    if not done.exists():
        shutil.rmtree(folder, ignore_errors=True)
        made = side(python, "export", name, str(WORK / "hf" / name), str(folder))
        if "error" in made:
            print(f"{name}: export failed: {made['error']}")
            return {"export": made}
        done.touch()
    return folder


def _without_merged(folder: Path) -> Path:
    """A copy of the pruned ``folder`` without its merged decoder, which Optimum prefers."""
    out = folder.with_name(folder.name + "-separate")
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(folder, out, ignore=shutil.ignore_patterns(MERGED))
    return out


def _line(entry: dict) -> str:
    if entry["exit"]:
        return f"spa exit {entry['exit']}: {entry['error']}"
    files = "; ".join(f"{n} {f['params_before']:,} -> {f['params_after']:,} "
                      f"({f['groups_pruned']} of {f['groups']})"
                      for n, f in entry["files"].items())
    gen = entry.get("generate_pruned")
    runs = "" if gen is None else " generates" if "tokens" in gen else f" {gen.get('error')}"
    steps = [s["relative_diff"] for s in entry.get("step_checks", {}).values()
             if isinstance(s, dict)]
    return files + (f"; step check {max(steps):.1e}" if steps else "") + runs


if __name__ == "__main__":
    main()
