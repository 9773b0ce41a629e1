"""Tests for the reference model zoo (``models``) and its ONNX exporter.

Every registered model is exported with both exporters, checked with the
full ONNX checker and run in onnxruntime; outputs must match torch.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import models
from models.export import (
    DYNAMO_DEFAULT_OPSET,
    EXPORTERS,
    TORCHSCRIPT_DEFAULT_OPSET,
    export,
    main,
)

NAMES = list(models.MODELS)
REPO = Path(__file__).resolve().parent.parent


def _run_onnx(path: Path, inputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: x.numpy() for i, x in zip(sess.get_inputs(), inputs, strict=True)}
    return sess.run(None, feeds)


def _torch_outputs(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    with torch.no_grad():
        out = module(*inputs)
    outs = [out] if isinstance(out, torch.Tensor) else list(out)
    return [o.numpy() for o in outs]


def _assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, rtol=1e-3, atol=1e-4 * scale)


def _op_counts(model: onnx.ModelProto) -> Counter[str]:
    return Counter(node.op_type for node in model.graph.node)


# ----------------------------------------------------------------- registry


def test_registry_contents() -> None:
    expected = {
        "resnet_basic",
        "resnet_bottleneck",
        "resnext",
        "mobilenetv2",
        "efficientnet",
        "densenet",
        "vgg_bn",
        "vgg_view",
        "unet",
        "conv1d",
    }
    assert set(models.MODELS) == expected
    for name, spec in models.MODELS.items():
        assert spec.name == name
        assert spec.description


def test_unknown_model_raises() -> None:
    with pytest.raises(KeyError, match="unknown model"):
        models.build("no_such_model")


@pytest.mark.parametrize("name", NAMES)
def test_build_is_deterministic_eval_and_sane(name: str) -> None:
    m1, x1 = models.build(name)
    m2, x2 = models.build(name)
    assert not m1.training
    assert all(not m.training for m in m1.modules())
    for (k1, v1), (k2, v2) in zip(m1.state_dict().items(), m2.state_dict().items(), strict=True):
        assert k1 == k2
        assert torch.equal(v1, v2), k1
    assert len(x1) == len(x2) == len(models.MODELS[name].input_shapes)
    for a, b, shape in zip(x1, x2, models.MODELS[name].input_shapes, strict=True):
        assert torch.equal(a, b)
        assert tuple(a.shape) == shape

    (out,) = _torch_outputs(m1, x1)
    assert np.isfinite(out).all()
    assert 0.05 < float(out.std()) < 20.0, float(out.std())


@pytest.mark.parametrize("name", NAMES)
def test_batchnorm_is_randomised(name: str) -> None:
    module, _ = models.build(name)
    bns = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns, "every reference model has BatchNorm"
    for bn in bns:
        assert bn.running_mean is not None and bn.running_var is not None
        assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
        assert not torch.allclose(bn.weight, torch.ones_like(bn.weight))
        assert not torch.allclose(bn.bias, torch.zeros_like(bn.bias))


def test_vgg_variants_share_weights() -> None:
    a, _ = models.build("vgg_bn")
    b, _ = models.build("vgg_view")
    for va, vb in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb)


def test_inputs_batch_override() -> None:
    spec = models.MODELS["conv1d"]
    (x,) = spec.inputs(batch=3)
    assert tuple(x.shape) == (3, 4, 64)


def test_models_does_not_import_spa() -> None:
    code = "import sys, models, models.export; assert 'spa' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# ------------------------------------------------------------------- export


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", NAMES)
def test_export_matches_torch(name: str, exporter: str, tmp_path: Path) -> None:
    path = export(name, tmp_path / f"{name}.onnx", exporter=exporter)
    assert path == tmp_path / f"{name}.onnx"
    # Self-contained: no external-data side file.
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{name}.onnx"]

    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    default = TORCHSCRIPT_DEFAULT_OPSET if exporter == "torchscript" else DYNAMO_DEFAULT_OPSET
    (opset,) = [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    assert opset == default
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["output"]

    module, inputs = models.build(name)
    expected = _torch_outputs(module, inputs)
    actual = _run_onnx(path, inputs)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert a.shape == e.shape
        _assert_close(a, e)


DYNAMIC_NAMES = ["vgg_view", "densenet", "unet", "conv1d"]


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", DYNAMIC_NAMES)
def test_dynamic_batch(name: str, exporter: str, tmp_path: Path) -> None:
    path = export(name, tmp_path / "m.onnx", exporter=exporter, dynamic_batch=True)
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    for value in (*proto.graph.input, *proto.graph.output):
        dim0 = value.type.tensor_type.shape.dim[0]
        assert dim0.dim_param == "batch", value.name

    module, _ = models.build(name)
    for batch in (1, 3):
        inputs = models.MODELS[name].inputs(batch=batch)
        (expected,) = _torch_outputs(module, inputs)
        (actual,) = _run_onnx(path, inputs)
        assert actual.shape[0] == batch
        _assert_close(actual, expected)


def test_vgg_view_flatten_ops(tmp_path: Path) -> None:
    static = onnx.load(export("vgg_view", tmp_path / "s.onnx"))
    assert "Shape" not in _op_counts(static)  # folded to a constant shape
    dynamic = onnx.load(export("vgg_view", tmp_path / "d.onnx", dynamic_batch=True))
    ops = _op_counts(dynamic)
    for op in ("Shape", "Gather", "Concat", "Reshape"):
        assert ops[op] >= 1, op
    assert _op_counts(onnx.load(export("vgg_bn", tmp_path / "f.onnx")))["Flatten"] == 1


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_optimize_false_keeps_batchnorm(exporter: str, tmp_path: Path) -> None:
    folded = onnx.load(export("vgg_bn", tmp_path / "a.onnx", exporter=exporter))
    assert _op_counts(folded)["BatchNormalization"] == 0
    path = export("vgg_bn", tmp_path / "b.onnx", exporter=exporter, optimize=False)
    kept = onnx.load(path)
    assert _op_counts(kept)["BatchNormalization"] == 6
    module, inputs = models.build("vgg_bn")
    _assert_close(_run_onnx(path, inputs)[0], _torch_outputs(module, inputs)[0])


def test_dynamo_explicit_opset(tmp_path: Path) -> None:
    path = export("conv1d", tmp_path / "m.onnx", exporter="dynamo", opset=18)
    proto = onnx.load(path)
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [18]
    module, inputs = models.build("conv1d")
    _assert_close(_run_onnx(path, inputs)[0], _torch_outputs(module, inputs)[0])


def test_dynamo_default_opset_constant() -> None:
    from torch.onnx import _constants

    assert _constants.ONNX_DEFAULT_OPSET == DYNAMO_DEFAULT_OPSET


def test_bad_exporter(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exporter"):
        export("conv1d", tmp_path / "m.onnx", exporter="tflite")


# ---------------------------------------------------------------------- CLI


def test_cli_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--list"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == NAMES


def test_cli_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sub" / "c.onnx"
    assert main(["conv1d", "-o", str(out), "--opset", "16", "--dynamic-batch"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    proto = onnx.load(out)
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [16]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_cli_unknown_model() -> None:
    with pytest.raises(SystemExit):
        main(["no_such_model", "-o", "x.onnx"])


def test_cli_subprocess(tmp_path: Path) -> None:
    out = tmp_path / "v.onnx"
    res = subprocess.run(
        [sys.executable, "-m", "models.export", "vgg_view", "-o", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert res.stdout.strip() == str(out)
    assert out.exists()


# --------------------------------------------------------- torchvision_compat


_FAKE_TORCHVISION = """
import sys
from torchvision import _autograd_registrations, _meta_registrations

STUBBED = not hasattr(_meta_registrations, "__file__") and not hasattr(
    _autograd_registrations, "__file__"
)
"""


def test_import_torchvision_stubs_registrations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fake torchvision that imports the two modules gets the empty stubs."""
    from models.torchvision_compat import STUBBED_MODULES, import_torchvision

    pkg = tmp_path / "torchvision"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(_FAKE_TORCHVISION)
    # Deliberately no _meta_registrations.py: importing it would fail without stubs.
    monkeypatch.syspath_prepend(str(tmp_path))
    saved = {n: sys.modules.pop(n) for n in ("torchvision", *STUBBED_MODULES) if n in sys.modules}
    try:
        tv = import_torchvision()
        assert tv.__file__ == str(pkg / "__init__.py")
        assert tv.STUBBED
    finally:
        for n in ("torchvision", *STUBBED_MODULES):
            sys.modules.pop(n, None)
        sys.modules.update(saved)


def test_import_torchvision_missing_cleans_up() -> None:
    from models.torchvision_compat import STUBBED_MODULES, import_torchvision

    saved = {n: sys.modules.pop(n) for n in ("torchvision", *STUBBED_MODULES) if n in sys.modules}
    try:
        # Block the real package (if any) so the import fails.
        sys.modules["torchvision"] = None  # type: ignore[assignment]
        with pytest.raises(ImportError):
            import_torchvision()
        assert all(n not in sys.modules for n in STUBBED_MODULES)
    finally:
        for n in ("torchvision", *STUBBED_MODULES):
            sys.modules.pop(n, None)
        sys.modules.update(saved)
