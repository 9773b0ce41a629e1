"""``python -m models`` is an alias for ``python -m models.export``."""

from __future__ import annotations

import sys

from models.export import main

if __name__ == "__main__":
    sys.exit(main())
