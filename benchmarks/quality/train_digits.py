"""Train the two digits models on CPU and export them for the quality benchmark.

    python -m benchmarks.quality.train_digits [--only resnet_digits|vit_digits] [--out DIR]

For each model (:mod:`.digits_models`) this trains on the fixed split of
:func:`.digits.load_digits_splits` (seed 0) with AdamW, a one-cycle learning-rate schedule,
label smoothing and light random affine augmentation, reports the test accuracy and the
training time, and writes to ``benchmarks/quality/models/``:

* ``NAME.pt`` -- the torch ``state_dict`` (rebuild with ``digits_models.build(NAME, path)``);
* ``NAME.onnx`` -- the eval-mode export with the TorchScript exporter at opset 17, constant
  folding on (so every BatchNorm is folded into its Conv, as in users' files), input
  ``input`` ``[batch, 3, 32, 32]`` with a symbolic batch axis, output ``output``
  ``[batch, 10]``;
* ``results.json`` -- accuracies (torch and onnxruntime), times, sizes, hyper-parameters.

Everything is seeded and runs with deterministic torch algorithms on 2 threads, so a rerun
on the same machine and torch version reproduces the weights.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.quality.digits import split_stats
from benchmarks.quality.digits_models import MODEL_NAMES, build

__all__ = ["MODELS_DIR", "CONFIGS", "TrainConfig", "augment", "export_onnx", "main", "train"]

MODELS_DIR = Path(__file__).parent / "models"


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run."""

    epochs: int
    lr: float
    weight_decay: float
    batch_size: int = 64
    label_smoothing: float = 0.1
    max_rotate_deg: float = 10.0
    max_shift_px: float = 2.0
    max_scale: float = 0.1
    seed: int = 0


CONFIGS: dict[str, TrainConfig] = {
    "resnet_digits": TrainConfig(epochs=12, lr=3e-3, weight_decay=5e-4),
    "vit_digits": TrainConfig(epochs=40, lr=2e-3, weight_decay=0.05),
}


def augment(x: torch.Tensor, cfg: TrainConfig, gen: torch.Generator, background: float,
            ) -> torch.Tensor:
    """Random rotation, scale and shift of a normalised batch (background stays background)."""
    n = x.shape[0]
    u = torch.rand(n, 4, generator=gen) * 2 - 1
    angle = u[:, 0] * math.radians(cfg.max_rotate_deg)
    scale = 1 + u[:, 1] * cfg.max_scale
    shift = u[:, 2:] * (2 * cfg.max_shift_px / x.shape[-1])  # grid units: 2 / width per pixel
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x - background, grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False)
    return out + background


def evaluate_torch(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of an eval-mode torch model."""
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(torch.from_numpy(x[i : i + 256])) for i in range(0, len(x), 256)])
    return float((logits.argmax(1).numpy() == y).mean())


def train(name: str, cfg: TrainConfig, *, verbose: bool = True) -> tuple[nn.Module, dict]:
    """Train model ``name`` with ``cfg``; return the eval-mode model and a result dict."""
    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(True)
    data = split_stats(seed=0)
    background = (0.0 - data.mean) / data.std
    x_train, y_train = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)

    model = build(name).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(x_train) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.2
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    gen = torch.Generator().manual_seed(cfg.seed)

    t0 = time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        total = 0.0
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            xb = augment(x_train[idx], cfg, gen, background)
            loss = loss_fn(model(xb), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        if verbose and ((epoch + 1) % max(1, cfg.epochs // 6) == 0 or epoch < 2):
            acc = evaluate_torch(model, data.x_test, data.y_test)
            print(f"  {name} epoch {epoch + 1:3d}/{cfg.epochs}  loss {total / len(order):.4f}  "
                  f"test acc {acc:.4f}  ({time.perf_counter() - t0:.1f}s)", flush=True)
    seconds = time.perf_counter() - t0
    model.eval()
    result = {
        "train_seconds": round(seconds, 1),
        "torch_test_accuracy": evaluate_torch(model, data.x_test, data.y_test),
        "torch_train_accuracy": evaluate_torch(model, data.x_train, data.y_train),
        "params": sum(p.numel() for p in model.parameters()),
        "config": asdict(cfg),
    }
    return model, result


def export_onnx(model: nn.Module, path: Path) -> Path:
    """TorchScript export at opset 17, BN folded, symbolic batch axis."""
    from models.export import export_module

    example = (torch.zeros(1, 3, 32, 32),)
    return export_module(model.eval(), example, path, exporter="torchscript", opset=17,
                         dynamic_batch=True, optimize=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Train, report, save; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality.train_digits",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=MODEL_NAMES, action="append",
                        help="train only this model (repeatable)")
    parser.add_argument("--out", type=Path, default=MODELS_DIR)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from benchmarks.quality.digits import load_digits_splits
    from benchmarks.quality.evaluate import accuracy

    _, _, x_test, y_test = load_digits_splits(seed=0)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for name in args.only or MODEL_NAMES:
        print(f"training {name} ...", flush=True)
        model, result = train(name, CONFIGS[name])
        args.out.mkdir(parents=True, exist_ok=True)
        pt, onnx_path = args.out / f"{name}.pt", args.out / f"{name}.onnx"
        torch.save(model.state_dict(), pt)
        export_onnx(model, onnx_path)
        result["onnx_test_accuracy"] = accuracy(onnx_path, x_test, y_test)
        result["onnx_bytes"] = onnx_path.stat().st_size
        result["pt_bytes"] = pt.stat().st_size
        result["torch"] = torch.__version__
        results[name] = result
        print(f"{name}: test accuracy torch {result['torch_test_accuracy']:.4f}, onnx "
              f"{result['onnx_test_accuracy']:.4f}; trained in {result['train_seconds']}s; "
              f"{result['params']:,} params; {onnx_path} {result['onnx_bytes']:,} bytes",
              flush=True)
    results_path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
