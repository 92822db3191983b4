"""glibc's malloc keeps large freed blocks (worker/malloc.py): measured in page faults.

Each case runs in its own interpreter (the thresholds are process-wide), allocates
and frees a 40 MiB block 20 times, touching every page, and counts the minor page
faults: with glibc's defaults each block is a fresh mapping (10,240 faults each),
after ``keep_freed_memory`` the heap's block is reused.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from worker.malloc import keep_freed_memory

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")

_PROBE = """
import resource, sys
from worker.malloc import keep_freed_memory
print(keep_freed_memory())
block = b"x" * (40 << 20)  # the first one: always new memory
del block
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    block = b"x" * (40 << 20)
    del block
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(**env: str) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_"))}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split()
    return out[0], int(out[1])


def test_freed_large_blocks_are_reused_not_mapped_again() -> None:
    done, faults = _faults()
    assert done == "True"
    assert faults < 2_000, f"{faults} page faults for 20 reused 40 MiB blocks"


def test_glibcs_defaults_map_each_large_block_again() -> None:
    # The control: what the thresholds save (the probe's first line says they were
    # left alone, since the operator's variable is set, here to glibc's default).
    done, faults = _faults(MALLOC_MMAP_THRESHOLD_="131072")
    assert done == "False"
    assert faults > 20 * 10_000 * 0.9


def test_an_operators_malloc_settings_are_left_alone() -> None:
    assert keep_freed_memory({"MALLOC_TRIM_THRESHOLD_": "0"}) is False
    assert keep_freed_memory({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=4096"}) is False
