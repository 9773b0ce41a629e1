"""The scikit-learn digits data set as a small, real image-classification benchmark.

``sklearn.datasets.load_digits`` ships inside the scikit-learn wheel (no download): 1797
grey 8x8 images of the digits 0-9 with values 0..16. For CNN/ViT-style models they are
upsampled to 32x32 with bilinear interpolation (``torch.nn.functional.interpolate``,
``align_corners=False``) and replicated to 3 channels, giving ``N x 3 x 32 x 32`` inputs
like the project's reference models.

The split is a fixed, seeded permutation: the first :data:`N_TRAIN` (1200) samples train,
the other 597 test. Inputs are normalised with the mean and standard deviation of the
*training* images (one scalar each, the three channels being identical).

scikit-learn is a benchmark-only dependency (the ``bench`` extra), imported lazily.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "IMAGE_SHAPE",
    "N_SAMPLES",
    "N_TRAIN",
    "DigitsSplits",
    "load_digits_splits",
    "split_stats",
    "upsample",
]

#: Number of samples in scikit-learn's digits data set.
N_SAMPLES = 1797
#: Training samples in the fixed split; the remaining 597 are the test set.
N_TRAIN = 1200
#: Shape of one model input (channels, height, width).
IMAGE_SHAPE = (3, 32, 32)


@dataclass(frozen=True)
class DigitsSplits:
    """The four arrays of :func:`load_digits_splits` plus the normalisation used."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    mean: float
    std: float


def upsample(images: np.ndarray, size: int = 32) -> np.ndarray:
    """``N x 8 x 8`` grey images in [0, 1] -> ``N x 3 x size x size`` float32 (bilinear).

    Uses torch's bilinear interpolation (``align_corners=False``, no antialiasing, which
    only matters when shrinking) and repeats the grey channel three times.
    """
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))[:, None]
    up = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    return up.repeat(1, 3, 1, 1).numpy().astype(np.float32, copy=False)


def split_stats(seed: int = 0) -> DigitsSplits:
    """Load, upsample, split with ``seed`` and normalise; see :func:`load_digits_splits`."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32) / 16.0  # 0..16 -> 0..1
    labels = np.asarray(bunch.target, dtype=np.int64)
    if images.shape != (N_SAMPLES, 8, 8):
        raise RuntimeError(f"unexpected digits shape {images.shape}")

    order = np.random.default_rng(seed).permutation(N_SAMPLES)
    train, test = order[:N_TRAIN], order[N_TRAIN:]
    x = upsample(images)
    x_train, x_test = x[train], x[test]
    mean = float(x_train.mean(dtype=np.float64))
    std = float(x_train.std(dtype=np.float64))
    x_train = ((x_train - mean) / std).astype(np.float32)
    x_test = ((x_test - mean) / std).astype(np.float32)
    return DigitsSplits(x_train, labels[train], x_test, labels[test], mean, std)


def load_digits_splits(
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(x_train, y_train, x_test, y_test)`` of the fixed digits split.

    ``x_*`` are float32 ``N x 3 x 32 x 32`` (normalised with the training mean/std),
    ``y_*`` int64 labels 0-9; 1200 training and 597 test samples. The same ``seed``
    always gives the same split (a ``numpy.random.default_rng(seed)`` permutation).
    """
    s = split_stats(seed)
    return s.x_train, s.y_train, s.x_test, s.y_test


if __name__ == "__main__":
    s = split_stats()
    print(f"train {s.x_train.shape} {s.x_train.dtype}, test {s.x_test.shape}, "
          f"mean {s.mean:.4f} std {s.std:.4f}")
    print("test class counts:", np.bincount(s.y_test, minlength=10).tolist())
