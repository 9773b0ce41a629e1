"""Models whose channels froze before: GroupNorm, computed weights, channel and pixel shuffles.

    python -m benchmarks.structure_models [--ratio 0.3] [--only LABEL ...]

Exported by PyTorch's TorchScript exporter (opset 17, random weights, batch 1):

* timm ``resnetv2_50x1_bit`` (BiT: GroupNorm on the residual stream, standardised convs), at
  224 px: no prunable group before (GroupNorm's ``Reshape [N, 32, -1]`` mapped no channel);
* timm ``nf_resnet26`` and ``nfnet_l0`` (NF-Nets: each conv weight standardised in the graph),
  at 224 px: no prunable group, and only the SE convs', before (spa/ir/computed.py);
* torchvision ``swin_v2_t`` at 224 px: its attention heads froze before (each block zeroes
  the key's third of its ``qkv`` bias in the graph: a ``ScatterND`` of constants, now folded);
* diffusers ``UNet2DModel`` (two levels, 32 and 64 channels, GroupNorm(8), self-attention at
  the second) at 32 px, and the decoder of an ``AutoencoderKL`` of the same widths at a 16 px
  latent: the diffusion model's two halves (skipped without ``diffusers``);
* torchvision ``shufflenet_v2_x1_0`` at 224 px: the channel shuffle after every unit froze 36%
  of its channels before (spa/coupling/analysis.py ``_agree``). A shuffled channel goes with
  one channel of each conv it reaches, so exact counts leave onnxruntime's kernel blocks there:
  the model is also pruned with ``--round-to 1`` and with ``--target latency``;
* an EDSR-style ×4 super-resolution network (:func:`_edsr`) at 48 px: PyTorch exports its
  ``PixelShuffle`` upsamplers as ``DepthToSpace``, which had no rule, so the upsampling convs
  froze before.

Each is pruned at ``--ratio`` (default options, plus a row's own flags: the numeric oracle
runs) by ``spa prune`` in its own process; recorded: the groups prunable, params and FLOPs
before and after, the oracle's relative difference, and latency medians of the dense and
pruned files side by side (one thread, its CPU time:
:func:`benchmarks.common.side_by_side_latency`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import onnx_counts, side_by_side_latency, write_result

WORK = Path("build") / "structure_models"


def _torch():
    from models.torchvision_compat import import_torchvision

    import_torchvision()  # its registrations stubbed, so that timm and diffusers import
    import torch
    return torch


def _timm(name: str):
    torch = _torch()
    import timm

    return timm.create_model(name, pretrained=False).eval(), (torch.randn(1, 3, 224, 224),)


def _unet():
    torch = _torch()
    from diffusers import UNet2DModel

    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(32, 64), norm_num_groups=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()

    class Denoiser(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.unet = unet

        def forward(self, x, t):
            return self.unet(x, t).sample

    return Denoiser(), (torch.randn(1, 3, 32, 32), torch.tensor([10]))


def _vae_decoder():
    torch = _torch()
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64),
                        layers_per_block=1, norm_num_groups=8, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2).eval()

    class Decoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vae = vae

        def forward(self, z):
            return self.vae.decode(z).sample

    return Decoder(), (torch.randn(1, 4, 16, 16),)


def _torchvision(name: str):
    torch = _torch()
    import torchvision

    return getattr(torchvision.models, name)().eval(), (torch.randn(1, 3, 224, 224),)


def _edsr():
    """An EDSR-style ×4 super-resolution network (Lim et al. 2017, as torchvision has none):
    a head conv, 8 residual blocks of 64 channels, two ``conv 64→256 → PixelShuffle(2)``
    upsamplers, and a tail conv to RGB, at a 48 px input."""
    torch = _torch()
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(64, 64, 3, padding=1))

        def forward(self, x):
            return x + 0.1 * self.body(x)

    class EDSR(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Conv2d(3, 64, 3, padding=1)
            self.body = nn.Sequential(*(Block() for _ in range(8)),
                                      nn.Conv2d(64, 64, 3, padding=1))
            self.up = nn.Sequential(*(m for _ in range(2) for m in
                                      (nn.Conv2d(64, 256, 3, padding=1), nn.PixelShuffle(2))))
            self.tail = nn.Conv2d(64, 3, 3, padding=1)

        def forward(self, x):
            h = self.head(x)
            return self.tail(self.up(h + self.body(h)))

    return EDSR().eval(), (torch.randn(1, 3, 48, 48),)


MODELS = {"timm resnetv2_50x1_bit (BiT)": lambda: _timm("resnetv2_50x1_bit"),
          "timm nf_resnet26": lambda: _timm("nf_resnet26"),
          "timm nfnet_l0": lambda: _timm("nfnet_l0"),
          "torchvision swin_v2_t": lambda: _torchvision("swin_v2_t"),
          "diffusers UNet2DModel": _unet,
          "diffusers AutoencoderKL decoder": _vae_decoder,
          "torchvision shufflenet_v2_x1_0": lambda: _torchvision("shufflenet_v2_x1_0"),
          "EDSR-style super-resolution (PixelShuffle)": _edsr}
#: Rows beyond each model's default run: model label -> the extra flags of each.
VARIANTS = {"torchvision shufflenet_v2_x1_0": (("--round-to", "1"),
                                               ("--target", "latency", "--threads", "1"))}


def export(label: str, path: Path) -> str | None:
    """Export ``label``'s model to ``path`` (cached); the reason when it cannot be built."""
    if path.exists():
        return None
    try:
        module, example = MODELS[label]()
    except ImportError as exc:
        return f"not installed: {exc.name}"
    torch = _torch()
    torch.manual_seed(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(module, example, str(path), dynamo=False, opset_version=17)
    return None


def row(label: str, dense: Path, ratio: float, flags: tuple[str, ...] = ()) -> dict:
    tag = "".join(f.strip("-").replace("-", "") for f in flags)
    out = dense.with_name(f"{dense.stem}_pruned{tag}.onnx")
    report = out.with_suffix(".json")
    analyzed = subprocess.run([sys.executable, "-m", "spa", "analyze", str(dense), "--json"],
                              capture_output=True, text=True)
    groups = json.loads(analyzed.stdout)["groups"] if analyzed.returncode == 0 else []
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "spa", "prune", str(dense), "-o", str(out),
                           "--ratio", str(ratio), *flags, "--report", str(report), "-q"],
                          capture_output=True, text=True)
    seconds = round(time.perf_counter() - t0, 1)
    body: dict = {"model": label, "flags": " ".join(flags), "groups": len(groups),
                  "prunable": sum(1 for g in groups if g.get("prunable")),
                  "exit": done.returncode, "seconds": seconds,
                  "error": done.stderr.strip().splitlines()[-1] if done.returncode else ""}
    if done.returncode:
        return body
    r = json.loads(report.read_text())
    before, after = onnx_counts(dense), onnx_counts(out)
    ms = side_by_side_latency({"dense": dense, "pruned": out}, threads=1,
                              clock=time.thread_time)
    return body | {"groups_pruned": r.get("groups_pruned"),
                   "oracle_relative": r.get("masked_relative_diff"),
                   "params": [before["params"], after["params"]],
                   "flops": [before["flops"], after["flops"]],
                   "latency_ms": [round(ms["dense"], 3), round(ms["pruned"], 3)]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--only", nargs="+", choices=list(MODELS), metavar="LABEL",
                        help="these models alone (the result is then written as "
                             "structure_models_only)")
    args = parser.parse_args(argv)
    rows, skipped = [], {}
    for label in args.only or MODELS:
        path = WORK / (label.replace(" ", "_").replace("(", "").replace(")", "") + ".onnx")
        why = export(label, path)
        if why is not None:
            skipped[label] = why
            continue
        for flags in ((), *VARIANTS.get(label, ())):
            rows.append(row(label, path, args.ratio, flags))
            print(json.dumps(rows[-1]), flush=True)
    name = "structure_models_only" if args.only else "structure_models"
    print(write_result(name, {"ratio": args.ratio, "rows": rows, "skipped": skipped}))


if __name__ == "__main__":
    main()
