"""Which residual-block score keeps the final outputs closest when depth pruning drops N blocks.

    python -m benchmarks.quality.depth_criteria [--samples 32]

For the trained digits ViT (8 residual blocks: 4 attention + 4 MLP sub-blocks; scored on
training images, evaluated on the 597 held-out test images) and, without real data, on the
random-init ``models.resnet.resnet_basic`` (4 identity-shortcut blocks; scored and evaluated on
different random inputs), each block criterion of ``spa prune --depth-criterion`` chooses N
blocks through the pipeline (``spa.api.plan``); the model with those blocks dropped is then
compared with the dense one: relative squared output error, top-1 agreement, (ViT) accuracy.
The scores are taken with calibration data (``--calib``) and without (synthetic inputs).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from spa import validate as val
from spa.api import PruneOptions, analyze, plan
from spa.choices import DepthCriterion

HERE = Path(__file__).parent


def _dropped_outputs(model: onnx.ModelProto, zero: list[str], x: np.ndarray) -> np.ndarray:
    masked = onnx.ModelProto()
    masked.CopyFrom(model)
    for init in masked.graph.initializer:
        if init.name in zero:
            init.CopyFrom(numpy_helper.from_array(
                np.zeros_like(numpy_helper.to_array(init)), init.name))
    sess = val.session(masked)
    return next(iter(val.run_chunked(sess, {sess.get_inputs()[0].name: x}).values()))


def measure(path: Path, calib: np.ndarray | None, x_eval: np.ndarray,
            y_eval: np.ndarray | None, counts: list[int], samples: int) -> list[dict]:
    model = onnx.load(str(path))
    analysis = analyze(path)
    dense = _dropped_outputs(model, [], x_eval)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        npz = None
        if calib is not None:
            npz = Path(tmp) / "calib.npz"
            np.savez(npz, **{model.graph.input[0].name: calib[:samples]})
        for source in ("calib", "synthetic") if npz is not None else ("synthetic",):
            for criterion in DepthCriterion:
                for n in counts:
                    options = PruneOptions(ratio=0.0, drop_blocks=n, depth_criterion=criterion,
                                           calib=str(npz) if source == "calib" else None,
                                           allocation="uniform", reconstruct=False,
                                           held_out=0.0)
                    p = plan(analysis, options)
                    out = _dropped_outputs(model, [z for b in p.dropped for z in b.zero], x_eval)
                    err = float(np.sum((out - dense) ** 2) / np.sum(dense ** 2))
                    row = {"model": path.stem, "scores_on": source,
                           "criterion": criterion.value, "dropped": n,
                           "blocks": [b.add for b in p.dropped], "rel_sq_error": err,
                           "top1_agreement": float(np.mean(out.argmax(1) == dense.argmax(1)))}
                    if y_eval is not None:
                        row["accuracy"] = float(np.mean(out.argmax(1) == y_eval))
                        row["dense_accuracy"] = float(np.mean(dense.argmax(1) == y_eval))
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--resnet", type=Path, help="resnet_basic ONNX (python -m models.export "
                        "resnet_basic -o PATH); skipped when not given")
    args = parser.parse_args()
    from benchmarks.quality.digits import load_digits_splits

    x_train, _, x_test, y_test = load_digits_splits()
    measure(HERE / "models" / "vit_digits.onnx", x_train, x_test, y_test, [1, 2, 3, 4],
            args.samples)
    if args.resnet is not None:
        rng = np.random.default_rng(1)
        x = rng.standard_normal((256, 3, 32, 32)).astype(np.float32)
        measure(args.resnet, None, x, None, [1, 2, 3], args.samples)


if __name__ == "__main__":
    main()
