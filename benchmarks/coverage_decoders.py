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

import tempfile
import time
from functools import partial
from pathlib import Path

from benchmarks.common import write_result
from benchmarks.coverage_transformers import survey

DIMS = (("batch", 2), ("sequence", 3), ("past", 4), ("total", 7))


def main() -> None:
    from models.hf_decoder import DECODERS, decoder_onnx

    workdir = Path(tempfile.mkdtemp(prefix="spa-dec-"))
    rows = []
    for kind, (config, _, _) in DECODERS.items():
        row = survey(kind, partial(decoder_onnx, kind=kind, **config), workdir, dims=DIMS,
                     more=lambda r: {"params": [r.params_before, r.params_after],
                                     "signature_changes": len(r.signature_changes),
                                     "generation": r.generation})
        row["config"] = config
        rows.append(row)
        print(f"{kind:10} groups={row.get('groups')} params={row.get('params')} "
              f"oracle={row.get('oracle_relative_diff')} cache={row.get('signature_changes')} "
              f"generation={row.get('generation')} {row.get('error', '')[:120]}")
    path = write_result("coverage_decoders", {"dims": dict(DIMS), "models": rows})
    print(f"wrote {path} at {time.strftime('%H:%M:%S')}")


if __name__ == "__main__":
    main()
