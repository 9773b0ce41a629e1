"""Float16 copies of a folder's files: ``model_fp16.onnx`` beside ``model.onnx``.

transformers.js folders (and others) hold a model at several precisions. A float16 variant made
by casting (onnxconverter-common's or onnxruntime's ``convert_float_to_float16``) holds the
plain file's values, cast: the same initializer names and shapes, each float value cast to
float16 the way those converters cast it (:func:`lowered`). Pruned apart, such a copy would be
planned on its own scores and calibrated again (its own sensitivity and refit, twice the
work), and its groups could lose other channels than the plain file's. Instead:

* **Found by its values** (:func:`cast_copies`): a file whose name is a plain file's with a
  precision suffix (:func:`variant`), every float initializer of two or
  more dims of which is the same-named initializer of the plain file, cast (as
  onnxruntime's converter or onnxconverter-common's casts: :data:`LIMITS`), at least one of
  them float16. Anything else (int8, int4, a weight of its own) is not a copy and is pruned
  apart, as before.
* **Planned as its plain file** (:func:`lowered_options`): no data of its own; each of its
  weights ties to the plain file's (spa/pipeline/family.py), so its groups follow the plain
  file's plan entry by entry.
* **Written with the plain file's values, cast** (:func:`lowered_taken`): what
  reconstruction refitted, OBSPA compensated or ``--recover`` trained in the plain file. The
  folder's check then finds every tied weight equal to the plain one cast, and, with
  validation on, the copy must answer as the pruned plain file does within the spread the two
  input files show on the same inputs (:data:`SPREAD`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from spa import validate as val
from spa.errors import ValidationError
from spa.ir.dtypes import is_floating
from spa.pipeline import encdec

if TYPE_CHECKING:
    from spa.pipeline import PruneOptions, PruneReport

#: A copy must answer as its pruned plain file within this many times the relative difference
#: the two input files show on the same inputs (and within ``FLOOR`` whatever that is).
SPREAD = 8.0
FLOOR = 1e-2
#: How transformers.js names a folder's other precisions of the same files
#: (``decoder_model_merged_quantized.onnx`` beside ``decoder_model_merged.onnx``).
VARIANTS = ("_quantized", "_fp16", "_int8", "_uint8", "_q4f16", "_q4", "_bnb4", "_q8")
SUFFIXES = ("_fp16",)  # the variants float16 copies are named with (transformers.js's)

#: How the float16 converters cast (the smallest and largest magnitude a non-zero finite value
#: is clipped to): onnxruntime's ``onnxruntime.transformers.float16``, onnxconverter-common's
#: (transformers.js's conversion script uses it).
LIMITS = ((5.96e-08, 65504.0), (1e-07, 1e4))


@dataclass(frozen=True)
class CastCopy:
    """A float16 file that is ``plain``'s values cast: ``names``, its weights (two or more
    dims), each the plain file's of the same name cast; ``values``, every initializer it held
    so (its biases too), which take the plain file's written values."""

    plain: str
    names: tuple[str, ...]
    values: tuple[str, ...]
    limits: tuple[float, float] = LIMITS[0]  # how it was cast (:func:`lowered`)


def lowered(values: np.ndarray, dtype: np.dtype, limits: tuple[float, float] = LIMITS[0]
            ) -> np.ndarray:
    """``values`` cast to ``dtype`` as a float16 converter casts (``limits``, one of
    :data:`LIMITS`): non-zero finite values clipped in magnitude to ``limits``, with their
    sign (NaN, ±inf and 0 as they are)."""
    dtype = np.dtype(dtype)
    if dtype != np.float16 or values.dtype == dtype:
        return values.astype(dtype)
    x = np.asarray(values, np.float32)
    tiny, top = np.float32(limits[0]), np.float32(limits[1])
    x = np.where((x > 0) & (x < tiny), tiny, x)
    x = np.where((x < 0) & (x > -tiny), -tiny, x)
    x = np.where(np.isfinite(x), np.clip(x, -top, top), x)
    return x.astype(np.float16)


def variant(name: str) -> str:
    """Which precision variant a file is (``""``: the plain files): files of different
    variants are different copies of the model, and pass nothing to each other."""
    return next((v for v in VARIANTS if _stem(name).endswith(v)), "")


def _stem(name: str) -> str:
    return name.removesuffix(".onnx").split(".")[0]  # a merged decoder's branch: its file's


def plain_name(name: str, suffixes: tuple[str, ...] = SUFFIXES) -> str | None:
    """The plain file a variant file ``name`` (float16 by default; of ``suffixes``) would be a
    copy of (a merged decoder's branch: its merged file's), or None."""
    suffix = variant(name)
    if suffix not in suffixes:
        return None
    stem = _stem(name)
    return name.replace(stem, stem.removesuffix(suffix), 1)


def cast_copies(graphs: Mapping[str, gs.Graph]) -> dict[str, CastCopy]:
    """The files of a folder that are float16 copies of another (see the module), by name."""
    out = {}
    for n, graph in graphs.items():
        plain = plain_name(n)
        if plain is None or plain not in graphs or plain_name(plain) is not None:
            continue
        theirs, mine = _constants(graphs[plain]), _constants(graph)
        found = next((c for c in (_cast_of(theirs, mine, limits) for limits in LIMITS)
                      if c is not None), None)
        if found is not None:
            out[n] = dataclasses.replace(found, plain=plain)
    return out


def _constants(graph: gs.Graph) -> dict[str, gs.Constant]:
    return {k: t for k, t in graph.tensors().items() if isinstance(t, gs.Constant)}


def _cast_of(plain: Mapping[str, gs.Constant], copy: Mapping[str, gs.Constant],
             limits: tuple[float, float]) -> CastCopy | None:
    """``copy`` as a :class:`CastCopy` (its ``plain`` left empty) when each of its float
    weights (two or more dims) is ``plain``'s of the same name cast with ``limits`` and one at
    least is float16; else None. A smaller float constant that is not the plain one cast is
    its own."""
    names, values, halved = [], [], False
    for name, t in sorted(copy.items()):
        if not is_floating(t.dtype):
            continue
        other = plain.get(name)
        mine = np.asarray(t.values)
        same = other is not None and tuple(other.shape) == tuple(t.shape) \
            and is_floating(other.dtype) \
            and val.same_bits(lowered(np.asarray(other.values), mine.dtype, limits), mine)
        if len(t.shape) >= 2:
            if not same:
                return None
            assert other is not None
            halved |= mine.dtype == np.float16 and other.dtype != np.float16
            names.append(name)
        if same:
            values.append(name)
    return CastCopy("", tuple(names), tuple(values), limits) if halved else None


def lowered_options(options: PruneOptions) -> PruneOptions:
    """A float16 copy's options: no data, the stand-in criterion, no compensation; its groups
    follow its plain file's, whose values it then takes."""
    return dataclasses.replace(encdec.without_data(options), criterion=encdec.STAND_IN,
                               compensate=False)


def lowered_taken(folder: Path, copies: Mapping[str, CastCopy], original: Path | None,
                  reports: Mapping[str, PruneReport]) -> dict[str, dict]:
    """Write into each pruned copy in ``folder`` its plain file's written values, cast, for
    every initializer of the same name both hold that the copy held cast before (its weights
    and biases); with ``original`` (the input folder: validation on) then check that it
    answers as its plain file (see the module). Per copy: how many values it took, from
    which file, and the check's relative differences."""
    out: dict[str, dict] = {}
    for n, copy in copies.items():
        if n not in reports or copy.plain not in reports:
            continue
        source = {i.name: i for i in onnx.load(str(folder / copy.plain)).graph.initializer}
        model = onnx.load(str(folder / n))
        held = set(copy.values)
        values = {}
        for init in model.graph.initializer:
            theirs = source.get(init.name)
            if theirs is None or init.name not in held:
                continue
            v = numpy_helper.to_array(theirs)
            if tuple(init.dims) == v.shape:
                mine = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
                values[init.name] = numpy_helper.from_array(lowered(v, mine, copy.limits),
                                                            init.name)
        count = encdec.replace_values(model, values)
        if count:
            onnx.save(model, str(folder / n))
        took: dict = {"from": copy.plain, "values": count, "how": "float16-cast"}
        if original is not None:
            took |= answers(original, folder, n, copy.plain,
                            dict(reports[copy.plain].input_dims), "float16 copy")
        out[n] = took
    return out


def answers(original: Path, written: Path, copy: str, plain: str, dims: dict[str, int],
            what: str) -> dict[str, float]:
    """The relative difference between the pruned copy and plain file on seeded random
    inputs, against the input files' on the same inputs; an error past :data:`SPREAD` (``what``
    the copy is of its plain file, for the message)."""
    spreads = []
    for folder in (original, written):
        a, b = (val.session(str(folder / n), what=n) for n in (plain, copy))
        feeds = val.random_inputs(a, dims=dims)
        rb = val.run(b, {i.name: feeds[i.name].astype(np.float16)
                         if i.type == "tensor(float16)" else feeds[i.name]
                         for i in b.get_inputs()})
        spreads.append(val.worst_relative(val.run(a, feeds), rb))
    before, after = spreads
    if not after <= max(SPREAD * before, FLOOR):
        raise ValidationError(f"{copy}: pruned, it answers {after:.1e} (relative) apart from "
                              f"the pruned {plain}, whose {what} it is ({before:.1e} "
                              "before pruning): the variant would not be the same model")
    return {"relative_diff": after, "relative_diff_before": before}


__all__ = ["VARIANTS", "CastCopy", "answers", "cast_copies", "lowered", "lowered_options",
           "lowered_taken", "plain_name", "variant"]
