"""Import torchvision without its operator-registration side modules.

torchvision registers fake/meta kernels and autograd formulas for its custom
ops (``torchvision._meta_registrations``, ``torchvision._autograd_registrations``)
at import time. Those registrations can fail or conflict when torchvision's
build does not exactly match the installed torch. The reference models only
need the pure-Python model definitions, so :func:`import_torchvision` replaces
both modules with empty stubs before importing torchvision.

torchvision is *not* a dependency of this project; callers (slow tests) should
skip when it is missing.
"""

from __future__ import annotations

import importlib
import sys
import types

__all__ = ["STUBBED_MODULES", "import_torchvision"]

STUBBED_MODULES = (
    "torchvision._meta_registrations",
    "torchvision._autograd_registrations",
)


def import_torchvision() -> types.ModuleType:
    """Stub torchvision's registration modules, import and return torchvision.

    Raises ``ImportError`` (``ModuleNotFoundError``) when torchvision is not
    installed; use ``pytest.importorskip``-style handling around it.
    """
    for name in STUBBED_MODULES:
        if name not in sys.modules:
            sys.modules[name] = types.ModuleType(name)
    try:
        return importlib.import_module("torchvision")
    except ImportError:
        # Do not leave stubs behind for a package that is not there.
        for name in STUBBED_MODULES:
            mod = sys.modules.get(name)
            if isinstance(mod, types.ModuleType) and not getattr(mod, "__file__", None):
                del sys.modules[name]
        raise
