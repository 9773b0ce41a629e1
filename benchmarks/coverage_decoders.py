"""Which transformers decoders, exported by TorchScript with a dynamic batch, prune their heads.

Each decoder of :data:`models.hf_decoder.DECODERS` (random weights, 2 layers, hidden 32, 4 heads)
is exported as transformers' ``DynamicCache`` writes it (:func:`models.hf_decoder.decoder_onnx`:
batch, sequence and past dynamic), analysed (head and neuron groups, prunable and frozen, with
the freeze reasons), and pruned at heads and MLP 0.5 under the numeric oracle at batch 2, with
the greedy-generation check when the caches lose heads.
Results: ``results/coverage_decoders.json``.

    python -m benchmarks.coverage_decoders
"""

from __future__ import annotations

import collections
import tempfile
import time
import traceback
from pathlib import Path

from benchmarks.common import write_result
from benchmarks.coverage_transformers import _reason_kind

DIMS = (("batch", 2), ("sequence", 3), ("past", 4), ("total", 7))


def survey(kind: str, config: dict, workdir: Path) -> dict:
    from models.hf_decoder import decoder_onnx
    from spa.api import CheckOptions, PruneOptions, analyze, prune

    entry: dict = {"model": kind, "config": config}
    try:
        path = decoder_onnx(workdir / f"{kind}.onnx", kind, **config)
        analysis = analyze(path)
        kinds = collections.Counter((g.kind.value, g.prunable) for g in analysis.groups
                                    if g.producers)
        entry["groups"] = {f"{k}{'' if ok else '_frozen'}": n for (k, ok), n in kinds.items()}
        reasons = collections.Counter(_reason_kind(r) for g in analysis.frozen_groups
                                      for r in g.frozen)
        entry["freeze_reasons"] = dict(reasons.most_common(4))
        report, _ = prune(path, workdir / f"{kind}_pruned.onnx",
                          PruneOptions(ratio=0.0, heads_ratio=0.5, mlp_ratio=0.5),
                          CheckOptions(check_masked=True, latency=False, input_dims=DIMS))
        entry.update(pruned=True, params=[report.params_before, report.params_after],
                     flops_ratio=report.flops_after / report.flops_before,
                     oracle_relative_diff=report.masked_relative_diff,
                     signature_changes=len(report.signature_changes),
                     generation=report.generation)
    except Exception as exc:  # record, do not stop the survey
        entry.update(pruned=False, error=f"{type(exc).__name__}: {exc}"[:400],
                     where=traceback.format_exc().splitlines()[-3:])
    return entry


def main() -> None:
    from models.hf_decoder import DECODERS

    workdir = Path(tempfile.mkdtemp(prefix="spa-dec-"))
    rows = []
    for kind, (config, _, _) in DECODERS.items():
        row = survey(kind, config, workdir)
        rows.append(row)
        print(f"{kind:10} groups={row.get('groups')} params={row.get('params')} "
              f"oracle={row.get('oracle_relative_diff')} cache={row.get('signature_changes')} "
              f"generation={row.get('generation')} {row.get('error', '')[:120]}")
    path = write_result("coverage_decoders", {"dims": dict(DIMS), "models": rows})
    print(f"wrote {path} at {time.strftime('%H:%M:%S')}")


if __name__ == "__main__":
    main()
