"""Seq2seq folders recovered by distillation, the encoder and decoder trained together
(``spa prune folder/ --calib C --recover N``, spa/pipeline/joined.py).

The BART trained to reverse sequences of symbols (:mod:`benchmarks.seq2seq_calibration`'s:
hidden 64, 2+2 layers, trained and exported in Optimum's venv on the first run, with its
merged decoder), pruned at heads and MLP ratios 0.5 and 0.75 with ``--calib`` of 256
sequences, from two starts, each with and without ``--recover 200``:

* ``post-training``: SPA's default with data (sensitivity allocation, reconstruction);
* ``magnitude``: ``--no-reconstruct --allocation uniform`` (the L1 criterion, one ratio in
  every group, no refit).

Judged by exact reversals of 512 other sequences, decoded greedily to EOS by the pruned
folder, and generated under Optimum's ``ORTModelForSeq2SeqLM`` (its caches and the merged
decoder); with the wall time of each ``spa prune`` and the recovery's held-out agreement
(the dense decode's tokens, teacher forced) before and after.

    python -m benchmarks.seq2seq_recovery
"""

from __future__ import annotations

import time

from benchmarks.common import write_result
from benchmarks.optimum_exports import side, venv
from benchmarks.seq2seq_calibration import prune, reverse_data, reverse_folder, reversing

CUTS = (0.5, 0.75)
STEPS = 200
STARTS = {"post-training": [], "magnitude": ["--no-reconstruct", "--allocation", "uniform"]}


def main() -> None:
    python = venv()
    results: dict = {}
    dense = reverse_folder(python, results)
    if dense is None:
        write_result("seq2seq_recovery", {"models": {"reverse": results}})
        return
    calib, held = reverse_data()
    results["dense"] = reversing(dense, dense, *held)
    for ratio in CUTS:
        cut = ["--heads-ratio", str(ratio), "--mlp-ratio", str(ratio)]
        for start, flags in STARTS.items():
            for steps in (0, STEPS):
                label = f"{ratio} {start}" + (f", recover {steps}" if steps else "")
                more = ["--recover", str(steps)] if steps else []
                began = time.monotonic()
                row = prune("reverse", dense, label, ["--calib", *flags, *more], calib, cut)
                row["seconds"] = round(time.monotonic() - began, 1)
                if row["exit"] == 0:
                    out = row.pop("output")
                    row["exact_reversals"] = reversing(dense, out, *held)
                    row["under_optimum"] = side(python, "reverse-eval", str(out))
                results[label] = row
                print(f"reverse {label}: {row.get('exact_reversals', row.get('error'))}, "
                      f"{row['seconds']} s")
    write_result("seq2seq_recovery", {"steps": STEPS, "calibration_sequences": 256,
                                      "held_out_sequences": 512, "models": {"reverse": results}})


if __name__ == "__main__":
    main()
