"""Fuzzing: random architectures pruned with random options. Seeds draw CNN-like ONNX graphs
built op by op (``tests/fuzz_graphs.py``, 70%), transformer-like graphs (``tests/fuzz_seq.py``,
20%) and random PyTorch CNNs exported by TorchScript (``tests/fuzz_torch.py``, 10%).

For every seed SPA either prunes and the numeric oracle holds (pruned ≡ masked original, emitted
params and FLOPs ≡ predicted, ratio-0 groups unchanged; the report's params are those of the
files, and the output holds no more than the input, each tensor counted once), or raises
``NothingPrunableError`` with every group frozen for a stated reason; channels touching an op
without a rule are frozen with a reason naming it. Anything else — another exception, an oracle
failure — fails the seed. Replay a seed with ``python tests/fuzz_graphs.py SEED`` (writes the
model, prints the options).
"""

from __future__ import annotations

import collections

import pytest
from fuzz_graphs import fuzz_case, run_case

FAST_SEEDS = range(50)
SLOW_SEEDS = range(50, 550)


def _run(seed: int, tmp_path) -> str:
    case = fuzz_case(seed)
    try:
        return run_case(case, tmp_path)
    except Exception as exc:
        raise AssertionError(f"fuzz seed {seed} failed (replay: python tests/fuzz_graphs.py "
                             f"{seed}); options {case.options}; ops {case.ops}") from exc


@pytest.mark.parametrize("seed", FAST_SEEDS)
def test_fuzz(seed, tmp_path):
    assert _run(seed, tmp_path) in ("pruned", "unchanged", "frozen")


def test_fuzz_is_reproducible():
    a, b = fuzz_case(7), fuzz_case(7)
    assert a.model.SerializeToString() == b.model.SerializeToString() and a.options == b.options
    assert fuzz_case(8).model.SerializeToString() != a.model.SerializeToString()


def test_fuzz_mostly_prunes(tmp_path):
    """The generator is useful only if most seeds prune something (not all freeze)."""
    outcomes = collections.Counter()
    for seed in range(100, 112):
        (tmp_path / str(seed)).mkdir()
        outcomes[_run(seed, tmp_path / str(seed))] += 1
    assert outcomes["pruned"] >= 6, outcomes


@pytest.mark.slow
@pytest.mark.parametrize("seed", SLOW_SEEDS)
def test_fuzz_sweep(seed, tmp_path):
    assert _run(seed, tmp_path) in ("pruned", "unchanged", "frozen")
