"""scikit-learn's digits as NHWC images, shared by the framework exporters and SPA's tests.

The exporters (``export_keras.py``, ``export_jax.py``) run in ``.venv-frameworks`` and SPA's
tests in ``.venv``; both must see the same split, so this module needs numpy only (scikit-learn
is imported lazily, and :func:`save_test_split` writes the test split for a side without it).

Images are 8×8 with values 0..16; they are scaled to [0, 1] and upsampled by pixel repetition
(nearest) to ``SIZE``×``SIZE`` with one channel, channels last: ``[N, SIZE, SIZE, 1]``. The split
is a seeded permutation: the first ``N_TRAIN`` samples train, the rest test (disjoint).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

N_TRAIN = 1200
SIZE = 16
SEED = 0


def to_inputs(images: np.ndarray) -> np.ndarray:
    """``[N, 8, 8]`` values 0..16 → float32 ``[N, SIZE, SIZE, 1]`` in [0, 1]."""
    k = SIZE // 8
    x = np.asarray(images, dtype=np.float32) / 16.0
    return np.repeat(np.repeat(x, k, axis=1), k, axis=2)[..., None]


def raw_splits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(train images, train labels, test images, test labels)``; images uint8 ``[N, 8, 8]``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.uint8)
    labels = np.asarray(bunch.target, dtype=np.int64)
    order = np.random.default_rng(SEED).permutation(len(labels))
    train, test = order[:N_TRAIN], order[N_TRAIN:]
    return images[train], labels[train], images[test], labels[test]


def save_test_split(path: Path) -> None:
    """Write the test split (uint8 8×8 images, labels) for :func:`load_test_split`."""
    _, _, images, labels = raw_splits()
    np.savez_compressed(path, images=images, labels=labels)


def load_test_split(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(inputs [N, SIZE, SIZE, 1], labels)`` from a file written by :func:`save_test_split`."""
    with np.load(path) as data:
        return to_inputs(data["images"]), data["labels"]


def to_nchw(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
