"""``spa.torch.from_onnx`` on resizes: ``F.interpolate`` (where it computes the positions of the
axis-by-axis path, spa/torch/resize_ops.py ``_interpolated``) against the axis-by-axis path,
forward and backward, side by side in interleaved rounds on one thread (``time.thread_time``).

Cases: a bilinear and a nearest 2x upsample of ``[8, 64, 80, 80]``, and the reference UNet
(its decoder's resizes), both exporters' files, a batch of 8 at its input size.

    python -m benchmarks.from_onnx_resize [--rounds 9]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.common import write_result


def _timed(step: Callable[[], torch.Tensor]) -> float:
    t0 = time.thread_time()
    step().float().pow(2).sum().backward()
    return time.thread_time() - t0


def _side_by_side(step: Callable[[], torch.Tensor], rounds: int) -> dict:
    """Median seconds of ``step`` (forward and backward) through each path, interleaved."""
    from spa.torch import resize_ops

    fast = resize_ops._interpolated
    paths = {"interpolate": fast, "axis_by_axis": lambda *args: None}
    times: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(rounds + 1):  # the first round warms up
        for name, choice in paths.items():
            resize_ops._interpolated = choice
            try:
                times[name].append(_timed(step))
            finally:
                resize_ops._interpolated = fast
    medians = {k: statistics.median(v[1:]) for k, v in times.items()}
    return {"median_seconds": medians,
            "speedup": medians["axis_by_axis"] / medians["interpolate"]}


def _upsample(nearest: str | None, coords: str) -> Callable[[], torch.Tensor]:
    from spa.torch import resize_ops

    x = torch.randn(8, 64, 80, 80, requires_grad=True)
    return lambda: resize_ops._resampled(x, [8, 64, 160, 160], [1.0, 1.0, 2.0, 2.0], coords,
                                         nearest)


def _model(path: Path) -> Callable[[], torch.Tensor]:
    import spa.torch as st
    from spa import validate as val

    module = st.from_onnx(path)
    feeds = val.random_inputs(val.session(path), dims={"N": 8, "batch": 8})
    args = [torch.from_numpy(feeds[n]) for n in module.input_names]

    def step() -> torch.Tensor:
        module.zero_grad()
        out = module(*args)
        return out if isinstance(out, torch.Tensor) else out[0]
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    from models.export import export

    torch.set_num_threads(1)
    results = {"bilinear_2x": _side_by_side(_upsample(None, "half_pixel"), args.rounds),
               "nearest_2x": _side_by_side(_upsample("floor", "asymmetric"), args.rounds)}
    tmp = Path(tempfile.mkdtemp(prefix="spa-bench-"))
    for exporter in ("torchscript", "dynamo"):
        path = export("unet", tmp / f"unet_{exporter}.onnx", exporter=exporter,
                      dynamic_batch=True)
        results[f"unet_{exporter}"] = _side_by_side(_model(Path(path)), args.rounds)
    body = {"what": "forward and backward through spa.torch.from_onnx's resizes, one thread",
            "rounds": args.rounds, "results": results}
    path = write_result("from_onnx_resize", body)
    for label, r in results.items():
        print(f"{label}: interpolate {r['median_seconds']['interpolate'] * 1e3:.1f} ms, axis by "
              f"axis {r['median_seconds']['axis_by_axis'] * 1e3:.1f} ms, ×{r['speedup']:.2f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
