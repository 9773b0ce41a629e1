"""Magnitude criteria: the Lp norm of a channel's weights, and a seeded random baseline.

``l1``: ``Σ|w|`` over a channel's slice of each weight space; ``l2``: ``sqrt(Σ w²)``.
``random``: a uniform score per index, seeded (a baseline; its normalisation changes nothing).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from spa.passes.importance.base import Criterion, along, register_criterion

if TYPE_CHECKING:
    from spa.coupling.analysis import Group, Member


@register_criterion
class L1(Criterion):
    name = "l1"
    help = "L1 norm of each channel's weights (data-free)"

    def local(self, weight: np.ndarray, axis: int, member: Member, group: Group) -> np.ndarray:
        return np.abs(along(weight, axis)).sum(axis=1)


@register_criterion
class L2(Criterion):
    name = "l2"
    help = "L2 norm of each channel's weights (data-free)"

    def local(self, weight: np.ndarray, axis: int, member: Member, group: Group) -> np.ndarray:
        return np.sqrt(np.square(along(weight, axis)).sum(axis=1))


@register_criterion
class Random(Criterion):
    name = "random"
    help = "uniform random scores, seeded by --seed (a baseline)"

    def local(self, weight: np.ndarray, axis: int, member: Member, group: Group) -> np.ndarray:
        rng = np.random.default_rng([self.seed, group.id])
        return rng.random((weight.shape[axis],))
