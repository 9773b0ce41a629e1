"""The models of the coverage benchmark: every torchvision classifier and a varied timm list.

Random init, no download. Each model is built with a fixed seed at the smallest input size it
accepts among a few candidates (128 px where the architecture allows it, else its default), to
keep the sweep quick; the choice is recorded with the result. Models over the 2 GB protobuf limit
are skipped with the reason (``benchmarks/large_model.py`` covers > 2 GB models).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

# timm, chosen to span the families: residual, depthwise/SE, NAS, re-parameterised, dense and
# dual-path, hybrid conv-attention, ViT/DeiT/Swin/CaiT/XCiT/EVA, MLP-mixers, poolformers, LeViT,
# MobileViT, LSTM (sequencer). Extend freely: the sweep reads only this list.
TIMM = [
    "resnet18", "resnet50d", "resnext26ts", "seresnext26d_32x4d", "res2net50_26w_4s",
    "resnest14d", "skresnet18", "resnetv2_50", "efficientnet_b0", "efficientnet_lite0",
    "tf_efficientnetv2_b0", "mobilenetv2_100", "mobilenetv3_large_100", "mobilenetv3_small_100",
    "mobilenetv4_conv_small", "mobilenetv4_hybrid_medium", "regnetx_002", "regnety_002",
    "regnetz_b16", "convnext_atto", "convnextv2_atto", "densenet121", "dpn68", "ghostnet_100",
    "ghostnetv2_100", "rexnet_100", "repvgg_a0", "repvit_m1", "fastvit_t8", "dla34",
    "cspresnet50", "cspdarknet53", "hrnet_w18_small", "xception41", "selecsls42b",
    "inception_v4", "mnasnet_100", "fbnetc_100", "lcnet_050", "tinynet_a", "hgnetv2_b0",
    "ese_vovnet19b_dw", "nf_resnet26", "gernet_s", "efficientvit_b0", "efficientvit_m0",
    "edgenext_xx_small", "starnet_s1", "mambaout_femto", "inception_next_tiny",
    "vit_tiny_patch16_224", "vit_small_patch16_224", "deit_tiny_patch16_224",
    "deit_small_patch16_224", "deit_tiny_distilled_patch16_224", "swin_tiny_patch4_window7_224",
    "swinv2_tiny_window8_256", "cait_xxs24_224", "xcit_nano_12_p16_224", "eva02_tiny_patch14_224",
    "pit_ti_224", "tnt_s_patch16_224", "crossvit_tiny_240", "twins_svt_small", "coat_tiny",
    "levit_128s", "mobilevit_xxs", "mobilevitv2_050", "efficientformer_l1",
    "efficientformerv2_s0", "tiny_vit_5m_224", "davit_tiny", "gcvit_xxtiny", "focalnet_tiny_srf",
    "maxvit_nano_rw_256", "coatnet_nano_rw_224", "mixer_s16_224", "resmlp_12_224", "gmlp_ti16_224",
    "poolformer_s12", "poolformerv2_s12", "sequencer2d_s", "botnet26t_256", "halonet26t",
]
QUICK_TORCHVISION = ["resnet18", "mobilenet_v3_small", "densenet121", "shufflenet_v2_x0_5",
                     "squeezenet1_1", "vit_b_32", "swin_t", "convnext_tiny"]
QUICK_TIMM = ["efficientnet_lite0", "ghostnet_100", "regnety_002", "deit_tiny_patch16_224",
              "mixer_s16_224", "poolformer_s12", "levit_128s", "mobilevit_xxs"]

SMALL_SIZE = 128
# Weights over the 2 GB protobuf limit: one ONNX file cannot hold them.
MAX_PARAMS = 500_000_000


@dataclass
class Built:
    module: nn.Module
    example: torch.Tensor
    num_classes: int


def torchvision_names() -> list[str]:
    from models.torchvision_compat import import_torchvision

    tv = import_torchvision()
    return sorted(tv.models.list_models(module=tv.models))


def model_list(quick: bool) -> list[tuple[str, str]]:
    """``(source, name)`` of every model of the sweep."""
    if quick:
        return [("torchvision", n) for n in QUICK_TORCHVISION] + [("timm", n) for n in QUICK_TIMM]
    return [("torchvision", n) for n in torchvision_names()] + [("timm", n) for n in TIMM]


def _torchvision(name: str) -> tuple[nn.Module, list[int]]:
    from models.torchvision_compat import import_torchvision

    tv = import_torchvision()
    kwargs = {"aux_logits": False, "init_weights": True} if name in ("googlenet",
                                                                     "inception_v3") else {}
    module = tv.models.get_model(name, weights=None, **kwargs)
    # Fixed-size architectures (ViT's position table, Swin/MaxViT windows, VGG/AlexNet adaptive
    # pools that only export when the size divides) run at 224; the rest at SMALL_SIZE.
    if name.startswith(("vit_", "swin", "maxvit", "vgg", "alexnet")):
        return module, [224]
    return module, [SMALL_SIZE, 224]


def _timm(name: str) -> tuple[nn.Module, list[int]]:
    os.environ.setdefault("TIMM_FUSED_ATTN", "0")  # as Torch-Pruning's timm examples do
    from models.thirdparty import _stub_torchvision

    _stub_torchvision()
    import timm

    module = timm.create_model(name, pretrained=False)
    default = module.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    if module.pretrained_cfg.get("fixed_input_size"):
        return module, [default]
    return module, [SMALL_SIZE, default]


def _param_count(source: str, name: str) -> int | None:
    """Parameters without building the model: torchvision's weight metadata, else the meta
    device; ``None`` when neither works (then the model is small enough to just build)."""
    if source == "torchvision":
        from models.torchvision_compat import import_torchvision

        weights = import_torchvision().models.get_model_weights(name)
        return int(next(iter(weights)).meta["num_params"])
    try:
        with torch.device("meta"):
            module, _ = _timm(name)
    except Exception:
        return None
    return sum(p.numel() for p in module.parameters())


def _check_size(source: str, name: str) -> None:
    """So that a 600M-parameter model is never built."""
    params = _param_count(source, name)
    if params is not None and params > MAX_PARAMS:
        raise TooLarge(f"{params / 1e6:.0f}M parameters: the ONNX file would exceed 2 GB")


def build(source: str, name: str, seed: int = 0) -> Built:
    """The model in eval mode and an example input of the first size its forward accepts."""
    _check_size(source, name)
    torch.manual_seed(seed)
    module, sizes = (_torchvision if source == "torchvision" else _timm)(name)
    module.eval()
    last: Exception | None = None
    for size in sizes:
        example = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))
        try:
            with torch.no_grad():
                out = module(example)
        except Exception as exc:  # try the next size
            last = exc
            continue
        return Built(module, example, int(out.shape[-1]))
    raise RuntimeError(f"forward fails at sizes {sizes}: {last}")


class TooLarge(Exception):
    """The model is skipped: too large for one ONNX file."""
