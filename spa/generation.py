"""A decoder's KV-cache signature change, and the greedy generation loop that validates it.

Pruning the KV heads of a decoder shrinks the head axis of its ``past`` cache inputs and
``present`` cache outputs, pair by pair (spa/coupling/analysis.py finds the pairs). That is the
one signature change SPA makes. :class:`SignatureChange` says which inputs and outputs lose
which heads; the pruned model is fed the original's inputs with those heads taken out, and its
outputs are compared with the reference's at the kept heads.

A single run on random inputs does not show that the caches line up from one step to the next,
so a decoder is also run as it is used: :func:`greedy_tokens` feeds a prompt with an empty
cache, then one token a step, each step's ``present`` as the next step's ``past``, and takes the
argmax of the last logits. The pruned model's tokens must equal the masked original's.

The loop feeds a decoder of the usual signature: ``input_ids``, ``attention_mask``, optionally
``position_ids``, the past caches, and a ``logits`` output (what transformers' exporters and
onnxruntime-genai's builder write). Another signature is not guessed at: :func:`loop_inputs`
says why, and the check is reported as not run.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from spa.errors import PlanMismatchError, ValidationError
from spa.inputs import dim_key
from spa.plan import kept_indices
from spa.validate import ORT_TYPES

if TYPE_CHECKING:
    from collections.abc import Callable

    import onnxruntime as ort

    from spa.coupling.analysis import Analysis
    from spa.plan import Plan

log = logging.getLogger(__name__)
_TOKEN_INPUTS = ("input_ids", "attention_mask", "position_ids")
LOGITS = "logits"


@dataclass(frozen=True)
class SignatureChange:
    """Graph inputs and outputs that lose entries of one axis: name -> (axis, kept indices, old
    length); and the KV-cache pairs, past input name -> present output name."""

    inputs: dict[str, tuple[int, np.ndarray, int]] = field(default_factory=dict)
    outputs: dict[str, tuple[int, np.ndarray, int]] = field(default_factory=dict)
    caches: dict[str, str] = field(default_factory=dict)
    head_axes: dict[str, int] = field(default_factory=dict)  # past input name -> its head axis
    # KV-cache inputs and outputs removed with a dropped attention block (depth pruning)
    removed: frozenset[str] = frozenset()
    depth: bool = False  # the plan drops residual blocks: the loop also reports logits

    def __bool__(self) -> bool:
        return bool(self.inputs or self.outputs or self.removed)

    def pruned_feeds(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The original's ``feeds`` as the pruned model takes them."""
        return {k: _take(v, self.inputs.get(k)) for k, v in feeds.items()
                if k not in self.removed}

    def kept_outputs(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A reference model's ``outputs`` at what the pruned model keeps."""
        return {k: _take(v, self.outputs.get(k)) for k, v in outputs.items()
                if k not in self.removed}

    def describe(self) -> list[str]:
        """For the report: ``graph input 'past.0.key' axis 1: 2 -> 1``, one line a tensor;
        ``graph input 'past.1.key' removed (dropped block)``."""
        pasts = set(self.caches)
        return [f"graph {side} '{name}' axis {axis}: {length} -> {kept.size}"
                for side, changes in (("input", self.inputs), ("output", self.outputs))
                for name, (axis, kept, length) in sorted(changes.items())] + [
            f"graph {'input' if name in pasts else 'output'} '{name}' removed (dropped block)"
            for name in sorted(self.removed, key=lambda n: (n not in pasts, n))]


def _take(value: np.ndarray, change: tuple[int, np.ndarray, int] | None) -> np.ndarray:
    return value if change is None else np.take(value, change[1], axis=change[0])


def signature_change(analysis: Analysis, plan: Plan) -> SignatureChange:
    """What ``plan`` changes of the graph's inputs and outputs: only KV-cache pairs can change
    (the analysis freezes every other signature space), and a pair's two sides lose the same
    entries because the attention rule couples both to its KV heads."""
    kept = kept_indices(analysis, plan)
    change = SignatureChange(removed=frozenset(
        name for b in plan.dropped for pair in b.caches for name in pair),
        depth=bool(plan.dropped))
    for cache in analysis.kv_cache:
        past, present = cache.past, cache.present
        change.caches[past[0]] = present[0]
        change.head_axes[past[0]] = past[1]
        for key, side in ((past, change.inputs), (present, change.outputs)):
            if key in kept:
                side[key[0]] = (key[1], kept[key], analysis.lengths[key])
    inputs = {t.name for t in analysis.model.graph.inputs}
    for key in sorted(k for k in kept if k[0] in analysis.free):  # another file's caches
        side = change.inputs if key[0] in inputs else change.outputs
        if key[0] in side and side[key[0]][0] == key[1]:
            continue  # a KV-cache pair of this file too
        if key[0] in side:
            raise PlanMismatchError(f"the plan narrows two axes of '{key[0]}', which another "
                                    "file of the model reads or writes")
        side[key[0]] = (key[1], kept[key], analysis.lengths[key])
    return change


#: Where a 🤗 Transformers ``config.json`` states the key/value heads, by architecture.
KV_HEADS_KEYS = ("num_key_value_heads", "num_kv_heads", "multi_query_group_num")
HEADS_KEYS = ("num_attention_heads", "n_head", "num_heads")  # when the KV heads are these
#: The ``model_type``\ s whose caches 🤗 Optimum's ``ORTModelForCausalLM`` sizes by the config's
#: key/value head count (optimum-onnx 0.1.0, modeling_decoder.py); the others' by
#: ``num_attention_heads``, even when the config states a key/value head count (Phi-3).
KV_SIZED = frozenset({
    "arcee", "deepseek_v3", "cohere", "gemma", "gemma3_text", "glm", "granite", "gpt_oss",
    "helium", "mistral", "llama", "nemotron", "qwen2", "qwen3", "qwen3_moe", "smollm3",
    "stablelm", "falcon"})


def config_mismatch(model_path: str | None, change: SignatureChange) -> str | None:
    """What a ``config.json`` beside the input (a 🤗 Optimum or Transformers folder) says
    that the pruned caches no longer match, for a warning; None when nothing is amiss.
    Optimum's ``ORTModelForCausalLM`` makes the first step's empty caches from the config's
    key/value head count, so the pruned decoder would not run under it until the count is
    updated; layers that keep different counts cannot be described by one. Not for a seq2seq
    model (:func:`read_config`)."""
    if model_path is None or not change.inputs:
        return None
    path = Path(model_path).parent / "config.json"
    config = read_config(path)
    if config is None:
        return None
    key, heads, kept = _cache_counts(config, change)
    if not kept or (key is None and heads is None):
        return None
    if key is None:
        counts = kept[0] if len(kept) == 1 else kept
        stated = next((k for k in KV_HEADS_KEYS if k in config), None)
        if stated is not None and heads is not None:  # a model_type sized by the heads
            return (f"{path} states {stated}={config[stated]}, but 🤗 Optimum's "
                    f"ORTModelForCausalLM sizes a {config.get('model_type')}'s caches (and "
                    f"their head size) from {heads}={config[heads]}, and the pruned caches have "
                    f"{counts} heads: it cannot run the pruned model, and no edit of the "
                    "config fixes that; prune the folder instead (spa prune folder/ -o out/): "
                    "the pruned cache inputs then take the placeholder caches it makes")
        return (f"{path} states {heads}={config[heads]} and no key/value head count, and the "
                f"pruned caches have {counts} heads: runtimes that size the caches from the "
                f"config (🤗 Optimum's ORTModelForCausalLM, which derives the head size from "
                f"{heads} too) cannot run the pruned model; no edit of the config fixes that; "
                "prune the folder instead (spa prune folder/ -o out/): the pruned cache inputs "
                "then take the placeholder caches such runtimes make")
    if len(kept) > 1:
        return (f"{path} states one {key} ({config[key]}) for every layer, but the pruned "
                f"layers keep {kept} key/value heads: runtimes that size the caches from it "
                "(🤗 Optimum's ORTModelForCausalLM) cannot run the model; prune heads by one "
                "ratio in every layer (uniform allocation), or prune the folder (spa prune "
                "folder/ -o out/): the pruned cache inputs then take the placeholder caches "
                "such runtimes make")
    if config[key] == kept[0]:
        return None
    return (f"{path} states {key}={config[key]}, but the pruned caches have {kept[0]} "
            "key/value heads: runtimes that size the caches from it (🤗 Optimum's "
            f"ORTModelForCausalLM does for Llama-like models) need {key}={kept[0]} in the config "
            "beside the pruned model")


def read_config(path: Path) -> dict | None:
    """A 🤗 ``config.json`` that runtimes size a decoder's caches from; None when there is
    none, or it is a seq2seq model's (``is_encoder_decoder``: ``ORTModelForSeq2SeqLM`` runs the
    first step with the decoder without a past, and the pruned T5 folder generates with its
    config unchanged)."""
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or config.get("is_encoder_decoder"):
        return None
    return config


def _cache_counts(config: dict, change: SignatureChange
                  ) -> tuple[str | None, str | None, list[int]]:
    """The config's key/value head count key (None unless runtimes size the caches by it:
    :data:`KV_SIZED`, or a config that does not say its model type), its head count key, and
    the head counts the pruned caches keep (one per layer count seen)."""
    typed = config.get("model_type")
    key = next((k for k in KV_HEADS_KEYS if k in config), None) \
        if typed is None or typed in KV_SIZED else None
    heads = next((k for k in HEADS_KEYS if k in config), None)
    kept = sorted({len(k) for name, (_, k, _) in change.inputs.items() if name in change.caches})
    return key, heads, kept


def config_edit(config: dict, change: SignatureChange) -> dict[str, int]:
    """What to set in ``config`` (:func:`read_config`) for the pruned caches: their one
    key/value head count, when the config states one that differs (the fix
    :func:`config_mismatch` asks for); else nothing."""
    key, _, kept = _cache_counts(config, change)
    if key is None or len(kept) != 1 or config[key] == kept[0]:
        return {}
    return {key: kept[0]}


def placeholder_count(config: dict, change: SignatureChange) -> int | None:
    """The head count of the empty caches a runtime feeds the first step, sized from
    ``config`` (🤗 Optimum's ``ORTModelForCausalLM``: the key/value head count for
    :data:`KV_SIZED` model types, else ``num_attention_heads``), when the pruned caches do not
    all have it and no :func:`config_edit` can say theirs (another model type, or layers that
    keep different counts); None otherwise. Such a decoder runs there once its pruned cache
    inputs declare their head axis symbolic: the placeholders are empty, and what is
    concatenated to nothing is never read."""
    key, heads, kept = _cache_counts(config, change)
    if not kept or (key is not None and len(kept) == 1):
        return None  # nothing pruned, or the edit says the one count
    stated = config.get(key or heads or "")
    if not isinstance(stated, int) or isinstance(stated, bool) or kept == [stated]:
        return None
    return stated


def decoder_feeds(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Random feeds of a KV-cache decoder made consistent: ``attention_mask`` all ones, over
    past and new positions (onnxruntime's GroupQueryAttention reads the sequence lengths off
    it; a random 0/1 mask can say fewer positions than the prompt has)."""
    return {k: np.ones_like(v) if k == "attention_mask" else v for k, v in feeds.items()}


def loop_inputs(sess: ort.InferenceSession, change: SignatureChange) -> str | None:
    """None when ``sess`` has the signature the greedy loop feeds, else why not."""
    names = {i.name for i in sess.get_inputs()}
    other = sorted(names - set(change.caches) - set(_TOKEN_INPUTS))
    if other:
        return f"inputs {other} are neither token inputs nor KV-cache pasts"
    if "input_ids" not in names:
        return "no 'input_ids' input"
    if LOGITS not in {o.name for o in sess.get_outputs()}:
        return f"no '{LOGITS}' output"
    return None


def greedy_tokens(sess: ort.InferenceSession, change: SignatureChange, *, prompt: np.ndarray,
                  steps: int, dims: dict[str, int], pruned: bool,
                  logits: list[np.ndarray] | None = None, forced: np.ndarray | None = None
                  ) -> np.ndarray:
    """``steps`` greedy tokens after ``prompt`` (``[1, P]`` int64): the prompt with an empty
    cache, then one token a step, each ``present`` fed back as its ``past``. ``dims``: sizes of
    the caches' other symbolic dims (spa/inputs.py); ``pruned``: the caches have the pruned
    model's widths (else the original's). ``logits`` collects each step's last logits;
    ``forced``: tokens fed instead of the argmax (teacher forcing)."""
    inputs = {i.name: i for i in sess.get_inputs()}
    past: dict[str, np.ndarray] = {
        name: np.zeros(_cache_shape(inputs[name], change, dims, pruned),
                       ORT_TYPES.get(inputs[name].type, np.float32))
        for name in change.caches if not (pruned and name in change.removed)}
    ids, length, tokens = prompt.astype(np.int64), 0, []
    out_names = [LOGITS, *(change.caches[name] for name in past)]
    for _ in range(steps):
        length += ids.shape[1]
        feeds = {"input_ids": ids, **past}
        if "attention_mask" in inputs:
            feeds["attention_mask"] = np.ones((1, length), np.int64)
        if "position_ids" in inputs:
            feeds["position_ids"] = np.arange(length - ids.shape[1], length,
                                              dtype=np.int64)[None]
        last, *presents = sess.run(out_names, feeds)
        past = dict(zip(past, presents, strict=True))
        token = int(np.argmax(last[0, -1]))
        tokens.append(token)
        if logits is not None:
            logits.append(np.asarray(last[0, -1], np.float64))
        ids = np.array([[token if forced is None else int(forced[len(tokens) - 1])]], np.int64)
    return np.array(tokens)


def _cache_shape(inp: ort.NodeArg, change: SignatureChange, dims: dict[str, int],
                 pruned: bool) -> list[int]:
    """An empty cache: batch 1, no past positions (the axis after the head axis: the caches
    SPA pairs are laid out ``[batch, heads, positions, head size]``), other symbolic dims as
    ``dims`` sizes them; the head axis the model's own (the original's before pruning)."""
    head_axis = change.head_axes[inp.name]
    shape = []
    for a, d in enumerate(inp.shape):
        key = dim_key(inp.name, a, d)
        shape.append(0 if a == head_axis + 1 else 1 if a == 0 and key is not None
                     else d if key is None else dims.get(key, 1))
    if not pruned and inp.name in change.inputs:
        shape[head_axis] = change.inputs[inp.name][2]
    return shape


GREEDY_STEPS = 32  # tokens generated by the check (issue #16 asks for 32)
PROMPT_LENGTH = 8
PAST_LENGTH = 8  # past positions of a random-input run


def cache_sizes(analysis: Analysis) -> dict[str, int]:
    """Sizes for the symbolic dims that made-up inputs of a KV-cache decoder need consistent
    (spa/inputs.py cannot guess them: the attention mask spans past and new positions, the
    cache's last dim is the head size): each cache's positions ``PAST_LENGTH`` and head size
    as its attention op says; ``input_ids`` and ``position_ids`` ``PROMPT_LENGTH`` long,
    ``attention_mask`` both. A dim asked two sizes is left to spa/inputs.py."""
    inputs = {t.name: t for t in analysis.model.graph.inputs}
    wanted: list[tuple[str | None, int]] = []
    for cache in analysis.kv_cache:
        past = inputs[cache.past[0]]
        shape = list(past.shape or ())
        if len(shape) == 4:
            wanted += [(dim_key(past.name, a, shape[a]), n) for a, n in (
                (cache.past[1] + 1, PAST_LENGTH), (3, cache.head_size))]
    if wanted:
        for name, n in (("input_ids", PROMPT_LENGTH), ("position_ids", PROMPT_LENGTH),
                        ("attention_mask", PROMPT_LENGTH + PAST_LENGTH)):
            t = inputs.get(name)
            if t is not None and len(t.shape or ()) == 2:
                wanted.append((dim_key(name, 1, t.shape[1]), n))
    sizes: dict[str, set[int]] = {}
    for key, n in wanted:
        if key is not None:
            sizes.setdefault(key, set()).add(n)
    return {k: next(iter(v)) for k, v in sizes.items() if len(v) == 1}


def greedy_check(reference: ort.InferenceSession, pruned: ort.InferenceSession,
                 change: SignatureChange, dims: dict[str, int], *,
                 dense: Callable[[], ort.InferenceSession] | None = None) -> dict:
    """The pruned decoder's ``GREEDY_STEPS`` greedy tokens equal those of ``reference`` (the
    masked original); for the report, how many were compared, or why the loop did not run.
    ``dense`` (depth plans): makes a session of the unmasked original, for the per-token
    logits report of :func:`depth_logits`."""
    why = loop_inputs(pruned, change)
    if why is not None:
        log.warning("the greedy generation check does not run: %s", why)
        return {"tokens": 0, "equal": None, "not_run": why}
    prompt = prompt_for(pruned)
    logits: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
    want, got = (greedy_tokens(sess, change, prompt=prompt, steps=GREEDY_STEPS, dims=dims,
                               pruned=sess is pruned, logits=kept)
                 for sess, kept in zip((reference, pruned), logits))
    if not np.array_equal(want, got):
        first = int(np.flatnonzero(want != got)[0])
        raise ValidationError(f"greedy generation differs from the masked original's at token "
                              f"{first} of {want.size}: {got.tolist()} instead of {want.tolist()}")
    result: dict = {"tokens": int(want.size), "equal": True}
    if dense is not None:
        result |= depth_logits(dense(), change, prompt, dims, got, *logits)
    return result


def depth_logits(dense: ort.InferenceSession, change: SignatureChange, prompt: np.ndarray,
                 dims: dict[str, int], got: np.ndarray, masked: list[np.ndarray],
                 pruned: list[np.ndarray]) -> dict:
    """What the report says of a depth-pruned decoder's generation: per token, the largest
    logit difference from the masked original (0 up to float error: masked == pruned); how
    many of the dense original's own greedy tokens the pruned model picks; and per token, the
    relative logits difference ``‖l − l_dense‖ / ‖l_dense‖`` with the dense original fed the
    pruned model's tokens (teacher forcing: both see the same prefix)."""
    forced: list[np.ndarray] = []
    free = greedy_tokens(dense, change, prompt=prompt, steps=got.size, dims=dims, pruned=False)
    greedy_tokens(dense, change, prompt=prompt, steps=got.size, dims=dims, pruned=False,
                  logits=forced, forced=got)
    return {"logits_max_abs_diff": [float(np.max(np.abs(p - m))) for p, m in zip(pruned, masked)],
            "dense_tokens_equal": int(np.sum(free == got)),
            "dense_logits_relative_diff": [
                float(np.linalg.norm(p - d) / max(float(np.linalg.norm(d)), 1e-30))
                for p, d in zip(pruned, forced)]}


def prompt_for(sess: ort.InferenceSession, *, seed: int = 0) -> np.ndarray:
    """A seeded ``[1, PROMPT_LENGTH]`` prompt of token ids the vocabulary (the logits' fixed
    last dim) holds."""
    logits = next(o for o in sess.get_outputs() if o.name == LOGITS)
    vocab = logits.shape[-1] if isinstance(logits.shape[-1], int) else 2
    return np.random.default_rng(seed).integers(0, vocab, size=(1, PROMPT_LENGTH))
