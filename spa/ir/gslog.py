"""onnx-graphsurgeon's messages through :mod:`logging`.

onnx-graphsurgeon prints its warnings (``[W] ...``) with ``print``: on stdout, where they break
``--json`` (one JSON document), and past ``--quiet``. Its logger's ``log`` is replaced by one
that hands each message to the ``spa.onnx_graphsurgeon`` logger at INFO (``-v`` shows them) or,
below warnings, DEBUG. Its ``critical`` still raises as before: it logs, then raises.
"""

from __future__ import annotations

import logging

from onnx_graphsurgeon.logger import G_LOGGER

log = logging.getLogger("spa.onnx_graphsurgeon")


def _log(message, severity, mode=None, stack_depth=2) -> None:
    level = logging.INFO if severity >= G_LOGGER.WARNING else logging.DEBUG
    if log.isEnabledFor(level):
        log.log(level, "onnx-graphsurgeon: %s", message() if callable(message) else message)


def route_graphsurgeon_logs() -> None:
    """Send onnx-graphsurgeon's messages to logging (idempotent)."""
    G_LOGGER.log = _log
