"""The bounded wait around the librdkafka backend's synchronous commit.

librdkafka's ``commit(asynchronous=False)`` has no timeout. Seen in
``test_faults.py``'s broker outage (2 runs in about 40 under load): after the
broker came back, the group waited in join-state ``wait-unassign-call`` for the
application to serve the rebalance callback, which only ``poll()`` does, while
the loop's thread sat in a commit whose request waited for that same group
(``OffsetCommit ... in join-state wait-unassign-call: manual: returned: Local:
Operation in progress``, every 60 s, for minutes). :class:`WaitLimit` gives the
loop its thread back: the commit goes on on a thread of its own, the caller
gets :class:`CallPending` (a deferred commit to the loop) and polls again.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import pytest

from worker.kafka import ClientConfig, CommitDeferred, TopicPartition
from worker.kafka.confluent import COMMIT_WAIT_S, ConfluentConsumer
from worker.kafka.deadline import CallPending, WaitLimit


def test_a_call_within_the_limit_gives_its_result_or_its_exception() -> None:
    limit = WaitLimit(1.0, "t")
    try:
        assert limit.call(lambda a, b: a + b, 2, 3) == 5
        with pytest.raises(KeyError, match="k"):
            limit.call({}.__getitem__, "k")
        assert limit.call(str, 7) == "7"  # an exception before does not block the next
    finally:
        limit.close()


def test_a_call_past_the_limit_goes_on_and_every_call_waits_until_it_returns() -> None:
    limit = WaitLimit(0.1, "kafka-commit")
    release, order = threading.Event(), []

    def slow() -> str:
        release.wait(10)
        order.append("slow")
        return "late"

    try:
        began = time.monotonic()
        with pytest.raises(CallPending, match=r"kafka-commit: no answer within 0\.1 s"):
            limit.call(slow)
        assert 0.1 <= time.monotonic() - began < 1.0
        # Refused at once while the first is still running: nothing overtakes it.
        began = time.monotonic()
        with pytest.raises(CallPending, match="the call before is still running"):
            limit.call(order.append, "second")
        assert time.monotonic() - began < 0.05
        release.set()
        deadline = time.monotonic() + 5
        while order != ["slow"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert limit.call(order.append, "third") is None
        assert order == ["slow", "third"]
    finally:
        release.set()
        limit.close()


def test_close_ends_the_thread() -> None:
    limit = WaitLimit(1.0, "t")
    limit.call(int)
    limit.close()
    limit._thread.join(5)
    assert not limit._thread.is_alive()


class _BlockedCommit:
    """librdkafka's consumer whose synchronous commit never returns until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls: list[Any] = []

    def commit(self, **kwargs: Any) -> list[Any]:
        self.calls.append(kwargs)
        self.release.wait(10)
        return []

    def close(self) -> None:
        self.release.set()


def test_a_commit_librdkafka_does_not_answer_is_deferred_and_the_loop_gets_its_thread_back(
    kafka_bootstrap: str, group_id: str
) -> None:
    assert 1.0 <= COMMIT_WAIT_S <= 10.0  # longer than a commit takes, shorter than a poll timeout
    consumer = ConfluentConsumer(
        ClientConfig(bootstrap_servers=kafka_bootstrap, group_id=group_id, client_id="c"), {}
    )
    real, blocked = consumer._c, _BlockedCommit()
    consumer._c = blocked
    consumer._commits.seconds = 0.2
    tp = TopicPartition("t", 0)
    try:
        with pytest.raises(CommitDeferred) as deferred:
            consumer.commit({tp: 5}, "run:9")
        assert deferred.value.retriable and deferred.value.name == "COMMIT_PENDING"
        with pytest.raises(CommitDeferred, match="still running"):
            consumer.commit({tp: 6}, "run:9")
        assert len(blocked.calls) == 1  # the second never reached librdkafka
        blocked.release.set()
        deadline = time.monotonic() + 5
        while True:
            try:
                consumer.commit({tp: 6}, "run:9")
                break
            except CommitDeferred:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        assert [c["offsets"][0].offset for c in blocked.calls] == [5, 6]
    finally:
        blocked.release.set()
        consumer._c = real
        consumer.close()


def test_ctrl_c_while_waiting_lets_the_call_finish_so_the_next_one_is_not_refused() -> None:
    """A tool's Ctrl-C lands while its commit waits on the limit's thread; the tool
    then commits what it sent. That commit must not be refused as pending
    (``producers redrive`` exited 1, "the call before is still running")."""
    limit = WaitLimit(5.0, "kafka-commit")
    main = threading.main_thread().ident
    assert main == threading.get_ident()
    done = threading.Event()

    def slow() -> str:
        signal.pthread_kill(main, signal.SIGINT)  # a real Ctrl-C, mid-call
        time.sleep(0.3)
        done.set()
        return "late"

    try:
        with pytest.raises(KeyboardInterrupt):
            limit.call(slow)
        assert done.is_set()  # the interrupt left only once the call returned
        assert limit.call(str, 7) == "7"
    finally:
        limit.close()
