"""Connected components of a large element graph, vectorised with numpy.

Hook-and-compress (Shiloach–Vishkin style): every round hooks each edge's larger root under the
smaller one and then compresses paths by pointer jumping; a few rounds suffice in practice.
"""

from __future__ import annotations

import numpy as np


def components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Label of each of ``n`` elements: the smallest element id of its component."""
    parent = np.arange(n, dtype=np.int64)
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    while True:
        ra, rb = parent[a], parent[b]
        diff = ra != rb
        if not diff.any():
            return parent
        ra, rb = ra[diff], rb[diff]
        lo, hi = np.minimum(ra, rb), np.maximum(ra, rb)
        np.minimum.at(parent, hi, lo)
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
