"""``spa recover``: distillation from the dense model wins back held-out fidelity.

A tiny CNN classifier, pruned by SPA at l1 ratio 0.5 without reconstruction, distilled on random
calibration data with a fixed seed. Held-out fidelity is measured by onnxruntime on samples
that never train; a run that makes it worse writes the pruned model unchanged, and an
interrupted run writes nothing.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

import spa.torch as st  # noqa: E402
from spa import fidelity  # noqa: E402
from spa.api import CheckOptions, PruneOptions, prune  # noqa: E402
from spa.calibration import Calibration, CalibrationOptions, split  # noqa: E402
from spa.cli import main  # noqa: E402
from spa.errors import OptionError  # noqa: E402
from spa.recovery import TORCH_MISSING, RecoverOptions  # noqa: E402
from spa.torch import augment, distill  # noqa: E402
from spa.torch import recover as rec  # noqa: E402

ROOT = Path(__file__).parents[1]
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    """(dense, pruned): a small CNN classifier with varied BatchNorm statistics, and SPA's
    l1 prune of half its channels with no reconstruction (exact counts: the default rounds
    the 16-channel group a conv reads up to its kernel block, i.e. keeps it whole)."""
    d = tmp_path_factory.mktemp("recover")
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.BatchNorm2d(32),
        torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(32, 10)).eval()
    with torch.no_grad():
        for m in net:
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(0.0, 0.3)
                m.bias.uniform_(-0.2, 0.2)
    dense, pruned = d / "dense.onnx", d / "pruned.onnx"
    torch.onnx.export(net, (torch.randn(2, 3, 16, 16),), str(dense), input_names=["x"],
                      output_names=["logits"], dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}},
                      dynamo=False)
    prune(dense, pruned, PruneOptions(ratio=0.5, criterion="l1", reconstruct=False, round_to=1),
          CheckOptions(validate=False, latency=False))
    return dense, pruned


def _samples(n: int = 160) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(0).standard_normal((n, 3, 16, 16)).astype(np.float32)}


@pytest.fixture(scope="module")
def calibration() -> Calibration:
    train, held = split(_samples(), 0.2, seed=0)
    return Calibration(train, held, "npz", "memory")


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".spa-"))


def test_recovery_lowers_held_out_error(models, calibration, tmp_path):
    dense, pruned = models
    out = tmp_path / "recovered.onnx"
    report = rec.recover(dense, pruned, out, calibration,
                         RecoverOptions(steps=50, batch_size=16, seed=0))
    assert report.kept == rec.KEPT_RECOVERED and report.world_size == 1
    assert report.lr in distill.LR_TRIALS and set(report.lr_trials) == {
        f"{lr:g}" for lr in distill.LR_TRIALS}
    trials = {float(k): m for k, m in report.lr_trials.items()}
    assert report.lr == distill.pick_lr(report.fidelity_before, trials)
    before = report.fidelity_before["relative_error"]
    after = report.fidelity_after["relative_error"]
    assert before > 0.15 and after < 0.85 * before  # measured: 0.197 -> 0.151
    # The written model is what the report measured, in onnxruntime, on the held-out samples.
    again = fidelity.measure(dense, out, calibration.held_out)
    assert again["relative_error"] == pytest.approx(after, rel=1e-6)
    names = {i.name for i in onnx.load(str(pruned)).graph.initializer}
    assert {i.name for i in onnx.load(str(out)).graph.initializer} == names
    assert 0 < report.steps <= 50 and _leftovers(tmp_path) == []


def test_a_model_fixed_at_one_sample_trains_one_sample_at_a_time(models, calibration,
                                                                  tmp_path):
    """An export with a static batch of 1 (its shapes may hold it) trains in chunks of one:
    the same steps as the symbolic-batch model's, to float rounding. It was refused before
    ("spa recover needs a symbolic batch axis")."""
    dense, pruned = models
    fixed = []
    for path in (dense, pruned):
        model = onnx.load(str(path))
        for v in (*model.graph.input, *model.graph.output):
            v.type.tensor_type.shape.dim[0].dim_value = 1
        fixed.append(tmp_path / f"fixed_{path.name}")
        onnx.save(model, str(fixed[-1]))
    options = RecoverOptions(steps=20, batch_size=16, seed=0, lr=1e-3)
    free = rec.recover(dense, pruned, tmp_path / "free.onnx", calibration, options)
    one = rec.recover(*fixed, tmp_path / "one.onnx", calibration, options)
    assert free.kept == one.kept == rec.KEPT_RECOVERED and one.steps == free.steps > 0
    for k, v in free.fidelity_after.items():
        assert one.fidelity_after[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    assert one.fidelity_after["relative_error"] < 0.9 * one.fidelity_before["relative_error"]


def test_inputs_fixing_different_batch_sizes_are_refused():
    inputs = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [b, 3])
              for n, b in (("a", 1), ("b", 2))]
    graph = onnx.helper.make_graph([onnx.helper.make_node("Add", ["a", "b"], ["y"])], "g",
                                   inputs, [onnx.helper.make_tensor_value_info(
                                       "y", onnx.TensorProto.FLOAT, None)])
    module = st.from_onnx(onnx.helper.make_model(graph))
    assert module.fixed_sizes == {"a": 1, "b": 2} and module.fixed_batch is None
    with pytest.raises(OptionError, match=r"different batch sizes \[1, 2\]: 'a' 1, 'b' 2"):
        distill.fixed_batch(module)


@pytest.mark.parametrize("rates, forced, chosen", [
    ((*distill.LR_TRIALS, 0.3), None, 1e-3),  # the pick (1e-3) beats a rate that diverges
    ((1e-5, 1e-3), 1e-5, 1e-3),  # a pick made too small (forced) loses to the larger rate
])
def test_a_long_budget_checks_the_picked_rate_against_the_next_larger_one(
        models, calibration, tmp_path, monkeypatch, rates, forced, chosen):
    """With checks allowed (here from 1 step: 5% of 50 steps is 2), the trials' pick and the
    next larger rate each train 2 steps from the start, and the more faithful one on the
    validation runs trains the full budget; the report lists both checks."""
    dense, pruned = models
    monkeypatch.setattr(distill, "CHECK_MIN_STEPS", 1)
    monkeypatch.setattr(distill, "LR_TRIALS", rates)
    if forced is not None:
        monkeypatch.setattr(distill, "pick_lr", lambda start, results: forced)
    report = rec.recover(dense, pruned, tmp_path / "r.onnx", calibration,
                         RecoverOptions(steps=50, batch_size=16, seed=0))
    trials = {float(k): m for k, m in report.lr_trials.items()}
    pick = distill.pick_lr(report.fidelity_before, trials)
    larger = rates[rates.index(pick) + 1]
    assert set(report.lr_checks) == {f"{pick:g}", f"{larger:g}"}
    a, b = report.lr_checks[f"{pick:g}"], report.lr_checks[f"{larger:g}"]
    assert report.lr == (larger if fidelity.better(b, a) else pick) == chosen
    # Nothing both graphs share was moved by pruning (every width changed): no weight to check.
    assert report.weight_checks == {} and report.matched_weight == 0.0


def test_a_long_budget_checks_a_heavier_matched_value_weight(tmp_path, monkeypatch):
    """After the learning rate's checks, the chosen rate trains one more check with the
    matched-value loss weighted :data:`MATCHED_HEAVY`; the more faithful weight on the validation
    runs trains the full budget. A weight the user gives is not checked."""
    dense, pruned, calibration, distiller = _residual_mlp(tmp_path)
    assert distiller.matched
    monkeypatch.setattr(distill, "CHECK_MIN_STEPS", 1)
    report = rec.recover(dense, pruned, tmp_path / "r.onnx", calibration,
                         RecoverOptions(steps=50, batch_size=16))
    base = report.lr_checks[f"{report.lr:g}"]
    light, heavy = f"{distill.MATCHED_WEIGHT:g}", f"{distill.MATCHED_HEAVY:g}"
    assert set(report.weight_checks) == {light, heavy}
    assert report.weight_checks[light] == base
    assert report.weight_checks[heavy] != base  # the weight changes training
    assert report.matched_weight == (distill.MATCHED_HEAVY
                                     if fidelity.better(report.weight_checks[heavy], base)
                                     else distill.MATCHED_WEIGHT)
    given = rec.recover(dense, pruned, tmp_path / "g.onnx", calibration,
                        RecoverOptions(steps=50, batch_size=16, matched_weight=3.0))
    assert given.matched_weight == 3.0 and given.weight_checks == {}
    # The pick is the largest rate: checked alone only as the weight check's base.
    assert report.lr == distill.LR_TRIALS[-1] and given.lr == report.lr
    assert set(report.lr_checks) == {f"{report.lr:g}"} and given.lr_checks == {}


def test_checks_take_a_share_of_the_budget_and_only_when_it_is_long():
    steps = distill.Distiller.check_steps
    assert distill.CHECK_MIN_STEPS == 120 and distill.CHECK_SHARE == 0.05
    assert steps(2400, None, 1.0) == 120 and steps(2399, None, 1.0) == 0
    assert steps(None, 3600.0, 0.5) == 360  # an hour at 0.5 s a step: 7200 steps
    assert steps(None, 300.0, 0.5) == 0  # 30 steps: no more than a trial says
    assert steps(3000, 3600.0, 0.5) == 150  # both budgets: the smaller
    assert steps(None, None, 0.5) == 0


def test_recovery_is_judged_on_runs_of_the_training_samples_not_the_held_out_split():
    """The learning rate and early stopping are judged on two contiguous runs of the training
    samples (views of one photo come in runs; a random pick would share their photos), which
    never train; the held-out split stays out of both. Under 8 training samples the held-out
    split judges."""
    ids = np.arange(200, dtype=np.float32)
    train, held = split({"x": ids}, 0.2, seed=0)
    fit, judge = distill.judged(Calibration(train, held, "npz", "memory"))
    assert len(judge["x"]) == 20 and len(fit["x"]) == 140
    assert sorted([*fit["x"], *judge["x"]]) == sorted(train["x"])  # disjoint, complete
    position = np.flatnonzero(np.isin(train["x"], judge["x"]))
    assert list(position) == [*range(70, 80), *range(150, 160)]  # the last 16th of each half
    assert not set(judge["x"]) & set(held["x"])
    few = Calibration({"x": ids[:6]}, {"x": ids[6:8]}, "npz", "memory")
    fit, judge = distill.judged(few)
    assert list(fit["x"]) == list(ids[:6]) and list(judge["x"]) == [6, 7]


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 32), torch.nn.Linear(32, 8)

    def forward(self, x):
        return x + self.b(torch.relu(self.a(x)))


def _residual_mlp(tmp_path: Path) -> tuple[Path, Path, Calibration, distill.Distiller]:
    """(dense, pruned, calibration, distiller): three residual blocks and an L2-normalised
    6-wide embedding, the blocks' inner widths pruned by half."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(_Block(), _Block(), _Block(), torch.nn.Linear(8, 6)).eval()
    dense, pruned = tmp_path / "dense.onnx", tmp_path / "pruned.onnx"
    torch.onnx.export(_Normalised(net), (torch.randn(2, 8),), str(dense), input_names=["x"],
                      output_names=["emb"], dynamic_axes={"x": {0: "n"}, "emb": {0: "n"}},
                      dynamo=False)
    prune(dense, pruned, PruneOptions(ratio=0.5, reconstruct=False),
          CheckOptions(validate=False, latency=False))
    samples = np.random.default_rng(0).standard_normal((160, 8)).astype(np.float32)
    calibration = Calibration(*split({"x": samples}, 0.2, seed=0), "npz", "memory")
    pruned_proto = onnx.load(str(pruned))
    distiller = distill.Distiller(onnx.load(str(dense)), pruned_proto,
                                  rec.graph_inputs(pruned_proto), calibration,
                                  RecoverOptions(), distill.World(0, 1, torch.device("cpu")))
    return dense, pruned, calibration, distiller


def test_shared_activations_are_matched_and_embeddings_recover(tmp_path):
    """A residual MLP with an L2-normalised embedding: pruning the inner widths leaves the
    residual stream, which the student is pulled towards; the output is not class scores."""
    dense, pruned, calibration, distiller = _residual_mlp(tmp_path)
    residual = [n for n in distiller.matched if n.endswith("Add_output_0")]
    assert len(residual) == 3 and distiller.scores == [False]
    # Batches are not augmented: the teacher answered every training sample once, outputs and
    # matched values, in order.
    assert distiller.answers is not None and list(distiller.answers[1]) == distiller.matched
    assert distiller.teacher is None and distiller.ort_teacher is None  # nothing else answers
    with torch.no_grad():
        live = distill._teacher(onnx.load(str(dense)), torch.device("cpu"))(
            *distiller.train_data, capture=distiller.matched)
    torch.testing.assert_close(distiller.answers[0][0], live[0][0])
    torch.testing.assert_close(distiller.answers[1][residual[1]], live[1][residual[1]])
    report = rec.recover(dense, pruned, tmp_path / "r.onnx", calibration,
                         RecoverOptions(steps=50, batch_size=16))
    before = report.fidelity_before["relative_error"]
    after = report.fidelity_after["relative_error"]
    assert before > 0.15 and after < 0.7 * before  # measured: 0.206 -> 0.103
    assert report.measure == "cosine" and "agreement" not in report.fidelity_after


@pytest.mark.parametrize("values, matched", [(2, 2), (-1, None)])
def test_answers_keep_what_fits_in_their_memory(tmp_path, monkeypatch, values, matched):
    """Room for the outputs and two matched values keeps two of the three, the first and the
    last; no room for the outputs leaves the teacher answering each batch, with all three."""
    dense, *_, distiller = _residual_mlp(tmp_path)
    n = len(distiller.train_data[0])
    outputs, value = n * 6 * 4, n * 8 * 4  # float32 [n, 6] and [n, 8]
    monkeypatch.setattr(distill, "ANSWERS_BYTES", outputs + values * value)
    names = distiller.matched
    got = distiller._answers(distill._teacher(onnx.load(str(dense)), torch.device("cpu")))
    if matched is None:
        assert got is None and distiller.matched == names
    else:
        assert got is not None and distiller.matched == [names[0], names[-1]]
        assert list(got[1]) == distiller.matched


class _Normalised(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return torch.nn.functional.normalize(self.net(x), dim=-1)


def test_channels_last_training_layout_changes_no_value(models):
    """Recovery trains convolutions in channels-last memory (faster on CPU): the module computes
    the same outputs, and the written model holds the same bytes in ONNX's C order."""
    from spa.torch.interpreter import from_onnx

    pruned = onnx.load(str(models[1]))
    x = torch.from_numpy(_samples(8)["x"])
    plain = from_onnx(pruned).eval()
    nhwc = distill._channels_last(from_onnx(pruned).eval())
    convs = [p for p in nhwc.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last)
                         and not p.is_contiguous() for p in convs)
    (fed,) = distill._nhwc([x])
    assert fed.is_contiguous(memory_format=torch.channels_last) and torch.equal(fed, x)
    with torch.no_grad():
        torch.testing.assert_close(nhwc(fed), plain(x), rtol=1e-5, atol=1e-6)
    written = rec.written_back(pruned, nhwc)
    assert [i.SerializeToString() for i in written.graph.initializer] == \
        [i.SerializeToString() for i in pruned.graph.initializer]


def test_time_budget_bounds_the_run(models, calibration, tmp_path):
    """With --time-budget the trials and the run share the seconds; no step count is set."""
    dense, pruned = models
    report = rec.recover(dense, pruned, tmp_path / "r.onnx", calibration,
                         RecoverOptions(time_budget=2.0, batch_size=16))
    assert report.steps > 0 and len(report.lr_trials) == len(distill.LR_TRIALS)
    assert report.seconds < 2.0 + 3.0  # + set-up, validation and writing
    assert report.fidelity_after["relative_error"] < report.fidelity_before["relative_error"]


def test_worse_recovery_writes_the_start_unchanged(models, calibration, tmp_path, caplog):
    dense, pruned = models
    out = tmp_path / "recovered.onnx"
    with caplog.at_level(logging.WARNING, logger="spa.torch.recover"):
        report = rec.recover(dense, pruned, out, calibration,
                             RecoverOptions(steps=10, lr=10.0, batch_size=16))
    assert report.kept == rec.KEPT_START
    assert report.fidelity_after == report.fidelity_before
    assert out.read_bytes() == pruned.read_bytes()
    # Every evaluation was worse, so the run ended in its start: said as such.
    assert "no state of the run was more faithful than the start" in caplog.text
    assert "writing the pruned model unchanged" in caplog.text


def test_interrupt_leaves_nothing(models, calibration, tmp_path, monkeypatch):
    dense, pruned = models
    out = tmp_path / "recovered.onnx"
    steps = []
    original = distill.Distiller._step

    def interrupted(self, opt):
        steps.append(1)
        if len(steps) == 3:
            raise KeyboardInterrupt
        return original(self, opt)

    monkeypatch.setattr(distill.Distiller, "_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        rec.recover(dense, pruned, out, calibration, RecoverOptions(steps=10, lr=1e-3))
    assert not out.exists() and _leftovers(tmp_path) == []

    monkeypatch.setattr(distill.Distiller, "_step", original)

    def write_interrupted(model, path, **kw):
        path.write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(rec, "write_proto", write_interrupted)
    with pytest.raises(KeyboardInterrupt):
        rec.recover(dense, pruned, out, calibration, RecoverOptions(steps=4, lr=1e-3))
    assert not out.exists() and _leftovers(tmp_path) == []


def test_mismatched_models_are_refused(models, calibration, tmp_path):
    dense, pruned = models
    other = onnx.load(str(pruned))
    other.graph.input[0].name = "image"
    for node in other.graph.node:
        node.input[:] = ["image" if i == "x" else i for i in node.input]
    with pytest.raises(OptionError, match=r"different graph inputs: \['x'\] \(dense\) vs "
                       r"\['image'\] \(pruned\)"):
        rec.recover(dense, other, tmp_path / "o.onnx", calibration)
    assert not (tmp_path / "o.onnx").exists()


def test_synthetic_calibration_is_refused_by_name(models, tmp_path, capsys):
    """`spa recover --calib synthetic` trains on nothing real: refused (exit 2) with the
    reason, not as a missing file named "synthetic"."""
    dense, pruned = models
    out = tmp_path / "r.onnx"
    assert main(["recover", str(dense), str(pruned), "-o", str(out), "--calib", "synthetic",
                 "-q"]) == 2
    assert "--calib synthetic has none" in capsys.readouterr().err and not out.exists()


def test_a_larger_learning_rate_wins_with_half_the_best_trial_gain():
    # The post-training MiniLM's trials (held-out cosine from 0.92266): 1e-5 and 3e-5 gained
    # about the same in a few steps; 3e-5 then gained more over the full run.
    start = {"cosine": 0.92266}
    trials = {1e-5: {"cosine": 0.92313}, 3e-5: {"cosine": 0.92311},
              1e-4: {"cosine": 0.92015}, 3e-4: {"cosine": 0.90503}, 1e-3: {"cosine": 0.82666}}
    assert distill.pick_lr(start, trials) == 3e-5
    trials[3e-5] = {"cosine": 0.92285}  # gained 0.00019 of the best 0.00047: under half
    assert distill.pick_lr(start, trials) == 1e-5
    # No trial gains: the most faithful, ties broken by the relative error.
    worse = {1e-5: {"relative_error": 0.3}, 1e-4: {"relative_error": 0.2}}
    assert distill.pick_lr({"relative_error": 0.1}, worse) == 1e-4
    assert distill.pick_lr({"relative_error": 0.4}, worse) == 1e-4
    worse[1e-3] = {"relative_error": 0.26}  # gains 0.14 of the best 0.2
    assert distill.pick_lr({"relative_error": 0.4}, worse) == 1e-3


def test_classifier_trials_are_weighed_by_kl_not_one_sample_flips():
    # 26 held-out images: one image is 0.038 of agreement, within sampling noise.
    start = {"agreement": 0.6538, "kl": 0.126, "samples": 26}
    trials = {1e-5: {"agreement": 0.6538, "kl": 0.124, "samples": 26},
              1e-4: {"agreement": 0.6154, "kl": 0.110, "samples": 26},  # one flip, KL -0.016
              1e-3: {"agreement": 0.6923, "kl": 0.190, "samples": 26}}  # one flip, KL +0.064
    assert distill.pick_lr(start, trials) == 1e-4
    # Beyond the noise (1000 samples), agreement decides.
    big = {lr: {**m, "samples": 1000} for lr, m in trials.items()}
    assert distill.pick_lr({**start, "samples": 1000}, big) == 1e-3


def test_token_dropout_spares_first_and_last_tokens():
    mask = torch.ones(64, 20, dtype=torch.int64)
    mask[:, 15:] = 0
    dropped = augment.drop_tokens(mask, np.random.default_rng(0), 0.1)
    assert (dropped[:, [0, 14]] == 1).all() and (dropped[:, 15:] == 0).all()
    share = 1 - dropped[:, 1:14].float().mean().item()
    assert 0.07 < share < 0.13


def test_token_batches_are_cut_after_the_last_attended_column():
    mask = torch.zeros(3, 10, dtype=torch.int64)
    mask[0, :4], mask[1, :6], mask[2, :2] = 1, 1, 1
    ids = torch.arange(30).reshape(3, 10)
    kinds = augment.input_kinds(_token_inputs("sequence"))
    assert kinds.mask == 1 and kinds.trimmed == (0, 1)
    cut_ids, cut_mask = augment.trim_padding([ids, mask], kinds)
    assert cut_ids.shape == cut_mask.shape == (3, 6)
    assert torch.equal(cut_ids, ids[:, :6]) and torch.equal(cut_mask, mask[:, :6])
    # A fixed sequence length is never cut; nor is a batch whose last column is attended.
    fixed = augment.input_kinds(_token_inputs(10))
    assert fixed.mask == 1 and fixed.trimmed == ()
    assert augment.trim_padding([ids, mask], fixed)[0].shape == (3, 10)
    mask[2, 9] = 1
    assert augment.trim_padding([ids, mask], kinds)[0].shape == (3, 10)
    assert augment.trim_padding([ids, torch.zeros_like(mask)], kinds)[0].shape == (3, 1)


def _token_inputs(length: int | str) -> list[rec.GraphInput]:
    return [rec.GraphInput(n, np.dtype("int64"), ("batch", length))
            for n in ("input_ids", "attention_mask")]


def _padded_cost(mask: torch.Tensor, batches: list[np.ndarray]) -> float:
    """Token positions the trimmed batches cost, over the attended tokens they hold."""
    lengths = mask.sum(1).numpy()
    return sum(len(b) * lengths[b].max() for b in batches) / sum(lengths[b].sum() for b in batches)


def test_token_batches_group_samples_of_similar_length():
    # Sentence lengths like fortunes' (median about 18 tokens, a long tail), padded to 128.
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(18), 0.6, 1000).astype(int), 3, 128)
    mask = torch.from_numpy((np.arange(128)[None] < lengths[:, None]).astype(np.int64))
    ids = torch.zeros_like(mask)
    kinds = augment.input_kinds(_token_inputs("sequence"))
    draws = augment.Batches([ids, mask], kinds, 32, np.random.default_rng(1))
    epoch = [draws.next() for _ in range(1000 // 32)]
    taken = np.concatenate(epoch)
    assert all(len(b) == 32 for b in epoch) and len(set(taken.tolist())) == len(taken)
    plain = augment.Batches([ids, mask], augment.input_kinds(_token_inputs(128)), 32,
                            np.random.default_rng(1))
    random_epoch = [plain.next() for _ in range(1000 // 32)]
    # Random batches pay for about three times the tokens they hold; grouped ones for a fifth
    # more.
    assert _padded_cost(mask, random_epoch) > 2.5
    assert _padded_cost(mask, epoch) < 1.3
    # The same seed draws the same batches (every learning-rate trial sees the same data).
    again = augment.Batches([ids, mask], kinds, 32, np.random.default_rng(1))
    assert all(np.array_equal(a, again.next()) for a in epoch)


def test_normalised_squared_error_is_the_ratio_of_means():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(4, 8, 5, 5, generator=g, requires_grad=True)
    t = torch.randn(4, 8, 5, 5, generator=g)  # the teacher's value
    loss = distill._nmse(s, t)
    expected = ((s - t) ** 2).mean() / (t ** 2).mean()
    assert abs(loss.item() - expected.item()) < 1e-6 * expected.item()
    loss.backward()
    grad = 2 * (s - t).detach() / s.numel() / (t.detach() ** 2).mean()
    assert torch.allclose(s.grad, grad, rtol=1e-5, atol=1e-9)


def test_image_augmentation_keeps_shape_and_layout():
    rng = np.random.default_rng(0)
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    kinds = augment.input_kinds([rec.GraphInput("x", np.dtype("float32"), ("n", 3, 8, 8)),
                                  rec.GraphInput("y", np.dtype("float32"), ("n", 8, 8, 3))])
    assert kinds.images == {0: 1, 1: 3} and kinds.mask is None
    a, b = augment.augment([x, x.permute(0, 2, 3, 1)], kinds, rng, 0.0)
    assert a.shape == x.shape and b.shape == (2, 8, 8, 3)
    assert not torch.equal(a, x) and float(a.min()) >= 0 and float(a.max()) <= float(x.max())


def _npz(tmp_path: Path) -> Path:
    path = tmp_path / "calib.npz"
    np.savez(path, **_samples(80))
    return path


def test_cli_end_to_end(models, tmp_path, capsys):
    dense, pruned = models
    out, report = tmp_path / "r.onnx", tmp_path / "r.json"
    code = main(["recover", str(dense), str(pruned), "-o", str(out), "--calib",
                 str(_npz(tmp_path)), "--steps", "20", "--lr", "1e-3", "--batch-size", "16",
                 "--held-out", "0.25", "--report", str(report), "--json", "-q"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert json.loads(report.read_text()) == printed
    assert printed["lr"] == 1e-3 and printed["lr_trials"] == {} and printed["output"] == str(out)
    assert printed["kept"] == rec.KEPT_RECOVERED and out.exists()
    assert printed["fidelity_after"]["relative_error"] < printed["fidelity_before"][
        "relative_error"]


def test_cli_held_out_data_trains_on_all_of_calib_and_measures_on_the_other_file(
        models, tmp_path, capsys):
    dense, pruned = models
    held = tmp_path / "held.npz"
    x = np.random.default_rng(5).standard_normal((24, 3, 16, 16)).astype(np.float32)
    np.savez(held, x=x)
    out, calib = tmp_path / "r.onnx", _npz(tmp_path)
    assert main(["recover", str(dense), str(pruned), "-o", str(out), "--calib", str(calib),
                 "--held-out-data", str(held), "--steps", "20", "--lr", "1e-3",
                 "--batch-size", "16", "-q"]) == 0
    printed = capsys.readouterr().out
    assert f"on held-out samples of {held}:" in printed
    report = rec.recover(dense, pruned, tmp_path / "again.onnx", rec.calibration_for(
        pruned, str(calib), CalibrationOptions(held_out_data=str(held))),
        RecoverOptions(steps=20, lr=1e-3, batch_size=16))
    assert report.calibration == {"path": str(calib), "kind": "npz", "samples": 80,
                                  "held_out": 24, "held_out_path": str(held)}
    assert report.fidelity_before == fidelity.measure(dense, pruned, {"x": x})
    assert (tmp_path / "again.onnx").read_bytes() == out.read_bytes()


def test_without_torch_the_command_says_how_to_install(models, tmp_path):
    dense, pruned = models
    code = ("import sys; sys.modules['torch'] = None; from spa.cli import main; "
            f"raise SystemExit(main(['recover', {str(dense)!r}, {str(pruned)!r}, '-o', "
            f"{str(tmp_path / 'o.onnx')!r}, '--calib', {str(_npz(tmp_path))!r}]))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == f"spa: error: {TORCH_MISSING}"


def test_two_processes_with_torchrun(models, tmp_path):
    """``torchrun --nproc-per-node 2``: gloo on CPU, DDP student; process 0 alone writes."""
    dense, pruned = models
    out, report = tmp_path / "r.onnx", tmp_path / "r.json"
    scratch = tmp_path / "tmp"  # torchrun's own log folder goes here, not in /tmp
    scratch.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TMPDIR": str(scratch)}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "spa", "recover", str(dense), str(pruned), "-o", str(out), "--calib",
         str(_npz(tmp_path)), "--steps", "10", "--lr", "1e-3", "--batch-size", "16",
         "--report", str(report), "--json", "-q"],
        capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    written = json.loads(report.read_text())
    assert written["world_size"] == 2 and written["steps"] > 0
    assert json.loads(done.stdout) == written  # one JSON document: process 1 prints nothing
    again = fidelity.measure(dense, out, _held_out(tmp_path))
    assert again["relative_error"] == pytest.approx(
        written["fidelity_after"]["relative_error"], rel=1e-6)


def _held_out(tmp_path: Path) -> dict[str, np.ndarray]:
    return split(_samples(80), 0.1, seed=0)[1]


def test_recover_reads_its_table_of_a_config_file(tmp_path):
    from spa.cli import _parse, build_parser

    config = tmp_path / "spa.toml"
    config.write_text("[prune]\nratio = 0.5\n\n[recover]\nsteps = 3\nlr = 0.001\n")
    args = _parse(build_parser(), ["recover", "d.onnx", "p.onnx", "-o", "o.onnx", "--calib",
                                   "c.npz", "--config", str(config)])
    assert (args.steps, args.lr) == (3, 0.001)


class _Pooled(torch.nn.Module):
    """Token ids → embedding → MLP per token → mean over the attended tokens: a sentence
    embedding ``[N, 8]`` (``tokens=True``: the per-token states ``[N, T, 8]`` instead)."""

    def __init__(self, tokens: bool = False):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 8)
        self.a, self.b = torch.nn.Linear(8, 32), torch.nn.Linear(32, 8)
        self.tokens = tokens

    def forward(self, ids, mask):
        h = self.emb(ids)
        h = h + self.b(torch.relu(self.a(h)))
        if self.tokens:
            return h
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1.0)


def _pooled_distiller(tmp_path: Path, tokens: bool, options: RecoverOptions
                     ) -> distill.Distiller:
    """:class:`_Pooled` and its inner widths pruned by half, on 96 random sentences of 1 to
    29 tokens padded to 40, in random order."""
    torch.manual_seed(0)
    dense, pruned = tmp_path / "dense.onnx", tmp_path / "pruned.onnx"
    axes = {"ids": {0: "n", 1: "t"}, "mask": {0: "n", 1: "t"},
            "out": {0: "n", 1: "t"} if tokens else {0: "n"}}
    torch.onnx.export(_Pooled(tokens).eval(), (torch.zeros(2, 5, dtype=torch.int64),
                                               torch.ones(2, 5, dtype=torch.int64)),
                      str(dense), input_names=["ids", "mask"], output_names=["out"],
                      dynamic_axes=axes, dynamo=False)
    prune(dense, pruned, PruneOptions(ratio=0.5, reconstruct=False),
          CheckOptions(validate=False, latency=False))
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 30, 96)
    mask = (np.arange(40)[None] < lengths[:, None]).astype(np.int64)
    ids = rng.integers(1, 50, (96, 40)) * mask
    calibration = Calibration(*split({"ids": ids, "mask": mask}, 0.25, seed=0), "npz", "memory")
    proto = onnx.load(str(pruned))
    return distill.Distiller(onnx.load(str(dense)), proto, rec.graph_inputs(proto),
                             calibration, options, distill.World(0, 1, torch.device("cpu")))


def test_a_sentence_model_is_answered_once_and_trains_the_same(tmp_path):
    """Without token dropout the teacher answers each training sentence once (cut after its
    batch's last attended column, like the training batches), and five steps train the
    student as the teacher answering each batch does; the shared per-token states are then
    not matched (they have a token axis). With token dropout, it answers each batch."""
    distiller = _pooled_distiller(tmp_path, False, RecoverOptions(batch_size=8,
                                                                   token_dropout=0.0))
    assert distiller.answers is not None and distiller.matched == []
    distiller._run(1e-2, 5, None, "answered once", evaluate=False)
    once = distill._state(distiller.student)
    distiller.answers = None
    distiller.teacher = distill._teacher(onnx.load(str(tmp_path / "dense.onnx")),
                                         torch.device("cpu"))
    distiller._run(1e-2, 5, None, "answered each batch", evaluate=False)
    each = distill._state(distiller.student)
    moved = [k for k, v in each.items() if not torch.equal(v, distiller.start_state[k])]
    assert moved
    for k in each:
        torch.testing.assert_close(once[k], each[k], rtol=1e-4, atol=1e-6)
    dropping = _pooled_distiller(tmp_path, False, RecoverOptions(batch_size=8))
    assert RecoverOptions().token_dropout > 0 and dropping.answers is None and dropping.matched


def test_onnxruntime_answers_augmented_batches_as_the_torch_teacher(models, calibration,
                                                                    tmp_path):
    """On CPU the teacher answers each augmented batch in onnxruntime: the same outputs and
    matched values as its torch module (images: crops, flips and mixup; tokens: dropout)."""
    proto = onnx.load(str(models[1]))
    images = distill.Distiller(onnx.load(str(models[0])), proto, rec.graph_inputs(proto),
                               calibration, RecoverOptions(batch_size=16),
                               distill.World(0, 1, torch.device("cpu")))
    tokens = _pooled_distiller(tmp_path, False, RecoverOptions(batch_size=8,
                                                                token_dropout=0.2))
    assert tokens.matched
    cpu = torch.device("cpu")
    for distiller, dense in ((images, models[0]), (tokens, tmp_path / "dense.onnx")):
        # onnxruntime holds the only copy of the teacher's weights while training
        assert distiller.answers is None and distiller.ort_teacher is not None
        assert distiller.teacher is None
        teacher = distill._teacher(onnx.load(str(dense)), cpu)
        for _ in range(3):
            _, batch = distiller._batch()
            out, mid = distiller.ort_teacher(batch)
            with torch.no_grad():
                want, want_mid = distill._forward(teacher, batch, distiller.matched)
            torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(mid, want_mid, rtol=1e-4, atol=1e-5)


def test_a_teacher_onnxruntime_cannot_take_is_answered_in_torch(models, calibration,
                                                                 monkeypatch, caplog):
    """onnxruntime takes models from memory up to 2 GB; past that, the torch module answers."""
    import spa.validate

    def refuse(*args, **kwargs):
        raise spa.validate.ValidationError("the model is too large to pass to onnxruntime")

    monkeypatch.setattr(spa.validate, "session", refuse)
    proto = onnx.load(str(models[1]))
    with caplog.at_level(logging.INFO, logger="spa.torch.distill"):
        distiller = distill.Distiller(onnx.load(str(models[0])), proto,
                                      rec.graph_inputs(proto), calibration,
                                      RecoverOptions(batch_size=16),
                                      distill.World(0, 1, torch.device("cpu")))
    assert distiller.ort_teacher is None and distiller.answers is None
    assert distiller.teacher is not None
    assert "teacher answers in torch (the model is too large" in caplog.text
    ran, _ = distiller._run(1e-3, 2, None, "torch teacher", evaluate=False)
    assert ran == 2


@pytest.mark.parametrize("tokens", [False, True])
def test_evaluation_cuts_padding_when_no_output_has_a_token_axis(tmp_path, tokens):
    distiller = _pooled_distiller(tmp_path, tokens, RecoverOptions(batch_size=8))
    assert distiller.cut_outputs is not tokens
    with torch.no_grad():
        got = distiller._outputs(distiller.student, distiller.held_data)[0]
        distiller.cut_outputs = False
        whole = distiller._outputs(distiller.student, distiller.held_data)[0]
    assert got.shape == whole.shape == ((24, 8) if not tokens else (24, 40, 8))
    # Each sample's embedding is where it was, whatever batch its length put it in.
    np.testing.assert_allclose(got, whole, rtol=1e-5, atol=1e-6)


def test_per_token_outputs_are_distilled_at_attended_tokens():
    """A decoder's logits ``[N, T, V]`` beside the ``[N, T]`` mask: the loss reads the attended
    tokens' rows only, as fidelity does; pooled outputs and unmatched shapes pass whole."""
    import torch

    s, t = torch.randn(2, 4, 5), torch.randn(2, 4, 5)
    real = torch.tensor([[True, True, False, False], [True, True, True, False]])
    a, b = distill.attended(s, t, real)
    assert a.shape == b.shape == (5, 5)
    assert torch.equal(a, s[real]) and torch.equal(b, t[real])
    t_pad = t.clone()
    t_pad[~real] = 100.0  # the teacher's answers at padding change: the loss does not
    assert torch.equal(distill._output_loss(*distill.attended(s, t, real), 1.0, True),
                       distill._output_loss(*distill.attended(s, t_pad, real), 1.0, True))
    pooled = torch.randn(2, 5)
    assert distill.attended(pooled, pooled, real)[0] is pooled
    assert distill.attended(s, t, None)[0] is s


def test_matched_values_are_distilled_at_attended_tokens(tmp_path):
    """The per-token values both graphs share (a pooled sentence model's token states) are
    matched at the attended tokens only: the teacher's values at padding change nothing."""
    distiller = _pooled_distiller(tmp_path, False, RecoverOptions(batch_size=8))
    ids, mask = (t[:8] for t in distiller.train_data)
    real = mask != 0
    assert (~real).any()
    with torch.no_grad():
        _, s = distiller.student(ids, mask, capture=distiller.matched)
        _, t = distill._teacher(onnx.load(str(tmp_path / "dense.onnx")), torch.device("cpu"))(
            ids, mask, capture=distiller.matched)
    per_token = [n for n in distiller.matched if fidelity.per_token(t[n], real)]
    assert per_token
    padded = dict(t)
    for n in per_token:
        padded[n] = t[n].clone()
        padded[n][~real] = 100.0
    loss = distill.matched_loss(s, t, distiller.matched, real)
    assert float(loss) > 0
    assert torch.equal(loss, distill.matched_loss(s, padded, distiller.matched, real))
    assert not torch.equal(loss, distill.matched_loss(s, padded, distiller.matched, None))
