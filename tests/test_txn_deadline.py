"""The deadline around the librdkafka backend's transactional calls (librdkafka#5456).

:class:`CallDeadline` on its own, with the process's ending injected; then the
backend itself in a process of its own (``tests/stuck_txn_producer.py``): a
``confluent_kafka.Producer`` whose one transactional call blocks past the
deadline must end that process with status 1 and one line naming the call and
the upstream issue, and a call that returns within it must not.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time

import pytest

from tests.harness import ROOT
from tests.stuck_txn_producer import CALLS, DEADLINE_S
from worker.kafka.confluent import TXN_CALL_TIMEOUT_S, TXN_DEADLINE_MARGIN_S, txn_deadline_s
from worker.kafka.deadline import CallDeadline


def _deadline(seconds: float) -> tuple[CallDeadline, list[int], threading.Event]:
    exits: list[int] = []
    ended = threading.Event()

    def exit_now(rc: int) -> None:
        exits.append(rc)
        ended.set()

    return CallDeadline(seconds, "the reason", exit_now=exit_now), exits, ended


def test_a_call_past_its_deadline_ends_the_process_with_one_line_naming_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    deadline, exits, ended = _deadline(0.2)
    start = time.monotonic()
    with caplog.at_level(logging.ERROR, "worker.kafka"), deadline.watch("stuck_call(t[0]@3)"):
        assert ended.wait(5), "the deadline never fired"
    assert exits == [1]
    assert time.monotonic() - start >= 0.2
    (line,) = [r.getMessage() for r in caplog.records if r.name == "worker.kafka"]
    assert line == "stuck_call(t[0]@3) still blocked 0.2 s after it was called: the reason"


def test_calls_that_return_in_time_never_end_it_however_many_follow() -> None:
    deadline, exits, ended = _deadline(0.5)
    start = time.monotonic()
    while time.monotonic() - start < 1.5:  # each call is re-armed, not the first one's
        with deadline.watch("quick_call"):
            time.sleep(0.05)
    assert not ended.wait(1.0)  # idle, past every deadline
    assert exits == []
    deadline.close()


def test_close_stops_the_thread_and_a_closed_deadline_never_fires() -> None:
    deadline, exits, ended = _deadline(0.1)
    deadline.close()
    assert not deadline._thread.is_alive()
    with deadline.watch("after_close"):
        assert not ended.wait(0.3)
    assert exits == []


def test_the_deadline_is_past_the_call_timeout_and_the_transaction_timeout() -> None:
    # The worker's own transaction.timeout.ms (10 s) is shorter than the calls' 30 s.
    assert txn_deadline_s({"transaction.timeout.ms": 10_000}, 30.0, 5.0) == 35.0
    assert txn_deadline_s({"transaction.timeout.ms": "90000"}, 30.0, 5.0) == 95.0
    assert txn_deadline_s({}, 30.0, 5.0) == 65.0  # librdkafka's default, 60 s
    assert (TXN_CALL_TIMEOUT_S, TXN_DEADLINE_MARGIN_S) == (30.0, 5.0)


def _run(call: str, seconds: float) -> tuple[int, str, str, float]:
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "tests.stuck_txn_producer", call, str(seconds)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )
    return done.returncode, done.stdout, done.stderr, time.monotonic() - start


@pytest.mark.parametrize("call", CALLS)
def test_a_transactional_call_blocked_past_its_deadline_exits_1_naming_the_call_and_issue(
    call: str,
) -> None:
    rc, out, err, took = _run(call, 30.0)
    assert rc == 1, err
    assert "done" not in out
    stuck = [line for line in err.splitlines() if "still blocked" in line]
    assert len(stuck) == 1, err
    assert f"worker.kafka:{call}" in stuck[0]
    assert f"still blocked {DEADLINE_S:g} s after it was called" in stuck[0]
    assert "librdkafka#5456" in stuck[0] and "exiting with status 1" in stuck[0]
    if call == "send_offsets_to_transaction":
        assert "send_offsets_to_transaction(in[0]@5)" in stuck[0]
    assert DEADLINE_S <= took < 20, f"exited after {took:.1f} s"


def test_a_call_slower_than_its_timeout_but_within_the_transaction_timeout_is_waited_for() -> None:
    # 1.2 s: past the call's 0.2 s timeout + margin, within transaction.timeout.ms + margin.
    rc, out, err, _ = _run("send_offsets_to_transaction", 1.2)
    assert (rc, out) == (0, "done\n"), err
    assert "still blocked" not in err
