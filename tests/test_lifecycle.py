"""Deadline and the drain watchdog (worker.lifecycle); test_stuck runs them in a process."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import pytest

from tests.fakes import Clock
from worker.lifecycle import STOP_SLACK_S, Deadline, exit_stuck, watch_the_drain


def test_a_deadline_counts_down_on_its_clock_and_caps_what_is_left() -> None:
    clock = Clock()
    d = Deadline(2.0, clock=clock.monotonic, sleep=clock.sleep)
    assert d.left() == 2.0 and d.left(0.5) == 0.5 and not d.passed
    clock.sleep(1.9)
    assert d.left() == pytest.approx(0.1) and d.left(0.5) == pytest.approx(0.1)
    clock.sleep(0.1)
    assert d.passed and d.left() == 0.0
    clock.sleep(5)
    assert d.left() == 0.0  # never negative


def test_wait_checks_every_step_until_the_condition_holds() -> None:
    clock = Clock()
    d = Deadline(1.0, clock=clock.monotonic, sleep=clock.sleep)
    start = clock.now
    assert d.wait(lambda: clock.now >= start + 0.3, 0.1) is True
    assert clock.now == pytest.approx(start + 0.3)


def test_wait_gives_up_when_the_deadline_passes_without_sleeping_past_it() -> None:
    clock = Clock()
    d = Deadline(0.25, clock=clock.monotonic, sleep=clock.sleep)
    start = clock.now
    assert d.wait(lambda: False, 0.1) is False
    assert clock.now == pytest.approx(start + 0.25)


def test_a_met_condition_does_not_wait_even_past_the_deadline() -> None:
    clock = Clock()
    d = Deadline(0.0, clock=clock.monotonic, sleep=clock.sleep)
    assert d.wait(lambda: True, 0.1) is True


def _watch(
    payload: bytes | None, closed: threading.Event, timeout_s: float = 0.05
) -> tuple[list[int], threading.Thread]:
    read_fd, write_fd = os.pipe()
    exits: list[int] = []
    thread = threading.Thread(
        target=watch_the_drain,
        args=(read_fd, closed, timeout_s - STOP_SLACK_S),
        kwargs={"exit_now": exits.append},
        daemon=True,
    )
    thread.start()
    if payload:
        os.write(write_fd, payload)
    os.close(write_fd)
    return exits, thread


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_the_watchdog_ends_the_process_when_a_stop_overruns_the_drain(
    sig: signal.Signals, caplog: pytest.LogCaptureFixture
) -> None:
    exits, thread = _watch(bytes([sig]), threading.Event())
    thread.join(5)
    assert exits == [1]
    assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records] == [
        (
            "worker.lifecycle",
            "ERROR",
            f"still running {0.05:g} s after the stop signal (--drain-timeout "
            f"{0.05 - STOP_SLACK_S:g}): a call into the Kafka client is stuck; exiting "
            "without waiting for it (what was not committed is answered again after a "
            "restart)",
        )
    ]


def test_the_watchdog_sees_the_signal_at_once_with_the_pipe_still_open(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The wakeup pipe stays open while the process lives: one byte must be enough.
    read_fd, write_fd = os.pipe()
    exits: list[int] = []
    thread = threading.Thread(
        target=watch_the_drain,
        args=(read_fd, threading.Event(), 0.05 - STOP_SLACK_S),
        kwargs={"exit_now": exits.append},
        daemon=True,
    )
    thread.start()
    try:
        os.write(write_fd, bytes([signal.SIGTERM]))
        thread.join(2)
        assert exits == [1] and not thread.is_alive()
    finally:
        os.close(write_fd)


def test_exit_stuck_logs_its_reason_as_it_is_and_exits_1(
    caplog: pytest.LogCaptureFixture,
) -> None:
    exits: list[int] = []
    why = "send_offsets_to_transaction(in[0]@7) still blocked 35 s: 100% stuck"
    exit_stuck(why, logger=logging.getLogger("worker.kafka"), exit_now=exits.append)
    assert exits == [1]
    assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records] == [
        ("worker.kafka", "ERROR", why)
    ]


def test_the_watchdog_lets_a_stop_that_closed_in_time_be() -> None:
    closed = threading.Event()
    closed.set()
    exits, thread = _watch(bytes([signal.SIGTERM]), closed)
    thread.join(5)
    assert exits == [] and not thread.is_alive()


def test_the_watchdog_ignores_other_signals_and_returns_when_the_pipe_closes() -> None:
    exits, thread = _watch(bytes([signal.SIGCHLD, signal.SIGUSR1]), threading.Event())
    thread.join(5)
    assert exits == [] and not thread.is_alive()


def test_the_watchdog_allows_the_drain_its_time_and_the_slack_after_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A stop whose clients close after --drain-timeout but within the slack is let be...
    closed = threading.Event()
    exits, thread = _watch(bytes([signal.SIGTERM]), closed, timeout_s=0.2 + STOP_SLACK_S)
    time.sleep(0.6)
    assert thread.is_alive() and exits == []
    closed.set()
    thread.join(5)
    assert exits == []
    # ...one still running after both is ended, and the line says how long it waited
    exits, thread = _watch(bytes([signal.SIGTERM]), threading.Event(), timeout_s=0.2 + STOP_SLACK_S)
    thread.join(10)
    assert exits == [1]
    assert f"still running {0.2 + STOP_SLACK_S:g} s after the stop signal" in caplog.text
    assert "(--drain-timeout 0.2)" in caplog.text
