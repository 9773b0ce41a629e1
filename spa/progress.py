"""Progress bars: the one place that decides whether SPA draws them.

Library loops that can take more than a second (analysis of a large graph, OBSPA per group,
Hessian collection, latency runs) iterate through :func:`progress`. It returns the plain iterable
unless bars are on, so the library never draws by accident and pays nothing when quiet.

Bars are on when the switch says so (:func:`configure`, set by the CLI: ``--quiet`` turns them
off) or, by default, when stderr is a terminal. Bars go to stderr, never stdout, so ``--json``
output stays one JSON document. A bar appears only after ``delay`` seconds, so fast steps stay
silent even with bars on.
"""

from __future__ import annotations

import contextlib
import sys
from contextvars import ContextVar
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

T = TypeVar("T")
DEFAULT_DELAY = 1.0  # seconds a step runs before its bar appears


@dataclass(frozen=True)
class ProgressSettings:
    """``enabled``: True / False, or None for "when the stream is a terminal"."""

    enabled: bool | None = None
    stream: IO[str] | None = None  # None: sys.stderr at the time of drawing
    delay: float | None = None  # seconds before a bar appears; None: DEFAULT_DELAY


_DEFAULT = ProgressSettings()
_settings: ContextVar[ProgressSettings] = ContextVar("spa_progress", default=_DEFAULT)


def configure(settings: ProgressSettings) -> None:
    """Set the switch for this context (the CLI calls this once, from ``--quiet``)."""
    _settings.set(settings)


@contextlib.contextmanager
def progress_settings(settings: ProgressSettings) -> Iterator[None]:
    """The switch set to ``settings`` inside the ``with`` block only."""
    token = _settings.set(settings)
    try:
        yield
    finally:
        _settings.reset(token)


def _stream(s: ProgressSettings) -> IO[str]:
    return s.stream if s.stream is not None else sys.stderr


def enabled() -> bool:
    s = _settings.get()
    if s.enabled is not None:
        return s.enabled
    isatty = getattr(_stream(s), "isatty", None)
    return bool(isatty and isatty())


def progress(iterable: Iterable[T], desc: str, total: int | None = None,
             unit: str = "it") -> Iterable[T]:
    """``iterable`` with a bar when bars are on, else ``iterable`` itself."""
    if not enabled():
        return iterable
    from tqdm import tqdm

    s = _settings.get()
    delay = DEFAULT_DELAY if s.delay is None else s.delay
    return tqdm(iterable, desc=f"spa: {desc}", total=total, unit=unit, file=_stream(s),
                delay=delay, leave=False, dynamic_ncols=True)
