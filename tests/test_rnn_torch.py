"""PyTorch recurrent taggers exported to ONNX prune their hidden units under the numeric oracle.

``Embedding → nn.LSTM(2 layers) / nn.GRU(bidirectional) → Linear`` per token, exported by the
TorchScript exporter at opset 17, with a fixed and with a dynamic batch (then the zero initial
states are a ``ConstantOfShape`` of a run-time shape, one for both layers, whose Slices tie the
two layers' units into one group). Before spa/coupling/rules/rnn.py every one of these groups
froze at the recurrent node.
"""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import onnx  # noqa: E402

from spa.api import analyze  # noqa: E402
from tests.graphs import attr, node_named  # noqa: E402
from tests.oracle import prune_checked  # noqa: E402


class Tagger(torch.nn.Module):
    def __init__(self, rnn: torch.nn.Module):
        super().__init__()
        self.emb = torch.nn.Embedding(100, 32)
        self.rnn = rnn
        self.fc = torch.nn.Linear(rnn.hidden_size * (2 if rnn.bidirectional else 1), 7)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn(self.emb(ids))
        return self.fc(y)


def _export(rnn: torch.nn.Module, path: Path, dynamic: bool) -> Path:
    torch.manual_seed(0)
    model = Tagger(rnn).eval()
    dims = {"ids": {0: "seq", 1: "batch"}} if dynamic else None
    torch.onnx.export(model, (torch.randint(0, 100, (12, 3)),), str(path), opset_version=17,
                      dynamo=False, input_names=["ids"], output_names=["tags"],
                      dynamic_axes=dims)
    return path


# (recurrent layer, dynamic axes) -> prunable groups: embedding width and hidden units
CASES = {"lstm2": (lambda: torch.nn.LSTM(32, 64, num_layers=2), False, [32, 64, 64]),
         "lstm2-dynamic": (lambda: torch.nn.LSTM(32, 64, num_layers=2), True, [32, 64]),
         "gru-bidirectional": (lambda: torch.nn.GRU(32, 48, bidirectional=True), False,
                               [32, 48])}


@pytest.mark.parametrize("case", sorted(CASES))
def test_recurrent_tagger_prunes_hidden_units(tmp_path, case):
    make, dynamic, prunable = CASES[case]
    torch.manual_seed(0)
    path = _export(make(), tmp_path / "tagger.onnx", dynamic)
    assert sorted(g.size for g in analyze(path).prunable_groups) == sorted(prunable)
    out = prune_checked(path, tmp_path, ratio=0.5, dims={"seq": 5, "batch": 2})
    assert sum(1 for g in out.plan.groups if len(g.keep) < g.size) == len(prunable)
    assert out.report.flops_after < out.report.flops_before / 3
    rnn = [n.name for n in onnx.load(str(out.path)).graph.node
           if n.op_type in ("LSTM", "GRU")]
    assert {attr(node_named(out.path, n), "hidden_size") for n in rnn} == {prunable[-1] // 2}


@pytest.mark.parametrize("case", sorted(CASES))
def test_pruned_recurrent_tagger_trains_in_torch(tmp_path, case):
    """The pruned tagger runs in ``spa.torch.from_onnx`` as onnxruntime runs it, and a few
    optimiser steps lower a loss (``spa recover`` trains it so)."""
    import numpy as np

    import spa.torch as st
    from spa import validate as val

    make, dynamic, _ = CASES[case]
    torch.manual_seed(0)
    path = _export(make(), tmp_path / "tagger.onnx", dynamic)
    out = prune_checked(path, tmp_path, ratio=0.5, dims={"seq": 5, "batch": 2})
    ids = np.random.default_rng(0).integers(0, 100, (12, 3))
    expected = val.run(val.session(out.path.read_bytes()), {"ids": ids})["tags"]
    module = st.from_onnx(out.path)
    with torch.no_grad():
        got = module(torch.from_numpy(ids))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-5)
    target = torch.randn_like(got)
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(module(torch.from_numpy(ids)), target)
        loss.backward()
        if not losses:  # every weight of the recurrent nodes too
            assert all(p.grad is not None and float(p.grad.abs().sum()) > 0
                       for p in module.parameters())
        losses.append(loss.item())
        opt.step()
    assert losses[-1] < losses[0]
