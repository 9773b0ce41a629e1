"""An onnxruntime-genai folder of a KV-cache decoder prunes its KV heads and MLP, and generates.

A 2-layer Llama with GQA (hidden 64, 4 query heads, 2 KV heads, random weights, a word-level
tokenizer), written by onnxruntime-genai's builder as int4 (``MatMulNBits``,
``GroupQueryAttention`` with rotary inside, ``Skip``/``SimplifiedLayerNormalization``) with
its fused ``[Q | K | V]`` projection (and, once, with separate ones: both prune alike).
Pruning half the heads narrows the ``past_key_values.*`` inputs and ``present.*`` outputs;
validation runs 32 greedy tokens against the masked original; onnxruntime-genai's
``Generator`` runs the output folder and picks the same tokens as SPA's loop."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
og = pytest.importorskip("onnxruntime_genai")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from models import genai_llm  # noqa: E402
from models.genai_llm import build_folder  # noqa: E402
from spa.api import CheckOptions, PruneOptions, analyze, prune  # noqa: E402
from spa.coupling import GroupKind  # noqa: E402
from spa.errors import ExitCode, InvalidModelError, OptionError, ValidationError  # noqa: E402
from spa.generation import SignatureChange, greedy_check, greedy_tokens  # noqa: E402

VOCAB, LAYERS = 1000, 2
PROMPT = [5, 17, 99, 3, 42, 7, 250, 11]


def make_hf(d: Path, kind: str = "Llama", layers: int = LAYERS) -> Path:
    """A random-init HuggingFace ``kind`` model (Llama, Qwen2) and its tokenizer in ``d/hf``."""
    return genai_llm.make_hf(d, kind, layers, vocab=VOCAB)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """``built(fused)``: the builder's int4 folder of the model, with its fused ``[Q | K | V]``
    projection (its default) or separate ones (or, ``precision="fp32"``, float weights); each
    built once."""
    d = tmp_path_factory.mktemp("genai")
    hf = make_hf(d)
    folders: dict[tuple[bool, str], Path] = {}

    def build(fused: bool, precision: str = "int4") -> Path:
        if (fused, precision) not in folders:
            extra = [] if fused else ["--extra_options", "disable_qkv_fusion=true"]
            name = ("fused" if fused else "separate") + ("" if precision == "int4" else precision)
            folders[fused, precision] = build_folder(hf, d / name, *extra, precision=precision)
        return folders[fused, precision]

    return build


@pytest.fixture(scope="module")
def folder(built) -> Path:
    return built(True)


def _generate(folder: Path, steps: int = 32) -> list[int]:
    return genai_llm.generate(folder, PROMPT, steps)


def _spa_tokens(model: Path, kv_heads: int) -> list[int]:
    """SPA's greedy loop (spa/generation.py) on one decoder file, prompt ``PROMPT``."""
    sess = ort.InferenceSession(str(model))
    pasts = [i.name for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
    change = SignatureChange(caches={p: p.replace("past_key_values", "present") for p in pasts},
                             head_axes=dict.fromkeys(pasts, 1))
    assert all(i.shape[1] == kv_heads for i in sess.get_inputs() if i.name in pasts)
    return greedy_tokens(sess, change, prompt=np.array([PROMPT]), steps=32,
                         dims={"kv_cache_dim": 16}, pruned=True).tolist()


def test_kv_heads_prune_through_the_cache(folder):
    groups = analyze(folder).prunable_groups  # the folder: its decoder
    heads = [g for g in groups if g.kind is GroupKind.HEADS]
    assert len(heads) == LAYERS and all(g.size == 2 for g in heads)  # the KV heads per layer
    assert all(("past_key_values.0.key", 1) in {m.space for m in g.members}
               or ("past_key_values.1.key", 1) in {m.space for m in g.members} for g in heads)


def test_folder_prunes_and_generates(folder, tmp_path):
    out = tmp_path / "pruned"
    report, _ = prune(folder, out, PruneOptions(ratio=0.0, heads_ratio=0.5, mlp_ratio=0.5),
                      CheckOptions(check_masked=True, latency=False))
    assert report.generation == {"tokens": 32, "equal": True}
    assert report.masked_relative_diff is not None and report.masked_relative_diff < 1e-4
    assert len(report.signature_changes) == 4 * LAYERS
    assert "graph input 'past_key_values.0.key' axis 1: 2 -> 1" in report.signature_changes
    assert "graph output 'present.1.value' axis 1: 2 -> 1" in report.signature_changes
    assert report.params_after < report.params_before
    config = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
    before = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (2, 1)
    assert {k: v for k, v in config.items() if "heads" not in k} == \
        {k: v for k, v in before.items() if "heads" not in k}
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (folder / name).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]  # no staging left
    # onnxruntime-genai runs the output folder and picks the tokens SPA's loop picks; the
    # pruned model's tokens are not the original's (the check can fail).
    tokens = _generate(out)
    assert tokens == _spa_tokens(out / "model.onnx", kv_heads=1)
    assert len(tokens) == 32 and tokens != _generate(folder)
    # The check fails where the tokens differ: the unmasked original is no reference.
    original = ort.InferenceSession(str(folder / "model.onnx"))
    pruned = ort.InferenceSession(str(out / "model.onnx"))
    pasts = [(f"past_key_values.{i}.{kv}", f"present.{i}.{kv}")
             for i in range(LAYERS) for kv in ("key", "value")]
    change = SignatureChange(inputs={p: (1, np.array([0]), 2) for p, _ in pasts},
                             caches=dict(pasts), head_axes={p: 1 for p, _ in pasts})
    with pytest.raises(ValidationError, match="greedy generation differs from the masked "
                                              "original's at token"):
        greedy_check(original, pruned, change, {"kv_cache_dim": 16})


def test_folder_whose_config_disagrees_is_refused(folder, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in folder.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    config = json.loads((bad / "genai_config.json").read_text())
    config["model"]["decoder"]["num_key_value_heads"] = 4
    (bad / "genai_config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidModelError, match=r"num_key_value_heads=4, the attention nodes "
                                                r"have \[2\]") as err:
        prune(bad, tmp_path / "out", PruneOptions(heads_ratio=0.5), CheckOptions(latency=False))
    assert err.value.exit_code is ExitCode.BAD_INPUT
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_cli_prunes_a_folder(folder, tmp_path, capsys):
    from spa.cli import main

    out = tmp_path / "cli"
    assert main(["prune", str(folder), "-o", str(out), "--heads-ratio", "0.5"]) == 0
    text = capsys.readouterr().out
    assert "signature changed: graph input 'past_key_values.0.key' axis 1: 2 -> 1" in text
    assert "greedy generation: 32 tokens equal to the masked original's" in text
    assert json.loads((out / "genai_config.json").read_text())["model"]["decoder"][
        "num_key_value_heads"] == 1


def test_separate_projections_prune_to_the_same_tokens(built, folder, tmp_path):
    """The builder's separate Q, K, V projections (``disable_qkv_fusion``) hold the same
    weights as its fused one: pruned by the same ratio, both folders generate the same tokens."""
    tokens = []
    for source in (folder, built(False)):
        out = tmp_path / source.name
        report, _ = prune(source, out, PruneOptions(ratio=0.0, heads_ratio=0.5),
                          CheckOptions(check_masked=True, latency=False))
        assert report.generation == {"tokens": 32, "equal": True}
        tokens.append(_generate(out))
    assert tokens[0] == tokens[1]


def test_layers_left_with_different_head_counts_are_refused(folder, tmp_path):
    """genai_config.json holds one head count for all layers: a plan that prunes one layer's
    heads and not the other's stops, and nothing is written."""
    keep_first = ("/model/layers.0/attn/GroupQueryAttention",)
    with pytest.raises(OptionError, match=r"different head counts \(query \(4, 2\), KV \(2, 1\)\)"):
        prune(folder, tmp_path / "out", PruneOptions(heads_ratio=0.5, ignore=keep_first),
              CheckOptions(latency=False))
    assert list(tmp_path.iterdir()) == []


def test_decoder_file_alone_sizes_its_cache_dims(folder, tmp_path):
    """The decoder file without its folder: the cache dims are sized from the attention op
    (past 8, head size 16) and the mask spans past and prompt, without --input-dim."""
    report, _ = prune(folder / "model.onnx", tmp_path / "pruned.onnx",
                      PruneOptions(ratio=0.0, heads_ratio=0.5),
                      CheckOptions(check_masked=True, latency=False))
    assert report.input_dims == {"batch_size": 1, "sequence_length": 8,
                                 "total_sequence_length": 16, "past_sequence_length": 8,
                                 "kv_cache_dim": 16}
    assert report.input_dims_from["kv_cache_dim"] == "kv cache"
    assert report.generation == {"tokens": 32, "equal": True}


def _prompts(tmp_path: Path) -> Path:
    words = [f"w{k}" for k in range(100, 400)]
    rng = np.random.default_rng(0)
    text = tmp_path / "prompts.txt"
    text.write_text("".join(" ".join(rng.choice(words, rng.integers(4, 20))) + "\n"
                            for _ in range(64)), encoding="utf-8")
    return text


@pytest.mark.parametrize("precision", ["int4", "fp32"])
def test_folder_calibrated_on_text_prompts_is_refitted_and_generates(built, precision,
                                                                     tmp_path):
    """A text file calibrates the builder's decoder: each line a prompt (ids, mask, empty
    caches whose head size is the symbolic ``kv_cache_dim``), run through its
    GroupQueryAttention (and, before the first projection, a SimplifiedLayerNormalization:
    both onnxruntime ops onnx cannot type); sensitivity spreads the heads. The folder's own
    tokenizer.json tokenizes the text (no ``--tokenizer``). Its projections are refitted by
    default, in the external data file they came in: fp32 MatMuls as they are, int4
    MatMulNBits quantised again (spa/ir/nbits.py). Held-out fidelity gets better, the weights
    keep their precision, and onnxruntime-genai generates with the folder."""
    from spa.cli import main

    source = built(True, precision)
    out, report = tmp_path / "cal", tmp_path / "r.json"
    text = _prompts(tmp_path)
    assert main(["prune", str(source), "-o", str(out), "--heads-ratio", "0.5", "--mlp-ratio",
                 "0.3", "--calib", str(text), "--max-length", "24", "--report", str(report),
                 "-q"]) == 0
    body = json.loads(report.read_text())
    assert body["calibration"] == {"path": str(text), "kind": "text", "samples": 58,
                                   "held_out": 6, "tokenizer": str(source)}
    assert body["allocation"] == "sensitivity" and body["groups_pruned"] > 0
    assert body["reconstruction"]["kept"] and body["reconstruction"]["refitted"] > 0
    before, after = body["fidelity"]["pruned"], body["fidelity"]["reconstructed"]
    assert after["kl"] < before["kl"] and after["relative_error"] < before["relative_error"]
    ops = {n.op_type for n in onnx.load(str(out / "model.onnx"), load_external_data=False
                                        ).graph.node}
    assert ("MatMulNBits" in ops) == (precision == "int4") and ("MatMul" in ops) == (
        precision == "fp32")
    assert (out / "model.onnx.data").stat().st_size > 100_000
    assert len(_generate(out, 8)) == 8


def test_folder_recovers_from_the_dense_folder(built, tmp_path):
    """`spa prune FOLDER --recover N` and `spa recover DENSE PRUNED -o OUT` on onnxruntime-genai
    folders: the pruned decoder (GroupQueryAttention, now run by spa.torch.from_onnx) is
    distilled from the dense one on text prompts whose empty caches take the symbolic head size
    ``kv_cache_dim`` from the attention op, and written into a folder with the pruned folder's
    config and tokenizer; both runs train the same, get better on the held-out prompts, and
    onnxruntime-genai generates with either folder. Both were refused before (a folder)."""
    from spa.cli import main

    source, text = built(True, "fp32"), _prompts(tmp_path)
    flags = ["--calib", str(text), "--max-length", "24"]
    pruned, reports = tmp_path / "pruned", {}
    assert main(["prune", str(source), "-o", str(pruned), "--heads-ratio", "0.5",
                 "--mlp-ratio", "0.3", *flags, "-q"]) == 0
    for how, argv in (("prune", ["prune", str(source), "-o", str(tmp_path / "prune"),
                                 "--heads-ratio", "0.5", "--mlp-ratio", "0.3", "--recover", "8"]),
                      ("recover", ["recover", str(source), str(pruned), "-o",
                                   str(tmp_path / "recover"), "--steps", "8"])):
        report = tmp_path / f"{how}.json"
        assert main([*argv, *flags, "--report", str(report), "-q"]) == 0
        body = json.loads(report.read_text())
        reports[how] = body.get("recovery", body)
        assert sorted(p.name for p in (tmp_path / how).iterdir()) == [
            "genai_config.json", "model.onnx", "tokenizer.json", "tokenizer_config.json"]
        assert (tmp_path / how / "genai_config.json").read_text() == (
            pruned / "genai_config.json").read_text()
        assert len(_generate(tmp_path / how, 8)) == 8
    assert reports["prune"]["fidelity_after"] == reports["recover"]["fidelity_after"]
    after, before = reports["recover"]["fidelity_after"], reports["recover"]["fidelity_before"]
    assert after["kl"] < before["kl"] and reports["recover"]["kept"] == "recovered"


def test_folder_prunes_by_taylor_on_text_prompts(built, tmp_path):
    """--criterion taylor on the builder's decoder with a text file: next-token labels, the
    gradients through GroupQueryAttention in spa.torch.from_onnx; a different plan from
    OBSPA's, and the folder generates."""
    from spa.cli import main

    source, text = built(True, "fp32"), _prompts(tmp_path)
    keeps = {}
    for criterion in ("taylor", "obspa"):
        out, plan = tmp_path / criterion, tmp_path / f"{criterion}.json"
        assert main(["prune", str(source), "-o", str(out), "--heads-ratio", "0.5",
                     "--mlp-ratio", "0.3", "--criterion", criterion, "--calib", str(text),
                     "--max-length", "24", "--plan", str(plan), "-q"]) == 0
        keeps[criterion] = [g["keep"] for g in json.loads(plan.read_text())["groups"]]
    assert keeps["taylor"] != keeps["obspa"]
    assert len(_generate(tmp_path / "taylor", 8)) == 8
