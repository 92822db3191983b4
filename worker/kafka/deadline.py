"""A deadline around a client's blocking calls: past it, the process ends.

A call into a Kafka client that ignores its own timeout holds the loop's
thread, and nothing in Python can interrupt it. :class:`CallDeadline` watches
one call at a time from a thread of its own: when a call is still running
``seconds`` after it began, the process ends with status 1 through
:func:`worker.lifecycle.exit_stuck`, the stop watchdog's own ending, as safe
as kill -9 (offsets are committed only after their answers, so a restart
answers again what was not committed). The librdkafka backend puts one around
its transactional calls (:mod:`worker.kafka.confluent`).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from worker.lifecycle import Deadline, exit_stuck

__all__ = ["CallDeadline"]

log = logging.getLogger("worker.kafka")


class CallDeadline:
    """Ends the process when a call made under :meth:`watch` outlives ``seconds``.

    One daemon thread per instance, asleep while no call runs; ``why`` ends the
    log line (the reason the call may hang and what exiting costs).
    """

    def __init__(
        self, seconds: float, why: str, *, exit_now: Callable[[int], object] = os._exit
    ) -> None:
        self.seconds, self._why, self._exit_now = seconds, why, exit_now
        self._changed = threading.Condition()
        self._call: tuple[str, Deadline] | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="call-deadline", daemon=True)
        self._thread.start()

    @contextmanager
    def watch(self, call: str) -> Iterator[None]:
        """Run the body as ``call`` (its name in the log line) under the deadline."""
        with self._changed:
            self._call = (call, Deadline(self.seconds))
            self._changed.notify()
        try:
            yield
        finally:
            with self._changed:
                self._call = None

    def close(self) -> None:
        """Stop the thread (no call may run under :meth:`watch` after this)."""
        with self._changed:
            self._closed = True
            self._changed.notify()
        self._thread.join(5)

    def _run(self) -> None:
        with self._changed:
            while True:
                if self._closed:
                    return
                if self._call is None:
                    self._changed.wait()
                    continue
                call, deadline = self._call
                if deadline.passed:
                    break
                self._changed.wait(deadline.left())
        exit_stuck(
            f"{call} still blocked {self.seconds:g} s after it was called: {self._why}",
            logger=log,
            exit_now=self._exit_now,
        )
