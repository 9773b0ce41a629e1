"""The options of ``spa recover`` (distillation from the dense model), declared once.

Torch-free, so that the CLI builds the flags without importing PyTorch; the loop itself is
:mod:`spa.torch.recover`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from spa.options import option, positive, share

GROUP = "recovery"
TORCH_MISSING = "spa recover needs PyTorch: pip install 'spa-prune[torch]'"
#: why ``--calib synthetic`` does not train: the held-out check would be synthetic too
SYNTHETIC_REFUSED = ("recovery distils on real calibration data, and --calib synthetic has "
                     "none (nothing would check the training against real inputs): give "
                     "--calib PATH")


def _number_above(low: float, *, inclusive: bool) -> Callable[[str], float]:
    """Parser of a float flag that must exceed ``low`` (or equal it, ``inclusive``)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not (value >= low if inclusive else value > low):
            raise argparse.ArgumentTypeError(f"must be {'at least' if inclusive else 'above'} "
                                             f"{low:g}, got {value}")
        return value
    return parse


_positive_float = _number_above(0.0, inclusive=False)
_non_negative_float = _number_above(0.0, inclusive=True)


@dataclass(frozen=True)
class RecoverOptions:
    """How long and how to distil the pruned model (the student) from the dense one."""

    steps: int | None = option(None, parse=positive, metavar="N", group=GROUP,
                               help="optimizer steps (default 200 unless --time-budget)")
    time_budget: float | None = option(None, parse=_positive_float, metavar="SECONDS",
                                       group=GROUP, help="train for this long instead of a "
                                       "number of steps (the learning-rate trials included)")
    lr: float | None = option(None, parse=_positive_float, metavar="LR", group=GROUP,
                              help="learning rate (default: the best of 1e-5..1e-3 in short "
                              "trials, judged on validation runs of the training samples)")
    matched_weight: float | None = option(
        None, parse=_non_negative_float, metavar="W", group=GROUP,
        help="weight of the loss on intermediate values both models share (default: 0.1, or 10 "
        "when a longer check on validation runs of the training samples favours it; 0: none)")
    batch_size: int = option(32, parse=positive, metavar="N", group=GROUP,
                             help="samples per step, over all processes (capped by the "
                             "training samples)")
    temperature: float = option(1.0, parse=_positive_float, metavar="T", group=GROUP,
                                help="softmax temperature of the KL loss on class scores")
    token_dropout: float = option(0.3, parse=share, metavar="SHARE", group=GROUP,
                                  help="token models: share of the attended tokens masked out "
                                  "in each training batch, for both models (0: none, and "
                                  "the dense model answers each training sample once, "
                                  "before training)")
    weight_decay: float = option(0.01, parse=_non_negative_float, metavar="W", group=GROUP,
                                 help="AdamW weight decay")
    seed: int = option(0, parse=int, group=GROUP,
                       help="seed of the held-out split, batches and augmentation")
    device: str = option("auto", choices=("auto", "cpu", "cuda"), group=GROUP,
                         help="where to train (auto: CUDA when available)")

    DEFAULT_STEPS = 200

    def budget(self) -> tuple[int | None, float | None]:
        """(steps, seconds): the default is 200 steps; a time budget alone has no step cap."""
        if self.steps is None and self.time_budget is None:
            return self.DEFAULT_STEPS, None
        return self.steps, self.time_budget
