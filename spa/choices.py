"""The closed sets of choices SPA's options take, as enums (``--target``, ``--hessian``, …).

They live in the kernel so that the plan's typed recipe (:mod:`spa.plan`), the passes that act
on them and the front ends that parse them share one definition; the CLI's ``choices`` are the
members' values.
"""

from __future__ import annotations

from enum import Enum


class Target(Enum):
    """What a ratio measures: channels, or parameters / MACs / measured latency (searched to
    meet the target)."""

    CHANNELS = "channels"
    PARAMS = "params"
    FLOPS = "flops"
    LATENCY = "latency"


class Reduction(Enum):
    """How a channel's scores over the weights of its group are combined."""

    MEAN = "mean"
    SUM = "sum"
    MAX = "max"


class Normalization(Enum):
    """How a group's channel scores are normalised before a global ranking."""

    MEAN = "mean"
    MAX = "max"
    STANDARD = "standard"
    NONE = "none"


class HessianSource(Enum):
    """Where the layer statistics (Hessians ``H = E[x xᵀ]``) come from (passes/hessian.py)."""

    SYNTHETIC = "synthetic"
    NOISE = "noise"
    CALIBRATION = "calibration"
    IDENTITY = "identity"


class AllocationMethod(Enum):
    """How the budget is spread over the groups (``--allocation``)."""

    UNIFORM = "uniform"  # the same ratio in every group
    GLOBAL = "global"  # one ranking of normalised scores across groups
    SENSITIVITY = "sensitivity"  # measured damage to the final outputs (passes/sensitivity.py)


class DepthCriterion(Enum):
    """How residual blocks are scored for depth pruning (passes/depth.py; lowest dropped)."""

    DAMAGE = "damage"  # final-output damage of the block zeroed (passes/sensitivity.py)
    COSINE = "cosine"  # ShortGPT: 1 − cos(block input, block output)
