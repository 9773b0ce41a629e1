"""Gradient criteria (taylor, snip, grasp, crop) against scores computed by hand, and
prune-at-initialisation on real data (scikit-learn's digits): SNIP/GraSP/CroP pick a valid plan
and the pruned network trains."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import spa.torch as st  # noqa: E402
from spa.coupling.analysis import CouplingAnalysis  # noqa: E402
from spa.errors import OptionError  # noqa: E402
from spa.ir.load import load_model  # noqa: E402
from spa.passes.importance import get_criterion  # noqa: E402
from spa.torch.export import export  # noqa: E402
from spa.torch.params import ParamMap  # noqa: E402
from spa.torch.saliency import on_constants, saliency  # noqa: E402


def _mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    return module, torch.randn(16, 4), torch.randint(0, 3, (16,))


def _hidden_group_scores(module, x, y, criterion: str) -> np.ndarray:
    """SPA's per-channel scores of the hidden layer (the one prunable group)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = export(module, (x[:1],), Path(tmp) / "m.onnx")
        loaded = load_model(path)
        params = ParamMap.build(module, onnx.load(str(path)), loaded.graph)
        analysis = CouplingAnalysis(frozen_tensors=params.unmapped).run(loaded)
        crit = get_criterion(criterion)
        sal = on_constants(saliency(module, (x, y), crit.needs), params)
        crit = get_criterion(criterion, saliency=sal)
        (group,) = analysis.prunable_groups
        assert group.size == 6
        return crit.run(analysis).by_group[group.id]


def _by_hand(module, x, y, second_order: bool) -> dict[str, np.ndarray]:
    """w·g or w·Hg with Hg from torch.autograd.functional.hvp (not the front end's double
    backward)."""
    names = [n for n, _ in module.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    shapes = [p.shape for p in module.parameters()]

    def loss_of(flat):
        out, i = {}, 0
        for n, s in zip(names, shapes):
            out[n] = flat[i:i + s.numel()].reshape(s)
            i += s.numel()
        logits = torch.func.functional_call(module, out, (x,))
        return nn.functional.cross_entropy(logits, y)

    flat = flat0.clone().requires_grad_()
    g = torch.autograd.grad(loss_of(flat), flat)[0]
    v = torch.autograd.functional.hvp(loss_of, flat0, g)[1] if second_order else g
    s = (flat0 * v).detach().double().numpy()
    out, i = {}, 0
    for n, sh in zip(names, shapes):
        out[n] = s[i:i + sh.numel()].reshape(tuple(sh))
        i += sh.numel()
    return out


@pytest.mark.parametrize("criterion,second_order,absolute",
                         [("taylor", False, True), ("snip", False, True),
                          ("crop", True, True), ("grasp", True, False)])
def test_gradient_criterion_matches_hand_computed(criterion, second_order, absolute):
    module, x, y = _mlp()
    s = _by_hand(module, x, y, second_order)
    f = np.abs if absolute else (lambda a: a)
    # The hidden channel j owns row j of the first weight (a producer), and column j of the
    # second (a consumer); the bias is not a weight. Mean over those two, normalised per group.
    per_member = np.stack([f(s["0.weight"]).sum(axis=1), f(s["2.weight"]).sum(axis=0)])
    expected = per_member.mean(axis=0)
    if absolute:
        expected = expected / expected.mean()
    else:  # signed scores are standardised (mean division could flip the ranking)
        expected = (expected - expected.mean()) / expected.std()
    got = _hidden_group_scores(module, x, y, criterion)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    assert np.argsort(got).tolist() == np.argsort(expected).tolist()


def test_gradient_criterion_without_a_module_says_how_to_get_one():
    from spa.api import PruneOptions, prune

    with tempfile.TemporaryDirectory() as tmp:
        module, x, _ = _mlp()
        path = export(module, (x[:1],), Path(tmp) / "m.onnx")
        with pytest.raises(OptionError, match="spa.torch.prune"):
            prune(path, Path(tmp) / "o.onnx", PruneOptions(criterion="taylor"))


def _digits():
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()
    x = torch.tensor(d.images[:, None] / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target, dtype=torch.long)
    return x, y


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


@pytest.mark.parametrize("criterion", ["snip", "grasp", "crop"])
def test_prune_at_init_then_train_on_digits(criterion):
    """One batch at initialisation chooses the plan; the pruned network then learns."""
    x, y = _digits()
    module = _cnn()
    module.train()
    _, report = st.prune(module, (x[:1],), criterion=criterion, ratio=0.5,
                         batch=(x[:128], y[:128]))
    assert report.params_after < 0.4 * report.params_before
    assert [m.out_channels for m in module if isinstance(m, nn.Conv2d)] == [16, 32, 32]
    module.train()
    opt = torch.optim.Adam(module.parameters(), lr=3e-3)
    losses = []
    for step in range(80):
        idx = torch.arange(step * 32, step * 32 + 32) % 1500
        opt.zero_grad()
        loss = nn.functional.cross_entropy(module(x[idx]), y[idx])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])


@pytest.mark.parametrize("criterion", ["taylor", "crop"])
def test_onnx_file_with_labels_gives_the_same_plan_as_the_module(criterion, tmp_path):
    """``spa prune --criterion taylor --calib batch.npz`` differentiates the ONNX model itself
    (from_onnx); its plan equals the one the front end makes from the module's own gradients."""
    from spa.cli import main

    x, y = _digits()
    module = _cnn().eval()
    path = export(module, (x[:1],), tmp_path / "m.onnx")
    (name,) = [i.name for i in onnx.load(str(path)).graph.input]
    np.savez(tmp_path / "batch.npz", **{name: x[:64].numpy(), "labels": y[:64].numpy()})
    code = main(["prune", str(path), "-o", str(tmp_path / "p.onnx"), "--criterion", criterion,
                 "--ratio", "0.5", "--calib", str(tmp_path / "batch.npz"),
                 "--plan", str(tmp_path / "plan.json"), "--no-validate", "--held-out", "0",
                 "--allocation", "uniform", "--no-reconstruct"])
    assert code == 0
    from spa.plan import Plan

    from_file = Plan.load(tmp_path / "plan.json")
    _, report = st.prune(module, (x[:1],), criterion=criterion, ratio=0.5,
                         batch=(x[:64], y[:64]))
    assert [g.keep for g in from_file.groups] == [g.keep for g in report.plan.groups]
    assert any(len(g.keep) < g.size for g in from_file.groups)


def _tiny_lm(vocab: int = 11, width: int = 6) -> onnx.ModelProto:
    """input_ids [N, T] → embedding → Tanh → MatMul → logits [N, T, vocab]."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((vocab, width)).astype(np.float32),
                                     "emb"),
             numpy_helper.from_array(rng.standard_normal((width, vocab)).astype(np.float32),
                                     "head")]
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["e"]),
             helper.make_node("Tanh", ["e"], ["h"]),
             helper.make_node("MatMul", ["h", "head"], ["logits"])]
    graph = helper.make_graph(
        nodes, "lm", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", "T"]),
                      helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                                    ["N", "T"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", "T", vocab])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_language_model_on_text_prompts_is_scored_on_next_tokens():
    """A text file gives token prompts but no labels: for a model whose first output scores
    the embedding's vocabulary at each position, the labels are each attended token's next
    token (padding and the last token ignored), so --criterion taylor works on a decoder's
    text calibration; it was refused before ("need ... an integer 'labels' array"). The
    saliencies equal those of the same batch with those labels given."""
    from spa.torch.saliency import IGNORED, onnx_saliency

    model = _tiny_lm()
    ids = np.array([[1, 4, 2, 7, 0], [3, 3, 9, 0, 0]], np.int64)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], np.int64)
    labels = np.array([[4, 2, 7, 0, IGNORED], [3, 9, IGNORED, IGNORED, IGNORED]], np.int64)
    derived = onnx_saliency(model, {"input_ids": ids, "attention_mask": mask}, "wg")
    given = onnx_saliency(model, {"input_ids": ids, "attention_mask": mask, "labels": labels},
                          "wg")
    assert set(derived) == {"emb", "head"}
    for name in derived:
        np.testing.assert_allclose(derived[name], given[name], rtol=1e-6)
        assert np.abs(derived[name]).sum() > 0
    with pytest.raises(OptionError, match="a text file for a language model"):
        onnx_saliency(model, {"attention_mask": mask}, "wg")


def _mixing_lm(causal: bool, vocab: int = 11, width: int = 6) -> onnx.ModelProto:
    """:func:`_tiny_lm` whose hidden state at each token adds the mean over the tokens up to
    it (``causal``: CumSum over T, divided by the position) or over the whole prompt (a masked
    LM's bidirectional mixing: ReduceMean over T)."""
    from onnx import helper, numpy_helper

    model = _tiny_lm(vocab, width)
    g = model.graph
    del g.node[-1]
    if causal:
        pos = numpy_helper.from_array(np.arange(1, 65, dtype=np.float32).reshape(64, 1), "pos")
        g.initializer.extend([pos] + [numpy_helper.from_array(np.array(v, np.int64), name)
                                      for name, v in (("ax", 1), ("zero", [0]), ("one", [1]),
                                                      ("two", [2]))])
        g.node.extend([helper.make_node("CumSum", ["h", "ax"], ["cs"]),
                       helper.make_node("Shape", ["h"], ["shape"]),
                       helper.make_node("Slice", ["shape", "one", "two"], ["t"]),
                       helper.make_node("Slice", ["pos", "zero", "t"], ["p"]),
                       helper.make_node("Div", ["cs", "p"], ["mix"])])
    else:
        g.node.append(helper.make_node("ReduceMean", ["h"], ["mix"], axes=[1], keepdims=1))
    g.node.extend([helper.make_node("Add", ["h", "mix"], ["hm"]),
                   helper.make_node("MatMul", ["hm", "head"], ["logits"])])
    return model


def test_next_token_labels_only_for_a_model_that_reads_left_to_right():
    """A masked (bidirectional) language model's scores at a token see the tokens after it:
    next-token labels from a text file would score it on a task it was never trained for, so
    the text file is refused by name (before, it was scored on next tokens, silently). A
    causal model mixing tokens left to right still gets the labels derived."""
    import onnxruntime as ort

    from spa.torch.saliency import onnx_saliency

    ids = np.array([[1, 4, 2, 7, 0], [3, 3, 9, 0, 0]], np.int64)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], np.int64)
    calib = {"input_ids": ids, "attention_mask": mask}
    for causal in (True, False):  # the models run in onnxruntime: they are valid graphs
        ort.InferenceSession(_mixing_lm(causal).SerializeToString()).run(None, calib)
    assert {"emb", "head"} <= set(onnx_saliency(_mixing_lm(True), calib, "wg"))
    with pytest.raises(OptionError, match="depend on the tokens after it"):
        onnx_saliency(_mixing_lm(False), calib, "wg")
    labels = np.where(mask != 0, ids, -100)  # labels given: any model is scored on them
    assert set(onnx_saliency(_mixing_lm(False), {**calib, "labels": labels}, "wg")) \
        == {"emb", "head"}


def test_a_masked_lm_is_scored_on_tokens_it_cannot_see(tmp_path):
    """A bidirectional LM given the tokenizer's mask token: 15% of each prompt's inner tokens
    (at least one; never the first or last) are replaced by it and labelled with what they
    hid, BERT's objective; the saliencies equal those of the same masked batch with its labels
    given. Without a mask token the text file is refused."""
    from spa.torch.saliency import IGNORED, masked, onnx_saliency
    from tests.test_calibration import tokenizer_file

    words = {f"w{i}": i for i in range(10)}
    tok = str(tokenizer_file(tmp_path / "tok", {**words, "[UNK]": 1, "[MASK]": 10}))
    no_mask = str(tokenizer_file(tmp_path / "plain", {**words, "[UNK]": 1}))

    ids = np.array([[1, 4, 2, 7, 3, 5, 6, 8, 9, 2, 0], [3, 3, 9, 4, 0, 0, 0, 0, 0, 0, 0]],
                   np.int64)
    mask = (np.arange(11) < np.array([[11], [4]])).astype(np.int64)
    hidden, labels = masked(ids, mask, mask_id=10)
    shown = labels.numpy() != IGNORED
    assert shown.sum(1).tolist() == [1, 1]  # round(0.15 · 9) and the floor of one (of 2)
    assert not shown[:, 0].any() and not shown[0, 10] and not shown[1, 3]
    assert (hidden[shown] == 10).all() and (labels.numpy()[shown] == ids[shown]).all()
    assert (hidden[~shown] == ids[~shown]).all()
    model = _mixing_lm(False)
    derived = onnx_saliency(model, {"input_ids": ids, "attention_mask": mask}, "wg", tok)
    given = onnx_saliency(model, {"input_ids": hidden, "attention_mask": mask,
                                  "labels": labels.numpy()}, "wg")
    for name in ("emb", "head"):
        np.testing.assert_allclose(derived[name], given[name], rtol=1e-6)
        assert np.abs(derived[name]).sum() > 0
    for without in (None, no_mask):
        with pytest.raises(OptionError, match="no mask token"):
            onnx_saliency(model, {"input_ids": ids, "attention_mask": mask}, "wg", without)


def test_taylor_on_a_masked_lm_with_a_text_file(tmp_path):
    """The CLI: --criterion taylor on a bidirectional LM, calibrated by a text file whose
    tokenizer has [MASK], prunes (before: it was scored on next tokens)."""
    from spa.cli import main
    from spa.errors import ExitCode
    from tests.test_calibration import tokenizer_file

    vocab = {"[PAD]": 0, "[UNK]": 1, "[MASK]": 2, **{w: i + 3 for i, w in enumerate(
        "the cat sat on a mat and dog ran".split())}}
    tok = tokenizer_file(tmp_path / "tok", vocab)
    onnx.save(_mixing_lm(False, vocab=len(vocab), width=8), str(tmp_path / "mlm.onnx"))
    text = tmp_path / "lines.txt"
    text.write_text("\n".join(["the cat sat on a mat", "the dog ran on a mat and sat",
                               "a cat and a dog sat"] * 12) + "\n")
    out = tmp_path / "small.onnx"
    assert main(["prune", str(tmp_path / "mlm.onnx"), "-o", str(out), "--criterion", "taylor",
                 "--calib", str(text), "--tokenizer", str(tok), "--max-length", "8",
                 "--ratio", "0.5", "-q"]) == ExitCode.OK
    assert out.stat().st_size < (tmp_path / "mlm.onnx").stat().st_size
