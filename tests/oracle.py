"""Test-side use of the numeric oracle (DESIGN.md): prune, then assert the three oracles.

1. pruned ≡ masked original (consumers' input slices of removed channels zeroed), relative 1e-4;
2. ratio 0 ⇒ outputs equal to the original's;
3. the emitted model's params and FLOPs equal the plan's prediction;

and the report's params are those of the files, each tensor once (:func:`file_params`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from spa import validate as val
from spa.api import CheckOptions, PruneOptions, PruneReport, analyze, prune
from spa.ir import to_onnx
from spa.plan import Plan

RTOL = 1e-4


@dataclass
class Pruned:
    report: PruneReport
    plan: Plan
    path: Path


#: A pruned model and its masked original run different kernels' summation orders (a channel
#: block that the masked model fills with zeros, the pruned one leaves out): on an AVX2 CPU the
#: two differ by float rounding (relative 1e-7), on an AVX-512 one they matched exactly.
ROUNDING = 1e-6
_ORACLE = re.compile(r"numeric oracle \(pruned == masked original\): max \|Δ\| (\S+)"
                     r"(?: \(relative (\S+)\))?")


def oracle_relative(text: str) -> float:
    """The relative difference the command's oracle line printed (it must have printed one)."""
    found = _ORACLE.search(text)
    assert found is not None, f"no oracle line in {text!r}"
    return float(found[2] if found[2] is not None else found[1])


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def prune_checked(model: Path | onnx.ModelProto, tmp_path: Path, *, expect_pruned: bool = True,
                  name: str = "pruned.onnx", dims: dict[str, int] | None = None,
                  **options) -> Pruned:
    """Prune under the masked oracle and assert the prediction; return what was made.
    ``dims`` sizes symbolic input dims for the oracle's inputs (default 1)."""
    if isinstance(model, onnx.ModelProto):
        model = save(model, tmp_path / "model.onnx")
    out = tmp_path / name
    checks = CheckOptions(check_masked=True, rtol=RTOL, latency=False,
                          input_dims=tuple((dims or {}).items()))
    report, plan = prune(model, out, PruneOptions(**options), checks)
    assert_file_params(report, model, out)
    assert report.params_after == report.predicted_params_after
    assert report.flops_after == report.predicted_flops_after
    if all(len(g.keep) == g.size for g in plan.groups) and not plan.dropped:
        assert report.params_after == report.params_before
        assert_same_outputs(model, out, dims)
    elif expect_pruned:
        assert report.channels_after < report.channels_before or plan.dropped, \
            "nothing was pruned"
        assert report.params_after < report.params_before
        assert report.masked_relative_diff is not None and report.masked_relative_diff <= RTOL
    return Pruned(report, plan, out)


def assert_file_params(report: PruneReport, model: Path, out: Path) -> None:
    """The report counts the parameters of the files read and written."""
    counted, files = (report.params_before, report.params_after), (file_params(model),
                                                                   file_params(out))
    assert counted == files, f"report counts {counted}, the files hold {files}"


def file_params(path: Path) -> int:
    """The parameters a model file holds, each tensor once: the floating-point initializers and
    ``Constant`` nodes of its graph and subgraphs, the integer tensors ``DequantizeLinear`` or
    a Cast to float reads (quantised weights; a float zero point subtracted after the Cast is
    not counted), and the values packed in ``MatMulNBits`` weights."""
    graphs = _graphs(onnx.load(str(path), load_external_data=False).graph)
    nodes = [n for g in graphs for n in g.node]
    integers = {t.name for g in graphs for t in g.initializer if not _floating(t)}
    # integer weights dequantised by DequantizeLinear, or by Cast to float (then Sub of a zero
    # point, which is not a parameter, and Mul by a scale)
    casts = {n.output[0]: n.input[0] for n in nodes if n.op_type == "Cast"
             and n.input[0] in integers and _cast_to_float(n)}
    quantised = {n.input[0] for n in nodes if n.op_type == "DequantizeLinear"} | set(casts.values())
    zero_points = {n.input[1] for n in nodes if n.op_type == "Sub" and n.input[0] in casts}
    # MatMulNBits' B [N, blocks, blob] holds block_size values a blob, several a byte
    packed = {n.input[1]: next(a.i for a in n.attribute if a.name == "block_size")
              for n in nodes if n.op_type == "MatMulNBits"}
    held = [_size(t) // t.dims[-1] * packed[t.name] if t.name in packed else _size(t)
            for g in graphs for t in g.initializer
            if t.name in quantised or t.name in packed
            or (_floating(t) and t.name not in zero_points)]
    for a in (a for n in nodes if n.op_type == "Constant" for a in n.attribute):
        if a.name == "value" and _floating(a.t):
            held.append(_size(a.t))
        elif a.name in ("value_float", "value_floats"):
            held.append(1 if a.name == "value_float" else len(a.floats))
    return sum(held)


def _cast_to_float(node: onnx.NodeProto) -> bool:
    to = next((a.i for a in node.attribute if a.name == "to"), None)
    return to in _FLOATING


def _graphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    """``graph`` and its subgraphs (If branches, Loop and Scan bodies), recursively."""
    subs = [g for n in graph.node for a in n.attribute
            for g in ([a.g] if a.HasField("g") else a.graphs)]
    return [graph, *(s for g in subs for s in _graphs(g))]


_FLOATING = {getattr(onnx.TensorProto, n) for n in (
    "FLOAT", "DOUBLE", "FLOAT16", "BFLOAT16", "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2",
    "FLOAT8E5M2FNUZ") if hasattr(onnx.TensorProto, n)}


def _floating(t: onnx.TensorProto) -> bool:
    """Written out here, not taken from SPA: the oracle counts by its own path."""
    return t.data_type in _FLOATING


def _size(t: onnx.TensorProto) -> int:
    return int(np.prod(t.dims, dtype=np.int64))


def assert_masked_at(model: Path, pruned: Pruned, sizes: list[dict[str, int]]) -> list[float]:
    """The masked oracle at several sizes of the symbolic input dims (one random input each):
    a model with dynamic dims must stay right at every size, not just the one SPA checked.
    Returns the relative difference at each size."""
    recipe = pruned.plan.recipe
    analysis = analyze(model, ignore=recipe.ignore if recipe else (),
                       hidden=recipe is not None and recipe.hidden)
    masked = val.session(val.masked_model(to_onnx(analysis.model), analysis, pruned.plan))
    small = val.session(pruned.path)
    diffs = []
    for i, dims in enumerate(sizes):
        feeds = val.random_inputs(masked, seed=i, dims=dims)
        want, got = val.run(masked, feeds), val.run(small, feeds)
        val.check_signature(want, got)
        diffs.append(val.check_close(want, got, rtol=RTOL).relative)
    return diffs


def run_model(path: Path | onnx.ModelProto, seed: int = 0, dims: dict[str, int] | None = None
              ) -> dict[str, np.ndarray]:
    sess = val.session(path)
    return val.run(sess, val.random_inputs(sess, seed=seed, dims=dims))


def assert_same_outputs(a: Path, b: Path, dims: dict[str, int] | None = None) -> None:
    out_a, out_b = run_model(a, dims=dims), run_model(b, dims=dims)
    val.check_signature(out_a, out_b)
    for name in out_a:
        np.testing.assert_allclose(out_b[name], out_a[name], rtol=1e-5, atol=1e-6)


def group_sizes(model: Path | onnx.ModelProto) -> list[tuple[int, bool]]:
    """(channels, prunable) of each group that has a producer."""
    return [(g.size, g.prunable) for g in analyze(model).groups if g.producers]


def prune_obspa(src: Path, out: Path, calib: Path, **options) -> PruneReport:
    """``src`` cut by half with OBSPA on Hessians from the calibration file ``calib``, each group
    alike (``allocation="uniform"``) and no reconstruction unless ``options`` say otherwise:
    how the tests measure what the update and the refit each do."""
    report, _ = prune(src, out, PruneOptions(**{
        "ratio": 0.5, "criterion": "obspa", "hessian": "calibration", "calib": str(calib),
        "allocation": "uniform", "reconstruct": False, **options}), CheckOptions(latency=False))
    return report


def output_error(original: Path | onnx.ModelProto, pruned: Path, samples: np.ndarray) -> float:
    """``‖y_pruned − y_original‖ / ‖y_original‖`` of the first output over ``samples`` of the one
    input, each (``samples[i]``) a whole feed."""
    sessions = [val.session(original), val.session(onnx.load(str(pruned)))]
    name = sessions[0].get_inputs()[0].name
    ref, got = (np.concatenate([next(iter(val.run(s, {name: x}).values())) for x in samples])
                for s in sessions)
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def with_and_without_update(original: onnx.ModelProto, src: Path, calib: Path,
                            samples: np.ndarray) -> tuple[dict[bool, Path], dict[bool, float]]:
    """:func:`prune_obspa` of ``src`` with OBSPA's update (True) and without (False), written
    beside it: the files and their :func:`output_error` against ``original`` on ``samples``."""
    outs, error = {}, {}
    for compensate in (True, False):
        out = src.with_name(f"o{compensate}.onnx")
        assert prune_obspa(src, out, calib, compensate=compensate).compensated_layers == \
            int(compensate)
        outs[compensate], error[compensate] = out, output_error(original, out, samples)
    return outs, error


def runs_as_onnxruntime(model: Path, feeds: dict[str, np.ndarray], tol: float = RTOL) -> None:
    """``spa.torch.from_onnx(model)`` gives onnxruntime's outputs on ``feeds`` (relative and
    absolute ``tol``): what ``spa recover`` trains is the model as written."""
    import torch

    from spa.torch import from_onnx

    want = val.run(val.session(model), feeds)
    module = from_onnx(model)
    with torch.no_grad():
        got = module(*[torch.from_numpy(feeds[n]) for n in module.input_names])
    got = got if isinstance(got, tuple) else (got,)
    for g, name in zip(got, module.output_names):
        np.testing.assert_allclose(g.numpy(), want[name], rtol=tol, atol=tol)
