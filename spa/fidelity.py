"""Fidelity: how closely a pruned model still answers like the dense one, on held-out inputs.

Three measures, over the model's float outputs, each sample compared with the dense model's
answer to the same input:

* ``agreement``: the share of samples whose arg-max over the last axis is the dense one's, for
  a first output shaped like class scores (``[N, C]`` with ``C ≥ 2``, rows not unit vectors;
  ``[N, T, C]`` averages over positions);
* ``cosine``: the mean per-sample cosine similarity of the first float output (embeddings);
* ``kl``: for class scores, the mean KL divergence of the pruned model's class probabilities
  from the dense model's;
* ``relative_error``: ``‖y − y_dense‖ / ‖y_dense‖`` over all float outputs together;
* ``samples``: with agreement, how many samples it counts (its resolution).

Outputs with a value per token (``[N, T, …]`` beside an ``[N, T]`` attention mask: a
decoder's logits, a token classifier's scores) are compared at the attended tokens only: with
calibration lines of 20 tokens padded to 128, the padding's outputs would otherwise make most
of the measure.

:func:`headline` names the one a report leads with: agreement for classifiers, else cosine.
:func:`compare` works on outputs already computed (the recovery loop's, in PyTorch);
:func:`measure` runs both models in onnxruntime over the inputs, in chunks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np
import onnx

if TYPE_CHECKING:
    from spa.generation import SignatureChange

Outputs = Sequence[np.ndarray]


def _float_outputs(outputs: Outputs) -> list[np.ndarray]:
    return [np.asarray(o) for o in outputs if np.issubdtype(np.asarray(o).dtype, np.floating)]


class Shaped(Protocol):
    """An array or a tensor: what :func:`per_token` reads."""

    @property
    def ndim(self) -> int: ...

    @property
    def shape(self) -> Sequence[int]: ...


def per_token(output: Shaped, real: Shaped | None) -> bool:
    """Whether ``output`` is ``[N, T, C]`` beside the ``[N, T]`` mask ``real`` (a KV cache's
    ``[N, heads, T, head size]`` is not: its axis 1 is not the tokens'); numpy arrays here,
    torch tensors in the recovery loss."""
    return real is not None and output.ndim == 3 and output.shape[:2] == real.shape


def compare(reference: Outputs, other: Outputs, real: np.ndarray | None = None
            ) -> dict[str, float]:
    """The fidelity measures of ``other`` against ``reference`` (outputs in the same order,
    first axis = samples). ``real``: the ``[N, T]`` attention mask's attended tokens, where
    outputs with a value per token are compared (padding's values count as equal)."""
    ref, out = _float_outputs(reference), _float_outputs(other)
    if not ref or len(ref) != len(out):
        return {}
    real = None if real is None else np.asarray(real) != 0
    if real is not None:  # the padding's values, set equal (zero) in both
        pad = ~real
        ref, out = ([np.where(pad[..., None], 0, o) if per_token(o, real) and o.shape == p.shape
                     else o
                     for o, p in zip(side, partner)]
                    for side, partner in ((ref, out), (out, ref)))
    metrics: dict[str, float] = {}
    first_ref, first_out = ref[0].astype(np.float64), out[0].astype(np.float64)
    if class_scores(first_ref) and first_ref.shape == first_out.shape:
        at = real if per_token(first_ref, real) else ...
        metrics["agreement"] = float(np.mean(first_ref[at].argmax(-1) == first_out[at].argmax(-1)))
        metrics["kl"] = _kl(first_ref[at], first_out[at])
        metrics["samples"] = len(first_ref)
    if first_ref.shape == first_out.shape and first_ref.size:
        a = first_ref.reshape(len(first_ref), -1)
        b = first_out.reshape(len(first_out), -1)
        denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        cos = np.where(denom > 0, (a * b).sum(1) / np.maximum(denom, 1e-30), 1.0)
        metrics["cosine"] = float(np.mean(cos))
    same = [(r.astype(np.float64), o) for r, o in zip(ref, out) if r.shape == o.shape]
    num = sum(float(np.sum((r - o) ** 2)) for r, o in same)
    den = sum(float(np.sum(r ** 2)) for r, _ in same)
    metrics["relative_error"] = float(np.sqrt(num / den)) if den > 0 else float(np.sqrt(num))
    return metrics


def _kl(reference: np.ndarray, other: np.ndarray) -> float:
    """Mean ``KL(softmax(reference) ‖ softmax(other))`` over samples (and positions)."""
    def log_softmax(z: np.ndarray) -> np.ndarray:
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lp, lq = log_softmax(reference), log_softmax(other)
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))


def class_scores(output: np.ndarray) -> bool:
    """Whether an output looks like class scores: ``[N, C]`` (or ``[N, T, C]``) floats with
    ``C ≥ 2`` whose rows are not unit vectors (unit rows are embeddings, whose arg-max is
    noise)."""
    if output.ndim not in (2, 3) or output.shape[-1] < 2 \
            or not np.issubdtype(output.dtype, np.floating):
        return False
    return not np.allclose(np.linalg.norm(output, axis=-1), 1.0, atol=1e-3)


def describe(metrics: Mapping[str, float]) -> str:
    """The measures as a line of text: ``agreement 0.6538, kl 0.1259, …`` (the sample count
    last, as a count)."""
    text = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "samples")
    return f"{text} (of {int(metrics['samples'])} samples)" if "samples" in metrics else text


def headline(metrics: Mapping[str, float]) -> tuple[str, float] | None:
    """The measure a report leads with, and its value (higher is better for both)."""
    for name in ("agreement", "cosine"):
        if name in metrics:
            return name, metrics[name]
    return None


def better(candidate: Mapping[str, float], incumbent: Mapping[str, float]) -> bool:
    """Whether ``candidate`` is the more faithful: the headline measure, ties broken by the KL
    divergence of the class probabilities (softmax ignores a shift of the logits, which the
    relative error counts) or, without class scores, by the relative error."""
    name = deciding(candidate, incumbent)
    if name in ("agreement", "cosine"):
        return candidate[name] > incumbent[name]
    return candidate.get(name, np.inf) < incumbent.get(name, np.inf)


def deciding(candidate: Mapping[str, float], incumbent: Mapping[str, float]) -> str:
    """The measure :func:`better` decides by: the headline one, unless the two are equal or
    (agreements) within their sampling noise; then ``kl``, else ``relative_error``."""
    key = headline(incumbent)
    if key is not None and key[0] in candidate and candidate[key[0]] != key[1] \
            and not _within_noise(candidate, incumbent):
        return key[0]
    return "kl" if "kl" in candidate and "kl" in incumbent else "relative_error"


def change(before: Mapping[str, float], after: Mapping[str, float]) -> str:
    """How fidelity moved, by the measure that decides whether ``after`` is better: ``agreement
    0.8333 → 0.7500``, or ``kl 0.0018 → 0.0020 (agreement 0.8333 → 1.0000 is within the
    sampling noise of 6 samples)``."""
    name = deciding(after, before)
    text = f"{name} {before.get(name, np.nan):.4f} → {after.get(name, np.nan):.4f}"
    key = headline(before)
    if key is not None and key[0] != name and key[0] in after:
        why = f"within the sampling noise of {int(before['samples'])} samples" \
            if key[1] != after[key[0]] and "samples" in before else "unchanged"
        text += f" ({key[0]} {key[1]:.4f} → {after[key[0]]:.4f} is {why})"
    return text


def _within_noise(a: Mapping[str, float], b: Mapping[str, float]) -> bool:
    """Whether two agreements on the same ``samples`` differ by less than their sampling noise
    (two standard errors of the difference, at least one sample), so that the KL divergence, a
    continuous measure of the same thing, decides: on 26 held-out images one image is 0.038 of
    agreement, and recovery kept or dropped models on such flips."""
    n = a.get("samples")
    if "agreement" not in a or "agreement" not in b or "kl" not in a or "kl" not in b \
            or not n or n != b.get("samples"):
        return False
    p, q = a["agreement"], b["agreement"]
    noise = 2.0 * np.sqrt((p * (1 - p) + q * (1 - q)) / n)
    return abs(p - q) <= max(noise, 1.0 / n)


def measure(dense, pruned, inputs: Mapping[str, np.ndarray],
            change: SignatureChange | None = None) -> dict[str, float]:
    """Run ``dense`` and ``pruned`` (paths or ModelProtos) in onnxruntime on ``inputs``, in
    chunks the models take, and compare. ``change``: the pruned model's signature change (a
    decoder's KV caches lose heads): it is fed the inputs at the heads it kept, and compared at
    those of the dense outputs."""
    from spa import validate as val
    from spa.calibration import attention_mask

    feeds = dict(inputs)
    ref = val.run_chunked(val.session(dense), feeds)
    out = val.run_chunked(val.session(pruned), change.pruned_feeds(feeds) if change else feeds)
    if change:
        ref = change.kept_outputs(ref)
    mask = attention_mask(dense if isinstance(dense, onnx.ModelProto)
                          else onnx.load(str(dense), load_external_data=False))
    return compare(list(ref.values()), [out[k] for k in ref],
                   feeds.get(mask) if mask is not None else None)
