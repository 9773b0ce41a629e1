"""Prune speed and result speed of SPA on a BERT-base-sized encoder (random init).

12 layers, hidden 768, 12 heads, MLP 3072, vocabulary 30522, sequence 128, exported with the
TorchScript exporter (opset 17). Prune with ``--heads-ratio 0.5 --mlp-ratio 0.5`` (L1): time
from file to saved file (validation excluded), median of N runs; onnxruntime latency of dense
and pruned side by side (1 and 2 threads) against the FLOPs reduction.

    python -m benchmarks.transformer_speed [--runs 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks.common import benchmark_prune, print_results, write_result


def build_bert_base(seq: int = 128):
    """The encoder (random init, seed 0) and its example ``(input_ids, attention_mask)``."""
    import torch

    from models.attention import finalize_transformer
    from models.bert import Bert

    torch.manual_seed(0)
    model = finalize_transformer(Bert(vocab=30522, max_positions=512, dim=768, depth=12,
                                      heads=12, mlp=3072))
    ids = torch.randint(0, 30522, (1, seq))
    mask = torch.ones(1, seq, dtype=torch.int64)
    return model.eval(), (ids, mask)


def export_bert_base(path: Path, seq: int = 128) -> Path:
    from models.export import export_module

    model, inputs = build_bert_base(seq)
    return export_module(model, inputs, path, exporter="torchscript",
                         input_names=["input_ids", "attention_mask"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    from spa.api import PruneOptions

    tmp = Path(tempfile.mkdtemp(prefix="spa-bench-"))
    dense = export_bert_base(tmp / "bert_base.onnx")
    variants = {"heads0.5_mlp0.5": PruneOptions(ratio=0.0, heads_ratio=0.5, mlp_ratio=0.5)}
    results = benchmark_prune(dense, variants, args.runs, tmp)
    body = {"model": "BERT-base-sized encoder (12×768, 12 heads, MLP 3072, vocab 30522, seq 128),"
                     " random init, TorchScript exporter opset 17",
            "runs": args.runs, "results": results,
            "targets": {"prune_seconds": 10.0, "speedup_over_flops_reduction": 0.8}}
    path = write_result("transformer_speed_bert_base", body)
    print_results(results)
    print(f"wrote {path} at {time.strftime('%H:%M:%S')}")


if __name__ == "__main__":
    main()
