"""Augmentation for distillation (spa/torch/distill.py): the teacher and the student see the
same altered batch, so any plausible input teaches them to agree. Images (4-D float inputs):
random resized crops, horizontal flips and mixup between calibration samples; token inputs
with an attention mask: token dropout (``--token-dropout``, default 0.3: masked positions,
never the first or last attended token).

Not an augmentation but done on the same training batches: when every token input has a
symbolic sequence axis, the columns after the batch's last attended token are cut off
(:func:`trim_padding`). Calibration text is padded to ``--max-length``; a batch of short
sentences then costs what its longest one does (MiniLM on fortunes: median 18 of 128 tokens,
the longest of 32 about 62), and both models see the same trimmed batch. So that the cut takes
most of the padding, :class:`Batches` also groups token samples of similar length into batches."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from spa import calibration
from spa.calibration.text import is_cache

if TYPE_CHECKING:
    from spa.torch.recover import GraphInput

MIXUP_ALPHA = 0.4
CROP_AREA = (0.6, 1.0)
POOL_BATCHES = 16  # token batches are made this many at a time from samples of similar length
Batch = list[torch.Tensor]

@dataclass(frozen=True)
class Kinds:
    """Which inputs are images (and their channel axis) and which is an attention mask."""

    images: dict[int, int] = field(default_factory=dict)  # input index → channel axis
    mask: int | None = None
    trimmed: tuple[int, ...] = ()  # token inputs cut after the last attended column


def input_kinds(inputs: Sequence[GraphInput]) -> Kinds:
    images = {}
    for k, i in enumerate(inputs):
        shape = list(i.shape or ())
        if np.issubdtype(i.dtype, np.floating) and len(shape) == 4 and not is_cache(i):
            last_is_channels = shape[3] in (1, 3, 4) and shape[1] not in (1, 3, 4)
            images[k] = 3 if last_is_channels else 1
    tokens = [k for k, i in enumerate(inputs) if np.issubdtype(i.dtype, np.integer)
              and len(i.shape or ()) == 2]
    masks = [k for k in tokens if "mask" in inputs[k].name.lower()]
    mask = masks[0] if masks and len(tokens) > 1 else None
    fixed = [k for k in tokens if isinstance(n := (inputs[k].shape or ())[1], int) and n > 0]
    return Kinds(images, mask, tuple(tokens) if mask is not None and not fixed else ())


def trim_padding(batch: Batch, kinds: Kinds) -> Batch:
    """``batch`` with its token inputs cut after the last column any sample attends to."""
    if kinds.mask is None or not kinds.trimmed:
        return batch
    attended = torch.nonzero(batch[kinds.mask].any(0))
    length = int(attended.max()) + 1 if len(attended) else 1
    return [t[:, :length] if k in kinds.trimmed else t for k, t in enumerate(batch)]


class Batches:
    """Which training samples each step takes: every sample once per epoch (a seeded
    permutation, less the remainder that does not fill a batch), batches in random order.

    With token inputs that :func:`trim_padding` cuts, the permutation is taken
    :data:`POOL_BATCHES` batches at a time and each pool is sorted by length before it is cut
    into batches, so a batch costs about what its own sentences do, not what the longest of
    random ones does (MiniLM on fortunes: a random batch of 32 is cut at about 62 tokens, the
    median sentence has 18)."""

    def __init__(self, batch: Batch, kinds: Kinds, size: int, rng: np.random.Generator):
        self.n, self.size, self.rng = len(batch[0]), size, rng
        self.lengths = None
        if kinds.mask is not None and kinds.trimmed:
            self.lengths = attended_lengths(batch[kinds.mask])
        self.pending: list[np.ndarray] = []

    def next(self) -> np.ndarray:
        """The sample indices of the next step (``size`` of them, distinct)."""
        if not self.pending:
            self._epoch()
        return self.pending.pop()

    def _epoch(self) -> None:
        order = self.rng.permutation(self.n)
        order = order[:len(order) - len(order) % self.size]
        if self.lengths is not None:
            pool = self.size * POOL_BATCHES
            order = np.concatenate([p[np.argsort(self.lengths[p], kind="stable")]
                                    for p in np.split(order, range(pool, len(order), pool))])
        batches = np.split(order, range(self.size, len(order), self.size))
        self.pending = [batches[k] for k in self.rng.permutation(len(batches))]


def augmented(kinds: Kinds, token_dropout: float) -> bool:
    """Whether :func:`augment` alters training batches of these inputs."""
    return bool(kinds.images) or (kinds.mask is not None and token_dropout > 0)


def augment(batch: Batch, kinds: Kinds, rng: np.random.Generator, token_dropout: float
            ) -> Batch:
    out = list(batch)
    for k, channels in kinds.images.items():
        out[k] = _augment_images(out[k], channels, rng)
    if kinds.mask is not None and token_dropout > 0:
        out[kinds.mask] = drop_tokens(out[kinds.mask], rng, token_dropout)
    return out


def _augment_images(x: torch.Tensor, channels: int, rng: np.random.Generator) -> torch.Tensor:
    """Random resized crops (same output size) with horizontal flips, then mixup."""
    if channels == 3:
        x = x.permute(0, 3, 1, 2)
    n = x.shape[0]
    area = rng.uniform(*CROP_AREA, n)
    aspect = np.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3), n))
    w, h = np.minimum(np.sqrt(area * aspect), 1.0), np.minimum(np.sqrt(area / aspect), 1.0)
    flip = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    theta = np.zeros((n, 2, 3))
    theta[:, 0, 0], theta[:, 1, 1] = w * flip, h
    theta[:, 0, 2] = rng.uniform(-1, 1, n) * (1 - w)
    theta[:, 1, 2] = rng.uniform(-1, 1, n) * (1 - h)
    grid = F.affine_grid(torch.from_numpy(theta).to(x), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    lam = torch.from_numpy(rng.beta(MIXUP_ALPHA, MIXUP_ALPHA, n)).to(x).view(n, 1, 1, 1)
    x = lam * x + (1 - lam) * x[torch.from_numpy(rng.permutation(n)).to(x.device)]
    return x.permute(0, 2, 3, 1) if channels == 3 else x


def drop_tokens(mask: torch.Tensor, rng: np.random.Generator, share: float) -> torch.Tensor:
    """Mask out ``share`` of the attended tokens, never the first (CLS) nor the last attended
    one (SEP)."""
    attended = (mask != 0).cpu().numpy()
    positions = np.arange(mask.shape[1])
    last = attended_lengths(mask) - 1  # -1: nothing attended
    special = (positions[None] == 0) | (positions[None] == last[:, None])
    drop = (rng.random(attended.shape) < share) & attended & ~special
    return torch.where(torch.from_numpy(drop).to(mask.device), torch.zeros_like(mask), mask)


def attended_lengths(mask: torch.Tensor) -> np.ndarray:
    """Per sample, one past its last attended column (0 when it attends to nothing)."""
    return calibration.attended_lengths(mask.cpu().numpy())
