"""Producer-side tools for the inference worker.

``inference-producer`` feeds a worker (``publish``), captures and re-sends
real traffic (``record``, ``replay``), reads the answers (``collect``) and
checks one model version against another (``compare``), and sends dead
letters back to their topic once their cause is fixed (``redrive``). Every
Kafka call is in :mod:`producers.clients`. The wire format is
the worker's own ``worker.protocol``, so the tools cannot drift from it.
"""

from __future__ import annotations

from importlib import metadata

from producers.errors import ProducerError, UsageError

__all__ = ["ProducerError", "UsageError", "__version__"]

try:
    __version__ = metadata.version("inference-worker")
except metadata.PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0+unknown"
