"""``python -m spa`` is the ``spa`` command."""

from spa.cli import main

raise SystemExit(main())
