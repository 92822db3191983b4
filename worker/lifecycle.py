"""Stopping: signals become ``stop()``, a watchdog bounds the drain, one ``Deadline``.

SIGTERM and SIGINT call the worker's ``stop()``; the loop then drains within
``--drain-timeout``. That handler runs only once the loop's thread is back in
Python: a call stuck in the Kafka client (librdkafka holds a commit for a
whole rebalance, and a group whose other member hangs does not settle for its
session timeout) would hold the stop past the drain's time. So Python's
C-level handler also writes the signal to a pipe at once, and a watchdog
thread ends the process when the drain's time and :data:`STOP_SLACK_S` are
up, as kill -9 would, which loses nothing: offsets only follow answers.
:func:`exit_stuck` is that ending, shared with the librdkafka backend's
deadline on its transactional calls (:mod:`worker.kafka.deadline`).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack

__all__ = [
    "STOP_SLACK_S",
    "Deadline",
    "exit_stuck",
    "install_stop_signals",
    "watch_the_drain",
]

log = logging.getLogger(__name__)

# Past --drain-timeout, the time a stop may take to close the clients before the
# watchdog ends the process.
STOP_SLACK_S = 2.0
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Deadline:
    """A point ``seconds`` from now on ``clock``: for every bounded wait of the loop."""

    __slots__ = ("_at", "_clock", "_sleep")

    def __init__(
        self,
        seconds: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._clock, self._sleep = clock, sleep
        self._at = clock() + seconds

    def left(self, cap: float | None = None) -> float:
        """Seconds left (never negative), at most ``cap``."""
        left = max(0.0, self._at - self._clock())
        return left if cap is None else min(cap, left)

    @property
    def passed(self) -> bool:
        return self._clock() >= self._at

    def wait(self, until: Callable[[], bool], step_s: float) -> bool:
        """Check ``until`` every ``step_s`` until it holds (True) or this passes (False)."""
        while not until():
            if self.passed:
                return False
            self._sleep(self.left(step_s))
        return True


def install_stop_signals(
    stack: ExitStack, stop: Callable[[], None], closed: threading.Event, drain_timeout_s: float
) -> None:
    """SIGTERM/SIGINT call ``stop``, and start the drain watchdog; ``stack`` undoes
    both. Only on the main thread (an embedded worker's owner calls ``stop()``)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in _STOP_SIGNALS:
        previous = signal.signal(sig, lambda *_: stop())
        stack.callback(signal.signal, sig, previous)
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    stack.callback(os.close, write_fd)  # the watchdog's read ends: it returns
    stack.callback(signal.set_wakeup_fd, signal.set_wakeup_fd(write_fd))
    threading.Thread(
        target=watch_the_drain,
        args=(read_fd, closed, drain_timeout_s),
        name="drain-watchdog",
        daemon=True,
    ).start()


def watch_the_drain(
    read_fd: int,
    closed: threading.Event,
    drain_timeout_s: float,
    *,
    exit_now: Callable[[int], object] = os._exit,
) -> None:
    """Wait for a stop signal on ``read_fd``; then, unless ``closed`` is set within
    the drain's time and its slack, end the process with status 1."""
    with open(read_fd, "rb", buffering=0) as signals:
        while (got := signals.read(64)) and not set(_STOP_SIGNALS) & set(got):
            pass
    if not got or closed.wait(drain_timeout_s + STOP_SLACK_S):
        return  # stopped in time (or never asked to)
    exit_stuck(
        f"still running {drain_timeout_s + STOP_SLACK_S:g} s after the stop signal "
        f"(--drain-timeout {drain_timeout_s:g}): a call into the Kafka client is stuck; "
        "exiting without waiting for it (what was not committed is answered again after "
        "a restart)",
        exit_now=exit_now,
    )


def exit_stuck(
    why: str, *, logger: logging.Logger = log, exit_now: Callable[[int], object] = os._exit
) -> None:
    """Log ``why`` and end the process at once with status 1, as kill -9 would: the
    stuck call's thread is never waited for, and nothing is lost, because offsets are
    committed only after their answers."""
    logger.error("%s", why)
    logging.shutdown()
    exit_now(1)
