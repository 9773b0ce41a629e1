"""Calibration images: a folder of photos read as the model's one 4-D float input wants
(spa/calibration/__init__.py says how; pillow decodes them, imported only when needed)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from spa.calibration import (
    PRESETS,
    Arrays,
    CalibrationOptions,
    InputSpec,
    _dtype,
    _static,
    chosen,
)
from spa.errors import OptionError

if TYPE_CHECKING:
    from PIL.Image import Image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}  # pillow's mode for a model's channel count


def read_images(folder: Path, inputs: Sequence[InputSpec], options: CalibrationOptions, *,
                seed: int = 0) -> Arrays:
    """Every image of ``folder`` and its subfolders (sorted by path; hidden files and folders
    left out), or a seeded ``--calib-samples`` of them, as one batch for the model's image
    input. Each image is decoded, resized and cropped in turn: only the model-sized arrays are
    held (a phone's 12-megapixel photo is 36 MB decoded)."""
    pil = _pillow()
    spec = _image_input(inputs)
    layout = _layout(spec, options)
    shape = list(spec.shape or ())
    c, hw = (shape[1], shape[2:]) if layout == "nchw" else (shape[3], shape[1:3])
    channels = c if _static(c) else 3
    if channels not in _MODES:
        raise OptionError(f"image input {spec.name!r} {shape} has {channels} channels; a folder "
                          "of images gives 1 (grey), 3 (RGB) or 4 (RGBA)")
    entries = sorted(f for f in folder.rglob("*") if f.is_file() and not any(
        part.startswith(".") for part in f.relative_to(folder).parts))
    files = [f for f in entries if f.suffix.lower() in IMAGE_SUFFIXES]
    files = [files[i] for i in chosen(len(files), options, seed, "image files")]
    size = _image_size(spec, hw, options, pil, files)
    preset = PRESETS[options.preprocess]
    mean = _per_channel(options.mean, "--mean", channels, preset.mean, 0.0)
    std = _per_channel(options.std, "--std", channels, preset.std, 1.0)
    batch, bad = [], []
    for f in files:
        try:
            with pil.open(f) as image:
                fitted = _fit(pil, image.convert(_MODES[channels]), size, preset.crop)
        except (OSError, ValueError, pil.DecompressionBombError) as exc:
            bad.append(f"{f.relative_to(folder)} ({exc})")
            continue
        batch.append((np.asarray(fitted, np.float32).reshape(*size, channels)
                      / preset.scale - mean) / std)
    if bad:
        log.warning("calibration: skipped %d unreadable image file(s): %s", len(bad),
                    "; ".join(bad))
    if not batch:
        raise OptionError(f"{folder}: no readable image (tried {len(files)} image file(s) of "
                          f"{len(entries)} file(s), subfolders included; extensions read: "
                          f"{', '.join(IMAGE_SUFFIXES)})")
    stacked = np.stack(batch)
    if layout == "nchw":
        stacked = stacked.transpose(0, 3, 1, 2)
    return {spec.name: np.ascontiguousarray(stacked, dtype=_dtype(spec))}


def _pillow() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise OptionError("reading a folder of images needs pillow: "
                          "pip install 'spa-prune[images]'") from None
    return Image


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


def _image_size(spec: InputSpec, hw: Sequence[int | str | None], options: CalibrationOptions,
                pil: Any, files: Sequence[Path]) -> tuple[int, int]:
    """(height, width): ``--image-size``, else the model's, else the images' own common size
    (read from the files' headers; a file that does not open is left to the decoding)."""
    if options.image_size:
        return options.image_size, options.image_size
    h, w = hw
    if _static(h) and _static(w):
        return int(h), int(w)  # type: ignore[arg-type]
    found = set()
    for f in files:
        try:
            with pil.open(f) as image:
                found.add(image.size)
        except (OSError, ValueError, pil.DecompressionBombError):
            continue
    sizes = sorted(found)
    if not sizes:
        return 1, 1  # no readable image: the decoding says so
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
