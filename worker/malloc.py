"""glibc's malloc told to keep large freed blocks for the next message.

Every request the worker reads is one or more large blocks: librdkafka's fetch
buffers on its broker threads, the copy of each value into a Python ``bytes``, a
coalesced batch, the run's outputs. glibc serves a block above its mmap threshold
(128 KiB, raised on each free up to 32 MiB) with a fresh ``mmap`` and hands it back
with ``munmap`` when freed, and it returns the top of a heap to the kernel once more
than the trim threshold lies free there. Either way the next message's block is new
memory: the kernel zeroes it and takes a page fault per page touched. At 256-row
requests (800 kB each) that was 47-95 minor faults and about a tenth of the
process's CPU per message (docs/performance.md).

:func:`keep_freed_memory` raises both thresholds for the whole process
(``mallopt``), so such blocks come from the heap and go back to it. The process's
resident size then stays near its peak instead of shrinking between bursts, and
the peak is some tens of MiB higher (what the heaps keep; docs/performance.md).
An operator who set glibc's own variables
(``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``GLIBC_TUNABLES``'
``glibc.malloc`` ones) keeps them: nothing is changed then. On another C library
(musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
from collections.abc import Mapping

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "keep_freed_memory"]

log = logging.getLogger(__name__)

# Blocks below this come from the heap: above a 64 MiB fetch (``fetch.max.bytes``'
# default) and a 16 MiB message. glibc's own ceiling for it is 32 MiB on 64-bit.
MMAP_THRESHOLD = 128 * 1024 * 1024
# Free memory at a heap's top kept, not returned to the kernel.
TRIM_THRESHOLD = 256 * 1024 * 1024

# <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_OPERATORS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_freed_memory(environ: Mapping[str, str] = os.environ) -> bool:
    """Raise glibc's mmap and trim thresholds; True when both were set."""
    if platform.libc_ver()[0] != "glibc":
        return False
    if any(name in environ for name in _OPERATORS) or "glibc.malloc." in environ.get(
        "GLIBC_TUNABLES", ""
    ):
        log.debug("malloc: the environment's thresholds kept")
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # An older glibc refuses an mmap threshold above 32 MiB (HEAP_MAX_SIZE / 2): then that.
    mapped = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) or mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    done = bool(mapped) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not done:
        log.warning("malloc: glibc refused the thresholds; large blocks are mapped per use")
    return done
