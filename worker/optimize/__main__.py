"""``python -m worker.optimize``: the same command as ``inference-worker optimize``."""

from __future__ import annotations

import sys

from worker.optimize.cli import main

__all__: list[str] = []

if __name__ == "__main__":  # guarded: tools that walk the package import this module too
    sys.exit(main())
