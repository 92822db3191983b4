r"""inference-worker: ONNX models on a Kafka stream.

The flow, one module per stage (see README for the picture)::

    kafka.py -> protocol/ -> batching.py -> cache.py/runtime.py -> protocol/ -> kafka.py
                             \______________ loop.py drives it all ______________/
"""

from __future__ import annotations

from importlib import metadata

__all__ = ["__version__"]

try:
    __version__ = metadata.version("inference-worker")
except metadata.PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0+unknown"
