"""OBSPA: the OBS update against least squares, the identity Hessian against L2 ordering, and
the compensation's effect on a reference CNN (assert the error ratio)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from spa import validate as val
from spa.api import CheckOptions, PruneOptions, analyze, apply, prune
from spa.errors import OptionError
from spa.passes.hessian import HessianSource, damped_inverse
from spa.passes.importance import get_criterion
from spa.passes.importance.obspa import obs_remove
from spa.passes.statistics import LayerStatistics


def test_obs_update_is_the_least_squares_refit() -> None:
    """Removing rows Q of W (rows = input channels) and updating the rest by OBS gives the
    least-squares fit of X·W by the kept inputs (damping → 0)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 6)) @ rng.standard_normal((6, 6))  # correlated inputs
    w = rng.standard_normal((6, 3))
    q, keep = np.array([1, 4]), np.array([0, 2, 3, 5])
    hinv = np.linalg.inv(x.T @ x)
    w_obs = w.copy()
    obs_remove(w_obs, hinv, q, keep)
    w_ls = np.linalg.lstsq(x[:, keep], x @ w, rcond=None)[0]
    np.testing.assert_allclose(w_obs[keep], w_ls, rtol=1e-8, atol=1e-10)
    assert np.all(w_obs[q] == 0)
    err_obs = np.linalg.norm(x @ w - x[:, keep] @ w_obs[keep])
    err_drop = np.linalg.norm(x @ w - x[:, keep] @ w[keep])
    assert err_obs < 0.9 * err_drop


def test_natural_images_are_standardised_correlated_and_smooth() -> None:
    from spa.passes.hessian import natural_images

    x = natural_images((4, 3, 32, 32), np.random.default_rng(0))
    np.testing.assert_allclose(x.mean(axis=(0, 2, 3)), 0, atol=1e-9)
    np.testing.assert_allclose(x.std(axis=(0, 2, 3)), 1, rtol=1e-6)
    assert np.corrcoef(x[:, 0].ravel(), x[:, 1].ravel())[0, 1] > 0.7  # RGB-like channels
    neighbours = np.corrcoef(x[..., :-1].ravel(), x[..., 1:].ravel())[0, 1]
    assert neighbours > 0.5  # 1/f² spectrum: neighbouring pixels alike, unlike white noise


def test_damped_inverse_survives_a_singular_hessian() -> None:
    h = np.ones((4, 4))  # rank 1
    hinv = damped_inverse(h, 0.1)
    np.testing.assert_allclose(hinv @ (h + 0.1 * np.eye(4)), np.eye(4), atol=1e-9)


def _mlp(w1: np.ndarray, w2: np.ndarray) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="act"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, w1.shape[0]])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [1, w2.shape[1]])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_identity_hessian_orders_by_consumer_l2() -> None:
    rng = np.random.default_rng(1)
    w1 = rng.standard_normal((5, 12)).astype(np.float32)
    w2 = (rng.standard_normal((12, 3)) * rng.uniform(0.1, 3, (12, 1))).astype(np.float32)
    analysis = analyze(_mlp(w1, w2))
    (group,) = analysis.prunable_groups
    identity = LayerStatistics(source=HessianSource.IDENTITY, samples=1).run(analysis)
    scores = get_criterion("obspa").run(analysis, identity).by_group
    order = np.argsort(scores[group.id], kind="stable")
    expected = np.argsort((w2.astype(np.float64) ** 2).sum(1), kind="stable")
    assert order.tolist() == expected.tolist()


@pytest.fixture(scope="module")
def resnet(tmp_path_factory) -> Path:
    pytest.importorskip("torch")
    from models.export import export

    return export("resnet_basic", tmp_path_factory.mktemp("obspa") / "resnet.onnx")


def _relative_error(reference: Path, pruned: Path, seeds=range(100, 108)) -> float:
    ref, new = val.session(reference), val.session(pruned)
    errs = []
    for s in seeds:
        feeds = val.random_inputs(ref, seed=s)
        a, b = val.run(ref, feeds), val.run(new, feeds)
        errs.extend(np.linalg.norm(a[k] - b[k]) / np.linalg.norm(a[k]) for k in a)
    return float(np.mean(errs))


def test_compensation_reduces_output_error_on_a_reference_cnn(resnet: Path, tmp_path) -> None:
    """Same OBSPA plan with and without the update: the update cuts the output error (on
    fresh inputs from the distribution the Hessians saw: white noise)."""
    checks = CheckOptions(latency=False)
    opts = dict(ratio=0.3, criterion="obspa", samples=16, hessian=HessianSource.NOISE)
    comp, plan = prune(resnet, tmp_path / "c.onnx", PruneOptions(**opts), checks)
    assert comp.compensated_layers > 0
    bare, plan2 = prune(resnet, tmp_path / "b.onnx", PruneOptions(**opts, compensate=False),
                        CheckOptions(check_masked=True, latency=False))
    assert [g.keep for g in plan.groups] == [g.keep for g in plan2.groups]
    assert bare.masked_relative_diff <= 1e-4  # without the update the oracle holds
    e_comp = _relative_error(resnet, tmp_path / "c.onnx")
    e_bare = _relative_error(resnet, tmp_path / "b.onnx")
    assert e_comp < 0.8 * e_bare, (e_comp, e_bare)


def test_obspa_plan_reapplies_to_identical_bytes(resnet: Path, tmp_path) -> None:
    checks = CheckOptions(validate=False, latency=False)
    prune(resnet, tmp_path / "p.onnx", PruneOptions(ratio=0.3, criterion="obspa", samples=8),
          checks, plan_path=tmp_path / "plan.json")
    apply(resnet, tmp_path / "plan.json", tmp_path / "again.onnx", checks)
    assert (tmp_path / "p.onnx").read_bytes() == (tmp_path / "again.onnx").read_bytes()


def test_calibration_source(resnet: Path, tmp_path) -> None:
    rng = np.random.default_rng(5)
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=rng.standard_normal((8, 1, 3, 32, 32)).astype(np.float32)[:, 0])
    rep, _ = prune(resnet, tmp_path / "p.onnx",
                   PruneOptions(ratio=0.3, criterion="obspa", hessian=HessianSource.CALIBRATION,
                                calib=str(calib)), CheckOptions(latency=False))
    assert rep.compensated_layers > 0
    np.savez(calib, wrong_name=np.zeros((2, 3, 32, 32), np.float32))
    with pytest.raises(OptionError, match="lacks arrays"):
        prune(resnet, tmp_path / "q.onnx", PruneOptions(
            ratio=0.3, criterion="obspa", hessian=HessianSource.CALIBRATION, calib=str(calib)))


def test_hessians_come_from_the_calibration_data_when_it_is_given(resnet: Path, tmp_path
                                                                   ) -> None:
    """``--criterion obspa --calib DATA`` without ``--hessian`` measures the Hessians on the
    data (the plan's compensation recipe says so, and equals the explicit flag's plan); without
    data, or with ``--calib synthetic``, they stay synthetic; an explicit source wins."""
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=np.random.default_rng(5).standard_normal((16, 3, 32, 32)
                                                                   ).astype(np.float32))
    assert PruneOptions(criterion="obspa").hessian_source is HessianSource.SYNTHETIC
    assert PruneOptions(calib="synthetic").hessian_source is HessianSource.SYNTHETIC
    assert PruneOptions(calib=str(calib), hessian="noise").hessian_source is HessianSource.NOISE
    obspa = get_criterion("obspa")  # the pass alone: data given or not
    assert obspa.statistics_source(True) is HessianSource.CALIBRATION
    assert obspa.statistics_source(False) is HessianSource.SYNTHETIC
    checks = CheckOptions(validate=False, latency=False)
    plans = {}
    for name, hessian in (("default", None), ("explicit", HessianSource.CALIBRATION)):
        _, plans[name] = prune(resnet, tmp_path / f"{name}.onnx", PruneOptions(
            ratio=0.3, criterion="obspa", calib=str(calib), hessian=hessian,
            allocation="uniform", reconstruct=False), checks)
    comp = plans["default"].recipe.compensation
    assert comp is not None and comp.hessian is HessianSource.CALIBRATION
    assert (tmp_path / "default.onnx").read_bytes() == (tmp_path / "explicit.onnx").read_bytes()
    _, synthetic = prune(resnet, tmp_path / "s.onnx", PruneOptions(
        ratio=0.3, criterion="obspa", samples=4), checks)
    assert synthetic.recipe.compensation.hessian is HessianSource.SYNTHETIC
