"""Prune a trained PyTorch model without data, then fine-tune it: SPA's PyTorch front end.

The model is the ResNet trained on scikit-learn's digits by the quality benchmark
(``benchmarks/quality/models/resnet_digits.pt``; ``--retrain`` trains it again, ~2 minutes).

1. evaluate the dense model;
2. ``spa.torch.prune(..., criterion="obspa", target="flops")``: OBSPA with its data-free
   (synthetic) Hessian, no training data, weights compensated; the module is sliced in place;
3. evaluate; fine-tune for ``--epochs`` epochs on the training split; evaluate;
4. export the fine-tuned model to ONNX and check its accuracy in onnxruntime.

    python -m examples.prune_finetune [--flops-cut 2] [--epochs 2] [--json out.json]

(from the checkout's root: the example uses the quality benchmark's data and model code, which
is not installed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import spa.torch as st
from benchmarks.quality.digits import split_stats
from benchmarks.quality.digits_models import build
from benchmarks.quality.train_digits import CONFIGS, augment, evaluate_torch, train
from spa import validate as val
from spa.torch.export import export

ROOT = Path(__file__).resolve().parents[1]

WEIGHTS = ROOT / "benchmarks" / "quality" / "models" / "resnet_digits.pt"


def fine_tune(model: nn.Module, data, epochs: int, seed: int = 0) -> float:
    """A short fine-tune (AdamW, cosine decay, the benchmark's augmentation); returns seconds."""
    torch.manual_seed(seed)
    cfg = CONFIGS["resnet_digits"]
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    background = (0.0 - data.mean) / data.std
    steps = epochs * ((len(x) + cfg.batch_size - 1) // cfg.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            loss = nn.functional.cross_entropy(model(augment(x[idx], cfg, gen, background)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return time.perf_counter() - t0


def onnx_accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    sess = val.session(path.read_bytes())
    name = sess.get_inputs()[0].name
    batch = sess.get_inputs()[0].shape[0]
    step = batch if isinstance(batch, int) else 256
    logits = np.concatenate([sess.run(None, {name: x[i:i + step]})[0]
                             for i in range(0, len(x), step)])
    return float((logits.argmax(1) == y).mean())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--flops-cut", type=float, default=2.0, help="FLOPs reduction factor")
    p.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs")
    p.add_argument("--retrain", action="store_true", help="train the dense model first")
    p.add_argument("--out", default=str(ROOT / "build" / "resnet_digits_pruned.onnx"))
    p.add_argument("--json", help="write the figures as JSON")
    args = p.parse_args(argv)

    data = split_stats(seed=0)
    if args.retrain:
        model, _ = train("resnet_digits", CONFIGS["resnet_digits"], verbose=False)
    else:
        model = build("resnet_digits", WEIGHTS)
    example = (torch.from_numpy(data.x_test[:1]),)
    figures: dict = {"command": " ".join(["python", "-m", "examples.prune_finetune",
                                          *(argv if argv is not None else sys.argv[1:])])}
    figures["dense_accuracy"] = evaluate_torch(model, data.x_test, data.y_test)

    t0 = time.perf_counter()
    model, report = st.prune(model, example, criterion="obspa", target="flops",
                             ratio=1 - 1 / args.flops_cut)
    figures["prune_seconds"] = round(time.perf_counter() - t0, 2)
    figures["flops_cut"] = round(report.flops_before / report.flops_after, 3)
    figures["params"] = [report.params_before, report.params_after]
    figures["pruned_accuracy_no_data"] = evaluate_torch(model, data.x_test, data.y_test)

    figures["finetune_seconds"] = round(fine_tune(model, data, args.epochs), 1)
    figures["finetuned_accuracy"] = evaluate_torch(model, data.x_test, data.y_test)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    export(model, example, out)
    figures["onnx_accuracy"] = onnx_accuracy(out, data.x_test, data.y_test)
    figures["onnx"] = str(out.relative_to(ROOT) if out.is_relative_to(ROOT) else out)
    print(json.dumps(figures, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    return figures


if __name__ == "__main__":
    main()
