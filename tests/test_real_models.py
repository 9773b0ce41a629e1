"""Slow sweep: architectures written by others (torchvision, timm), random init, under the oracle.

Install them with ``pip install --no-deps torchvision==0.28.* timm pillow`` (see README); the
sweep skips when they are missing. Run with ``pytest -m slow``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.oracle import prune_checked

pytestmark = pytest.mark.slow

TORCHVISION = ["resnet50", "densenet121", "mobilenet_v3_large", "efficientnet_b0",
               "regnet_y_400mf", "resnext50_32x4d", "googlenet", "shufflenet_v2_x1_0",
               "squeezenet1_0", "mnasnet1_0", "convnext_tiny", "vgg11_bn", "wide_resnet50_2",
               "mobilenet_v2"]
TIMM = ["resnet18d", "efficientnet_lite0", "mobilenetv3_small_100", "ghostnet_100",
        "dla34", "cspresnet50"]


def _export(model, path: Path, exporter: str, size: int = 128) -> Path:
    import torch

    torch.manual_seed(0)
    model.eval()
    torch.onnx.export(model, (torch.randn(1, 3, size, size),), str(path),
                      dynamo=exporter == "dynamo", opset_version=17 if exporter != "dynamo"
                      else None, input_names=["input"], output_names=["output"])
    return path


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision(tmp_path: Path, name: str, exporter: str) -> None:
    pytest.importorskip("torch")
    from models.torchvision_compat import import_torchvision

    try:
        tv = import_torchvision()
    except ImportError:
        pytest.skip("torchvision not installed")
    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    size = 224 if name.startswith("vgg") else 128  # VGG's adaptive pool needs 7 | H
    path = _export(getattr(tv.models, name)(**kwargs), tmp_path / f"{name}.onnx", exporter,
                   size)
    prune_checked(path, tmp_path, ratio=0.3)


@pytest.mark.parametrize("name", TIMM)
def test_timm(tmp_path: Path, name: str) -> None:
    timm = pytest.importorskip("timm")
    path = _export(timm.create_model(name, pretrained=False), tmp_path / f"{name}.onnx",
                   "torchscript")
    prune_checked(path, tmp_path, ratio=0.3)
