"""Producer-side tools for the inference worker (spec §5).

``inference-producer`` feeds a worker (``publish``), captures and re-sends
real traffic (``record``, ``replay``), reads the answers (``collect``) and
checks one model version against another (``compare``). The wire format is
the worker's own ``worker.protocol``, so the tools cannot drift from it.
"""

from __future__ import annotations

from producers.errors import ProducerError, UsageError

__all__ = ["ProducerError", "UsageError"]
