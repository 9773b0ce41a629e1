"""Byte-identity check for refactors: prune every reference and benchmark model with three recipes
and record the SHA-256 of each pruned model (and plan).

A refactor must change nothing a user sees. Run once on the code before (``record``), once after
(``compare``): every model × recipe must give the same bytes. The input models are exported once
into ``--models-dir`` and reused, so the comparison does not depend on the exporters.

    python scripts/golden.py record  -o build/golden/before.json
    python scripts/golden.py compare build/golden/before.json
    python scripts/golden.py record --quick   # the bundled reference nets only, no large models

Models: the reference nets of ``models/`` (both exporters, where they export), the benchmark
models of ``benchmarks/zoo.py`` (ResNet-50, MobileNetV3-Large, ViT-B/16, BERT-base) and the
quality benchmark's bundled ONNX files. Recipes: ``l1`` at ratio 0.5, ``obspa`` (synthetic
Hessians, compensation on) at ratio 0.3, and ``l1`` with ``--target flops`` at 0.5.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPES = {
    "l1": ["--ratio", "0.5"],
    "obspa": ["--ratio", "0.3", "--criterion", "obspa"],
    "flops": ["--ratio", "0.5", "--target", "flops"],
}
REFERENCE = ["resnet_basic", "resnet_bottleneck", "resnext", "mobilenetv2", "efficientnet",
             "densenet", "vgg_bn", "vgg_view", "unet", "conv1d", "vit", "vit_sdpa", "bert",
             "bert_sdpa", "gpt", "gpt_sdpa", "torch_encoder", "torch_mha"]
BENCHMARK = ["resnet50", "mobilenet_v3_large", "vit_b_16", "bert_base"]
BUNDLED = sorted((ROOT / "benchmarks" / "quality" / "models").glob("*.onnx"))


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


def export_models(models_dir: Path, quick: bool) -> dict[str, Path]:
    """Every input model as a file (exported once; reused when already there)."""
    models_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for name in REFERENCE:
        for exporter in ("torchscript", "dynamo"):
            path = models_dir / f"{name}.{exporter}.onnx"
            if not path.exists():
                res = _run([sys.executable, "-m", "models.export", name, "-o", str(path),
                            "--exporter", exporter])
                if res.returncode:
                    print(f"skip {path.name}: export failed", file=sys.stderr)
                    continue
            out[path.stem] = path
    for path in BUNDLED:
        out[f"quality.{path.stem}"] = path
    if not quick:
        for key in BENCHMARK:
            path = models_dir / f"{key}.onnx"
            if not path.exists():
                code = ("import sys; from benchmarks.zoo import MODELS, export; "
                        f"e = MODELS[{key!r}]; export(e, *e.build(), sys.argv[1])")
                res = _run([sys.executable, "-c", code, str(path)])
                if res.returncode:
                    print(f"skip {key}: {res.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                    continue
            out[key] = path
    return out


def _sha(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def prune_all(models: dict[str, Path]) -> dict[str, dict]:
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for key, path in models.items():
            for recipe, flags in RECIPES.items():
                out, plan = Path(tmp) / "out.onnx", Path(tmp) / "plan.json"
                t0 = time.perf_counter()
                res = _run([sys.executable, "-m", "spa", "prune", str(path), "-o", str(out),
                            "--plan", str(plan), "--no-validate", "-q", *flags])
                entry = {"exit": res.returncode, "model": _sha(out),
                         "data": _sha(out.with_name(out.name + ".data")), "plan": _sha(plan),
                         "seconds": round(time.perf_counter() - t0, 1)}
                results[f"{key}/{recipe}"] = entry
                print(f"{key}/{recipe}: exit {res.returncode} {(entry['model'] or '-')[:12]}",
                      flush=True)
                for p in (out, plan, out.with_name(out.name + ".data")):
                    p.unlink(missing_ok=True)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=["record", "compare"])
    ap.add_argument("reference", nargs="?", help="compare: the JSON written by record")
    ap.add_argument("-o", "--output", type=Path, default=ROOT / "build" / "golden" / "now.json")
    ap.add_argument("--models-dir", type=Path, default=ROOT / "build" / "golden" / "models")
    ap.add_argument("--quick", action="store_true", help="no large benchmark models")
    args = ap.parse_args()
    models = export_models(args.models_dir, args.quick)
    if args.mode == "compare":
        before = json.loads(Path(args.reference).read_text())["results"]
        models = {k: v for k, v in models.items() if any(r.startswith(f"{k}/") for r in before)}
        before = {r: v for r, v in before.items() if r.split("/")[0] in models}  # --quick
    results = prune_all(models)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    revision = _run(["git", "describe", "--always", "--dirty"]).stdout.strip()
    args.output.write_text(json.dumps({"revision": revision, "results": results}, indent=1))
    if args.mode == "record":
        return 0
    differ = [k for k, v in results.items()
              if k in before and any(before[k][f] != v[f] for f in ("exit", "model", "data"))]
    plans = [k for k, v in results.items() if k in before and before[k]["plan"] != v["plan"]]
    missing = sorted(set(before) - set(results))
    print(f"{len(results) - len(differ)} of {len(results)} pruned models identical; differ: "
          f"{differ}; missing: {missing}; plans that differ (format changes are allowed): "
          f"{len(plans)}")
    return int(bool(differ or missing))


if __name__ == "__main__":
    sys.exit(main())
