"""Calibration data: what ``--calib PATH`` reads, and the held-out split every stage respects.

``--calib`` takes what users have:

* an ``.npz``: arrays named after the graph inputs, first axis = samples;
* a folder of images (its sub-folders too): decoded with pillow, resized (shorter side) and
  centre-cropped to the model's size, scaled by a preset (``imagenet``: ``(v/255 - mean)/std``
  with ImageNet's mean and std, after resizing to ``size/0.875``; ``unit``: ``v/255``; ``raw``:
  ``v``), laid out as the model's one 4-D float input wants (NCHW or NHWC);
* a text file, one sample per non-empty line (JSON Lines: a string, or an object's ``"text"``
  and ``"text_pair"``): encoded by a ``tokenizers`` tokenizer (``--tokenizer``, else the one
  saved beside the model), truncated and padded to the model's sequence length, fed to the
  ids / attention mask / token type / position inputs by their names; a decoder's KV-cache
  inputs get empty caches (each line is a prompt). Ids the model's embedding has no row for
  are refused.

``--calib-samples N`` reads a seeded N of the samples instead of all.

:func:`load` reads it once per run into :class:`Calibration`: a seeded share
(``--held-out``, default 10%) is held back and never used for statistics, reconstruction,
sensitivity or recovery; it only measures fidelity (spa/fidelity.py).
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from spa.errors import OptionError
from spa.options import option, positive, share

log = logging.getLogger(__name__)
GROUP = "calibration data"
Arrays = dict[str, np.ndarray]


class InputSpec(Protocol):
    """A graph input as the readers see it (a ``gs.Variable`` fits): name, dtype, shape
    (ints, or str/None for symbolic dims)."""

    name: str
    dtype: object
    shape: Sequence[int | str | None] | None


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        import argparse

        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}"
                                         ) from None


@dataclass(frozen=True)
class Preset:
    """Resize so the shorter side is ``size / crop``, centre-crop to ``size``, then
    ``(v / scale - mean) / std``. Mean and std are RGB's (see :func:`_per_channel`)."""

    crop: float
    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]


PRESETS = {"imagenet": Preset(0.875, 255.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
           "unit": Preset(1.0, 255.0, (0.0,), (1.0,)),
           "raw": Preset(1.0, 1.0, (0.0,), (1.0,))}



@dataclass(frozen=True)
class CalibrationOptions:
    """How ``--calib`` is read (images: preset and overrides; text: tokenizer, length)."""

    preprocess: str = option("imagenet", choices=tuple(PRESETS), group=GROUP,
                             help="image folders: imagenet (scale to [0,1], ImageNet mean/std), "
                             "unit (scale to [0,1]) or raw (0..255)")
    image_size: int | None = option(None, parse=positive, metavar="N", group=GROUP,
                                    help="image folders: resize and centre-crop to N×N "
                                    "(default: the model's static input size)")
    mean: tuple[float, ...] | None = option(None, parse=_floats, metavar="M[,M,M]",
                                            group=GROUP, help="image folders: per-channel mean "
                                            "subtracted after scaling (overrides the preset)")
    std: tuple[float, ...] | None = option(None, parse=_floats, metavar="S[,S,S]", group=GROUP,
                                           help="image folders: per-channel std divided by "
                                           "(overrides the preset)")
    layout: str | None = option(None, choices=("nchw", "nhwc"), group=GROUP,
                                help="image folders: the model's image layout (default: from "
                                "its input shape)")
    tokenizer: str | None = option(None, metavar="PATH", group=GROUP,
                                   help="text files: a tokenizer.json, or a folder holding one "
                                   "(or the vocab files transformers converts); default: the "
                                   "one saved beside the model")
    max_length: int = option(128, parse=positive, metavar="N", group=GROUP,
                             help="text files: tokens per sample (truncated and padded)")
    pack: bool = option(False, name="--pack", group=GROUP,
                        help="text files: join the lines' tokens and cut them into samples of "
                        "--max-length tokens, no padding (windows of a corpus, as decoder LLMs "
                        "are calibrated) instead of one padded sample a line")
    calib_samples: int | None = option(None, parse=positive, metavar="N", group=GROUP,
                                       help="read a seeded N of the samples (image files, "
                                       "text lines, --pack windows, .npz rows) of --calib and "
                                       "of --held-out-data, not all (default: all)")
    held_out: float = option(0.1, parse=share, metavar="SHARE", group=GROUP,
                             help="share of the calibration samples held back (seeded) to "
                             "measure fidelity; never used to calibrate or recover")
    held_out_data: str | None = option(None, metavar="PATH", group=GROUP,
                                       help="measure fidelity on these samples (read like "
                                       "--calib) instead of a share of --calib, which then "
                                       "calibrates whole: give samples from other sources "
                                       "(photos, documents) than the calibration's")


@dataclass(frozen=True)
class Calibration:
    """Calibration samples split once: ``train`` calibrates, ``held_out`` only measures."""

    train: Arrays
    held_out: Arrays
    kind: str  # "npz", "images" or "text"
    path: str
    held_out_path: str | None = None  # --held-out-data; None: a share of ``path``
    tokenizer: str | None = None  # the tokenizer a text file was read with

    @property
    def samples(self) -> int:
        return sample_count(self.train) + sample_count(self.held_out)

    def summary(self) -> dict:
        """Where the data came from and how it was split (the report's ``calibration``)."""
        out = {"path": self.path, "kind": self.kind, "samples": sample_count(self.train),
               "held_out": sample_count(self.held_out)}
        out |= {"held_out_path": self.held_out_path} if self.held_out_path else {}
        return out | ({"tokenizer": self.tokenizer} if self.tokenizer else {})


def sample_count(arrays: Mapping[str, np.ndarray]) -> int:
    """How many samples ``arrays`` hold (the length of each array; 0 without arrays)."""
    return len(next(iter(arrays.values()))) if arrays else 0


def load(path: str, inputs: Sequence[InputSpec], options: CalibrationOptions = CalibrationOptions(),
         *, seed: int = 0, graph: gs.Graph | None = None, dims: Mapping[str, int] | None = None
         ) -> Calibration:
    """Read ``path`` (an .npz, a folder of images or a text file) for a model with these graph
    ``inputs``, and split off the held-out share. With ``graph``, token ids are checked against
    the model's embedding; ``dims``: sizes of symbolic input dims (a text file's empty KV
    caches take their head counts and sizes from it when symbolic)."""
    kind, arrays = read(path, inputs, options, graph=graph, dims=dims, seed=seed)
    train, held = held_out(fitted(arrays, inputs), inputs, options, seed=seed, graph=graph,
                           dims=dims)
    return Calibration(train, held, kind, str(path), options.held_out_data,
                       options.tokenizer if kind == "text" else None)


def held_out(arrays: Mapping[str, np.ndarray], inputs: Sequence[InputSpec],
             options: CalibrationOptions, *, seed: int = 0, graph: gs.Graph | None = None,
             dims: Mapping[str, int] | None = None) -> tuple[Arrays, Arrays]:
    """(train, held-out) of the calibration ``arrays``: with ``--held-out-data``, all of them
    and that data (read and preprocessed as ``--calib`` is); else :func:`split`'s seeded share.

    A share of the calibration samples is held out from the same sources: views of the same
    photos, lines of the same documents. Fidelity on it can promise more than the model keeps
    on new sources (EfficientNet-Lite0 calibrated on 28 photos, 1.5x FLOPs cut: reconstruction
    lifts top-1 agreement on the held-out share 0.66 → 0.84, on 15 other photos 0.65 → 0.67);
    other sources' samples say what it keeps."""
    if options.held_out_data is None:
        return split(arrays, options.held_out, seed=seed)
    where = options.held_out_data
    if not Path(where).exists():
        raise OptionError(f"--held-out-data {where}: no such file or folder")
    _samples(arrays, "calibration arrays")
    try:
        _, read_back = read(where, inputs, options, graph=graph, dims=dims, seed=seed)
        held = {k: v for k, v in fitted(read_back, inputs).items() if k in arrays}
    except OptionError as exc:
        raise OptionError(f"--held-out-data: {exc}") from None
    if _samples(held, f"--held-out-data {where}: arrays") == 0:
        raise OptionError(f"--held-out-data {where}: no samples")
    return dict(arrays), held


def _samples(arrays: Mapping[str, np.ndarray], what: str) -> int:
    """The sample count all ``arrays`` share (0 without arrays); an :class:`OptionError` naming
    ``what`` when they differ."""
    counts = {len(v) for v in arrays.values()}
    if len(counts) > 1:
        raise OptionError(f"{what} have different sample counts {sorted(counts)}")
    return counts.pop() if counts else 0


def fitted(arrays: Mapping[str, np.ndarray], inputs: Sequence[InputSpec]) -> Arrays:
    """The arrays for the graph inputs, cast to their element types (other arrays, such as the
    labels of gradient criteria, pass as they are); an :class:`OptionError`
    when one is missing, or its rank or a fixed dim (after the sample axis) does not fit."""
    missing = [i.name for i in inputs if i.name not in arrays]
    if missing:
        raise OptionError(f"calibration data lacks arrays for graph inputs {missing}")
    out = {}
    for inp in inputs:
        arr = np.asarray(arrays[inp.name])
        shape = list(inp.shape or ())
        fixed = [d if isinstance(d, int) and d > 0 else None for d in shape]
        if inp.shape is not None and (arr.ndim != len(fixed) or any(
                d is not None and d != a for d, a in zip(fixed[1:], arr.shape[1:]))):
            shown = [d if isinstance(d, int) else (d or "?") for d in shape]
            raise OptionError(f"calibration array '{inp.name}' has shape {list(arr.shape)}; the "
                              f"model's input is {shown} (first axis: samples)")
        want = np.dtype(inp.dtype) if inp.dtype is not None else arr.dtype  # type: ignore[call-overload]
        if arr.dtype != want:
            if want.kind != arr.dtype.kind and not (want.kind in "iu" and arr.dtype.kind in "iu"):
                raise OptionError(f"calibration array '{inp.name}' holds {arr.dtype}; the "
                                  f"model's input is {want}")
            arr = arr.astype(want)
        out[inp.name] = arr
    return out | {k: np.asarray(v) for k, v in arrays.items() if k not in out}  # e.g. labels


def read(path: str, inputs: Sequence[InputSpec], options: CalibrationOptions, *,
         graph: gs.Graph | None = None, dims: Mapping[str, int] | None = None, seed: int = 0
         ) -> tuple[str, Arrays]:
    """The samples of ``path`` (all, or ``--calib-samples`` of them, chosen with ``seed``), by
    graph input name, and what kind of source it was."""
    p = Path(path)
    if not p.exists():
        raise OptionError(f"{path}: no such calibration file or folder")
    kind = source_kind(p)
    if kind == "images":
        return kind, read_images(p, inputs, options, seed=seed)
    if kind == "npz":
        arrays = read_npz(p)
        if options.calib_samples is None:  # (rows already in memory: no note)
            return kind, arrays
        rows = chosen(_samples(arrays, f"{path}: arrays"), options, seed, "rows")
        return kind, {k: v[rows] for k, v in arrays.items()}
    if kind == "text":
        return kind, read_text(p, inputs, options, graph=graph, dims=dims, seed=seed)
    raise OptionError(f"{path}: not calibration data SPA can read: give an .npz of arrays named "
                      "after the graph inputs, a folder of images, or a text file with one "
                      "sample per line")


def source_kind(path: Path) -> str | None:
    """What ``--calib`` reads at ``path``: "images" (a folder), "npz" (a file named so, or any
    zip), "text" (another file); None when it is neither a file nor a folder."""
    if path.is_dir():
        return "images"
    if path.is_file():
        return "npz" if path.suffix.lower() == ".npz" or zipfile.is_zipfile(path) else "text"
    return None


LARGE = 20_000  # samples read whole without --calib-samples: a note suggests it above this


def chosen(count: int, options: CalibrationOptions, seed: int, what: str) -> np.ndarray:
    """The indices (in order) of the samples read out of ``count``: a seeded
    ``--calib-samples`` of them, or all (with a note when they are many)."""
    wanted = options.calib_samples
    if wanted is None or wanted >= count:
        if wanted is None and count > LARGE:
            log.info("calibration: reading all %d %s (--calib-samples N reads a seeded N)",
                     count, what)
        return np.arange(count)
    log.info("calibration: %d of the %d %s (--calib-samples)", wanted, count, what)
    return np.sort(np.random.default_rng([seed, 0x5B]).choice(count, wanted, replace=False))


def read_npz(path: str | Path) -> Arrays:
    """Arrays named after the graph inputs, first axis = samples (``numpy.savez``)."""
    if not zipfile.is_zipfile(path):
        raise OptionError(f"{path}: not an .npz file (save arrays with numpy.savez)")
    try:
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise OptionError(f"{path}: not a readable .npz of calibration arrays ({exc})") from exc


def split(arrays: Mapping[str, np.ndarray], share: float, *, seed: int = 0
          ) -> tuple[Arrays, Arrays]:
    """(train, held-out): a seeded ``share`` of the samples held back, at least one when
    ``share > 0``; too few samples for both sides is an :class:`OptionError`."""
    n = _samples(arrays, "calibration arrays")
    if share == 0.0:
        return dict(arrays), {}
    held = max(1, round(share * n))
    if n - held < 1:
        raise OptionError(f"calibration data has {n} sample(s): too few to hold back "
                          f"{share:.0%} for measuring fidelity and calibrate on the rest (give "
                          "more samples, or --held-out 0)")
    order = np.random.default_rng([seed, 0x5A]).permutation(n)
    held_idx, train_idx = np.sort(order[:held]), np.sort(order[held:])
    return ({k: v[train_idx] for k, v in arrays.items()},
            {k: v[held_idx] for k, v in arrays.items()})


VALIDATION_EVERY = 8  # an eighth of the samples judge a fit (reconstruction, recovery)
VALIDATION_BLOCKS = 2  # ... in this many contiguous runs


def validation_runs(n: int) -> np.ndarray:
    """Which of ``n`` training samples (in the order given) judge a fit and are never fitted
    (reconstruction's λ and refit, recovery's learning rate and early stopping): an eighth of
    them, as :data:`VALIDATION_BLOCKS` contiguous runs (the last sixteenth of each half), or
    every 8th when there are too few samples for runs.

    Runs, not every 8th sample: calibration data often comes in runs of related samples (views
    of one photo, frames of one clip, lines of one document), and rows interleaved with the
    fitted ones then share their photo, so the judge cannot see a fit that learns the photos.
    Measured on EfficientNet-Lite0 calibrated on views of 28 photos (24 each, folder order) at
    a 1.5x FLOPs cut: reconstruction judged on every 8th sample, held-out top-1 agreement on 15
    other photos 0.511 (48 layers refitted); on runs, 0.572 (37 refitted); no reconstruction,
    0.550. On MiniLM (fortunes lines) the two agree (cosine 0.9164 and 0.9159)."""
    parts = VALIDATION_EVERY * VALIDATION_BLOCKS
    index = np.arange(n)
    if n < 2 * parts:
        return index % VALIDATION_EVERY == VALIDATION_EVERY - 1
    return index * parts // n % VALIDATION_EVERY == VALIDATION_EVERY - 1


#: element types of token inputs (ids, masks, type and position ids)
TOKEN_TYPES = (onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.BOOL)


def attention_mask(model: onnx.ModelProto) -> str | None:
    """The graph input that masks padding tokens: 2-D integer or bool, named like a mask. Its
    zeros are padding, which no statistic or fit counts as data."""
    for i in model.graph.input:
        t = i.type.tensor_type
        if "mask" in i.name.lower() and len(t.shape.dim) == 2 and t.elem_type in TOKEN_TYPES:
            return i.name
    return None


def padding_cut(model: onnx.ModelProto, arrays: Mapping[str, np.ndarray] | None = None
                ) -> str | None:
    """The attention mask when the model's padding can be cut off: every graph input is a 2-D
    integer or bool tensor with a symbolic second (token) axis (ids, mask, type and position
    ids), or, in ``arrays``, empty (a decoder's KV caches when each sample is a prompt: the
    mask then spans the prompt alone), so a batch of samples fits any length from its last
    attended column on. None otherwise (image or embedding inputs, a fixed sequence length,
    caches that hold a past)."""
    mask = attention_mask(model)
    inits = {i.name for i in model.graph.initializer}
    for i in model.graph.input:
        if i.name in inits or (arrays is not None and i.name in arrays
                               and np.size(arrays[i.name]) == 0):
            continue
        t = i.type.tensor_type
        if len(t.shape.dim) != 2 or t.shape.dim[1].HasField("dim_value") \
                or t.elem_type not in TOKEN_TYPES:
            return None
    return mask


def tokenless_outputs(model: onnx.ModelProto) -> bool:
    """Whether every graph output has a known shape with fixed sizes after its first (batch)
    axis, so no output grows with the sequence and cutting padding changes no output's shape."""
    for o in model.graph.output:
        t = o.type.tensor_type
        if not t.HasField("shape") or not all(d.HasField("dim_value") and d.dim_value > 0
                                              for d in t.shape.dim[1:]):
            return False
    return True


def chunked(arrays: Mapping[str, np.ndarray], step: int, mask: str | None = None
            ) -> tuple[list[np.ndarray], list[Arrays]]:
    """``arrays`` in chunks of at most ``step`` samples: each chunk's sample indices and its
    arrays. With ``mask`` (:func:`padding_cut`), samples are grouped by attended length and
    each chunk ends after its last attended column: calibration text padded to 128 tokens
    (fortunes: 21 tokens a line on average) then costs what its tokens do."""
    n = sample_count(arrays)
    if mask is None:
        index = [np.arange(i, min(i + step, n)) for i in range(0, n, step)]
        return index, [{k: np.asarray(v[i:i + step]) for k, v in arrays.items()}
                       for i in range(0, n, step)]
    lengths = attended_lengths(np.asarray(arrays[mask]))
    order = np.argsort(lengths, kind="stable")
    index = [order[i:i + step] for i in range(0, n, step)]
    width = np.shape(arrays[mask])[1]
    chunks = []
    for idx in index:
        length = max(int(lengths[idx].max()), 1)
        chunks.append({k: np.asarray(v[idx])[:, :length] if np.ndim(v) == 2 and
                       np.shape(v)[1] == width else np.asarray(v[idx]) for k, v in arrays.items()})
    return index, chunks


def attended_lengths(mask: np.ndarray) -> np.ndarray:
    """Per sample of a ``[samples, tokens]`` attention mask, one past its last attended column
    (0 when it attends to nothing)."""
    attended = np.asarray(mask) != 0
    return np.where(attended.any(1), attended.shape[1] - attended[:, ::-1].argmax(1), 0)


def by_token(x: np.ndarray, real: np.ndarray | None) -> np.ndarray:
    """A layer value's ``[samples × tokens, channels]`` rows (GPT-2's Conv1D flattens its input
    before the product) as ``[samples, tokens, channels]``, lined up with the ``[samples,
    tokens]`` attention mask ``real``, so that padding is left out as for 3-D values; other
    values as they are."""
    if real is not None and x.ndim == 2 and real.ndim == 2 and len(x) == real.size:
        return x.reshape(*real.shape, x.shape[-1])
    return x


def real_rows(x: np.ndarray, real: np.ndarray | None) -> np.ndarray:
    """A layer input ``x`` (channels last) as rows of channels, without the rows at padding
    tokens when ``real`` (``[samples, tokens]``, False at padding) lines up with its leading
    axes, or with its rows when samples and tokens were flattened into one axis
    (:func:`by_token`)."""
    x = by_token(x, real)
    if real is not None and x.ndim == 3 and x.shape[:2] == real.shape:
        return x[real]
    return x.reshape(-1, x.shape[-1])


def spread(arrays: Mapping[str, np.ndarray], count: int) -> Arrays:
    """``count`` samples evenly spaced over the whole set (all of them when there are no more).
    Calibration data comes in runs of related samples (views of one photo, lines of one
    document): the first ``count`` would measure one photo."""
    n = sample_count(arrays)
    if count >= n:
        return {k: np.asarray(v) for k, v in arrays.items()}
    idx = np.unique(np.linspace(0, n - 1, max(count, 1)).round().astype(np.int64))
    return {k: np.asarray(v[idx]) for k, v in arrays.items()}


# Images -------------------------------------------------------------------------------------


def _dtype(spec: InputSpec) -> np.dtype:
    try:
        return np.dtype(spec.dtype)  # type: ignore[call-overload]
    except TypeError:  # an ONNX element type numpy has no dtype for (bfloat16, …)
        return np.dtype(object)


def _static(dim: object) -> bool:
    return isinstance(dim, int) and dim > 0


# The readers of folders and text files (imported last: they use the names above).
from spa.calibration.images import read_images  # noqa: E402
from spa.calibration.text import embedding_rows, read_text  # noqa: E402

__all__ = ["GROUP", "PRESETS", "Calibration", "CalibrationOptions", "InputSpec", "Preset",
           "embedding_rows", "fitted", "load", "read", "read_images", "read_npz", "read_text",
           "split", "spread"]
