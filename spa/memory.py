"""Handing freed memory back to the operating system between the heavy stages of a run.

A run pauses Python's cyclic collector (:func:`spa.api._gc_paused`), so the graphs a stage
drops stay until a collection; and glibc's allocator keeps freed heap pages in the process
(numpy's and onnxruntime's buffers up to tens of MB come from the heap once a larger block has
been freed). Both count as resident memory. On the ResNet-50 cost run (256 calibration images),
when reconstruction starts: 906 MiB resident, 674 MiB after a collection and ``malloc_trim``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc


@functools.cache
def _trim():
    """glibc's ``malloc_trim``, or None (another C library: nothing to call)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return getattr(libc, "malloc_trim", None)


def release(*, collect: bool = True) -> None:
    """Collect cyclic garbage (``collect``) and return the allocator's free pages to the OS."""
    if collect:
        gc.collect()
    trim = _trim()
    if trim is not None:
        trim(0)
