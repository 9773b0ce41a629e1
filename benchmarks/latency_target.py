"""Latency target: ask for 1.5× and 2× faster, measure what comes out; and never slower.

Models (random init): torchvision ResNet-50 and MobileNetV3-Large (``zoo``), timm's
EfficientNet-Lite0 (224 px; the model on which ``--ratio 0.05`` alone runs 2.5× slower),
ultralytics YOLOv8n from ``yolov8n.yaml`` (640 px, BatchNorm folded; ``pip install ultralytics``, a
benchmark-only package, offline) and transformers BERT-base (``BertConfig()`` defaults, sequence
128). SPA's ``--target latency`` with ``--ratio 1 − 1/s`` for requested speed-ups ``s`` of 1.5 and
2 (L1 importance, ``--round-to auto``, one onnxruntime thread on the CPU) and, at the same ratio,
``--target flops``, one channel ratio in every group, and Torch-Pruning's L1 magnitude pruning
where the model has a recipe; at :data:`SMALL_RATIOS`, exact counts (``--round-to 1``) and the
default options (``--round-to auto``). The latency table is built once in a fresh cache (its build
time is recorded), then read back (the cached time is recorded). Every pruned model, the dense one
and the dense one in a second session (the noise floor) are timed side by side in interleaved
rounds, 1 thread, CPU time of the calling thread (robust to the load of a shared machine); achieved
speed-up = dense / pruned, and a run below 1 is slower than dense. A latency-target run measures
its own result as the default options do, and plans once more when that misses by more than
10% (as a user's run would); validation is off.

    python -m benchmarks.latency_target [--models resnet50 ...] [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from benchmarks.common import side_by_side_latency, write_result
from benchmarks.tp_peer import default_recipe
from benchmarks.zoo import MODELS, Entry, export

SPEEDUPS = (1.5, 2.0)
SMALL_RATIOS = (0.05, 0.1)


def _efficientnet_lite0():
    import torch

    from models.torchvision_compat import import_torchvision

    import_torchvision()  # timm imports torchvision; its registrations are stubbed first
    import timm

    torch.manual_seed(0)
    model = timm.create_model("efficientnet_lite0", pretrained=False).eval()
    return model, (torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)),)


def _yolov8n():
    """Ultralytics YOLOv8n built from its YAML (random init, BatchNorm folded, 640 px); the
    Detect head in export mode returns its one ``[1, 84, 8400]`` tensor. Offline."""
    import torch

    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics import YOLO

    torch.manual_seed(0)
    model = YOLO("yolov8n.yaml").model.fuse().eval()
    for module in model.modules():
        if type(module).__name__ == "Detect":
            module.export, module.format = True, "onnx"
    return model, (torch.randn(1, 3, 640, 640, generator=torch.Generator().manual_seed(0)),)


def _bert_base():
    """transformers ``BertModel(BertConfig())`` (BERT-base defaults, random init, eager
    attention), sequence 128; the output is the last hidden state."""
    import torch

    from models.torchvision_compat import import_torchvision

    import_torchvision()  # transformers imports torchvision too
    from transformers import BertConfig, BertModel

    class LastHidden(torch.nn.Module):
        def __init__(self, bert: torch.nn.Module):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    torch.manual_seed(0)
    model = LastHidden(BertModel(BertConfig(attn_implementation="eager"))).eval()
    ids = torch.randint(0, 30522, (1, SEQUENCE), generator=torch.Generator().manual_seed(0))
    return model, (ids, torch.ones(1, SEQUENCE, dtype=torch.int64))


SEQUENCE = 128
#: Models with a Torch-Pruning recipe (not None) get a Torch-Pruning run at each ratio too.
ENTRIES = {"resnet50": MODELS["resnet50"], "mobilenet_v3_large": MODELS["mobilenet_v3_large"],
           "efficientnet_lite0": Entry("timm EfficientNet-Lite0, 224 px", _efficientnet_lite0,
                                       lambda m: default_recipe(m, 1000)),
           "yolov8n": Entry("ultralytics YOLOv8n (from yolov8n.yaml), 640 px", _yolov8n,
                            lambda m: None),
           "bert_base": Entry("transformers BERT-base (BertConfig defaults), seq 128",
                              _bert_base, lambda m: None, ("input_ids", "attention_mask"))}


def _table_seconds(dense: Path) -> dict:
    """Seconds to build the latency table in an empty cache, then to read it back."""
    from spa.passes.latency import kernel_block
    from spa.passes.latency_profile import LatencyProfile
    from spa.pipeline.stages import analyse, load

    analysis = analyse(load(dense))
    seconds = {}
    for label in ("build", "cached"):
        table = LatencyProfile(reanalyse=analyse, block=kernel_block()).run(analysis)
        assert table.cached == (label == "cached")
        seconds[label] = table.seconds
    seconds["groups_timed"] = len(table.groups)
    seconds["noise"] = table.noise
    seconds["dense_ms"] = table.dense_ms
    return seconds


def _prune(dense: Path, out: Path, ratio: float, **options) -> dict:
    """One ``spa.prune`` run, validation off. A latency target measures its result as the
    default options do, so that a missed target is planned again as a user's run would be
    (``replanned``: the first plan measured further off than ±10%)."""
    from spa.api import CheckOptions, PruneOptions, prune
    from spa.choices import Target

    t0 = time.perf_counter()
    timed = options.get("target") is Target.LATENCY
    report, plan = prune(dense, out, PruneOptions(ratio=ratio, **options),
                         CheckOptions(validate=False, latency=timed))
    target = report.latency_target
    return {"prune_seconds": time.perf_counter() - t0, "ratio": ratio,
            "flops_reduction_x": report.flops_before / report.flops_after,
            "kept_widths": {g.name: len(g.keep) for g in plan.groups},
            **({"predicted_speedup_x": target["dense_ms"] / target["predicted_ms"],
                "replanned": bool(target.get("second_try"))} if target else {})}


def _torch_pruning(entry: Entry, ratio: float, out: Path) -> dict:
    """Torch-Pruning's L1 magnitude pruning at channel ratio ``ratio``, exported like dense."""
    from benchmarks.common import onnx_counts
    from benchmarks.zoo import tp_pruned

    model, inputs, seconds = tp_pruned(entry, ratio)
    export(entry, model, inputs, out)
    return {"ratio": ratio, "prune_seconds": seconds["total"], "flops": onnx_counts(out)["flops"]}


def variants(block: int) -> dict[str, tuple[float, dict]]:
    """label → (ratio, PruneOptions fields) of the SPA runs: the latency target, the FLOPs
    target and the uniform channel ratio at ``1 − 1/s``, and exact counts (``--round-to 1``)
    and the default ``--round-to auto`` at small ratios (where unsnapped widths run slower)."""
    from spa.choices import Target

    out: dict[str, tuple[float, dict]] = {}
    for s in SPEEDUPS:
        out[f"latency_{s}x"] = (1 - 1 / s, {"target": Target.LATENCY, "round_to": block})
        out[f"flops_{s}x"] = (1 - 1 / s, {"target": Target.FLOPS, "round_to": block})
        out[f"uniform_{s}x"] = (1 - 1 / s, {"round_to": block})
    for r in SMALL_RATIOS:
        out[f"exact_{r}"] = (r, {"round_to": 1})
        out[f"auto_{r}"] = (r, {})  # the default: --round-to auto
    return out


def measure(key: str, workdir: Path, rounds: int) -> dict:
    from benchmarks.common import onnx_counts
    from spa.passes.latency import kernel_block

    entry = ENTRIES[key]
    model, inputs = entry.build()
    dense = export(entry, model, inputs, workdir / f"{key}.onnx")
    has_tp = entry.recipe(model) is not None
    del model
    result: dict = {"model": entry.label, "latency_table_seconds": _table_seconds(dense),
                    "dense_flops": onnx_counts(dense)["flops"]}
    paths = {"dense": dense}
    runs: dict[str, dict] = {}
    for label, (ratio, options) in variants(kernel_block()).items():
        paths[label] = workdir / f"{key}_{label}.onnx"
        runs[label] = _prune(dense, paths[label], ratio, **options)
    for s in SPEEDUPS:
        runs[f"latency_{s}x"]["requested_x"] = s
        if has_tp:
            label = f"torch_pruning_{s}x"
            paths[label] = workdir / f"{key}_{label}.onnx"
            runs[label] = _torch_pruning(entry, 1 - 1 / s, paths[label])
    # The dense model a second time, in its own session: how far apart two equal models
    # measure in this run (the noise floor of every speed-up below).
    paths["dense_again"] = dense
    lat = side_by_side_latency(paths, threads=1, rounds=rounds, clock=time.thread_time)
    result["latency_ms_dense"] = lat["dense"]
    result["dense_again_speedup_x"] = lat["dense"] / lat["dense_again"]
    for label, r in runs.items():
        r["latency_ms_pruned"] = lat[label]
        r["achieved_speedup_x"] = lat["dense"] / lat[label]
        r["slower_than_dense"] = lat[label] > lat["dense"]
        if "requested_x" in r:
            r["achieved_over_requested"] = r["achieved_speedup_x"] / r["requested_x"]
            r["within_10_percent"] = abs(r["achieved_over_requested"] - 1) <= 0.1
    result["runs"] = runs
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(ENTRIES), choices=list(ENTRIES))
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="spa-latency-"))
    os.environ["SPA_CACHE_DIR"] = str(workdir / "cache")  # a fresh table: its build is timed
    load_before = os.getloadavg()
    results = {}
    for key in args.models:
        results[key] = r = measure(key, workdir, args.rounds)
        t = r["latency_table_seconds"]
        print(f"{key}: table {t['build']:.1f}s (cached {t['cached']:.2f}s)", flush=True)
        for label, run in r["runs"].items():
            print(f"  {label}: achieved {run['achieved_speedup_x']:.2f}x", flush=True)
        # Written after every model, so that the models done survive a later failure.
        body = {"speedups": SPEEDUPS, "small_ratios": SMALL_RATIOS, "threads": 1,
                "criterion": "l1", "round_to": "auto", "load_average_before": load_before,
                "load_average_after": os.getloadavg(), "results": results,
                "goal": "achieved speed-up within ±10% of the requested one (issue #15)"}
        path = write_result("latency_target", body)
        print(f"wrote {path} at {time.strftime('%H:%M:%S')}", flush=True)


if __name__ == "__main__":
    main()
