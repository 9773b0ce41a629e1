"""Calibration data: what ``--calib PATH`` reads, and the held-out split every stage respects.

``--calib`` takes what users have:

* an ``.npz``: arrays named after the graph inputs, first axis = samples;
* a folder of images: decoded with pillow, resized (shorter side) and centre-cropped to the
  model's size, scaled by a preset (``imagenet``: ``(v/255 - mean)/std`` with ImageNet's mean
  and std, after resizing to ``size/0.875``; ``unit``: ``v/255``; ``raw``: ``v``), laid out as
  the model's one 4-D float input wants (NCHW or NHWC);
* a text file, one sample per non-empty line: encoded by a ``tokenizers`` tokenizer, truncated
  and padded to the model's sequence length, fed to the ids / attention mask / token type
  inputs by their names. Ids the model's embedding has no row for are refused.

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
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import onnx_graphsurgeon as gs

from spa.errors import OptionError
from spa.options import option

if TYPE_CHECKING:
    from PIL.Image import Image
    from tokenizers import Tokenizer

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


def _share(text: str) -> float:
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def _positive(text: str) -> int:
    from spa.options import positive

    return positive(text)


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
    image_size: int | None = option(None, parse=_positive, metavar="N", group=GROUP,
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
                                   help="text files: a tokenizer.json, or a folder holding one")
    max_length: int = option(128, parse=_positive, metavar="N", group=GROUP,
                             help="text files: tokens per sample (truncated and padded)")
    held_out: float = option(0.1, parse=_share, metavar="SHARE", group=GROUP,
                             help="share of the calibration samples held back (seeded) to "
                             "measure fidelity; never used to calibrate or recover")


@dataclass(frozen=True)
class Calibration:
    """Calibration samples split once: ``train`` calibrates, ``held_out`` only measures."""

    train: Arrays
    held_out: Arrays
    kind: str  # "npz", "images" or "text"
    path: str

    @property
    def samples(self) -> int:
        return _count(self.train) + _count(self.held_out)


def _count(arrays: Mapping[str, np.ndarray]) -> int:
    return len(next(iter(arrays.values()))) if arrays else 0


def load(path: str, inputs: Sequence[InputSpec], options: CalibrationOptions = CalibrationOptions(),
         *, seed: int = 0, graph: gs.Graph | None = None) -> Calibration:
    """Read ``path`` (an .npz, a folder of images or a text file) for a model with these graph
    ``inputs``, and split off the held-out share. With ``graph``, token ids are checked against
    the model's embedding."""
    kind, arrays = read(path, inputs, options, graph=graph)
    train, held = split(fitted(arrays, inputs), options.held_out, seed=seed)
    return Calibration(train, held, kind, str(path))


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
         graph: gs.Graph | None = None) -> tuple[str, Arrays]:
    """All samples of ``path``, by graph input name, and what kind of source it was."""
    p = Path(path)
    if not p.exists():
        raise OptionError(f"{path}: no such calibration file or folder")
    if p.is_dir():
        return "images", read_images(p, inputs, options)
    if p.is_file() and (p.suffix.lower() == ".npz" or zipfile.is_zipfile(p)):
        return "npz", read_npz(p)
    if p.is_file():
        return "text", read_text(p, inputs, options, graph=graph)
    raise OptionError(f"{path}: not calibration data SPA can read: give an .npz of arrays named "
                      "after the graph inputs, a folder of images, or a text file with one "
                      "sample per line")


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
    n = _count(arrays)
    counts = {len(v) for v in arrays.values()}
    if len(counts) > 1:
        raise OptionError(f"calibration arrays have different sample counts {sorted(counts)}")
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


# Images -------------------------------------------------------------------------------------

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}  # pillow's mode for a model's channel count


def read_images(folder: Path, inputs: Sequence[InputSpec], options: CalibrationOptions
                ) -> Arrays:
    """Every image of ``folder`` (sorted by name) as one batch for the model's image input."""
    pil = _pillow()
    spec = _image_input(inputs)
    layout = _layout(spec, options)
    shape = list(spec.shape or ())
    c, hw = (shape[1], shape[2:]) if layout == "nchw" else (shape[3], shape[1:3])
    channels = c if _static(c) else 3
    if channels not in _MODES:
        raise OptionError(f"image input {spec.name!r} {shape} has {channels} channels; a folder "
                          "of images gives 1 (grey), 3 (RGB) or 4 (RGBA)")
    entries = sorted(f for f in folder.iterdir() if f.is_file())
    files = [f for f in entries if f.suffix.lower() in IMAGE_SUFFIXES]
    images = _decode(pil, files, _MODES[channels])
    if not images:
        raise OptionError(f"{folder}: no readable image (tried {len(files)} image file(s) of "
                          f"{len(entries)} file(s); extensions read: {', '.join(IMAGE_SUFFIXES)})")
    size = _image_size(spec, hw, options, images)
    preset = PRESETS[options.preprocess]
    mean = _per_channel(options.mean, "--mean", channels, preset.mean, 0.0)
    std = _per_channel(options.std, "--std", channels, preset.std, 1.0)
    batch = np.stack([(np.asarray(_fit(pil, im, size, preset.crop), np.float32).reshape(
        *size, channels) / preset.scale - mean) / std for im in images])
    if layout == "nchw":
        batch = batch.transpose(0, 3, 1, 2)
    return {spec.name: np.ascontiguousarray(batch, dtype=_dtype(spec))}


def _pillow() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise OptionError("reading a folder of images needs pillow: "
                          "pip install 'spa-prune[images]'") from None
    return Image


def _dtype(spec: InputSpec) -> np.dtype:
    try:
        return np.dtype(spec.dtype)  # type: ignore[call-overload]
    except TypeError:  # an ONNX element type numpy has no dtype for (bfloat16, …)
        return np.dtype(object)


def _static(dim: object) -> bool:
    return isinstance(dim, int) and dim > 0


def _image_input(inputs: Sequence[InputSpec]) -> InputSpec:
    """The model's one 4-D float input; a folder of images cannot feed any other."""
    floats = [i for i in inputs if _dtype(i).kind == "f"]
    if len(floats) != 1 or len(floats[0].shape or ()) != 4:
        found = ", ".join(f"{i.name!r} {list(i.shape or [])}" for i in floats) or "none"
        raise OptionError("a folder of images feeds one 4-D float input (images × channels × "
                          f"height × width); the model's float inputs are: {found} (give an .npz)")
    others = [i.name for i in inputs if i is not floats[0]]
    if others:
        raise OptionError(f"a folder of images feeds only {floats[0].name!r}; the model also takes "
                          f"{others} (give an .npz)")
    return floats[0]


def _layout(spec: InputSpec, options: CalibrationOptions) -> str:
    if options.layout:
        return options.layout
    shape = list(spec.shape or ())
    if shape[1] in (1, 3, 4):
        return "nchw"
    if shape[3] in (1, 3, 4):
        return "nhwc"
    raise OptionError(f"cannot tell the channel axis of image input {spec.name!r} {shape}: "
                      "give --layout nchw or nhwc")


def _decode(pil: Any, files: Sequence[Path], mode: str) -> list[Image]:
    """The readable ones of ``files`` in pillow ``mode``; the others are skipped with a warning."""
    images, bad = [], []
    for f in files:
        try:
            with pil.open(f) as image:
                images.append(image.convert(mode))
        except (OSError, ValueError, pil.DecompressionBombError) as exc:
            bad.append(f"{f.name} ({exc})")
    if bad:
        log.warning("calibration: skipped %d unreadable image file(s): %s", len(bad),
                    "; ".join(bad))
    return images


def _image_size(spec: InputSpec, hw: Sequence[int | str | None], options: CalibrationOptions,
                images: Sequence[Image]) -> tuple[int, int]:
    """(height, width): ``--image-size``, else the model's, else the images' own common size."""
    if options.image_size:
        return options.image_size, options.image_size
    h, w = hw
    if _static(h) and _static(w):
        return int(h), int(w)  # type: ignore[arg-type]
    sizes = sorted({im.size for im in images})
    if len(sizes) > 1:
        shown = ", ".join(f"{a}×{b}" for a, b in sizes[:4]) + (" …" if len(sizes) > 4 else "")
        raise OptionError(f"image input {spec.name!r} has symbolic height/width {list(hw)} and the "
                          f"images have mixed sizes ({shown}): give --image-size")
    iw, ih = sizes[0]
    return (int(h) if _static(h) else ih, int(w) if _static(w) else iw)  # type: ignore[arg-type]


def _fit(pil: Any, image: Image, size: tuple[int, int], crop: float) -> Image:
    """Resize (bilinear) so that the shorter side is ``size / crop``, then centre-crop."""
    th, tw = size
    w, h = image.size
    scale = max(round(tw / crop) / w, round(th / crop) / h)
    rw, rh = max(tw, round(w * scale)), max(th, round(h * scale))
    if (rw, rh) != (w, h):
        image = image.resize((rw, rh), pil.Resampling.BILINEAR)
    left, top = (rw - tw) // 2, (rh - th) // 2
    return image.crop((left, top, left + tw, top + th))


def _per_channel(given: tuple[float, ...] | None, flag: str, channels: int,
                 preset: tuple[float, ...], alpha: float) -> np.ndarray:
    """``--mean``/``--std`` (one value for all channels, or one each), else the preset's.

    A preset's three values are RGB's: a grey image takes their average, an alpha channel
    ``alpha`` (left as is)."""
    if given is not None:
        if len(given) not in (1, channels):
            raise OptionError(f"{flag} has {len(given)} values; the model's images have "
                              f"{channels} channel(s): give 1 value or {channels}")
        values = given
    elif len(preset) == 3 and channels == 1:
        values = (sum(preset) / 3,)
    elif len(preset) == 3 and channels == 4:
        values = (*preset, alpha)
    else:
        values = preset
    return np.broadcast_to(np.asarray(values, np.float32), (channels,))


# Text ---------------------------------------------------------------------------------------

# What a text file fills, by the graph input's name (lower case): ids, mask or type ids.
_ROLES = (("ids", ("input_ids",)), ("mask", ("mask",)), ("types", ("token_type", "segment")))
# Ops between a token-ids input and its embedding's Gather that keep the ids' values.
_KEEPS_VALUES = frozenset({"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"})


def read_text(path: Path, inputs: Sequence[InputSpec], options: CalibrationOptions, *,
              graph: gs.Graph | None = None) -> Arrays:
    """One sample per non-empty line of ``path``, tokenised and fed to the model's token ids,
    attention mask and token type inputs; with ``graph``, ids the embedding lacks are refused."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise OptionError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); --calib "
                          "takes an .npz, a folder of images or a text file with one sample per "
                          "line") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise OptionError(f"{path}: no non-empty line to calibrate on")
    roles = {spec.name: _role(spec.name) for spec in inputs}
    ids_specs = [spec for spec in inputs if roles[spec.name] == "ids"]
    if len(ids_specs) != 1:
        raise OptionError(f"a text file feeds one token-ids input (named like input_ids); the "
                          f"model has {[s.name for s in ids_specs]}")
    tokenizer = _tokenizer(options.tokenizer)
    encodings = _encode(tokenizer, lines, _sequence_length(ids_specs[0], options))
    columns = {"ids": np.array([e.ids for e in encodings], np.int64),
               "mask": np.array([e.attention_mask for e in encodings], np.int64),
               "types": np.array([e.type_ids for e in encodings], np.int64)}
    rows = None if graph is None else embedding_rows(graph, ids_specs[0].name)
    top = int(columns["ids"].max())
    if rows is not None and top >= rows:
        raise OptionError(f"the tokenizer gives ids up to {top} but the model's embedding has "
                          f"{rows} rows: wrong tokenizer? (--tokenizer {options.tokenizer})")
    return {spec.name: columns[roles[spec.name]].astype(_dtype(spec)) for spec in inputs}


def _role(name: str) -> str:
    low = name.lower()
    if low in ("ids", "input"):
        return "ids"
    for role, parts in _ROLES:
        if any(part in low for part in parts):
            return role
    raise OptionError(f"a text file fills inputs named like input_ids, attention_mask and "
                      f"token_type_ids; the model's input {name!r} is none of these (give an .npz)")


def _tokenizer(path: str | None) -> Tokenizer:
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise OptionError("reading a text file needs tokenizers: "
                          "pip install 'spa-prune[text]'") from None
    if path is None:
        raise OptionError("a text file as --calib needs --tokenizer (a tokenizer.json, or a "
                          "folder holding one)")
    file = Path(path) / "tokenizer.json" if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise OptionError(f"--tokenizer {path}: no such tokenizer.json")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises a bare Exception for every parse error
        raise OptionError(f"--tokenizer {file}: not a readable tokenizer.json "
                          f"({' '.join(str(exc).split())})") from None


def _sequence_length(spec: InputSpec, options: CalibrationOptions) -> int:
    """The ids input's static sequence dim, else ``--max-length``."""
    shape = list(spec.shape) if spec.shape is not None else None
    if shape is not None and len(shape) != 2:
        raise OptionError(f"token-ids input {spec.name!r} has shape {shape}; a text file gives "
                          "[samples, tokens]")
    last = shape[1] if shape else None
    return int(last) if _static(last) else options.max_length  # type: ignore[arg-type]


def _encode(tokenizer: Tokenizer, lines: list[str], length: int) -> list[Any]:
    """``lines`` truncated and padded to ``length`` tokens, with the tokenizer's own padding
    (id, token, side) if it has one, else ``[PAD]``/``<pad>``'s id, else 0."""
    padding = tokenizer.padding or {"pad_id": _pad_id(tokenizer), "pad_type_id": 0,
                                    "direction": "right"}
    pad_token = padding.get("pad_token") or tokenizer.id_to_token(padding["pad_id"]) or "[PAD]"
    tokenizer.enable_truncation(max_length=length)
    tokenizer.enable_padding(length=length, pad_id=padding["pad_id"], pad_token=pad_token,
                             pad_type_id=padding["pad_type_id"], direction=padding["direction"])
    return tokenizer.encode_batch(lines)


def _pad_id(tokenizer: Tokenizer) -> int:
    for token in ("[PAD]", "<pad>"):
        found = tokenizer.token_to_id(token)
        if found is not None:
            return found
    return 0


def embedding_rows(graph: gs.Graph, input_name: str) -> int | None:
    """Rows of the embedding table that the token ids ``input_name`` index: the ids followed
    through value-keeping ops to a ``Gather`` (axis 0) of a constant. The fewest rows if
    several tables are reached; None if none is."""
    tensor = graph.tensors().get(input_name)
    todo = [tensor] if tensor is not None else []
    rows: list[int] = []
    while todo:
        ids = todo.pop()
        for node in ids.outputs:
            if node.op in _KEEPS_VALUES and node.inputs and node.inputs[0] is ids:
                todo.extend(node.outputs[:1])
            elif node.op == "Gather" and len(node.inputs) == 2 and node.inputs[1] is ids:
                table = _constant_shape(node.inputs[0])
                if table and node.attrs.get("axis", 0) % len(table) == 0:
                    rows.append(int(table[0]))
    return min(rows, default=None)


def _constant_shape(tensor: gs.Tensor) -> Sequence[int] | None:
    """The shape of ``tensor`` if it is a constant (an initializer or a ``Constant`` node)."""
    if isinstance(tensor, gs.Constant):
        return tuple(tensor.shape)
    producer = tensor.inputs[0] if tensor.inputs else None
    value = producer.attrs.get("value") if producer is not None and producer.op == "Constant" \
        else None
    return tuple(value.shape) if isinstance(value, gs.Constant) else None
