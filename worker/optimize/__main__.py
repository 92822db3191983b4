"""``python -m worker.optimize``: the same command as ``inference-worker optimize``."""

from __future__ import annotations

import sys

from worker.optimize.cli import main

sys.exit(main())
