"""bench/workloads.py's readings of a process from /proc (the probe's CPU per thread)."""

from __future__ import annotations

import os
import threading
import time

import pytest

from bench.workloads import minor_faults, thread_cpu_seconds, thread_groups

linux = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads /proc")


@linux
def test_thread_cpu_counts_a_busy_unnamed_thread_under_the_process_name() -> None:
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(1000))

    before = thread_cpu_seconds(os.getpid())
    thread = threading.Thread(target=spin)
    thread.start()
    time.sleep(0.3)
    after = thread_cpu_seconds(os.getpid())
    stop.set()
    thread.join()
    groups = thread_groups(before, after)
    assert groups["Python threads (loop, inference, metrics)"] >= 0.1
    assert after[""] > before.get("", 0.0)


def test_groups_split_librdkafka_threads_from_the_rest() -> None:
    before = {"": 1.0, "rdk:broker1": 0.5, "rdk:main": 0.1}
    after = {"": 1.5, "rdk:broker1": 0.75, "rdk:broker2": 0.25, "rdk:main": 0.2,
             "jemalloc_bg_thd": 0.0}  # fmt: skip
    assert thread_groups(before, after) == pytest.approx({
        "Python threads (loop, inference, metrics)": 0.5,
        "librdkafka broker threads": 0.5,
        "librdkafka other threads": 0.1,
        "other threads": 0.0,
    })


@linux
def test_minor_faults_grow_when_fresh_memory_is_touched() -> None:
    before = minor_faults(os.getpid())
    block = bytearray(32 << 20)  # 8,192 pages, zeroed: each touched
    assert minor_faults(os.getpid()) - before > 1000
    del block
