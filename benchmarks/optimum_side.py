"""The half of :mod:`benchmarks.optimum_exports` that runs in the venv of 🤗 Optimum (its own:
optimum-onnx 0.1.0 needs transformers 4.57, older than this project's). It does not import
SPA. Two commands, each printing one JSON line:

    python benchmarks/optimum_side.py export NAME HF_DIR ONNX_DIR
        build NAME's random model from its config (seeded, hidden 64, 4 heads, 2 layers),
        save it to HF_DIR and export it with ``optimum-cli export onnx``'s own function
    python benchmarks/optimum_side.py generate NAME ONNX_DIR
        load the folder with Optimum's ORTModel class for NAME's task and generate greedily
        (the tokens, or the error)
    python benchmarks/optimum_side.py train HF_DIR ONNX_DIR [STEPS]
        train a small BART to reverse sequences of symbols (:data:`REVERSE`), save and
        export it: a seq2seq model with weights that do something
    python benchmarks/optimum_side.py reverse-eval ONNX_DIR [SEED] [COUNT]
        the share of held-out sequences that folder reverses under ORTModelForSeq2SeqLM
"""

from __future__ import annotations

import json
import sys
import traceback

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100)
ENCODER = dict(SMALL, intermediate_size=128, max_position_embeddings=64)
DECODER = dict(SMALL, intermediate_size=128, max_position_embeddings=128)
SEQ2SEQ = dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
               vocab_size=100, max_position_embeddings=64)
T5 = dict(d_model=64, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=16,
          vocab_size=100, decoder_start_token_id=0)



def _causal(name: str, **extra: object) -> tuple[str, str, dict, str, str]:
    """A decoder-only model's entry of :data:`MODELS`."""
    return (f"{name}Config", f"{name}ForCausalLM", dict(DECODER, **extra),
            "text-generation-with-past", "decoder")


#: name: (config class, model class, its config, Optimum's task, kind: encoder, seq2seq,
#: speech or decoder)
MODELS = {
    "bert": ("BertConfig", "BertModel", ENCODER, "feature-extraction", "encoder"),
    "roberta": ("RobertaConfig", "RobertaModel", ENCODER, "feature-extraction", "encoder"),
    "distilbert": ("DistilBertConfig", "DistilBertModel",
                   dict(dim=64, n_layers=2, n_heads=4, hidden_dim=128, vocab_size=100,
                        max_position_embeddings=64), "feature-extraction", "encoder"),
    "albert": ("AlbertConfig", "AlbertModel", dict(ENCODER, embedding_size=32),
               "feature-extraction", "encoder"),
    "electra": ("ElectraConfig", "ElectraModel", dict(ENCODER, embedding_size=32),
                "feature-extraction", "encoder"),
    "deberta-v2": ("DebertaV2Config", "DebertaV2Model", ENCODER, "feature-extraction",
                   "encoder"),
    "mpnet": ("MPNetConfig", "MPNetModel", ENCODER, "feature-extraction", "encoder"),
    "xlm-roberta": ("XLMRobertaConfig", "XLMRobertaModel", ENCODER, "feature-extraction",
                    "encoder"),
    "vit": ("ViTConfig", "ViTModel",
            dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=128, image_size=32, patch_size=8),
            "feature-extraction", "encoder"),
    "bart": ("BartConfig", "BartForConditionalGeneration", SEQ2SEQ,
             "text2text-generation-with-past", "seq2seq"),
    "marian": ("MarianConfig", "MarianMTModel",
               dict(SEQ2SEQ, decoder_start_token_id=0, pad_token_id=1),
               "text2text-generation-with-past", "seq2seq"),
    "pegasus": ("PegasusConfig", "PegasusForConditionalGeneration", SEQ2SEQ,
                "text2text-generation-with-past", "seq2seq"),
    "t5": ("T5Config", "T5ForConditionalGeneration", T5, "text2text-generation-with-past",
           "seq2seq"),
    "mt5": ("MT5Config", "MT5ForConditionalGeneration", T5, "text2text-generation-with-past",
            "seq2seq"),
    "whisper": ("WhisperConfig", "WhisperForConditionalGeneration",
                dict(SEQ2SEQ, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                     decoder_start_token_id=0, num_mel_bins=80, max_source_positions=1500,
                     max_target_positions=64),
                "automatic-speech-recognition-with-past", "speech"),
    **{name.lower(): _causal(name, **extra) for name, extra in (
        ("Llama", dict(num_key_value_heads=2)), ("Qwen2", dict(num_key_value_heads=2)),
        ("Mistral", dict(num_key_value_heads=4)),
        ("Gemma", dict(num_key_value_heads=2, head_dim=16)),
        ("Granite", dict(num_key_value_heads=2)), ("StableLm", dict(num_key_value_heads=2)),
        ("Phi3", dict(num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=1)))},
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=128),
             "text-generation-with-past", "decoder"),
    "falcon": ("FalconConfig", "FalconForCausalLM",
               dict(SMALL, new_decoder_architecture=False, multi_query=True),
               "text-generation-with-past", "decoder"),
}
PROMPT = [5, 17, 42, 8, 99, 3]
#: The trained seq2seq model (``train``): a BART that reverses sequences of symbols.
REVERSE = dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256,
               vocab_size=24, max_position_embeddings=32, pad_token_id=1, bos_token_id=0,
               eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None)
SYMBOLS, LENGTHS = (4, 24), (4, 11)  # symbol ids [4, 24), sequence lengths [4, 11)


def reverse_batch(rng, count: int):
    """``count`` random sequences (padded with 1, mask 0 there) and their reversals + EOS."""
    import numpy as np

    n = max(LENGTHS)
    ids = np.ones((count, n), np.int64)
    mask = np.zeros((count, n), np.int64)
    labels = np.full((count, n + 1), -100, np.int64)
    for i, length in enumerate(rng.integers(*LENGTHS, count)):
        seq = rng.integers(*SYMBOLS, length)
        ids[i, :length], mask[i, :length] = seq, 1
        labels[i, :length + 1] = [*seq[::-1], REVERSE["eos_token_id"]]
    return ids, mask, labels


def train(hf_dir: str, onnx_dir: str, steps: str = "3000") -> dict:
    """Train REVERSE's BART to reverse sequences (seeded; AdamW, batch 64), save and export
    it; its held-out exact-match accuracy (teacher-forced arg-max) on 512 new sequences."""
    import numpy as np
    import torch
    import transformers
    from optimum.exporters.onnx import main_export

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = transformers.BartForConditionalGeneration(transformers.BartConfig(**REVERSE))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=int(steps))
    model.train()
    for _ in range(int(steps)):
        ids, mask, labels = (torch.from_numpy(a) for a in reverse_batch(rng, 64))
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    ids, mask, labels = (torch.from_numpy(a) for a in reverse_batch(np.random.default_rng(99),
                                                                    512))
    with torch.no_grad():
        pred = model(input_ids=ids, attention_mask=mask, labels=labels).logits.argmax(-1)
    right = ((pred == labels) | (labels == -100)).all(-1).float().mean().item()
    model.save_pretrained(hf_dir)
    main_export(hf_dir, output=onnx_dir, task="text2text-generation-with-past")
    return {"trained": True, "loss": float(loss), "held_out_exact": right}


def export(name: str, hf_dir: str, onnx_dir: str) -> dict:
    import torch
    import transformers
    from optimum.exporters.onnx import main_export

    config_class, model_class, config, task, _ = MODELS[name]
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**config))
    model.save_pretrained(hf_dir)
    main_export(hf_dir, output=onnx_dir, task=task)
    return {"exported": True}


def generate(name: str, onnx_dir: str) -> dict:
    import torch
    from optimum import onnxruntime as ort_models

    kind = MODELS[name][4]
    if kind == "encoder":
        return {"generate": "not a generator"}
    cls = {"seq2seq": "ORTModelForSeq2SeqLM", "speech": "ORTModelForSpeechSeq2Seq",
           "decoder": "ORTModelForCausalLM"}[kind]
    model = getattr(ort_models, cls).from_pretrained(onnx_dir, use_cache=True)
    torch.manual_seed(0)
    if kind == "speech":
        feeds = {"input_features": torch.randn(1, 80, 3000)}
    else:
        ids = torch.tensor([PROMPT])
        feeds = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    out = model.generate(**feeds, max_new_tokens=8, do_sample=False)
    return {"runtime": cls, "tokens": out[0].tolist()}


def reverse_eval(onnx_dir: str, seed: str = "2", count: str = "512") -> dict:
    """The share of ``count`` held-out sequences (``seed``) that ``onnx_dir`` reverses exactly
    when Optimum's ORTModelForSeq2SeqLM generates (greedy, with its caches: the merged
    decoder, or the two decoders)."""
    import numpy as np
    import torch
    from optimum.onnxruntime import ORTModelForSeq2SeqLM

    model = ORTModelForSeq2SeqLM.from_pretrained(onnx_dir, use_cache=True)
    ids, mask, labels = reverse_batch(np.random.default_rng(int(seed)), int(count))
    out = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                         max_new_tokens=labels.shape[1], do_sample=False, num_beams=1).numpy()
    pad = REVERSE["pad_token_id"]
    got = np.full(labels.shape, pad, np.int64)
    width = min(labels.shape[1], out.shape[1] - 1)
    got[:, :width] = out[:, 1:1 + width]
    want = np.where(labels == -100, pad, labels)
    return {"runtime": "ORTModelForSeq2SeqLM", "exact": float(np.mean((got == want).all(1))),
            "sequences": int(count)}


def main(argv: list[str]) -> None:
    try:
        command = {"export": export, "generate": generate, "train": train,
                   "reverse-eval": reverse_eval}[argv[0]]
        result = command(*argv[1:])
    except Exception as exc:  # reported, not raised: the benchmark records what failed
        result = {"error": f"{type(exc).__name__}: {str(exc)[:300]}",
                  "trace": traceback.format_exc()[-1500:]}
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
