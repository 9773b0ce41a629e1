"""A transformers GPT-2 with its KV cache as plain ONNX ops prunes heads, MLP and the cache.

:func:`models.hf_decoder.decoder_onnx` exports a random-weight two-layer ``GPT2LMHeadModel``
(hidden 32, 4 heads of 8, MLP 128, vocabulary 50) as transformers' ``DynamicCache`` writes it:
``present.<i>.key = Concat(past_key_values.<i>.key, k, axis=2)``, a graph output. Each Concat
pairs its past and present on the head axis (spa/coupling/rules/slicing.py), so a layer's heads
prune with its four cache tensors; the oracle holds on random inputs, and 32 greedy tokens of
the pruned decoder (each step's presents fed back as pasts) equal the masked original's.

A Llama of the same size views its attention output by the hidden state's shape,
``reshape(*hidden.shape[:-1], -1)``, and ONNX shape inference loses the batch and sequence
names through rotary embedding and the mask: the Reshape gives ``[batch, sequence, ?]``. The
output projection's weight fixes that ``?`` (a MatMul runs only when its contracted dims are
equal), so ``heads × head_dim`` merges into it; with grouped-query heads, ``repeat_kv``'s
Expand (its target read through ``Where``) keeps the batch and total names. Both prune their
heads, caches and MLP at batch 2 (spa/ir/load.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from models.hf_decoder import DECODERS, LLAMA_WIDTHS, decoder_onnx  # noqa: E402
from spa.api import analyze  # noqa: E402
from spa.cli import main  # noqa: E402
from spa.coupling import GroupKind  # noqa: E402
from spa.errors import ExitCode  # noqa: E402
from tests.oracle import prune_checked  # noqa: E402

LAYERS, HEADS, HIDDEN, VOCAB = 2, 4, 32, 50
NAMES = [f"{i}.{kv}" for i in range(LAYERS) for kv in ("key", "value")]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> Path:
    return decoder_onnx(tmp_path_factory.mktemp("gpt2") / "gpt2.onnx", "GPT2", n_embd=HIDDEN,
                        n_layer=LAYERS, n_head=HEADS, vocab_size=VOCAB, n_positions=64)


def _shapes(path: Path) -> dict[str, list[int | str]]:
    graph = onnx.load(str(path)).graph
    return {vi.name: [d.dim_value or d.dim_param for d in vi.type.tensor_type.shape.dim]
            for vi in (*graph.input, *graph.output)}


def test_gpt2_cache_pairs_and_groups(gpt2):
    a = analyze(gpt2)
    assert [(c.past[0], c.present[0], c.head_size) for c in a.kv_cache] == \
        [(f"past_key_values.{n}", f"present.{n}", HIDDEN // HEADS) for n in NAMES]
    prunable = sorted((g.kind.value, g.size) for g in a.prunable_groups)
    assert prunable == [("heads", HEADS)] * LAYERS + [("neurons", 4 * HIDDEN)] * LAYERS


def test_gpt2_prunes_heads_mlp_and_the_cache(tmp_path, gpt2):
    out = prune_checked(gpt2, tmp_path, heads_ratio=0.5, mlp_ratio=0.5)
    report = out.report
    assert (report.params_before, report.params_after) == (30606, 18222)
    assert report.masked_relative_diff < 1e-6
    assert report.signature_changes == [
        f"graph {side} '{name}.{n}' axis 1: {HEADS} -> {HEADS // 2}"
        for side, name in (("input", "past_key_values"), ("output", "present")) for n in NAMES]
    assert report.generation == {"tokens": 32, "equal": True}
    shapes = _shapes(out.path)
    for n in NAMES:
        assert shapes[f"past_key_values.{n}"] == ["batch", HEADS // 2, "past", HIDDEN // HEADS]
        assert shapes[f"present.{n}"][:2] == ["batch", HEADS // 2]
    assert shapes["logits"] == ["batch", "sequence", VOCAB]


@pytest.mark.parametrize("kv_heads", [HEADS, 2], ids=["mha", "gqa"])
def test_llama_prunes_heads_and_cache_at_any_batch(tmp_path, kv_heads):
    path = decoder_onnx(tmp_path / "llama.onnx", "Llama",
                        **{**LLAMA_WIDTHS, "num_key_value_heads": kv_heads})
    a = analyze(path)
    heads = sorted(g.size for g in a.groups if g.kind is GroupKind.HEADS and g.prunable)
    assert heads == [kv_heads] * LAYERS  # a group per layer: its key/value heads
    out = prune_checked(path, tmp_path, heads_ratio=0.5, mlp_ratio=0.5,
                        dims={"batch": 2, "sequence": 3, "past": 4, "total": 7})
    assert out.report.masked_relative_diff < 1e-6
    assert out.report.signature_changes == [
        f"graph {side} '{name}.{n}' axis 1: {kv_heads} -> {kv_heads // 2}"
        for side, name in (("input", "past_key_values"), ("output", "present")) for n in NAMES]
    assert out.report.generation == {"tokens": 32, "equal": True}
    assert _shapes(out.path)["past_key_values.0.key"] == \
        ["batch", kv_heads // 2, "past", HIDDEN // HEADS]


@pytest.mark.parametrize("kind", [pytest.param(k, marks=[] if k == "Falcon" else
                                               pytest.mark.slow) for k in DECODERS
                                  if k != "Llama"])  # Llama: the test above
def test_decoders_prune_heads_at_any_batch(tmp_path, kind):
    """TorchScript exports with a dynamic batch: the heads of each layer prune (with their cache
    where the heads are the cache's), under the oracle at batch 2."""
    config, groups, cached = DECODERS[kind]
    path = decoder_onnx(tmp_path / f"{kind}.onnx", kind, **config)
    heads = sorted(g.size for g in analyze(path).groups if g.kind is GroupKind.HEADS
                   and g.prunable)
    assert heads == [groups] * LAYERS
    out = prune_checked(path, tmp_path, heads_ratio=0.5, mlp_ratio=0.5,
                        dims={"batch": 2, "sequence": 3, "past": 4, "total": 7})
    assert out.report.masked_relative_diff < 1e-6
    assert len(out.report.signature_changes) == (4 * LAYERS if cached else 0)
    if cached:
        assert out.report.generation == {"tokens": 32, "equal": True}


WORDS = "the a cat dog sat on mat ran far big small red blue house tree sun moon day".split()


def _text(path: Path, lines: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    path.write_text("".join(" ".join(rng.choice(WORDS, rng.integers(3, 12))) + "\n"
                            for _ in range(lines)), encoding="utf-8")
    return path


def _word_tokenizer(folder: Path):
    """A word-level tokenizer of :data:`WORDS` saved as ``folder/tokenizer.json``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in
                                                                enumerate(WORDS)}}, "[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    return tok


def test_gpt2_calibrated_on_text_prompts(tmp_path, gpt2):
    """Calibration text feeds a decoder as prompts (ids, mask, empty caches); the pruned model,
    whose caches lost heads, is fed them at its kept heads, and held-out fidelity counts the
    attended tokens' next-token answers, as onnxruntime gives them."""
    tok = _word_tokenizer(tmp_path)
    calib, held = _text(tmp_path / "calib.txt", 120, 0), _text(tmp_path / "held.txt", 30, 1)
    out, report = tmp_path / "p.onnx", tmp_path / "r.json"
    assert main(["prune", str(gpt2), "-o", str(out), "--calib", str(calib), "--tokenizer",
                 str(tmp_path / "tokenizer.json"), "--max-length", "12", "--held-out-data",
                 str(held), "--heads-ratio", "0.5", "--mlp-ratio", "0.5", "--report",
                 str(report), "-q"]) == 0
    body = json.loads(report.read_text())
    assert body["calibration"]["kind"] == "text" and body["calibration"]["held_out"] == 30
    assert len(body["signature_changes"]) == 4 * LAYERS
    assert body["reconstruction"]["layers"] > 0
    # held-out fidelity, computed here: each attended token's argmax, dense against pruned
    tok.enable_padding(length=12, pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(12)
    enc = tok.encode_batch(held.read_text().splitlines())
    ids = np.array([e.ids for e in enc], np.int64)
    mask = np.array([e.attention_mask for e in enc], np.int64)
    logits = []
    for path in (gpt2, out):
        shapes = _shapes(path)  # the pruned caches' heads: as sensitivity spread them
        feeds = {"input_ids": ids, "attention_mask": mask} | {
            f"past_key_values.{n}": np.zeros((len(ids), shapes[f"past_key_values.{n}"][1], 0,
                                              HIDDEN // HEADS), np.float32) for n in NAMES}
        logits.append(ort.InferenceSession(str(path)).run(["logits"], feeds)[0])
    real = mask == 1
    agreement = np.mean(logits[0][real].argmax(-1) == logits[1][real].argmax(-1))
    stage = "reconstructed" if body["reconstruction"]["kept"] else "pruned"
    assert body["fidelity"][stage]["agreement"] == pytest.approx(agreement)
    assert 0.5 < agreement < 1.0  # counted at 30 × 7 tokens, not at the padding


def test_gpt2_data_free_prompts(tmp_path, gpt2):
    """``--calib synthetic`` gives a decoder random prompts with empty caches (model inversion
    would take its caches for images)."""
    out, report = tmp_path / "p.onnx", tmp_path / "r.json"
    assert main(["prune", str(gpt2), "-o", str(out), "--calib", "synthetic", "--heads-ratio",
                 "0.5", "--mlp-ratio", "0.5", "--report", str(report), "-q"]) == 0
    body = json.loads(report.read_text())
    assert body["calibration"]["kind"] == "synthetic (random token ids)"
    assert body["fidelity"]["pruned"]["samples"] == body["calibration"]["held_out"] > 0


def test_gpt2_recovers_from_text_prompts(tmp_path, gpt2):
    """``spa recover`` distils a decoder on text prompts, its caches pruned or not: the
    teacher makes its own empty caches from the student's (no image to augment in them), and
    the caches that lost heads are left out of the loss and the fidelity. Caches that hold a
    past cannot be fed to both: refused, by name, before any work."""
    from spa.torch.recover import fed_like_student

    _word_tokenizer(tmp_path)
    text = _text(tmp_path / "calib.txt", 80, 0)
    calib = ["--calib", str(text), "--tokenizer", str(tmp_path / "tokenizer.json"),
             "--max-length", "12"]
    for label, ratios in (("mlp", ["--heads-ratio", "0", "--mlp-ratio", "0.5"]),
                          ("heads", ["--heads-ratio", "0.5", "--mlp-ratio", "0"])):
        pruned = tmp_path / f"{label}.onnx"
        assert main(["prune", str(gpt2), "-o", str(pruned), *calib, *ratios, "-q"]) == 0
        out, report = tmp_path / f"rec-{label}.onnx", tmp_path / f"rec-{label}.json"
        assert main(["recover", str(gpt2), str(pruned), "-o", str(out), *calib, "--steps",
                     "10", "--report", str(report), "-q"]) == 0
        body = json.loads(report.read_text())
        assert body["calibration"]["kind"] == "text" and 1 <= body["steps"] <= 10
        assert body["fidelity_before"]["samples"] == body["calibration"]["held_out"] == 8
        assert _shapes(out) == _shapes(pruned)
    # the teacher fed the student's empty caches answers as with its own
    shapes = _shapes(pruned)
    n = 3
    feeds = {"input_ids": np.array([[2, 3, 4]] * n), "attention_mask": np.ones((n, 3), np.int64)}
    own = feeds | {f"past_key_values.{k}": np.zeros((n, HEADS, 0, HIDDEN // HEADS), np.float32)
                   for k in NAMES}
    theirs = feeds | {f"past_key_values.{k}": np.zeros(
        (n, shapes[f"past_key_values.{k}"][1], 0, HIDDEN // HEADS), np.float32) for k in NAMES}
    calibration = SimpleNamespace(train={k: v[:2] for k, v in theirs.items()},
                                  held_out={k: v[2:] for k, v in theirs.items()})
    teacher = fed_like_student(onnx.load(str(gpt2)), onnx.load(str(pruned)), calibration)
    want = ort.InferenceSession(str(gpt2)).run(None, own)
    got = ort.InferenceSession(teacher.SerializeToString()).run(None, theirs)
    for a, b in zip(want, got):
        np.testing.assert_array_equal(a, b)
    past = tmp_path / "past.npz"
    np.savez(past, input_ids=feeds["input_ids"].repeat(8, 0),
             attention_mask=np.ones((24, 4), np.int64),
             **{f"past_key_values.{k}": np.zeros((24, shapes[f"past_key_values.{k}"][1], 1,
                                                   HIDDEN // HEADS), np.float32) for k in NAMES})
    refused = tmp_path / "refused.onnx"
    assert main(["recover", str(gpt2), str(pruned), "-o", str(refused), "--calib", str(past),
                 "--steps", "10", "-q"]) == ExitCode.BAD_INPUT
    assert not refused.exists()


def test_padding_changes_nothing_in_a_calibrated_decoder(tmp_path, gpt2):
    """GPT-2's Conv1D flattens samples and tokens into one axis before its product: those
    rows are lined up with the attention mask too, so prompts padded to 12 or to 40 tokens
    give the same statistics, refit and file (before, the padding's rows entered both)."""
    _word_tokenizer(tmp_path)
    text = _text(tmp_path / "calib.txt", 80, 0)  # at most 11 words a line
    outs = []
    for length in (12, 40):
        outs.append(tmp_path / f"p{length}.onnx")
        assert main(["prune", str(gpt2), "-o", str(outs[-1]), "--calib", str(text),
                     "--tokenizer", str(tmp_path / "tokenizer.json"), "--max-length",
                     str(length), "--heads-ratio", "0.5", "--mlp-ratio", "0.5", "--criterion",
                     "obspa", "--hessian", "calibration", "-q"]) == 0
    assert outs[0].read_bytes() == outs[1].read_bytes()


def test_gpt2_calibrated_on_packed_text(tmp_path, gpt2):
    """``--pack``: the corpus's tokens in windows of ``--max-length``, each a full prompt."""
    _word_tokenizer(tmp_path)
    text = _text(tmp_path / "calib.txt", 80, 0)
    words = len(text.read_text().split())
    out, report = tmp_path / "p.onnx", tmp_path / "r.json"
    assert main(["prune", str(gpt2), "-o", str(out), "--calib", str(text), "--tokenizer",
                 str(tmp_path / "tokenizer.json"), "--pack", "--max-length", "16",
                 "--heads-ratio", "0.5", "--report", str(report), "-q"]) == 0
    calibration = json.loads(report.read_text())["calibration"]
    assert calibration["samples"] + calibration["held_out"] == words // 16


def test_the_tokenizer_saved_beside_the_model(tmp_path, gpt2):
    """Without ``--tokenizer``, a text file is tokenized by the ``tokenizer.json`` saved beside
    the model (an Optimum export, a genai folder): the same file as with the flag, the path in
    the plan's recipe; ``spa recover`` finds it beside the dense model. A model with none
    beside it is refused, saying so, and nothing is written."""
    export = tmp_path / "export"
    export.mkdir()
    shutil.copy(gpt2, export / "model.onnx")
    _word_tokenizer(export)
    text = _text(tmp_path / "calib.txt", 60, 0)
    args = ["--calib", str(text), "--max-length", "12", "--heads-ratio", "0.5", "-q"]
    given, found = tmp_path / "given.onnx", tmp_path / "found.onnx"
    assert main(["prune", str(export / "model.onnx"), "-o", str(given), *args,
                 "--tokenizer", str(export / "tokenizer.json")]) == 0
    assert main(["prune", str(export / "model.onnx"), "-o", str(found), *args,
                 "--plan", str(tmp_path / "plan.json"), "--report", str(tmp_path / "r.json")]
                ) == 0
    assert found.read_bytes() == given.read_bytes()
    assert json.loads((tmp_path / "r.json").read_text())["calibration"]["tokenizer"] == \
        str(export)
    recipe = json.loads((tmp_path / "plan.json").read_text())["recipe"]
    assert recipe["calibration"]["options"]["tokenizer"] == str(export)
    recovered = tmp_path / "recovered.onnx"
    assert main(["recover", str(export / "model.onnx"), str(found), "-o", str(recovered),
                 "--calib", str(text), "--max-length", "12", "--steps", "2", "-q"]) == 0
    assert recovered.exists()
    alone = tmp_path / "alone.onnx"
    assert main(["prune", str(gpt2), "-o", str(alone), *args]) == ExitCode.BAD_INPUT
    assert not alone.exists()


@pytest.mark.parametrize("config, words", [
    ({"num_key_value_heads": 2}, "states num_key_value_heads=2, but the pruned caches have 1 "
                                 "key/value heads"),
    ({"num_attention_heads": 2}, "states num_attention_heads=2 and no key/value head count, "
                                 "and the pruned caches have 1 heads"),
    ({"num_key_value_heads": 1}, None),
    ({"num_attention_heads": 2, "is_encoder_decoder": True}, None),
    ({"model_type": "phi3", "num_attention_heads": 4, "num_key_value_heads": 2},
     "sizes a phi3's caches (and their head size) from num_attention_heads=4"),
    ({"model_type": "llama", "num_attention_heads": 4, "num_key_value_heads": 2},
     "states num_key_value_heads=2, but the pruned caches have 1 key/value heads"),
], ids=["kv-count", "heads-only", "agrees", "seq2seq", "phi3", "llama"])
def test_a_config_beside_the_decoder_that_the_pruned_caches_contradict(tmp_path, caplog, config,
                                                                       words):
    """🤗 Optimum's ``ORTModelForCausalLM`` makes the first step's empty caches from the
    ``config.json`` beside the decoder: a pruned model whose caches lost heads is said not to
    run under it until the count there agrees (or at all, when the config has only a head
    count, from which Optimum also derives the head size)."""
    path = decoder_onnx(tmp_path / "llama.onnx", "Llama",
                        **{**LLAMA_WIDTHS, "num_key_value_heads": 2})
    (tmp_path / "config.json").write_text(json.dumps(config))
    out = prune_checked(path, tmp_path, heads_ratio=0.5, mlp_ratio=0.5,
                        dims={"batch": 2, "sequence": 3, "past": 4, "total": 7})
    assert out.report.signature_changes
    found = [r.getMessage() for r in caplog.records if "config.json" in r.getMessage()]
    assert [words in m for m in found] == ([True] if words else [])


@pytest.mark.parametrize("model_type", ["llama", "phi3"])
def test_a_folder_writes_the_config_its_pruned_caches_need(tmp_path, caplog, model_type):
    """Pruned as a folder (spa/pipeline/family.py), a decoder's ``config.json`` is written with
    the key/value head count its caches keep, the rest as it was, and no warning is given:
    the folder runs under 🤗 Optimum's ``ORTModelForCausalLM`` as it is (checked on Optimum's
    Llama export: it generates; the file pruned alone, beside the old config, does not). A
    Phi-3's caches Optimum sizes by its head count (4), which no edit of the config can make
    the one key/value head kept: the config is copied as it is, and the pruned cache inputs
    declare their head axis symbolic instead, so that the first step takes Optimum's
    placeholder caches (4 heads, length 0) and answers as on empty caches of one head
    (checked on Optimum's Phi-3 and GPT-2 exports: they generate, and their cached steps give
    the logits of a run over the whole sequence)."""
    src = tmp_path / "llama"
    src.mkdir()
    decoder_onnx(src / "model.onnx", "Llama", **{**LLAMA_WIDTHS, "num_key_value_heads": 2})
    config = {"model_type": model_type, "num_attention_heads": 4, "num_key_value_heads": 2,
              "hidden_size": 32}
    (src / "config.json").write_text(json.dumps(config))
    out = tmp_path / "small"
    report = tmp_path / "report.json"
    assert main(["prune", str(src), "-o", str(out), "--heads-ratio", "0.5", "--mlp-ratio", "0.5",
                 "--input-dim", "batch=2", "--input-dim", "sequence=3", "--input-dim", "past=4",
                 "--input-dim", "total=7", "--report", str(report)]) == ExitCode.OK
    edited = {**config, "num_key_value_heads": 1} if model_type == "llama" else config
    assert json.loads((out / "config.json").read_text()) == edited
    assert json.loads((src / "config.json").read_text()) == config
    assert not [r for r in caplog.records if "config.json" in r.getMessage()]
    pasts = [i for i in onnx.load(str(out / "model.onnx")).graph.input
             if i.name.startswith("past")]
    heads = {i.type.tensor_type.shape.dim[1].dim_value or i.type.tensor_type.shape.dim[1].dim_param
             for i in pasts}
    held = json.loads(report.read_text())["placeholder_caches"]
    if model_type == "llama":
        assert heads == {1} and held == {}
        return
    assert heads == {f"{i.name}.axis1" for i in pasts}
    assert held["model.onnx"]["placeholder_heads"] == 4 and held["model.onnx"]["check"] == 0.0
    # what Optimum feeds the first step: 4 heads of nothing; the logits of 1 head of nothing
    sess = ort.InferenceSession(str(out / "model.onnx"))
    ids = np.array([[3, 7]], np.int64)

    def first(heads: int) -> np.ndarray:
        return sess.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids),
                                     **{i.name: np.zeros((1, heads, 0, 8), np.float32)
                                        for i in pasts}})[0]

    assert np.array_equal(first(4), first(1))
