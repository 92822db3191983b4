"""Deadline, the drain watchdog and the stop signals (worker.lifecycle); test_stuck runs them
in a worker process."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.fakes import Clock
from worker.lifecycle import (
    STOP_SLACK_S,
    Deadline,
    exit_stuck,
    install_stop_signals,
    watch_the_drain,
)

ROOT = Path(__file__).resolve().parents[1]


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


def test_the_watchdog_sees_the_signal_at_once_with_the_pipe_still_open() -> None:
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


# -- the stop signals, installed for real -----------------------------------------------


_STOPS = (signal.SIGTERM, signal.SIGINT)


class _Before:
    """A handler for SIGTERM and SIGINT and a wakeup pipe of the test's own, in place
    before the worker installs its own: ``seen``, the signals it got."""

    def __init__(self) -> None:
        self.seen: list[int] = []
        self.read_fd, self.wakeup_fd = os.pipe()
        os.set_blocking(self.wakeup_fd, False)


@pytest.fixture
def before() -> Iterator[_Before]:
    b = _Before()
    saved = {sig: signal.signal(sig, lambda s, _: b.seen.append(s)) for sig in _STOPS}
    saved_fd = signal.set_wakeup_fd(b.wakeup_fd)
    try:
        yield b
    finally:
        signal.set_wakeup_fd(saved_fd)
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        os.close(b.read_fd)
        os.close(b.wakeup_fd)


def _watchdogs(known: Iterable[threading.Thread] = ()) -> list[threading.Thread]:
    """The drain watchdogs running now, but those ``known`` (started before)."""
    return [t for t in threading.enumerate() if t.name == "drain-watchdog" and t not in known]


def test_stop_signals_call_stop_until_the_stack_undoes_them(before: _Before) -> None:
    stops: list[str] = []
    closed = threading.Event()
    known = _watchdogs()
    with ExitStack() as stack:
        stack.callback(closed.set)  # whatever fails, the watchdog never ends the tests
        install_stop_signals(stack, lambda: stops.append("stop"), closed, 30.0)
        [watchdog] = _watchdogs(known)
        assert watchdog.daemon  # it never holds the process's exit
        for sig in _STOPS:
            signal.raise_signal(sig)
        assert stops == ["stop", "stop"] and before.seen == []
        closed.set()  # the drain closed in time: the watchdog lets it be
    watchdog.join(2)
    assert not watchdog.is_alive() and _watchdogs(known) == []
    # undone: the handlers and the wakeup pipe in place before are back
    assert signal.set_wakeup_fd(before.wakeup_fd) == before.wakeup_fd
    for sig in _STOPS:
        signal.raise_signal(sig)
    assert before.seen == list(_STOPS) and stops == ["stop", "stop"]


def test_the_watchdog_returns_when_the_stack_closes_without_a_stop(before: _Before) -> None:
    known = _watchdogs()
    with ExitStack() as stack:
        install_stop_signals(stack, lambda: None, threading.Event(), 30.0)
        [watchdog] = _watchdogs(known)
    watchdog.join(2)
    assert not watchdog.is_alive()


def test_stop_signals_are_left_alone_off_the_main_thread(before: _Before) -> None:
    # an embedded worker: its owner calls stop()
    known = _watchdogs()
    stack = ExitStack()
    thread = threading.Thread(
        target=install_stop_signals, args=(stack, lambda: None, threading.Event(), 30.0)
    )
    thread.start()
    thread.join(5)
    assert _watchdogs(known) == []
    signal.raise_signal(signal.SIGTERM)
    assert before.seen == [signal.SIGTERM]
    stack.close()


_STUCK = """
import logging, sys, threading, time
from contextlib import ExitStack
import worker.lifecycle as lifecycle
lifecycle.STOP_SLACK_S = 0.0
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
with ExitStack() as stack:
    lifecycle.install_stop_signals(
        stack, lambda: print("stop", flush=True), threading.Event(), 0.1
    )
    print("ready", flush=True)
    time.sleep(5)  # stuck: the drain never closes the clients
print("returned", flush=True)
"""


def test_a_stop_signal_that_the_drain_never_follows_ends_the_process() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _STUCK],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 1 and out == "stop\n"
    assert err.startswith(
        "ERROR still running 0.1 s after the stop signal (--drain-timeout 0.1): "
    ), err
