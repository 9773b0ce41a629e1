"""Accuracy and agreement of ONNX classifiers, run with onnxruntime in batches.

* :func:`predict_logits` -- run a one-input, one-output model over ``x`` in batches and
  return the stacked logits. A model whose batch axis is fixed (e.g. exported with a static
  ``1 x 3 x 32 x 32`` input) is fed in batches of exactly that size.
* :func:`accuracy` -- top-1 accuracy of a model file against integer labels.
* :func:`top1_agreement` / :func:`topk_agreement` -- how often a (pruned) model's
  predictions agree with reference logits: the share of samples whose arg-max is equal, and
  the share whose reference top-1 class is among the other model's top ``k``. These are the
  measures for data without labels (the EfficientNet photo crops).

CLI, for a quick look at a (pruned) model::

    python -m benchmarks.quality.evaluate MODEL.onnx --digits       # digits test accuracy
    python -m benchmarks.quality.evaluate MODEL.onnx --photos REF.onnx
        # top-1/top-5 agreement with REF on the EfficientNet photo crops
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["accuracy", "main", "predict_logits", "session", "top1_agreement", "topk_agreement"]


def session(onnx_path: str | Path, threads: int = 2):  # -> onnxruntime.InferenceSession
    """A CPU onnxruntime session with ``threads`` intra-op threads and no spinning."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])


def predict_logits(onnx_path: str | Path, x: np.ndarray, batch_size: int = 128,
                   threads: int = 2) -> np.ndarray:
    """Logits of the model's single output for every sample of ``x`` (float32, batched)."""
    sess = session(onnx_path, threads)
    inputs = sess.get_inputs()
    if len(inputs) != 1:
        raise ValueError(f"{onnx_path}: expected one input, found {len(inputs)}")
    batch_dim = inputs[0].shape[0] if inputs[0].shape else None
    if isinstance(batch_dim, int) and batch_dim > 0:
        batch_size = batch_dim
    x = np.ascontiguousarray(x, dtype=np.float32)
    name = inputs[0].name
    chunks = []
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        short = batch_size - len(xb) if isinstance(batch_dim, int) else 0
        if short:  # fixed batch axis: pad the last batch, drop the padding afterwards
            xb = np.concatenate([xb, np.zeros((short, *xb.shape[1:]), np.float32)])
        out = sess.run(None, {name: xb})[0]
        chunks.append(out[: len(out) - short])
    return np.concatenate(chunks).reshape(len(x), -1)


def accuracy(onnx_path: str | Path, x: np.ndarray, y: np.ndarray, batch_size: int = 128,
             threads: int = 2) -> float:
    """Top-1 accuracy of the ONNX classifier at ``onnx_path`` on ``(x, y)``."""
    logits = predict_logits(onnx_path, x, batch_size, threads)
    y = np.asarray(y)
    if len(y) != len(logits):
        raise ValueError(f"{len(logits)} predictions for {len(y)} labels")
    return float((logits.argmax(axis=1) == y).mean())


def top1_agreement(ref_logits: np.ndarray, logits: np.ndarray) -> float:
    """Share of samples whose arg-max class is the same in both logit arrays."""
    ref, other = _pair(ref_logits, logits)
    return float((ref.argmax(axis=1) == other.argmax(axis=1)).mean())


def topk_agreement(ref_logits: np.ndarray, logits: np.ndarray, k: int = 5) -> float:
    """Share of samples whose reference top-1 class is among ``logits``' top ``k`` classes."""
    ref, other = _pair(ref_logits, logits)
    if not 1 <= k <= other.shape[1]:
        raise ValueError(f"k must be in [1, {other.shape[1]}], got {k}")
    top = np.argpartition(-other, k - 1, axis=1)[:, :k]
    return float((top == ref.argmax(axis=1)[:, None]).any(axis=1).mean())


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    if a.shape != b.shape:
        raise ValueError(f"logit shapes differ: {a.shape} vs {b.shape}")
    return a, b


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality.evaluate",
                                     description="Accuracy or agreement of an ONNX model.")
    parser.add_argument("model", type=Path)
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument("--digits", action="store_true", help="accuracy on the digits test split")
    how.add_argument("--photos", type=Path, metavar="REF",
                     help="agreement with reference model REF on the EfficientNet photo crops")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    if args.digits:
        from benchmarks.quality.digits import load_digits_splits

        _, _, x, y = load_digits_splits(seed=0)
        print(f"{args.model}: digits test accuracy "
              f"{accuracy(args.model, x, y, args.batch_size):.4f} ({len(y)} samples)")
        return 0
    from benchmarks.quality.effnet_lite0 import effnet_eval_set

    x = effnet_eval_set()
    ref = predict_logits(args.photos, x, args.batch_size)
    out = predict_logits(args.model, x, args.batch_size)
    print(f"{args.model} vs {args.photos} on {len(x)} photo crops: top-1 agreement "
          f"{top1_agreement(ref, out):.4f}, top-5 {topk_agreement(ref, out, 5):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
