"""Channel shuffles prune: ``Reshape [C] → [g, C/g]``, ``Transpose``, ``Reshape [C/g, g] → [C]``.

Output channel ``j`` of a shuffle is input channel ``(j mod g)·C/g + j // g``. The two reshapes
reach both factors, so each would keep its own outermost (the split the group index, the merge
the channel within a group) and neither would lead on: every channel froze. The analysis now
makes such tied choices meet (spa/coupling/analysis.py ``_agree``): input channel ``k`` and
``k + C/g`` go with outputs ``g·k … g·k + g − 1``, and the masked oracle holds.
"""

from __future__ import annotations

import numpy as np
import pytest
from graphs import Builder, group_of, init_shapes, init_value, kept_slices
from oracle import prune_checked

from spa.api import analyze

X = {"x": [1, 3, 4, 4]}


def _shuffle(b: Builder, x: str, c: int, groups: int, name: str) -> str:
    s = b.op("Reshape", x, b.const([1, groups, c // groups, 4, 4]), name=f"{name}_split")
    s = b.op("Transpose", s, perm=[0, 2, 1, 3, 4], name=name)
    return b.op("Reshape", s, b.const([1, c, 4, 4]), name=f"{name}_merge")


@pytest.mark.parametrize("channels, groups", [(8, 2), (4, 2), (12, 3)])
def test_a_shuffle_prunes_its_channels_in_interleaved_sets(tmp_path, channels, groups):
    """(4, 2) has factors of equal length, (12, 3) three groups."""
    b = Builder()
    y = b.conv(_shuffle(b, b.stem("x", 3, channels), channels, groups, "shuffle"), channels, 4,
               name="c2")
    m = b.model(X, {y: [1, 4, 4, 4]})
    per_group = channels // groups
    g = group_of(m, "c1.w", 0)
    assert g.prunable and g.size == per_group
    out = prune_checked(m, tmp_path, ratio=0.5, round_to=1)
    kept_in = kept_slices(init_value(m, "c1.b"), init_value(out.path, "c1.b"), 0)
    kept_out = kept_slices(init_value(m, "c2.w"), init_value(out.path, "c2.w"), 1)
    units = sorted({k % per_group for k in kept_in})
    assert len(units) == per_group // 2
    # input channel k + i·C/g of every group i goes with outputs g·k … g·k + g − 1
    assert kept_in == sorted(k + i * per_group for k in units for i in range(groups))
    assert kept_out == sorted(groups * k + i for k in units for i in range(groups))


def _unit(b: Builder, x: str, c: int, name: str) -> str:
    """A ShuffleNetV2 unit at stride 1: half the channels pass, half go through
    1×1 → depthwise 3×3 → 1×1, the halves are concatenated and shuffled (groups 2)."""
    keep, work = b.op("Split", x, b.const(np.array([c // 2, c // 2], np.int64)), axis=1,
                      outputs=2, name=f"{name}_halves")
    h = b.op("Relu", b.conv(work, c // 2, c // 2, k=1, name=f"{name}_pw1"))
    h = b.conv(h, c // 2, c // 2, group=c // 2, name=f"{name}_dw")
    h = b.op("Relu", b.conv(h, c // 2, c // 2, k=1, name=f"{name}_pw2"))
    return _shuffle(b, b.op("Concat", keep, h, axis=1, name=f"{name}_cat"), c, 2, name)


def test_shufflenet_v2_units_prune_under_the_oracle(tmp_path):
    """Three units in a row: the passed-on half of each unit is shuffled into the next, so
    the stem's channels spread over every unit; they and the units' own channels prune."""
    b = Builder()
    x = b.stem("x", 3, 16)
    for i in range(3):
        x = _unit(b, x, 16, f"u{i}")
    y = b.conv(x, 16, 4, name="head")
    m = b.model(X, {y: [1, 4, 4, 4]})
    stem = [g for g in analyze(m).groups if any(s.space == ("c1.w", 0) for s in g.members)]
    assert len(stem) > 1 and all(g.prunable for g in stem)  # the stem's channels, in sets
    assert sum(len(s.indices) for g in stem for s in g.members if s.space == ("c1.w", 0)) == 16
    assert group_of(m, "u1_pw1.w", 0).prunable
    out = prune_checked(m, tmp_path, ratio=0.5, round_to=1)
    shapes = init_shapes(out.path)
    assert shapes["c1.w"][0] < 16 and shapes["head.w"][1] < 16
    assert all(shapes[f"u{i}_pw1.w"][0] < 8 for i in range(3))
