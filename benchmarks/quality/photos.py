"""Real photographs that ship inside the scikit-image and scikit-learn wheels.

No file is downloaded: ``skimage.data`` images that need ``pooch`` (eagle, lily, skin,
kidney, ...) are not used, only ones stored in the wheel itself. :func:`photos` returns

* scikit-image: astronaut, coffee, chelsea (a tabby cat), rocket, motorcycle (the left
  image of ``stereo_motorcycle``), camera (the cameraman, grey), coins (grey) and
  hubble_deep_field;
* scikit-learn (``load_sample_images``): china (a temple) and flower.

:func:`crop` turns one photo into a normalised square model input: resize so the shorter
side has a given length (bilinear with antialiasing, torch), cut a ``size`` x ``size``
window at a relative position, optionally mirror it, normalise with a mean and std.
:data:`CROPS` is the fixed list of eight views per photo used by the EfficientNet
evaluation set (:func:`crops`): scales 224-384, centre and off-centre windows, flips.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["CROPS", "PHOTO_NAMES", "crop", "crops", "photos", "whole"]

#: Names of :func:`photos`, in order.
PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle", "camera", "coins",
               "hubble_deep_field", "china", "flower")
#: (shorter side after resizing, window position (y, x) in [0, 1], horizontal flip).
CROPS: tuple[tuple[int, tuple[float, float], bool], ...] = (
    (224, (0.5, 0.5), False),
    (256, (0.5, 0.5), False),
    (256, (0.5, 0.5), True),
    (288, (0.0, 0.0), False),
    (288, (1.0, 1.0), True),
    (320, (0.5, 0.5), False),
    (320, (0.25, 0.75), True),
    (384, (0.5, 0.5), False),
)


def _rgb(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    return np.ascontiguousarray(a[..., :3], dtype=np.uint8)


def photos() -> dict[str, np.ndarray]:
    """The photos of :data:`PHOTO_NAMES` as ``H x W x 3`` uint8 RGB (grey ones replicated)."""
    import skimage.data as sk
    from sklearn.datasets import load_sample_images

    china, flower = load_sample_images().images
    out = {
        "astronaut": sk.astronaut(),
        "coffee": sk.coffee(),
        "chelsea": sk.chelsea(),
        "rocket": sk.rocket(),
        "motorcycle": sk.stereo_motorcycle()[0],
        "camera": sk.camera(),
        "coins": sk.coins(),
        "hubble_deep_field": sk.hubble_deep_field(),
        "china": china,
        "flower": flower,
    }
    return {name: _rgb(out[name]) for name in PHOTO_NAMES}


def crop(
    image: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    short: int = 256,
    pos: tuple[float, float] = (0.5, 0.5),
    flip: bool = False,
    size: int = 224,
) -> np.ndarray:
    """One ``3 x size x size`` float32 view of an ``H x W x 3`` uint8 photo.

    The photo is scaled to [0, 1], resized so its shorter side is ``short`` (never below
    ``size``), cropped at relative position ``pos`` (0 = top/left, 1 = bottom/right),
    mirrored if ``flip``, and normalised as ``(x - mean) / std`` per channel. With
    ``short == size`` and ``pos == (0.5, 0.5)`` this is the usual resize-and-centre-crop.
    """
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    h, w = t.shape[-2:]
    scale = max(short, size) / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    t = F.interpolate(t, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    top, left = round((nh - size) * pos[0]), round((nw - size) * pos[1])
    t = t[..., top : top + size, left : left + size]
    if flip:
        t = t.flip(-1)
    m = torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1)
    return ((t - m) / s)[0].numpy().astype(np.float32)


def whole(image: np.ndarray, mean: Sequence[float], std: Sequence[float], size: int = 224,
          ) -> np.ndarray:
    """The whole photo squeezed to ``3 x size x size`` (aspect ratio not kept), normalised."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    m = torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1)
    return ((t - m) / s)[0].numpy().astype(np.float32)


def crops(mean: Sequence[float], std: Sequence[float], size: int = 224) -> np.ndarray:
    """Every view of :data:`CROPS` of every photo: ``(10 * 8) x 3 x size x size`` float32,
    photo-major (rows ``8 * i`` to ``8 * i + 7`` come from ``PHOTO_NAMES[i]``)."""
    return np.stack([crop(img, mean, std, short * size // 224, pos, flip, size)
                     for img in photos().values() for short, pos, flip in CROPS])
