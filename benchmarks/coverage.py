"""Coverage: every torchvision classifier and 80+ timm models, SPA and Torch-Pruning side by side.

For each model (random init, see ``coverage_models``): export to ONNX (TorchScript exporter,
opset 17; the dynamo exporter when that fails; a model neither exports is an *export failure*,
not SPA's), prune with SPA at ratio 0.3 (exact channel counts, ``--round-to 1``) under the
numeric oracle (outputs validated and
``check_masked``), and record *pruned* (FLOPs/params reduction, oracle difference), *frozen*
(nothing prunable, with the reasons) or *error*. Then Torch-Pruning prunes the same
``nn.Module`` at ratio 0.3 with its examples' recipe (``tp_peer``): *pruned and runs* (forward
gives the dense output shape), *wrong output shape*, *forward fails*, *nothing pruned* or
*error*. Its FLOPs are counted on its result exported to ONNX, by SPA's counter, so that both
reductions use one yardstick.

Every model runs in two subprocesses (SPA stage, Torch-Pruning stage), each with a timeout, so
that a hang or a crash costs one entry, not the sweep. Results are saved after every model
(``--resume`` continues an interrupted sweep).

    python -m benchmarks.coverage [--quick] [--only NAME ...] [--timeout 900] [--jobs 1]
        [--resume [--redo NAME ... | --redo-all] [--spa-only]] [--memory-limit BYTES]
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from benchmarks.common import RESULTS, onnx_counts, write_result

RATIO = 0.3
NAME = "coverage"


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text[:limit]


def _where(exc: BaseException) -> list[str]:
    """The innermost frames, to tell SPA bugs from exporter or model problems at a glance."""
    frames = traceback.extract_tb(exc.__traceback__)[-3:]
    return [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames]


def export(module, example, path: Path) -> dict:
    """TorchScript at opset 17, else dynamo (its default opset); raises if neither works."""
    from benchmarks.zoo import no_mha_fastpath
    from models.export import export_module

    no_mha_fastpath()
    errors = {}
    for exporter, opset in (("torchscript", 17), ("dynamo", None)):
        try:
            export_module(module, (example,), path, exporter=exporter, opset=opset)
            return {"exporter": exporter, "opset": opset or "default",
                    "fallback_reason": errors.get("torchscript")}
        except Exception as exc:  # try the next exporter
            errors[exporter] = _one_line(exc)
    raise ExportFailed(errors)


class ExportFailed(Exception):
    def __init__(self, errors: dict[str, str]):
        super().__init__("; ".join(f"{k}: {v}" for k, v in errors.items()))
        self.errors = errors


def _freeze_reasons(frozen_reason_lists) -> dict[str, int]:
    from benchmarks.coverage_transformers import _reason_kind

    counts = collections.Counter(_reason_kind(r) for reasons in frozen_reason_lists
                                 for r in reasons)
    return dict(counts.most_common(5))


def _build(source: str, name: str):
    """The built model, or the entry that says why there is none (too large, fails to build)."""
    from benchmarks.coverage_models import TooLarge, build

    try:
        return build(source, name)
    except TooLarge as exc:
        return {"status": "skipped", "reason": str(exc)}
    except Exception as exc:
        return {"status": "build_error", "error": _one_line(exc)}


def spa_stage(source: str, name: str, workdir: Path) -> dict:
    """Build, export, prune with SPA under the oracle; one status and its evidence."""
    from spa.api import CheckOptions, PruneOptions, analyze, prune
    from spa.errors import NothingPrunableError, ValidationError

    built = _build(source, name)
    if isinstance(built, dict):
        return built
    entry: dict = {"input_size": list(built.example.shape)}
    dense = workdir / f"{name}.onnx"
    t0 = time.perf_counter()
    try:
        entry["export"] = export(built.module, built.example, dense)
    except ExportFailed as exc:
        return {**entry, "status": "export_failed", "export_errors": exc.errors}
    entry["export_seconds"] = time.perf_counter() - t0
    del built
    t0 = time.perf_counter()
    try:
        # Exact channel counts, as Torch-Pruning's recipes have them: the default --round-to
        # auto keeps whole kernel blocks, a latency choice that would blur the structural one.
        report, plan = prune(dense, workdir / f"{name}_spa.onnx",
                             PruneOptions(ratio=RATIO, round_to=1),
                             CheckOptions(check_masked=True, latency=False))
    except NothingPrunableError as exc:
        analysis = analyze(dense)
        return {**entry, "status": "frozen", "message": _one_line(exc),
                "freeze_reasons": _freeze_reasons(g.frozen for g in analysis.frozen_groups)}
    except ValidationError as exc:
        return {**entry, "status": "error", "kind": "validation/oracle failed",
                "error": _one_line(exc, 600), "where": _where(exc)}
    except Exception as exc:
        return {**entry, "status": "error", "kind": "crash", "error": _one_line(exc, 600),
                "where": _where(exc)}
    frozen_channels = sum(f["channels"] for f in report.frozen)
    return {**entry, "status": "pruned", "seconds": time.perf_counter() - t0,
            "params_before": report.params_before, "params_after": report.params_after,
            "flops_before": report.flops_before, "flops_after": report.flops_after,
            "flops_reduction_x": report.flops_before / max(report.flops_after, 1),
            "params_reduction_x": report.params_before / max(report.params_after, 1),
            "prediction_matches": (report.params_after == report.predicted_params_after
                                   and report.flops_after == report.predicted_flops_after),
            "oracle_max_abs_diff": report.masked_max_abs_diff,
            "oracle_relative_diff": report.masked_relative_diff,
            "groups": report.groups, "groups_pruned": report.groups_pruned,
            "groups_frozen": len(report.frozen),
            "frozen_channel_share": frozen_channels / max(frozen_channels
                                                          + report.channels_before, 1),
            "freeze_reasons": _freeze_reasons(f["reasons"] for f in report.frozen)}


def tp_stage(source: str, name: str, workdir: Path) -> dict:
    """Prune the same module with Torch-Pruning's recipe; does the result still run?"""
    import torch

    from benchmarks import tp_peer

    built = _build(source, name)
    if isinstance(built, dict):
        return built
    model, example = built.module, built.example
    with torch.no_grad():
        dense_shape = list(model(example).shape)
    entry: dict = {}
    try:
        macs_before, params_before = tp_peer.count(model, example)
        recipe = tp_peer.default_recipe(model, built.num_classes)
        entry["recipe"] = {"ignored": len(recipe.ignored), "attention_modules":
                           len(recipe.num_heads), "round_to": recipe.round_to}
        entry["seconds"] = tp_peer.prune(model, example, RATIO, recipe)
    except Exception as exc:
        return {**entry, "status": "error", "error": _one_line(exc, 600), "where": _where(exc)}
    try:
        with torch.no_grad():
            shape = list(model(example).shape)
    except Exception as exc:
        return {**entry, "status": "forward_fails", "error": _one_line(exc, 600),
                "where": _where(exc)}
    macs_after, params_after = tp_peer.count(model, example)
    entry.update(macs_before=macs_before, macs_after=macs_after, params_before=params_before,
                 params_after=params_after, tp_flops_reduction_x=macs_before / max(macs_after, 1),
                 output_shape=shape, dense_output_shape=dense_shape)
    if shape != dense_shape:
        return {**entry, "status": "wrong_output_shape"}
    if params_after >= params_before:
        return {**entry, "status": "nothing_pruned"}
    entry["status"] = "pruned_runs"
    try:
        pruned = workdir / f"{name}_tp.onnx"
        entry["export"] = export(model, example, pruned)
        dense_flops = _dense_flops(workdir, name)
        if dense_flops:
            entry["onnx_flops_reduction_x"] = dense_flops / max(onnx_counts(pruned)["flops"], 1)
    except Exception as exc:  # counted by Torch-Pruning only
        entry["onnx_count_error"] = _one_line(exc)
    return entry


def _dense_flops(workdir: Path, name: str) -> int | None:
    """The dense model's FLOPs as SPA's stage counted them, else counted from its file."""
    spa = workdir / f"{name}.spa.json"
    if spa.exists():
        flops = json.loads(spa.read_text()).get("flops_before")
        if flops:
            return flops
    dense = workdir / f"{name}.onnx"
    return onnx_counts(dense)["flops"] if dense.exists() else None


STAGES = {"spa": spa_stage, "tp": tp_stage}


def run_stage(stage: str, source: str, name: str, workdir: Path, timeout: float,
              limit: int) -> dict:
    """One stage in a subprocess; a timeout or a crash becomes the entry's status."""
    out = workdir / f"{name}.{stage}.json"
    cmd = [sys.executable, "-m", "benchmarks.coverage", "--worker", stage, "--source", source,
           "--name", name, "--workdir", str(workdir), "--out", str(out),
           "--memory-limit", str(limit)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "timeout_seconds": timeout}
    wall = time.perf_counter() - t0
    if out.exists():
        return {**json.loads(out.read_text()), "wall_seconds": wall}
    return {"status": "crash", "returncode": proc.returncode,
            "stderr_tail": proc.stderr.strip().splitlines()[-5:], "wall_seconds": wall}


MEMORY_LIMIT = 8 * 2**30  # address space of one stage; the machine is shared


def out_of_memory(message: str) -> bool:
    """An allocation failure under the limit, as numpy, torch or onnxruntime words it."""
    return any(s in message for s in ("MemoryError", "can't allocate memory", "bad_alloc",
                                      "Failed to allocate", "Cannot allocate memory"))


def worker(args: argparse.Namespace) -> None:
    import logging
    import resource
    import warnings

    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    # Torch-Pruning's tracer needs over 20 GB on torchvision's Swin: a limit turns that into
    # an error in this stage instead of the kernel's OOM killer picking a process.
    resource.setrlimit(resource.RLIMIT_AS, (args.memory_limit, args.memory_limit))
    try:
        result = STAGES[args.worker](args.source, args.name, Path(args.workdir))
    except Exception as exc:  # the stages record their own errors; this is the build or export
        result = {"status": "crash", "error": _one_line(exc), "where": _where(exc)}
    if out_of_memory(result.get("error", "")):
        result["status"] = "memory_limit"
    result["memory_limit_bytes"] = args.memory_limit
    Path(args.out).write_text(json.dumps(result, default=str))


SPA_STATUSES = ("pruned", "frozen", "error", "memory_limit", "timeout", "crash")
TP_STATUSES = ("pruned_runs", "nothing_pruned", "wrong_output_shape", "forward_fails", "error",
               "memory_limit", "timeout", "crash")


def summarise(rows: list[dict]) -> dict:
    """Totals over the models both tools could be given (exported and not skipped)."""
    exported = [r for r in rows if r["spa"]["status"] not in
                ("skipped", "build_error", "export_failed")]
    spa = collections.Counter(r["spa"]["status"] for r in exported)
    tp = collections.Counter(r["tp"]["status"] for r in exported)
    return {"models": len(rows),
            "skipped": [r["name"] for r in rows if r["spa"]["status"] == "skipped"],
            "build_errors": [r["name"] for r in rows if r["spa"]["status"] == "build_error"],
            "export_failures": [r["name"] for r in rows
                                if r["spa"]["status"] == "export_failed"],
            "compared": len(exported),
            "spa": {s: spa.get(s, 0) for s in SPA_STATUSES},
            "tp": {s: tp.get(s, 0) for s in TP_STATUSES},
            "spa_errors": {r["name"]: r["spa"].get("error", r["spa"]["status"])
                           for r in exported if r["spa"]["status"] in ("error", "crash",
                                                                       "timeout")},
            "spa_frozen": {r["name"]: r["spa"].get("message", "") for r in exported
                           if r["spa"]["status"] == "frozen"},
            "spa_prediction_mismatch": [r["name"] for r in exported
                                        if r["spa"]["status"] == "pruned"
                                        and not r["spa"]["prediction_matches"]],
            "both_pruned": _both_pruned(exported),
            "freeze_reasons_by_models": _reasons_by_models(exported),
            "by_source": {src: {"spa_pruned": sum(1 for r in exported if r["source"] == src
                                                  and r["spa"]["status"] == "pruned"),
                                "tp_pruned_runs": sum(1 for r in exported if r["source"] == src
                                                      and r["tp"]["status"] == "pruned_runs"),
                                "compared": sum(1 for r in exported if r["source"] == src)}
                          for src in ("torchvision", "timm")}}


def _both_pruned(rows: list[dict]) -> dict:
    """FLOPs reductions of the models both tools pruned (Torch-Pruning's counted on its ONNX),
    leaving out those whose emitted FLOPs differ from SPA's prediction (the count is suspect)."""
    import statistics

    pairs = [(r["spa"]["flops_reduction_x"], r["tp"]["onnx_flops_reduction_x"]) for r in rows
             if r["spa"]["status"] == "pruned" and r["spa"]["prediction_matches"]
             and "onnx_flops_reduction_x" in r["tp"]]
    if not pairs:
        return {"models": 0}
    return {"models": len(pairs),
            "spa_flops_reduction_median": statistics.median(p[0] for p in pairs),
            "tp_flops_reduction_median": statistics.median(p[1] for p in pairs),
            "spa_below_tp_by_10pct": sum(1 for a, b in pairs if a < 0.9 * b)}


def _reasons_by_models(rows: list[dict]) -> dict[str, int]:
    """For each kind of freeze reason, how many pruned models it froze something in."""
    counts = collections.Counter(reason for r in rows if r["spa"]["status"] in ("pruned",
                                                                                "frozen")
                                 for reason in r["spa"].get("freeze_reasons", {}))
    return dict(counts.most_common(8))


def table(summary: dict) -> str:
    spa, tp = summary["spa"], summary["tp"]
    lines = [f"models: {summary['models']}, compared (built and exported): "
             f"{summary['compared']}, skipped: {len(summary['skipped'])}, export failures: "
             f"{len(summary['export_failures'])}, build errors: {len(summary['build_errors'])}",
             "SPA   " + "  ".join(f"{k}={v}" for k, v in spa.items()),
             "TP    " + "  ".join(f"{k}={v}" for k, v in tp.items())]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """SPA's FLOPs reduction against Torch-Pruning's, per model, at the same ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(r["spa"]["flops_reduction_x"], r["tp"]["onnx_flops_reduction_x"], r["source"])
           for r in rows if r["spa"]["status"] == "pruned"
           and "onnx_flops_reduction_x" in r["tp"]]
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for src, marker in (("torchvision", "o"), ("timm", "^")):
        xs = [p[0] for p in pts if p[2] == src]
        ys = [p[1] for p in pts if p[2] == src]
        ax.scatter(xs, ys, marker=marker, alpha=0.7, label=src)
    hi = max([p[0] for p in pts] + [p[1] for p in pts] + [2.0])
    ax.plot([1, hi], [1, hi], "k--", lw=0.8)
    ax.set(xlabel="SPA FLOPs reduction (×)", ylabel="Torch-Pruning FLOPs reduction (×)",
           title=f"ratio {RATIO}: models both tools prune")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def one_model(source: str, model: str, workdir: Path, timeout: float, limit: int,
              previous: dict | None = None) -> dict:
    """Both stages of one model, or only SPA's when ``previous`` (a row of an earlier sweep)
    gives Torch-Pruning's; its ONNX files are removed afterwards."""
    mdir = workdir / f"{source}_{model}"
    mdir.mkdir()
    row = {"source": source, "name": model,
           "spa": run_stage("spa", source, model, mdir, timeout, limit)}
    if previous is not None:
        row["tp"] = previous["tp"]
    elif row["spa"]["status"] != "skipped":
        row["tp"] = run_stage("tp", source, model, mdir, timeout, limit)
    else:
        row["tp"] = {"status": "skipped"}
    for f in mdir.glob("*.onnx*"):
        f.unlink()
    return row


def _line(row: dict) -> str:
    spa, tp = row["spa"], row["tp"]
    return (f"{row['source']}/{row['name']}: SPA {spa['status']}"
            f" {spa.get('flops_reduction_x', 0):.2f}x {spa.get('error', '')[:100]} |"
            f" TP {tp['status']} {tp.get('onnx_flops_reduction_x', 0):.2f}x"
            f" {tp.get('error', '')[:80]}")


def sweep(args: argparse.Namespace) -> None:
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from benchmarks.coverage_models import model_list

    models = model_list(args.quick)
    if args.only:
        models = [(s, n) for s, n in models if n in set(args.only)]
    name = NAME + ("_quick" if args.quick else "") + ("_subset" if args.only else "")
    partial = RESULTS / f"{name}.partial.json"
    done: dict[tuple[str, str], dict] = {}
    previous: dict[tuple[str, str], dict] = {}
    final = RESULTS / f"{name}.json"
    if args.resume and (partial.exists() or final.exists()):
        rows = (json.loads(partial.read_text()) if partial.exists()
                else json.loads(final.read_text())["models"])
        redo = {r["name"] for r in rows} if args.redo_all else set(args.redo or ())
        done = {(r["source"], r["name"]): r for r in rows if r["name"] not in redo}
        if args.spa_only:  # Torch-Pruning's results of the redone models are kept
            previous = {(r["source"], r["name"]): r for r in rows if r["name"] in redo}
    workdir = Path(tempfile.mkdtemp(prefix="spa-coverage-"))
    todo = [m for m in models if m not in done]
    RESULTS.mkdir(exist_ok=True)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # threads only wait on subprocesses
        futures = [pool.submit(one_model, s, n, workdir, args.timeout, args.memory_limit,
                               previous.get((s, n))) for s, n in todo]
        for i, future in enumerate(as_completed(futures)):
            row = future.result()
            done[(row["source"], row["name"])] = row
            partial.write_text(json.dumps(list(done.values()), indent=1, default=str))
            print(f"[{len(models) - len(todo) + i + 1}/{len(models)}] {_line(row)}", flush=True)
    rows = [done[m] for m in models]
    summary = summarise(rows)
    plot(rows, RESULTS / f"{name}.png")
    path = write_result(name, {"ratio": RATIO, "timeout_seconds": args.timeout,
                               "jobs": args.jobs, "summary": summary, "models": rows})
    if not args.only:
        partial.unlink(missing_ok=True)
    print(table(summary))
    print(f"wrote {path} at {time.strftime('%H:%M:%S')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 models instead of 160+")
    parser.add_argument("--only", nargs="*", help="only these model names")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per stage")
    parser.add_argument("--resume", action="store_true", help="continue a partial sweep")
    parser.add_argument("--jobs", type=int, default=1, help="models run at the same time")
    parser.add_argument("--redo", nargs="*", help="with --resume: run these models again")
    parser.add_argument("--redo-all", action="store_true", help="with --resume: run all again")
    parser.add_argument("--spa-only", action="store_true",
                        help="with --resume: redo only SPA's stage, keep Torch-Pruning's results "
                             "(after a change to SPA)")
    parser.add_argument("--worker", choices=sorted(STAGES), help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--memory-limit", type=int, default=MEMORY_LIMIT,
                        help="address-space limit of each stage, bytes (default 8 GiB)")
    args = parser.parse_args()
    if args.worker:
        worker(args)
    else:
        sweep(args)


if __name__ == "__main__":
    main()
