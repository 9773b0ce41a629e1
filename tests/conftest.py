from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
# --round-to auto (the default) rounds conv groups to the CPU's kernel block: the same block on
# every machine, so that the suite's channel counts do not depend on the CPU it runs on.
os.environ.setdefault("SPA_KERNEL_BLOCK", "16")
