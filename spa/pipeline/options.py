"""The options of a run, declared once: :class:`PruneOptions` and :class:`CheckOptions`.

Every field is a :func:`spa.options.option`: its default, its flag, its help and its choices
(enum members, or the criterion registry) in one place. ``spa prune`` / ``spa apply`` build
their flags from these dataclasses (:func:`spa.options.add_flags`), ``--config`` reads those
flags' actions, and the Python API and ``spa.torch`` take the same dataclasses (or their field
names as keywords). A criterion's own options (OBSPA's ``OBSPAOptions``) and the scoring steps
(``ScoringOptions``) are declared by the pass that uses them and copied here field by field
(:func:`spa.options.like`), so that ``PruneOptions(damping=0.05)`` stays flat.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any

from spa.calibration import GROUP as CALIB_GROUP
from spa.calibration import CalibrationOptions
from spa.choices import (
    AllocationMethod,
    DepthCriterion,
    HessianSource,
    Normalization,
    Reduction,
    Target,
)
from spa.errors import OptionError
from spa.options import (
    check_ratio,
    enum_values,
    like,
    option,
    parse_bytes,
    parse_input_dim,
    parse_ratio,
    positive,
)
from spa.passes.importance import CRITERIA
from spa.passes.importance.base import ScoringOptions
from spa.passes.importance.obspa import GROUP as OBSPA_GROUP
from spa.passes.importance.obspa import OBSPAOptions, hessian_source
from spa.passes.latency import CPU_PROVIDER, kernel_block

SYNTHETIC = "synthetic"  # --calib synthetic: inputs made up from the model's input signature

AUTO = "auto"
LATENCY_GROUP = "latency target (--target latency)"
DEPTH_GROUP = "depth pruning (whole residual blocks)"

_INPUT_DIM_HELP = ("size of a symbolic input dim (e.g. height=224) for the inputs SPA makes up; "
                   "default: from the model's metadata, else the smallest size tried (batch 1, "
                   "spatial 32..1024, sequence 8..128) at which onnxruntime runs it")
InputDims = tuple[tuple[str, int], ...]


def parse_round_to(text: str) -> int | str:
    """Parser of ``--round-to``: an integer ≥ 1, or ``auto`` (this CPU's kernel block, where
    the kernels need it: passes/kernel_widths.py)."""
    return AUTO if text == AUTO else positive(text)


def _criteria_help() -> str:
    return "; ".join(f"{n}: {c.help}" for n, c in sorted(CRITERIA.items()))


def _hidden(value: Any, args: argparse.Namespace) -> float | None:
    """``--hidden`` alone prunes the hidden size by ``--ratio``; ``--hidden R`` by R."""
    return args.ratio if value is True else (value or None)


@dataclass(frozen=True)
class PruneOptions:
    """What to prune and how (``spa prune``'s options)."""

    ratio: float = option(0.3, parse=parse_ratio, help="share of channels (or of params/FLOPs with "
                          "--target) to remove, [0, 1); allocated by sensitivity (the default "
                          "with --calib), the MACs that share of each channel group would "
                          "free (heads: that share of all heads)")
    heads_ratio: float | None = option(None, parse=parse_ratio, metavar="R",
                                       help="share of attention heads to remove (default: "
                                       "--ratio)")
    mlp_ratio: float | None = option(None, parse=parse_ratio, metavar="R",
                                     help="share of dense neurons (MLP widths) to remove "
                                     "(default: --ratio)")
    # None: the hidden size (residual stream) is not pruned.
    hidden_ratio: float | None = option(
        None, name="--hidden", parse=parse_ratio, const=True, metavar="R", resolve=_hidden,
        help="also prune the hidden size (residual stream) of transformers, by R or by "
        "--ratio; norm statistics then change (outside the masked oracle)")
    target: Target = option(Target.CHANNELS, enum=Target, help="what --ratio measures "
                            "(params/flops: searched to meet the target; latency: the share of "
                            "the latency measured in onnxruntime with --provider and --threads)")
    criterion: str = option("l1", choices=lambda: sorted(CRITERIA), help=_criteria_help)
    reduction: Reduction = like(ScoringOptions, "reduction")
    normalization: Normalization = like(ScoringOptions, "normalization")
    global_ranking: bool = option(False, name="--global", help="rank channels across groups "
                                  "instead of the same ratio per group (--allocation global)")
    # None: sensitivity with --calib (synthetic too), else uniform (or global with --global).
    allocation: AllocationMethod | None = option(
        None, enum=AllocationMethod, help="how the budget is spread over the groups: uniform "
        "(same ratio per group), global (one ranking across groups) or sensitivity (measured "
        "damage to the final outputs; default with --calib)")
    # AUTO: resolved to this CPU's block (:attr:`block`) where the kernels need it.
    round_to: int | str = option(AUTO, parse=parse_round_to, metavar="N",
                                 help="keep channel counts a multiple of N in every group; "
                                 "'auto' (the default): in the groups of convolutions "
                                 "onnxruntime runs in "
                                 "its blocked layout, a multiple of its block on this CPU (16 "
                                 "with AVX-512, 8 with AVX2), other groups (MatMul, Gemm) "
                                 "exact")
    min_channels: int = option(1, parse=positive, metavar="N",
                               help="never keep fewer than N channels in a group")
    ignore: tuple[str, ...] = option((), append=True, metavar="GLOB", help="freeze every "
                                     "channel touching nodes whose name matches GLOB")
    seed: int = option(0, parse=int, help="seed of random scores and inputs")
    provider: str = option(CPU_PROVIDER, metavar="NAME", group=LATENCY_GROUP,
                           help="onnxruntime execution provider that --target latency times on")
    threads: int = option(1, parse=positive, metavar="N", group=LATENCY_GROUP,
                          help="onnxruntime intra-op threads for --target latency's timing")
    # OBSPA (criterion "obspa"): where H comes from, its damping, how many synthetic samples,
    # calibration data (arrays named after the graph inputs), and whether to write the update.
    # None: calibration with --calib data, else synthetic (:attr:`hessian_source`).
    hessian: HessianSource | None = like(OBSPAOptions, "hessian")
    calib: str | None = option(None, metavar="PATH", group=CALIB_GROUP, help="calibration "
                               "data: an .npz of arrays named after the graph inputs, a folder "
                               "of images, a text file with one sample per line, or 'synthetic' "
                               "(data-free: natural-image noise made from the input signature)")
    preprocess: str = like(CalibrationOptions, "preprocess")
    image_size: int | None = like(CalibrationOptions, "image_size")
    mean: tuple[float, ...] | None = like(CalibrationOptions, "mean")
    std: tuple[float, ...] | None = like(CalibrationOptions, "std")
    layout: str | None = like(CalibrationOptions, "layout")
    tokenizer: str | None = like(CalibrationOptions, "tokenizer")
    max_length: int = like(CalibrationOptions, "max_length")
    pack: bool = like(CalibrationOptions, "pack")
    calib_samples: int | None = like(CalibrationOptions, "calib_samples")
    held_out: float = like(CalibrationOptions, "held_out")
    held_out_data: str | None = like(CalibrationOptions, "held_out_data")
    decoder_tokens: int = option(32, parse=positive, metavar="N", group=CALIB_GROUP,
                                 help="a seq2seq folder's first-step decoder is calibrated on "
                                 "N tokens per sample, decoded greedily by the dense model "
                                 "from the encoder's samples")
    # None: on when calibration data is given (passes/reconstruction.py).
    reconstruct: bool | None = option(
        None, off=("--no-reconstruct", "do not refit the kept weights on calibration data"),
        group=CALIB_GROUP, help="refit each layer's kept weights and bias (ridge least "
        "squares) so that the pruned model's layer outputs match the dense model's on the "
        "calibration data (default: on with --calib, except for models over 2 GB, which it "
        "would hold in memory)")
    calib_memory: int = option(2 << 30, parse=parse_bytes, metavar="SIZE", group=CALIB_GROUP,
                               help="memory budget for the activations held during "
                               "reconstruction and sensitivity (e.g. 512MiB, 2GiB)")
    damping: float = like(OBSPAOptions, "damping")
    samples: int = like(OBSPAOptions, "samples")
    compensate: bool = option(True, name="--no-compensate", negate=True, group=OBSPA_GROUP,
                              help="do not write the OBS update of the kept weights")
    # Depth pruning (passes/depth.py): whole residual blocks, scored by --depth-criterion.
    drop_blocks: int | None = option(None, parse=int, metavar="N", group=DEPTH_GROUP,
                                     help="remove the N least important residual blocks "
                                     "(Add(x, f(x)): transformer attention and MLP sub-blocks, "
                                     "CNN blocks with identity shortcuts)")
    depth_ratio: float | None = option(None, parse=parse_ratio, metavar="R", group=DEPTH_GROUP,
                                       help="remove this share of the candidate residual "
                                       "blocks, [0, 1)")
    depth_criterion: DepthCriterion = option(
        DepthCriterion.DAMAGE, enum=DepthCriterion, group=DEPTH_GROUP,
        help="block score, lowest dropped first: damage (final-output error of the block "
        "zeroed, on --calib or synthetic inputs) or cosine (ShortGPT: 1 - cos(block input, "
        "block output))")
    # Sizes of symbolic input dims for the inputs SPA makes (synthetic Hessians): ("H", 224), …;
    # the others are sized by spa/inputs.py, once per run.
    input_dims: InputDims = option((), name="--input-dim", parse=parse_input_dim, append=True,
                                   metavar="NAME=SIZE", help=_INPUT_DIM_HELP)

    def __post_init__(self) -> None:
        enum_values(self)
        if self.round_to != AUTO and (isinstance(self.round_to, bool) or not isinstance(
                self.round_to, int) or self.round_to < 1):
            raise OptionError(f"round_to must be an integer ≥ 1 or {AUTO!r}, got "
                              f"{self.round_to!r}")
        for name in ("ratio", "heads_ratio", "mlp_ratio", "hidden_ratio", "depth_ratio"):
            value = getattr(self, name)
            if value is not None:
                check_ratio(value, name.replace("_", " "))
        if self.drop_blocks is not None and self.depth_ratio is not None:
            raise OptionError("--drop-blocks and --depth-ratio both say how many blocks to "
                              "remove: give one")
        if self.drop_blocks is not None and self.drop_blocks < 0:
            raise OptionError(f"--drop-blocks must be at least 0, got {self.drop_blocks}")
        if self.held_out_data is not None and not self.calib:
            raise OptionError("--held-out-data measures fidelity against the calibration "
                              "stages: it needs --calib")

    @property
    def drops_blocks(self) -> bool:
        """Whether depth pruning was asked for."""
        return bool(self.drop_blocks) or bool(self.depth_ratio)

    @property
    def block(self) -> int:
        """``round_to`` resolved: this CPU's kernel block for ``auto``."""
        return kernel_block() if self.round_to == AUTO else int(self.round_to)

    @property
    def hessian_source(self) -> HessianSource:
        """``hessian``, with its default filled in: the data given is what OBSPA's Hessians
        are measured on (all-MiniLM-L6-v2 heads+MLP 0.3 with 1024 calibration lines: held-out
        cosine 0.918 from synthetic Hessians, 0.954 from the calibration data)."""
        return hessian_source(self.hessian, self.calib_data)

    @property
    def calib_data(self) -> bool:
        """Whether ``--calib`` gives data (not ``synthetic``, inputs made up from the model)."""
        return bool(self.calib) and self.calib != SYNTHETIC

    @property
    def calibration(self) -> CalibrationOptions:
        """How ``calib`` is read."""
        return CalibrationOptions(**{f.name: getattr(self, f.name)
                                     for f in dataclasses.fields(CalibrationOptions)})

    @property
    def allocation_method(self) -> AllocationMethod:
        """``allocation``, with its default filled in."""
        if self.allocation is not None:
            return AllocationMethod(self.allocation)
        if self.global_ranking:
            return AllocationMethod.GLOBAL
        if self.target is Target.LATENCY and not self.calib_data:
            return AllocationMethod.GLOBAL  # non-uniform widths: importance per millisecond
        # Synthetic inputs too: their sensitivities keep far more of a compact network than
        # one ratio everywhere (docs/cli.md).
        return AllocationMethod.SENSITIVITY if self.calib else AllocationMethod.UNIFORM

    @property
    def reconstructs(self) -> bool:
        """Whether reconstruction runs: asked for, or by default with calibration data."""
        return bool(self.calib) if self.reconstruct is None else self.reconstruct

    def criterion_options(self, cls: type) -> Any:
        """The criterion class's own options dataclass, from the same-named fields."""
        options = getattr(cls, "Options", None)
        if options is None:
            return None
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(options)}
        if "hessian" in values:
            values["hessian"] = self.hessian_source
        return options(**values)


@dataclass(frozen=True)
class CheckOptions:
    """What validation runs. ``check_masked``: None (the default) runs the numeric oracle
    whenever it applies to the plan (:func:`spa.validate.oracle_exemption`); True requires it
    (a plan it cannot apply to is then validated without it, with a warning; it implies
    ``validate``); False turns it off (``--no-check``)."""

    validate: bool = option(True, name="--no-validate", negate=True, help="skip running "
                            "original and pruned models in onnxruntime (and the numeric "
                            "oracle, unless --check-masked)")
    check_masked: bool | None = option(
        None, off=("--no-check", "do not run the numeric oracle (the default runs it whenever "
                   "the plan has no compensation and no normalisation over a pruned axis)"),
        help="require the numeric oracle (pruned == masked original); it runs by default "
        "whenever it applies to the plan")
    rtol: float = 1e-4
    latency: bool = option(True, name="--no-validate", negate=True, help="(with validation)")
    latency_runs: int = 20
    latency_threads: int | None = None  # onnxruntime's default unless a latency target says
    provider: str = CPU_PROVIDER
    input_dims: InputDims = like(PruneOptions, "input_dims")  # for validation inputs
    # warn when a config.json beside the input contradicts the pruned caches (a folder of
    # files rewrites it instead: spa/pipeline/family.py)
    config_warning: bool = True

    def __post_init__(self) -> None:
        if self.check_masked:
            object.__setattr__(self, "validate", True)
