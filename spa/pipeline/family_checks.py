"""The checks of a folder's files pruned together (spa/pipeline/family.py), across files.

Each file is validated as ``spa prune`` validates it (the numeric oracle against its masked
original, the greedy check for a decoder). Then across files, on the files written:

* every weight two files share must be byte-identical after pruning (a float16 copy's: its
  plain file's, cast), and each tensor passed between files must have the same shape on both
  sides (:func:`check_written`);
* a file that reads back what another writes must continue it (:func:`steps_checked`: a
  decoder with past, fed the first-step decoder's caches and then its own, gives the logits
  the first-step decoder gives over the whole prefix, as the original files do);

else nothing is written. A decoder calibrated on samples made from an encoder's is measured
with it on their held-out samples (:func:`together`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from spa import validate as val
from spa.errors import ValidationError
from spa.ir.contrib import fixed_dims
from spa.pipeline import encdec
from spa.pipeline.variants import LIMITS, CastCopy, lowered

if TYPE_CHECKING:
    from spa.pipeline.family import FamilyPlan
    from spa.pipeline.ties import Site


STEPS = 3  # tokens the step check decodes with the reader


def steps_checked(src: Path, out: Path, writer: str, reader: str, dims: dict[str, int],
                  rtol: float) -> dict | str:
    """Whether the pruned ``reader`` continues what the pruned ``writer`` wrote, as a decoder
    with past continues the first-step decoder: on the writer's caches for a prefix, and then
    its own, ``STEPS`` tokens one at a time, its logits must match the writer's over the whole
    prefix at the last token (relative ``rtol``), as they do for the original files (else the
    check does not run: the files are not such a pair). The result, or why it did not run."""
    first, later = (val.session(str(out / n), what=n) for n in (writer, reader))
    why = _not_a_pair(first, later)
    if why:
        return f"not run: {why}"
    originals = (val.session(str(src / writer), what=writer),
                 val.session(str(src / reader), what=reader))
    try:
        before = _step_difference(*originals, dims)
    except ValidationError as exc:  # such as a merged decoder that is no file of the pair
        return f"not run: the original files do not run step by step ({exc})"
    if not before <= rtol:
        return f"not run: the original files differ by {before:.1e} step by step"
    after = _step_difference(first, later, dims)
    if not after <= rtol:
        raise ValidationError(
            f"the pruned {reader} does not continue what the pruned {writer} writes: its logits "
            f"differ from a run over the whole prefix by {after:.1e} (relative; the original "
            f"files: {before:.1e}, allowed {rtol:.0e})")
    return {"steps": STEPS, "relative_diff": after, "relative_diff_original": before}


def _not_a_pair(first: ort.InferenceSession, later: ort.InferenceSession) -> str | None:
    """None when ``later`` reads what ``first`` writes and the token inputs both take, else
    why the step check cannot feed them."""
    fed = {i.name for i in first.get_inputs()}
    own = [i.name for i in later.get_inputs() if i.name not in fed and not any(
        i.name.startswith(p + ".") for ps in encdec.PASSED.values() for p in ps)]
    if own:
        return f"inputs {own} are neither the first file's nor caches it writes"
    if "input_ids" not in fed or "logits" not in {o.name for o in first.get_outputs()} \
            or "logits" not in {o.name for o in later.get_outputs()}:
        return "no 'input_ids' input and 'logits' output"
    ids = next(i for i in first.get_inputs() if i.name == "input_ids")
    if len(ids.shape) != 2 or isinstance(ids.shape[1], int):
        return "'input_ids' has no symbolic sequence axis"
    by_length = [i.name for i in first.get_inputs()
                 if i.name != "input_ids" and ids.shape[1] in i.shape]
    if by_length:
        return f"inputs {by_length} are sized by the token sequence too"
    return None


def _step_difference(first: ort.InferenceSession, later: ort.InferenceSession,
                     dims: dict[str, int]) -> float:
    """The worst relative difference, over ``STEPS`` steps, between ``later``'s last logits
    on the caches written so far and ``first``'s over the whole prefix."""
    feeds = {k: np.ones_like(v) if "mask" in k else v
             for k, v in val.random_inputs(first, dims=dims).items()}
    prefix = feeds["input_ids"].shape[1]
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 2, (feeds["input_ids"].shape[0], prefix + STEPS)).astype(
        feeds["input_ids"].dtype)

    def whole(t: int) -> dict[str, np.ndarray]:
        return val.run(first, {**feeds, "input_ids": ids[:, :t]})

    wanted = {i.name for i in later.get_inputs()}
    past = encdec.read_back(whole(prefix))
    worst = 0.0
    for t in range(prefix, prefix + STEPS):
        step = val.run(later, {**{k: v for k, v in feeds.items() if k in wanted},
                               **{k: v for k, v in past.items() if k in wanted},
                               "input_ids": ids[:, t:t + 1]})
        ref = whole(t + 1)["logits"][:, -1]
        worst = max(worst, float(np.abs(step["logits"][:, -1] - ref).max()
                                 / max(float(np.abs(ref).max()), 1e-30)))
        past.update(encdec.read_back(step))
    return worst


def check_written(folder: Path, names: list[str], pairs: list[tuple[Site, Site]],
                  copies: Mapping[str, CastCopy] | None = None) -> None:
    """The pruned files agree: shared weights byte-identical (a float16 copy's: its plain
    file's cast), passed tensors the same shape."""
    limits = {n: c.limits for n, c in (copies or {}).items()}
    written = {n: onnx.load(str(folder / n)) for n in names}
    values = {n: {i.name: i for i in m.graph.initializer} for n, m in written.items()}
    dims = {n: {v.name: fixed_dims(v) for v in (*m.graph.input, *m.graph.output)}
            for n, m in written.items()}
    for (a, (x, ax)), (b, (y, _)) in pairs:
        if x in dims[a] and y in dims[b]:
            if dims[a][x][ax] != dims[b][y][ax]:
                raise ValidationError(
                    f"'{x}' in {a} and '{y}' in {b} have {dims[a][x][ax]} and {dims[b][y][ax]} "
                    f"entries on axis {ax} after pruning: the files would not run together")
        elif x in values[a] and y in values[b]:
            va, vb = (numpy_helper.to_array(values[n][w]) for n, w in ((a, x), (b, y)))
            if va.dtype != vb.dtype and va.shape == vb.shape:  # a float16 copy's weight
                va = lowered(va, vb.dtype, limits.get(b, LIMITS[0]))
            if va.shape != vb.shape or not val.same_bits(va, vb):
                raise ValidationError(
                    f"weight '{x}' of {a} and '{y}' of {b} were the same before pruning and "
                    f"differ after: the files would not be one model (a value refitted or "
                    f"compensated in one file that the others did not take)")


def together(fp: FamilyPlan, written: Path) -> dict[str, dict[str, float]]:
    """Per decoder calibrated on samples made from an encoder's, the held-out fidelity of the
    two pruned files run together (:func:`spa.pipeline.encdec.together`)."""
    out = {}
    for d, how in fp.made.items():
        e = how["from"]
        held = [fp.prepared[n].calib if n in fp.prepared else None for n in (e, d)]
        if held[0] is not None and held[1] is not None:
            feeds = encdec.feeds_for(fp.headers, d, [e])
            assert feeds is not None, "a decoder whose samples were made reads an encoder"
            out[f"{e} -> {d}"] = encdec.together(fp.src, written, feeds, d, held[0].held_out,
                                                 held[1].held_out, encdec.eos_ids(fp.src))
    return out


__all__ = ["STEPS", "check_written", "steps_checked", "together"]
